"""The keys of a web config file (exporter-toolkit's format), parsed and typed.

Imported only where a web config file is read: pydantic is not part of a daemon without one
(`exporter.serve`). What the values mean is checked by `exporter.web.webconfig`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError


class FieldsError(ValueError):
    """The first problem with the file's keys, and how many more there are."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TlsFields(_Strict):
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: Literal[
        "NoClientCert", "RequestClientCert", "RequireAnyClientCert", "RequireClientCert",
        "VerifyClientCertIfGiven", "RequireAndVerifyClientCert",
    ] = "NoClientCert"  # fmt: skip
    client_ca_file: str | None = None
    min_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS12"
    max_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS13"


class HttpFields(_Strict):
    http2: bool = True  # accepted for compatibility; this server speaks HTTP/1.x
    headers: dict[str, str] | None = None


class FileFields(_Strict):
    tls_server_config: TlsFields | None = None
    http_server_config: HttpFields | None = None
    basic_auth_users: dict[str, str] | None = None


def file_fields(data: dict[Any, Any]) -> FileFields:
    try:
        return FileFields.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        key = ".".join(str(part) for part in errors[0]["loc"])
        if errors[0]["type"] == "extra_forbidden":
            problem = "unknown key"
        else:
            problem = str(errors[0]["msg"]).removeprefix("Value error, ")
        more = len(errors) - 1
        raise FieldsError(key, problem + (f" (and {more} more problems)" if more else "")) from None

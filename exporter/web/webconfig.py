"""`--web.config.file`: TLS, basic auth and response headers in exporter-toolkit's format.

Go exporters read this file through prometheus/exporter-toolkit, so one file (and one
Prometheus scrape config) serves them all. It is watched: a change to it or to the files it
names applies to the next connection; a bad change keeps the last good one and is logged
and counted, as blackbox_exporter does with its own config.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.core import Metric as Family

from exporter.collectors.catalogue import LAST_WEB_CONFIG_RELOAD_SUCCESS, WEB_CONFIG_RELOAD_SUCCESS
from exporter.config.errors import ConfigError
from exporter.web.endpoint import StartResponse, WsgiApp

if TYPE_CHECKING:
    from exporter.web.webconfig_fields import TlsFields

log = structlog.get_logger(__name__)

# Changes are looked for at most this often, on a request: a stat() per file, no reading.
CHECK_INTERVAL_SECONDS = 1.0
# Long enough to spare bcrypt on most scrapes at Prometheus' default 1 min interval. A changed
# or removed user need not wait for it: the cache key holds the stored hash.
AUTH_CACHE_SECONDS = 120.0
AUTH_CACHE_SIZE = 256
REALM = "llama-speed-exporter"

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go's crypto/tls can ask for a client certificate and not verify it; Python's ssl cannot.
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# exporter-toolkit's list: only these headers, and for two of them only these values.
HEADERS: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
# Keys of the format this exporter does not implement: named as such, not as unknown keys,
# so that a file shared with Go exporters fails with the reason.
_UNSUPPORTED: Mapping[str, str] = {
    "tls_server_config.cert": "inline PEM is not supported here; use cert_file",
    "tls_server_config.key": "inline PEM is not supported here; use key_file",
    "tls_server_config.client_ca": "inline PEM is not supported here; use client_ca_file",
    "tls_server_config.cipher_suites": "Go cipher suite names are not supported here",
    "tls_server_config.curve_preferences": "Go curve names are not supported here",
    "tls_server_config.prefer_server_cipher_suites": "not supported here",
    "tls_server_config.client_allowed_sans": "not supported here",
    "rate_limit": "not supported here",
}
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")


class WebConfigError(ConfigError):
    """A problem in the web config file, naming the file and the key in it."""

    def __init__(self, path: Path, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.path = path
        self.files: tuple[tuple[Path, object], ...] = ()

    def __str__(self) -> str:
        where = f"{self.path}: {self.key}" if self.key else str(self.path)
        return f"web.config_file: {where}: {self.problem}"


def file_signature(path: Path) -> object:
    """What changes when a file is written or replaced (an editor's rename, a k8s symlink swap)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


@dataclass(frozen=True)
class WebConfig:
    path: Path
    tls: ssl.SSLContext | None
    users: Mapping[str, bytes]
    headers: tuple[tuple[str, str], ...]
    # Every file read, with its signature taken before the read: what a reload watches.
    files: tuple[tuple[Path, object], ...]
    # Checked against for unknown users, so that timing does not tell which users exist.
    decoy_hash: bytes
    # The file held nothing (or only blanks and comments): the defaults, no TLS and no auth.
    empty: bool = False


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: list[tuple[Path, object]] = []

    def error(self, key: str, problem: str) -> WebConfigError:
        exc = WebConfigError(self.path, key, problem)
        exc.files = tuple(self.files)
        return exc

    def read(self, path: Path, key: str) -> bytes:
        self.files.append((path, file_signature(path)))
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self.error(key, f"cannot read {path}: {exc.strerror or exc}") from None

    def resolve(self, value: str, key: str) -> Path:
        """exporter-toolkit's rule: a relative path is relative to the config file."""
        if not value:
            raise self.error(key, "must not be empty")
        path = Path(value)
        return path if path.is_absolute() else self.path.parent / path

    def load(self) -> WebConfig:
        # Only with a web config file: yaml, and pydantic for the file's keys, are some 10 MiB
        # that a daemon without one never loads (exporter.serve).
        import yaml  # noqa: PLC0415

        from exporter.web.webconfig_fields import FieldsError, HttpFields, file_fields  # noqa: PLC0415

        raw = self.read(self.path, "")
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark is not None else ""
            raise self.error("", f"not valid YAML{line}") from None
        empty = data is None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error("", "must hold a mapping at the top level")
        self._check_unsupported(data)
        try:
            fields = file_fields(data)
        except FieldsError as exc:
            raise self.error(exc.key, exc.problem) from None
        tls = self._tls(fields.tls_server_config) if fields.tls_server_config else None
        users = self._users(fields.basic_auth_users or {})
        http = fields.http_server_config or HttpFields()
        headers = self._headers(http.headers or {})
        cost = max((int(h[4:6]) for h in users.values()), default=4)
        # A well-formed hash of nothing: checking any password against it costs what a real
        # user's check costs, and never matches.
        decoy = f"$2b${cost:02d}$".encode() + b"." * 53
        return WebConfig(self.path, tls, users, headers, tuple(self.files), decoy, empty)

    def _check_unsupported(self, data: dict[Any, Any]) -> None:
        tls = data.get("tls_server_config")
        present = {k for k in data if isinstance(k, str)}
        if isinstance(tls, dict):
            present |= {f"tls_server_config.{k}" for k in tls if isinstance(k, str)}
        for key, why in _UNSUPPORTED.items():
            if key in present:
                raise self.error(key, why)

    def _tls(self, tls: TlsFields) -> ssl.SSLContext | None:
        if not tls.model_fields_set:
            return None  # an empty tls_server_config, as exporter-toolkit reads it: no TLS
        key = "tls_server_config"
        if tls.cert_file is None:
            raise self.error(f"{key}.cert_file", "required when tls_server_config is set")
        if tls.key_file is None:
            raise self.error(f"{key}.key_file", "required when tls_server_config is set")
        cert = self.resolve(tls.cert_file, f"{key}.cert_file")
        private = self.resolve(tls.key_file, f"{key}.key_file")
        cert_pem = self.read(cert, f"{key}.cert_file")
        self.read(private, f"{key}.key_file")  # named in the error if missing; watched
        if not _holds_certificate(cert_pem):
            raise self.error(f"{key}.cert_file", f"{cert} holds no PEM certificate")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        minimum, maximum = TLS_VERSIONS[tls.min_version], TLS_VERSIONS[tls.max_version]
        if minimum > maximum:
            raise self.error(f"{key}.min_version", f"is above max_version {tls.max_version}")
        context.minimum_version, context.maximum_version = minimum, maximum
        # The stdlib server below speaks HTTP/1.x; say so rather than leave h2 to be guessed.
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(cert, private)
        except ssl.SSLError as exc:
            problem = (
                f"{private} is not the private key of {cert}"
                if exc.reason == "KEY_VALUES_MISMATCH"
                else f"{private} holds no PEM private key"
            )
            raise self.error(f"{key}.key_file", problem) from None
        except OSError as exc:  # removed between the read above and this one
            raise self.error(f"{key}.cert_file", exc.strerror or str(exc)) from None
        self._client_auth(tls, context)
        return context

    def _client_auth(self, tls: TlsFields, context: ssl.SSLContext) -> None:
        key = "tls_server_config"
        if tls.client_auth_type in _UNVERIFIED_CLIENT_AUTH:
            raise self.error(
                f"{key}.client_auth_type",
                f"{tls.client_auth_type} is not supported here (Python's ssl always verifies "
                "a client certificate it asks for): use RequireAndVerifyClientCert",
            )
        context.verify_mode = CLIENT_AUTH[tls.client_auth_type]
        if tls.client_ca_file is None:
            if context.verify_mode != ssl.CERT_NONE:
                raise self.error(f"{key}.client_ca_file", f"required with {tls.client_auth_type}")
            return
        if context.verify_mode == ssl.CERT_NONE:
            raise self.error(
                f"{key}.client_ca_file",
                "set without a client_auth_type that verifies client certificates",
            )
        path = self.resolve(tls.client_ca_file, f"{key}.client_ca_file")
        ca_pem = self.read(path, f"{key}.client_ca_file")
        if not _holds_certificate(ca_pem):
            raise self.error(f"{key}.client_ca_file", f"{path} holds no PEM certificate")
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))

    def _users(self, users: dict[str, str]) -> dict[str, bytes]:
        for name, hashed in users.items():
            key = f"basic_auth_users.{name}"
            match = _BCRYPT.fullmatch(hashed)
            if match is None:
                raise self.error(key, "is not a bcrypt hash ($2y$10$ and 53 more characters)")
            if not 4 <= int(match.group(1)) <= 31:
                raise self.error(key, "bcrypt cost must be 4 to 31")
            if not name or ":" in name:
                raise self.error(key, "a basic auth user name must be non-empty, without ':'")
        return {name: hashed.encode() for name, hashed in users.items()}

    def _headers(self, headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
        for name, value in headers.items():
            key = f"http_server_config.headers.{name}"
            if name not in HEADERS:
                raise self.error(key, f"cannot be set; allowed: {', '.join(HEADERS)}")
            allowed = HEADERS[name]
            if allowed and value not in allowed:
                raise self.error(key, f"must be one of {', '.join(allowed)}")
            if "\r" in value or "\n" in value:
                raise self.error(key, "must be one line")
        return tuple((name, value) for name, value in headers.items() if value)


def _holds_certificate(pem: bytes) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError):  # UnicodeDecodeError is a ValueError
        return False
    return True


def load_web_config(path: Path) -> WebConfig:
    """Read and check the file and every file it names; problems become a WebConfigError."""
    return _Loader(path).load()


def _changed(files: Iterable[tuple[Path, object]]) -> bool:
    return any(file_signature(path) != signature for path, signature in files)


class ReloadableWebConfig:
    """The web config in force; `current()` picks up changes, at most once a second."""

    def __init__(
        self,
        path: Path,
        *,
        check_interval: float = CHECK_INTERVAL_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._config = load_web_config(path)  # a bad file at startup is a config error
        self._watched = self._config.files
        self._check_interval = check_interval
        self._monotonic = monotonic
        self._wall = wall
        self._checked = monotonic()
        self._lock = threading.Lock()
        self.reload_success = True
        self.last_success = wall()
        log.info(
            "web_config_loaded", file=str(path), tls=self.tls_enabled,
            basic_auth_users=len(self._config.users),
        )  # fmt: skip

    @property
    def tls_enabled(self) -> bool:
        return self._config.tls is not None

    def current(self) -> WebConfig:
        # Whoever finds a check due does it; the others go on with the config in force.
        if self._monotonic() - self._checked >= self._check_interval and self._lock.acquire(
            blocking=False
        ):
            try:
                self._checked = self._monotonic()
                if _changed(self._watched):
                    self._reload()
            finally:
                self._lock.release()
        return self._config

    def tls_context(self) -> ssl.SSLContext:
        """The context for a new connection; only for a server started with TLS."""
        context = self.current().tls
        if context is None:
            raise RuntimeError("the web config has no TLS")  # reloads never turn TLS off
        return context

    def _reload(self) -> None:
        try:
            config = load_web_config(self.path)
        except WebConfigError as exc:
            # Watch what the bad file read, so that fixing it (or a file it names) is seen,
            # while an unchanged bad file is not retried and logged every second.
            self._failed(exc, exc.files)
            return
        if config.empty and not self._config.empty:
            # At startup an empty file means the defaults, as in exporter-toolkit. On a
            # reload it is more likely a file caught half-written, and taking it would turn
            # basic auth off without a word: it is refused like any bad file.
            problem = "is empty: a reload keeps the config in force (restart to clear it)"
            self._failed(WebConfigError(self.path, "", problem), config.files)
            return
        if (config.tls is None) != (self._config.tls is None):
            problem = "turning TLS on or off needs a restart of the exporter"
            self._failed(WebConfigError(self.path, "tls_server_config", problem), config.files)
            return
        self._config, self._watched = config, config.files
        self.reload_success = True
        self.last_success = self._wall()
        log.info(
            "web_config_reloaded", file=str(self.path), tls=config.tls is not None,
            basic_auth_users=len(config.users),
        )  # fmt: skip

    def _failed(self, exc: WebConfigError, files: tuple[tuple[Path, object], ...]) -> None:
        self._watched = files
        self.reload_success = False
        log.error("web_config_reload_failed", file=str(self.path), error=str(exc))

    def collect(self) -> Iterator[Family]:
        """Its reload metrics, for the exporter's registry."""
        success = WEB_CONFIG_RELOAD_SUCCESS.family()
        success.add_metric([], 1.0 if self.reload_success else 0.0)
        last = LAST_WEB_CONFIG_RELOAD_SUCCESS.family()
        last.add_metric([], self.last_success)
        yield from (success, last)


class BasicAuth:
    """bcrypt checks of `Authorization: Basic`, with recent successes cached.

    bcrypt is slow on purpose (about 70 ms at cost 10), too slow to run on every scrape; a
    success is remembered under a keyed hash of the user, its stored hash and the password,
    so a changed or removed user stops matching at once.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, float] = {}  # key -> expiry
        self._cache_lock = threading.Lock()
        # One bcrypt at a time, as exporter-toolkit does: guessing cannot take every core.
        self._bcrypt_lock = threading.Lock()

    def check(self, config: WebConfig, authorization: str | None) -> bool:
        credentials = parse_basic(authorization)
        if credentials is None:
            return False
        user, password = credentials
        stored = config.users.get(user)
        known = stored is not None
        hashed = stored if stored is not None else config.decoy_hash
        key = self._cache_key(user, hashed, password)
        now = self._monotonic()
        with self._cache_lock:
            expiry = self._cache.get(key)
        if known and expiry is not None and expiry > now:
            return True
        import bcrypt  # noqa: PLC0415 - only where basic auth is configured

        with self._bcrypt_lock:
            try:
                ok = bcrypt.checkpw(password, hashed)
            except ValueError:  # over bcrypt's 72 bytes, or a hash bcrypt will not take
                ok = False
        if not (ok and known):
            return False
        with self._cache_lock:
            if len(self._cache) >= AUTH_CACHE_SIZE:
                self._cache = {k: t for k, t in self._cache.items() if t > now}
                while len(self._cache) >= AUTH_CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]  # the oldest
            self._cache[key] = now + AUTH_CACHE_SECONDS
        return True

    def _cache_key(self, user: str, hashed: bytes, password: bytes) -> bytes:
        digest = hashlib.blake2b(key=self._key)
        for part in (user.encode(), hashed, password):
            digest.update(len(part).to_bytes(4, "big") + part)
        return digest.digest()


def parse_basic(authorization: str | None) -> tuple[str, bytes] | None:
    """User and password of an `Authorization: Basic` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


def secure_app(
    app: WsgiApp,
    web_config: ReloadableWebConfig,
    open_paths: frozenset[str] = frozenset({"/healthz"}),
    auth: BasicAuth | None = None,
) -> WsgiApp:
    """The app behind the web config's basic auth and headers; `open_paths` need no user."""
    checker = auth or BasicAuth()

    def secured(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        config = web_config.current()

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [*headers, *config.headers], exc_info)

        path = environ.get("PATH_INFO", "/")
        if (
            config.users
            and path not in open_paths
            and not checker.check(config, environ.get("HTTP_AUTHORIZATION"))
        ):
            start(
                "401 Unauthorized",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),
                ],
            )
            return [b"Unauthorized\n"]
        return app(environ, start)

    return secured

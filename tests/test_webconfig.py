"""`--web.config.file`: TLS, basic auth, headers and reloads, on the real daemon over sockets.

The daemon runs against the fake llama-server; certificates are made with the openssl CLI
for each session, hashes with the bcrypt package at its lowest cost, to keep tests fast.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
import yaml

from exporter.cli import parse
from exporter.config import Config, ConfigError
from exporter.daemon import Daemon
from exporter.llama.client import LlamaClient, ServerError
from exporter.web import webconfig
from exporter.web.endpoint import WebServer
from exporter.web.webconfig import (
    AUTH_CACHE_SECONDS,
    BasicAuth,
    ReloadableWebConfig,
    load_web_config,
    parse_basic,
)
from tests.daemon_harness import fast_target, running_daemon, sample
from tests.fakes import FakeLlama

RELOAD_DEADLINE_S = 15.0


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def write_web_config(path: Path, data: dict[str, Any] | str) -> Path:
    """Replace the file at once, as an editor or a config manager does."""
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    partial = path.with_name(path.name + ".new")
    partial.write_text(text)
    os.replace(partial, path)
    return path


def tls_and_users(**users: str) -> dict[str, Any]:
    return {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
        "basic_auth_users": {name: bcrypt_hash(password) for name, password in users.items()},
    }


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


@contextmanager
def secured_daemon(web_config: Path) -> Iterator[tuple[Daemon, int]]:
    """`running_daemon` with a web config file; yields the daemon and its port."""
    fake = FakeLlama()
    targets = [fast_target("t", "http://llama")]
    with running_daemon(targets, lambda t: fake.transport(), web_config_file=web_config) as (
        daemon,
        _,
    ):
        yield daemon, daemon.web.port


def eventually(check: Callable[[], bool], what: str, timeout: float = RELOAD_DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)  # poll interval inside the deadline


def status(url: str, verify: ssl.SSLContext, auth: tuple[str, str] | None = None) -> int:
    return httpx.get(url, verify=verify, auth=auth, timeout=5).status_code


def test_https_with_password_and_the_refusals(
    tls_dir: Path,
    certificates: dict[str, tuple[Path, Path]],
    capfd: pytest.CaptureFixture[str],
) -> None:
    config = tls_and_users(alice="wonderland")
    config["http_server_config"] = {"headers": {"X-Content-Type-Options": "nosniff"}}
    web = write_web_config(tls_dir / "web.yml", config)
    ca = trusting(certificates["server"][0])
    with secured_daemon(web) as (_, port):
        base = f"https://localhost:{port}"
        ok = httpx.get(f"{base}/metrics", verify=ca, auth=("alice", "wonderland"), timeout=5)
        assert ok.status_code == 200
        assert sample(ok.text, "llama_speed_web_config_reload_success") == 1.0
        assert "llama_speed_exporter_build_info" in ok.text
        assert ok.headers["X-Content-Type-Options"] == "nosniff"
        ip = httpx.get(f"https://127.0.0.1:{port}/", verify=ca, auth=("alice", "wonderland"))
        assert ip.status_code == 200 and "llama-speed-exporter" in ip.text

        for auth in (None, ("alice", "wrong"), ("bob", "wonderland"), ("alice", "")):
            for path in ("/metrics", "/", "/nope"):
                refused = httpx.get(f"{base}{path}", verify=ca, auth=auth, timeout=5)
                assert refused.status_code == 401, (auth, path)
                assert refused.headers["WWW-Authenticate"].startswith("Basic realm=")
                assert "llama_speed" not in refused.text
        bearer = {"Authorization": "Bearer wonderland"}
        assert httpx.get(f"{base}/metrics", verify=ca, headers=bearer).status_code == 401

        health = httpx.get(f"{base}/healthz", verify=ca, timeout=5)
        assert (health.status_code, health.text) == (200, "ok\n")

        # Plain HTTP on the TLS port: Go's answer, never the metrics.
        plain = httpx.get(f"http://127.0.0.1:{port}/metrics", auth=("alice", "wonderland"))
        assert plain.status_code == 400
        assert "HTTPS" in plain.text and "llama_speed" not in plain.text
        # A client that does not trust the certificate gets no connection.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/healthz", verify=trusting(certificates["other"][0]))
        # The server still serves after all that.
        assert status(f"{base}/metrics", ca, ("alice", "wonderland")) == 200
    assert "Traceback" not in "".join(capfd.readouterr())


def test_basic_auth_without_tls(tmp_path: Path) -> None:
    web = write_web_config(
        tmp_path / "web.yml", {"basic_auth_users": {"alice": bcrypt_hash("wonderland")}}
    )
    with secured_daemon(web) as (_, port):
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/metrics", auth=("alice", "wonderland")).status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert httpx.get(f"{base}/healthz").status_code == 200


def test_reload_swaps_users_within_a_deadline(
    tls_dir: Path, certificates: dict[str, tuple[Path, Path]]
) -> None:
    web = write_web_config(tls_dir / "web.yml", tls_and_users(alice="wonderland"))
    ca = trusting(certificates["server"][0])
    with secured_daemon(web) as (_, port):
        url = f"https://localhost:{port}/metrics"
        first = httpx.get(url, verify=ca, auth=("alice", "wonderland")).text
        started = sample(first, "llama_speed_web_config_last_reload_success_timestamp_seconds")
        assert status(url, ca, ("bob", "builder")) == 401

        write_web_config(web, tls_and_users(bob="builder"))
        eventually(lambda: status(url, ca, ("bob", "builder")) == 200, "new user accepted")
        # Cached success or not, a removed user is refused at once.
        assert status(url, ca, ("alice", "wonderland")) == 401
        text = httpx.get(url, verify=ca, auth=("bob", "builder")).text
        assert sample(text, "llama_speed_web_config_reload_success") == 1.0
        reloaded = sample(text, "llama_speed_web_config_last_reload_success_timestamp_seconds")
        assert started is not None and reloaded is not None and reloaded > started


def test_a_broken_file_keeps_the_old_config_until_fixed(
    tls_dir: Path,
    certificates: dict[str, tuple[Path, Path]],
    capfd: pytest.CaptureFixture[str],
) -> None:
    web = write_web_config(tls_dir / "web.yml", tls_and_users(alice="wonderland"))
    ca = trusting(certificates["server"][0])
    alice = ("alice", "wonderland")
    with secured_daemon(web) as (_, port):
        url = f"https://localhost:{port}/metrics"

        def reload_success() -> float | None:
            text = httpx.get(url, verify=ca, auth=alice, timeout=5).text
            return sample(text, "llama_speed_web_config_reload_success")

        broken = yaml.safe_dump(tls_and_users(bob="builder")) + "basic_auth_users: [\n"
        write_web_config(web, broken)
        eventually(lambda: reload_success() == 0.0, "reload_success drops to 0")
        assert status(url, ca, alice) == 200  # the old users, still in force
        assert status(url, ca, ("bob", "builder")) == 401

        write_web_config(web, tls_and_users(bob="builder"))
        eventually(lambda: status(url, ca, ("bob", "builder")) == 200, "fixed file applies")
        text = httpx.get(url, verify=ca, auth=("bob", "builder")).text
        assert sample(text, "llama_speed_web_config_reload_success") == 1.0
    out = "".join(capfd.readouterr())
    assert "web_config_reload_failed" in out and "not valid YAML" in out
    assert "Traceback" not in out


def test_a_rotated_certificate_serves_new_connections(
    tls_dir: Path, certificates: dict[str, tuple[Path, Path]]
) -> None:
    web = write_web_config(tls_dir / "web.yml", tls_and_users(alice="wonderland"))
    old, new = trusting(certificates["server"][0]), trusting(certificates["other"][0])
    alice = ("alice", "wonderland")
    with secured_daemon(web) as (_, port):
        url = f"https://localhost:{port}/metrics"
        assert status(url, old, alice) == 200
        # cert-manager's way: the files change, the config does not. Between the two
        # replacements the pair does not match; that reload fails, the next one succeeds.
        other_cert, other_key = certificates["other"]
        for source, target in ((other_cert, "server.crt"), (other_key, "server.key")):
            shutil.copy(source, tls_dir / f"{target}.new")
            os.replace(tls_dir / f"{target}.new", tls_dir / target)

        def serves_new() -> bool:
            try:
                return status(url, new, alice) == 200
            except httpx.ConnectError:
                return False

        eventually(serves_new, "new certificate served")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url, verify=old, auth=alice)
        text = httpx.get(url, verify=new, auth=alice).text
        assert sample(text, "llama_speed_web_config_reload_success") == 1.0


def test_client_certificates_are_verified(
    tls_dir: Path, certificates: dict[str, tuple[Path, Path]]
) -> None:
    client_cert, client_key = certificates["client"]
    web = write_web_config(
        tls_dir / "web.yml",
        {
            "tls_server_config": {
                "cert_file": "server.crt",
                "key_file": "server.key",
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": str(client_cert),
                "min_version": "TLS13",
            }
        },
    )
    with secured_daemon(web) as (_, port):
        url = f"https://localhost:{port}/healthz"
        with_cert = trusting(certificates["server"][0])
        with_cert.load_cert_chain(client_cert, client_key)
        assert status(url, with_cert) == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(url, verify=trusting(certificates["server"][0]), timeout=5)
        no_tls13 = trusting(certificates["server"][0])
        no_tls13.maximum_version = ssl.TLSVersion.TLSv1_2
        no_tls13.load_cert_chain(client_cert, client_key)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, verify=no_tls13, timeout=5)


@pytest.mark.parametrize(
    ("config", "key", "problem"),
    [
        ({"tls_server_config": {"cert_file": "missing.crt", "key_file": "server.key"}},
         "tls_server_config.cert_file", "cannot read"),
        ({"tls_server_config": {"cert_file": "server.crt"}},
         "tls_server_config.key_file", "required"),
        ({"tls_server_config": {"cert_file": "server.key", "key_file": "server.key"}},
         "tls_server_config.cert_file", "holds no PEM certificate"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.crt"}},
         "tls_server_config.key_file", "holds no PEM private key"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                "cert_fil": "x"}},
         "tls_server_config.cert_fil", "unknown key"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                "min_version": "TLS9"}},
         "tls_server_config.min_version", "'TLS12'"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                "min_version": "TLS13", "max_version": "TLS12"}},
         "tls_server_config.min_version", "above max_version"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                "client_auth_type": "RequireAnyClientCert"}},
         "tls_server_config.client_auth_type", "not supported"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                "client_ca_file": "server.crt"}},
         "tls_server_config.client_ca_file", "without a client_auth_type"),
        ({"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                "cipher_suites": ["TLS_AES_128_GCM_SHA256"]}},
         "tls_server_config.cipher_suites", "not supported"),
        ({"basic_auth_users": {"alice": "wonderland"}},
         "basic_auth_users.alice", "not a bcrypt hash"),
        ({"basic_auth_users": {"alice": 12}}, "basic_auth_users.alice", "valid string"),
        ({"http_server_config": {"headers": {"Server": "nginx"}}},
         "http_server_config.headers.Server", "cannot be set"),
        ({"http_server_config": {"headers": {"X-Frame-Options": "allow"}}},
         "http_server_config.headers.X-Frame-Options", "deny, sameorigin"),
        ({"rate_limit": {"burst": 1}}, "rate_limit", "not supported"),
        ({"basic_auth": {}}, "basic_auth", "unknown key"),
        ("basic_auth_users: [\n", "", "not valid YAML (line 2)"),
        ("- a list\n", "", "mapping"),
    ],
)  # fmt: skip
def test_bad_files_are_config_errors_naming_the_key(
    tls_dir: Path, config: dict[str, Any] | str, key: str, problem: str
) -> None:
    web = write_web_config(tls_dir / "web.yml", config)
    with pytest.raises(ConfigError) as caught:
        load_web_config(web)
    assert caught.value.key == key
    assert problem in caught.value.problem
    line = str(caught.value)
    assert line.startswith(f"web.config_file: {web}") and key in line and "\n" not in line


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*web\.yml"):
        load_web_config(tmp_path / "web.yml")


def test_an_empty_file_serves_plain_http_without_auth(tmp_path: Path) -> None:
    config = load_web_config(write_web_config(tmp_path / "web.yml", ""))
    assert (config.tls, dict(config.users), config.headers) == (None, {}, ())
    empty_tls = load_web_config(write_web_config(tmp_path / "web.yml", {"tls_server_config": {}}))
    assert empty_tls.tls is None


def test_a_bad_file_at_startup_exits_2_with_one_line(tmp_path: Path) -> None:
    web = write_web_config(tmp_path / "web.yml", {"basic_auth_users": {"alice": "plain"}})
    with pytest.raises(ConfigError, match=r"basic_auth_users\.alice"):
        Daemon(Config((), "127.0.0.1:0", "/metrics", "console", "info", False, web))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SPEED_")}
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "--web.listen-address", "127.0.0.1:0",
         "--web.config.file", str(web)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"llama-speed-exporter: config error: web.config_file: {web}: basic_auth_users.alice: "
        "is not a bcrypt hash ($2y$10$ and 53 more characters)"
    ]


def test_flag_env_and_file_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("LLAMA_SPEED_")]:
        monkeypatch.delenv(name)
    assert parse([])[1].web_config_file is None
    main = tmp_path / "config.yaml"
    main.write_text("web:\n  config_file: /etc/file.yml\n")
    assert parse(["--config.file", str(main)])[1].web_config_file == Path("/etc/file.yml")
    monkeypatch.setenv("LLAMA_SPEED_WEB_CONFIG_FILE", "/etc/env.yml")
    assert parse(["--config.file", str(main)])[1].web_config_file == Path("/etc/env.yml")
    flag = parse(["--config.file", str(main), "--web.config.file", "web.yml"])[1]
    assert flag.web_config_file == Path("web.yml")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_changes_are_looked_for_at_most_once_per_interval(tmp_path: Path) -> None:
    clock = Clock()
    web = write_web_config(tmp_path / "web.yml", {"basic_auth_users": {"a": bcrypt_hash("x")}})
    config = ReloadableWebConfig(web, check_interval=1.0, monotonic=clock, wall=clock)
    write_web_config(web, {"basic_auth_users": {"b": bcrypt_hash("x")}})
    clock.now += 0.5
    assert set(config.current().users) == {"a"}
    clock.now += 0.5
    assert set(config.current().users) == {"b"}
    assert (config.reload_success, config.last_success) == (True, 1001.0)


def test_a_failed_reload_is_not_retried_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    web = write_web_config(tmp_path / "web.yml", {"basic_auth_users": {"a": bcrypt_hash("x")}})
    config = ReloadableWebConfig(web, monotonic=clock, wall=clock)
    # Names a key file that is not there yet: the failed load watches it too.
    write_web_config(web, {"tls_server_config": {"cert_file": "c.crt", "key_file": "c.key"}})
    loads: list[Path] = []
    real = webconfig.load_web_config

    def counting(path: Path) -> webconfig.WebConfig:
        loads.append(path)
        return real(path)

    monkeypatch.setattr(webconfig, "load_web_config", counting)
    clock.now += 1
    assert set(config.current().users) == {"a"} and config.reload_success is False
    clock.now += 1
    config.current()
    assert len(loads) == 1
    # The missing file appears: seen, and the load retried (to fail on the next problem).
    (tmp_path / "c.crt").write_text("not yet")
    clock.now += 1
    config.current()
    assert len(loads) == 2 and config.reload_success is False
    assert config.last_success == 1000.0


@pytest.mark.parametrize("emptied", ["", "  \n\n   \n", "# all commented out\n"])
def test_a_file_emptied_on_a_reload_keeps_basic_auth_on(
    tmp_path: Path, emptied: str, capfd: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    web = write_web_config(tmp_path / "web.yml", {"basic_auth_users": {"a": bcrypt_hash("x")}})
    config = ReloadableWebConfig(web, monotonic=clock, wall=clock)
    write_web_config(web, emptied)
    clock.now += 1
    assert set(config.current().users) == {"a"}
    assert (config.reload_success, config.last_success) == (False, 1000.0)
    families = {f.name: f.samples[0].value for f in config.collect()}
    assert families["llama_speed_web_config_reload_success"] == 0.0
    assert "is empty" in capfd.readouterr().out
    # Written again, with users: taken.
    write_web_config(web, {"basic_auth_users": {"b": bcrypt_hash("x")}})
    clock.now += 1
    assert set(config.current().users) == {"b"} and config.reload_success is True


def test_a_file_empty_from_the_start_may_be_written_empty_again(tmp_path: Path) -> None:
    clock = Clock()
    web = write_web_config(tmp_path / "web.yml", "")
    config = ReloadableWebConfig(web, monotonic=clock, wall=clock)
    write_web_config(web, "\n")  # a new signature, the same meaning
    clock.now += 1
    assert dict(config.current().users) == {} and config.reload_success is True


@pytest.mark.parametrize("path", ["/healthz", "/", "metrics"])
def test_the_telemetry_path_cannot_be_an_open_path(path: str) -> None:
    with pytest.raises(ConfigError, match=r"^web\.telemetry_path: "):
        parse(["--web.telemetry-path", path])


def test_an_open_telemetry_path_exits_2_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SPEED_")}
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "--web.telemetry-path", "/healthz", "--config.check"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("llama-speed-exporter: config error: web.telemetry_path: ")
    assert done.stderr.count("\n") == 1


def test_tls_cannot_be_turned_off_by_a_reload(tls_dir: Path) -> None:
    clock = Clock()
    web = write_web_config(tls_dir / "web.yml", tls_and_users(a="x"))
    config = ReloadableWebConfig(web, monotonic=clock, wall=clock)
    write_web_config(web, {"basic_auth_users": {"a": bcrypt_hash("x")}})
    clock.now += 1
    assert config.current().tls is not None
    assert config.reload_success is False


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_caches_successes_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    web = write_web_config(tmp_path / "web.yml", {"basic_auth_users": {"a": bcrypt_hash("pw")}})
    config = load_web_config(web)
    clock = Clock()
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    auth = BasicAuth(monotonic=clock)
    assert auth.check(config, basic("a", "pw")) and len(calls) == 1
    assert auth.check(config, basic("a", "pw")) and len(calls) == 1  # cached
    assert not auth.check(config, basic("a", "nope")) and len(calls) == 2
    assert not auth.check(config, basic("a", "nope")) and len(calls) == 3  # never cached
    # An unknown user costs a bcrypt check too, against a hash of the same cost.
    assert not auth.check(config, basic("z", "pw")) and len(calls) == 4
    assert calls[-1][:7] == config.users["a"][:7] and calls[-1] != config.users["a"]
    clock.now += AUTH_CACHE_SECONDS + 1
    assert auth.check(config, basic("a", "pw")) and len(calls) == 5  # expired
    # Another hash for the same user: the cached success does not carry over.
    changed = load_web_config(
        write_web_config(web, {"basic_auth_users": {"a": bcrypt_hash("new")}})
    )
    assert not auth.check(changed, basic("a", "pw")) and len(calls) == 6
    assert not auth.check(config, basic("a", "x" * 100))  # over bcrypt's 72 bytes
    assert not auth.check(config, None)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Basic YTpiOmM=", ("a", b"b:c")),
        ("basic YTo=", ("a", b"")),
        ("Basic !!!", None),
        ("Basic YWJj", None),  # no colon
        ("Bearer YTpi", None),
        ("", None),
    ],
)
def test_parse_basic(header: str, expected: tuple[str, bytes] | None) -> None:
    assert parse_basic(header) == expected


def readme_section_yaml() -> list[str]:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Securing the metrics endpoint", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```yaml\n")[1:]]


def test_the_readme_examples_load(tmp_path: Path, certificates: dict[str, Any]) -> None:
    web_yaml, scrape_yaml = readme_section_yaml()
    shutil.copy(certificates["server"][0], tmp_path / "exporter.crt")
    shutil.copy(certificates["server"][1], tmp_path / "exporter.key")
    config = load_web_config(write_web_config(tmp_path / "web.yml", web_yaml))
    assert config.tls is not None and list(config.users) == ["prometheus"]
    assert bcrypt.checkpw(b"secret", config.users["prometheus"])  # the example password
    job = yaml.safe_load(scrape_yaml)["scrape_configs"][0]
    assert job["scheme"] == "https" and set(job["basic_auth"]) == {"username", "password_file"}


@pytest.mark.parametrize("scheme", ["https", "HTTPS"])
def test_an_https_target_is_verified_however_its_scheme_is_spelled(
    scheme: str, certificates: dict[str, tuple[Path, Path]]
) -> None:
    """The client skips the CA bundle for plain HTTP only: an https target whose certificate
    nobody trusts is refused, never read."""
    cert, key = certificates["server"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def props(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    server = WebServer(props, "127.0.0.1", 0, lambda: context)
    server.start()

    async def read() -> Any:
        client = LlamaClient(f"{scheme}://127.0.0.1:{server.port}")
        try:
            return await client.get_json("/props")
        finally:
            await client.aclose()

    try:
        with pytest.raises(ServerError) as refused:
            asyncio.run(read())
    finally:
        server.close()
    assert refused.value.reason == "connect"

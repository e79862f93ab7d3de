#!/usr/bin/env bash
# The whole test suite, as CI runs it: system packages, virtualenv, lint, types, tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Debian's prometheus package brings promtool and the server the tests scrape with;
# prometheus-alertmanager brings Alertmanager and amtool, for the alert delivery tests.
packages=()
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v amtool >/dev/null 2>&1 || packages+=(prometheus-alertmanager)
if [ "${#packages[@]}" -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
    "${packages[@]}" >/dev/null
fi

bash "$root/scripts/setup-env.sh" dev
cd "$root"
. .venv/bin/activate
# Offline Kubernetes and compose schemas for tests/test_deploy.py.
python -m pip install --quiet -r requirements-deploy-test.txt
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"

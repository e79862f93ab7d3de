#!/usr/bin/env bash
# The demo: builds llama-server (llama.cpp b11434) once, generates a tiny model, starts
# llama-server and the exporter against it, and prints the URLs. Ctrl-C stops both.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh" demo
cd "$root"
exec .venv/bin/python -m testbed.demo "$@"

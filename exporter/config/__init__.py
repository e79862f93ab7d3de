"""Configuration: settings declared once, layered (flags, environment, file) and resolved.

The package itself holds only what the daemon runs with (`Config`, `Target`) and the error
type: the layering (`exporter.config.settings`, pydantic-settings) is imported where a
command line is resolved, never by the daemon that runs on the result.
"""

from exporter.config.errors import ConfigError
from exporter.config.resolved import Config, Target

__all__ = ["Config", "ConfigError", "Target"]

"""Configuration: settings declared once, layered (flags, environment, file) and resolved."""

from exporter.config.errors import ConfigError
from exporter.config.resolved import Config, Target
from exporter.config.settings import (
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_TARGET_URL,
    ENV_PREFIX,
    load_config,
    resolve_probe,
)

__all__ = [
    "DEFAULT_LISTEN_ADDRESS",
    "DEFAULT_TARGET_URL",
    "ENV_PREFIX",
    "Config",
    "ConfigError",
    "Target",
    "load_config",
    "resolve_probe",
]

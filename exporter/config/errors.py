"""The one kind of configuration problem: reported as one line naming the key, exit status 2."""

from __future__ import annotations


class ConfigError(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem

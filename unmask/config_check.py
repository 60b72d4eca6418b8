"""`ConfigError` and the one check every config section runs on its values."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the flag."""


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"--{flag}: {message}")

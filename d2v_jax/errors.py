"""Errors that name what the user must fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """An impossible config value; the message starts with `config.<field>:`."""


def check_field(cond: bool, field: str, msg: str) -> None:
    """Raises ConfigError(`config.<field>: <msg>`) unless `cond`."""
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")

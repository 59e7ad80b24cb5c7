"""Typed settings: dataclass fields that carry the help (and choices) of their command-line flags,
so `TrainConfig` and `ServerLimits` are each the one place their defaults and flags come from."""
from __future__ import annotations

from dataclasses import field


def setting(default, help: str, choices: tuple[str, ...] | None = None):
    """A dataclass field with `default`, and `help`/`choices` for the flag the CLI makes of it."""
    return field(default=default, metadata={"help": help, "choices": choices})

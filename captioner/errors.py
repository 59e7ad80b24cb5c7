"""One-line error messages, and the errors that modules without TensorFlow raise too."""
from __future__ import annotations


class EncoderError(ValueError):
    """A user-facing problem with an encoder name, its weights or its input."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(error).__name__

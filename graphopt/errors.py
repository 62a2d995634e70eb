"""The errors graphopt raises. Every message is one line that names the problem (and the node).

The CLI maps `GraphoptError` subclasses to exit code 2 (bad input or usage); anything else is an
internal error (exit code 1).
"""

from __future__ import annotations

__all__ = ["ExternalDataError", "GraphoptError", "ModelLoadError", "ParseError", "UsageError", "VerifyError"]

# every character str.splitlines() breaks on, and the other C0 controls, shown escaped
_ESCAPES = {c: repr(chr(c))[1:-1] for c in [*range(0x20), 0x7F, 0x85, 0x2028, 0x2029] if chr(c) != "\t"}


class GraphoptError(Exception):
    """Base of every error graphopt raises on purpose.

    The message is kept to one line: names taken from a model may hold newlines or control
    characters, which are shown escaped.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        if isinstance(message, str):
            message = message.translate(_ESCAPES)
        super().__init__(message, *args)


class ModelLoadError(GraphoptError):
    """The input is not a model graphopt can read (not protobuf, truncated, inconsistent)."""


class ExternalDataError(ModelLoadError):
    """External tensor data is missing, too short, or points outside the model's folder."""


class VerifyError(GraphoptError):
    """An IR invariant is broken. `node` is the offending node when there is one."""

    def __init__(self, message: str, node: object | None = None) -> None:
        super().__init__(message)
        self.node = node


class ParseError(GraphoptError):
    """The textual IR could not be parsed; the message gives line and column."""


class UsageError(GraphoptError):
    """A wrong argument or option (unknown pass, bad pipeline spec...)."""

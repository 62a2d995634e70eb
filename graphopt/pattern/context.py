"""The model a rule is being applied to or explained on, for checks that need model-wide facts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from graphopt.ir.core import Model

_MODEL: ContextVar[Model | None] = ContextVar("graphopt_pattern_model", default=None)


def current_model() -> Model | None:
    """The model that `apply_rules` or `explain` is working on, for checks that need model-wide
    facts (opset imports, IR version). None outside them."""
    return _MODEL.get()


@contextlib.contextmanager
def model_context(model: Model) -> Iterator[None]:
    token = _MODEL.set(model)
    try:
        yield
    finally:
        _MODEL.reset(token)

"""The model a rule is being applied to or explained on, and the options of the pass applying it,
for checks that need model-wide facts or a pass option (such as contrib-ops)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from contextvars import ContextVar

from graphopt.ir.core import Model
from graphopt.ir.query import constant_semantics

_MODEL: ContextVar[Model | None] = ContextVar("graphopt_pattern_model", default=None)
_NO_OPTIONS: Mapping[str, object] = MappingProxyType({})
_OPTIONS: ContextVar[Mapping[str, object]] = ContextVar("graphopt_pattern_options", default=_NO_OPTIONS)


def current_model() -> Model | None:
    """The model that `apply_rules` or `explain` is working on, for checks that need model-wide
    facts (opset imports, IR version). None outside them."""
    return _MODEL.get()


def current_options() -> Mapping[str, object]:
    """The options (field name → value) of the RewritePass applying the rule, or those given to
    `explain`; empty outside them. A rule shared by several passes reads e.g. `contrib_ops` here."""
    return _OPTIONS.get()


@contextlib.contextmanager
def model_context(model: Model, options: Mapping[str, object] | None = None) -> Iterator[None]:
    """Within this block `current_model()` is `model`, `current_options()` are `options`, and
    constants follow `model`'s IR version (graphopt.ir.constant_semantics). Rules read the model
    and options through their Match (`m.model`, `m.options`); these remain for code outside a
    rule (analyses that call const_array) and for rules written against them."""
    token = _MODEL.set(model)
    otoken = _OPTIONS.set(MappingProxyType(dict(options)) if options else _NO_OPTIONS)
    try:
        with constant_semantics(model):
            yield
    finally:
        _OPTIONS.reset(otoken)
        _MODEL.reset(token)

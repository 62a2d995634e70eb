"""What a pass is: a frozen dataclass with a kebab-case `name`, its options as fields, and `run`.

    @register_pass
    @dataclass(frozen=True)
    class Prune(Pass):
        '''Remove low-importance channels: Conv(W[C]) -> Conv(W[C']) ...'''
        name: ClassVar[str] = "prune"
        ratio: float = 0.3
        criterion: str = "l1"

        def run(self, model: Model, ctx: PassContext) -> PassResult:
            ...
            return PassResult(changed=True, stats={"channels-removed": 96})

The fields double as pipeline syntax: `prune{ratio=0.3,criterion=l1}`.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graphopt.errors import GraphoptError, UsageError
from graphopt.ir.core import Model


@dataclass
class Rewrite:
    """One local change a rule-based pass made: which rule, and the nodes it replaced."""

    rule: str
    nodes: list[str]

    def __str__(self) -> str:
        return f"{self.rule} on [{', '.join(self.nodes)}]"


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    # for rule-based passes: each rewrite in the order applied (used to pinpoint a bad one)
    rewrites: list[Rewrite] = field(default_factory=list)
    # one line for the terminal summary: what the pass did, or why it did nothing ("" : derived
    # from the stats, the pass's log lines or its `idle_reason`)
    note: str = ""


class PassError(GraphoptError):
    """A pass raised: the message names the pass and the passes that ran before it."""


@dataclass
class PassContext:
    """Shared state of one pipeline run: options that every pass may consult, and the log."""

    # stop a rule-based pass after this many rewrites (None: no limit); used to bisect which
    # rewrite broke the numbers
    rewrite_limit: int | None = None
    # check invariants inside passes (the greedy driver verifies after each rewrite)
    debug: bool = False
    log: list[str] = field(default_factory=list)
    # passes that already ran in this pipeline (names), for error messages
    history: list[str] = field(default_factory=list)
    # free-form per-run data passes may share (analysis caches, calibration data...)
    data: dict[str, Any] = field(default_factory=dict)
    # the machine model of the CPU the pipeline compiles for (graphopt.targets.machine.MachineModel:
    # lanes, int8 instruction...), or None: onnxruntime on this machine (the onnx target)
    machine: Any = None

    def info(self, message: str) -> None:
        self.log.append(message)


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses; set `name` as a ClassVar."""

    name: ClassVar[str] = ""
    # why a run that changed nothing did nothing, when the run gives no note of its own
    idle_reason: ClassVar[str] = ""

    def run(self, model: Model, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def requires(self, model: Model, ctx: PassContext) -> None:
        """Precondition; raise GraphoptError when the model is not fit for this pass."""

    def ensures(self, model: Model, ctx: PassContext) -> None:
        """Postcondition, checked after `run`; raise GraphoptError when it does not hold."""

    # --- pipeline syntax ----------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        """First line of the docstring (what `--list-passes` shows)."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def description(cls) -> str:
        """The docstring's first paragraph as one line (what `--list-passes` shows, whole)."""
        doc = inspect.cleandoc(cls.__doc__ or "")
        return " ".join(doc.split("\n\n")[0].split())

    @classmethod
    def options_help(cls) -> list[dict[str, str]]:
        """Each option (field) for `--help-pass`: kebab name, type, default in pipeline syntax,
        and its description: the field's comment in the source, else the docstring's
        "`name` (...)" for it."""
        hints = typing.get_type_hints(cls)
        comments = _field_comments(cls)
        doc = " ".join(inspect.cleandoc(cls.__doc__ or "").split())
        out = []
        for f in cls.option_fields():
            if f.default is not dataclasses.MISSING:
                default = _format_value(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = _format_value(f.default_factory())
            else:
                default = "(required)"
            hint = hints.get(f.name, str)
            tname = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
            text = comments.get(f.name, "")
            if not text:  # "`round-to` (kept channel counts are ...)" in the docstring
                m = re.search(r"`(?:%s|%s)` \(((?:[^()]|\([^()]*\))*)\)" % (re.escape(_kebab(f.name)), re.escape(f.name)), doc)
                text = m.group(1) if m else ""
            out.append({"name": _kebab(f.name), "type": tname or str(hint).replace("typing.", ""),
                        "default": default if default != "" else "''", "doc": text})
        return out

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field[Any]]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def from_options(cls, options: dict[str, str]) -> Pass:
        """Build the pass from `key=value` strings, converting by each field's annotation."""
        hints = typing.get_type_hints(cls)
        known = {_kebab(f.name): f for f in cls.option_fields()}
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            f = known.get(_kebab(key))
            if f is None:
                opts = ", ".join(sorted(known)) or "none"
                raise UsageError(f"pass {cls.name!r} has no option {key!r} (options: {opts})")
            kwargs[f.name] = _convert(cls.name, key, raw, hints.get(f.name, str))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise UsageError(f"pass {cls.name!r}: {e}") from None

    def spec(self) -> str:
        """This pass in pipeline syntax, listing the options that differ from their defaults."""
        parts = []
        for f in self.option_fields():
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
            )
            if value != default:
                parts.append(f"{_kebab(f.name)}={_format_value(value)}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")


def _field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} from the source of `cls` and its bases: the comment at the end of
    the field's line, else the `#:` / `#` lines right above it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):  # (no source: a class made at run time)
            continue
        above: list[str] = []
        pending: dict[int, str] = {}  # line -> field assigned on it
        lines = src.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"\s{4}([a-z_][a-z0-9_]*)\s*:\s*[^=]+?(?:=.*)?$", line)
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#:").strip())
                continue
            if m and line.startswith("    ") and not line.startswith("     "):
                pending[i] = m.group(1)
                if above:
                    out[m.group(1)] = " ".join(above)
            above = []
        try:  # trailing comments, found by the tokenizer (a '#' inside a string is not one)
            for tok in tokenize.generate_tokens(io.StringIO(src).readline):
                if tok.type == tokenize.COMMENT and tok.start[0] - 1 in pending and not lines[tok.start[0] - 1].strip().startswith("#"):
                    out[pending[tok.start[0] - 1]] = tok.string.lstrip("#:").strip()
        except (tokenize.TokenError, IndentationError):
            pass
    return out


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return ":".join(_format_value(x) for x in v)
    return str(v)


def _convert(pass_name: str, key: str, raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(hint)):
        if raw.lower() in ("none", "null", ""):
            return None
        hint = args[0] if args else str
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            low = raw.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if origin in (tuple, list):
            inner = typing.get_args(hint)[0] if typing.get_args(hint) else str
            items = [_convert(pass_name, key, x, inner) for x in raw.split(":") if x]
            return tuple(items) if origin is tuple else items
        return raw
    except ValueError:
        tname = getattr(hint, "__name__", str(hint))
        raise UsageError(f"pass {pass_name!r}: option {key}={raw!r} is not a valid {tname}") from None

"""Pass instruments: hooks around every pass of a pipeline (timing, IR dumps, verify, numerics).

An instrument sees `enter_pipeline`, then `before_pass`/`after_pass` for each pass, then
`exit_pipeline`. Raising from a hook stops the pipeline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.check import NumericMismatchError, compare_outputs, random_inputs, run_onnxruntime
from graphopt.errors import GraphoptError
from graphopt.ir.core import Model
from graphopt.transform.pass_base import Pass, PassContext, PassError, PassResult


class PassInstrument:
    def enter_pipeline(self, model: Model, passes: Sequence[Pass], ctx: PassContext) -> None: ...

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, result: PassResult, seconds: float) -> None: ...

    def exit_pipeline(self, model: Model, ctx: PassContext) -> None: ...


def count_nodes(model: Model) -> int:
    return sum(1 for _ in model.all_nodes())


@dataclass
class PassRecord:
    spec: str
    seconds: float
    changed: bool
    stats: dict[str, int | float]
    nodes_before: int
    nodes_after: int
    note: str = ""  # one line: what the pass did or why it did nothing (describe_result)


def describe_result(p: Pass, result: PassResult, log: Sequence[str] = ()) -> str:
    """One line saying what a pass did, or why it did nothing: the pass's own note, else its
    non-zero statistics (a change) or first log line, else its `idle_reason`."""
    if result.note:
        return result.note
    own = [line.split(": ", 1)[1] if line.startswith(f"{p.name}: ") else line for line in log]
    if result.changed:
        done = [f"{k} {_num(v)}" for k, v in result.stats.items() if "/" not in k and v and k != "seconds"]
        return ", ".join(done[:6]) or (own[0] if own else "changed the model")
    if own:
        return own[0]
    if p.idle_reason:
        return f"nothing to do: {p.idle_reason}"
    return "nothing to do"


def _num(v: int | float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class TimingInstrument(PassInstrument):
    """Wall time, node counts, statistics and a one-line description of every pass."""

    records: list[PassRecord] = field(default_factory=list)
    _nodes: int = 0
    _log_start: int = 0

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        self._nodes = count_nodes(model)
        self._log_start = len(ctx.log)

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, result: PassResult, seconds: float) -> None:
        note = describe_result(p, result, ctx.log[self._log_start:])
        self.records.append(PassRecord(p.spec(), seconds, result.changed, dict(result.stats), self._nodes,
                                       count_nodes(model), note))


@dataclass
class DumpIRInstrument(PassInstrument):
    """Write the textual IR after each pass to `folder/NN-<pass>.txt` (big tensors elided)."""

    folder: str
    _i: int = 0

    def enter_pipeline(self, model: Model, passes: Sequence[Pass], ctx: PassContext) -> None:
        os.makedirs(self.folder, exist_ok=True)
        self._write("00-input", model)

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, result: PassResult, seconds: float) -> None:
        self._i += 1
        self._write(f"{self._i:02d}-{p.name}", model)

    def _write(self, stem: str, model: Model) -> None:
        from graphopt.ir.printer import print_model

        with open(os.path.join(self.folder, stem + ".txt"), "w") as f:
            f.write(print_model(model, elide_tensors_over=16))


class VerifyInstrument(PassInstrument):
    """`verify()` after every pass; a broken invariant names the pass that broke it."""

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, result: PassResult, seconds: float) -> None:
        try:
            model.verify()
        except GraphoptError as e:
            raise PassError(f"pass {p.spec()!r} left an invalid model: {e}{_ran_before(ctx)}") from None


def _ran_before(ctx: PassContext) -> str:
    before = ctx.history[:-1]
    return f" (passes before it: {', '.join(before)})" if before else " (it ran first)"


@dataclass
class NumericCheckInstrument(PassInstrument):
    """`--verify-each`: run the model on onnxruntime after every pass and stop at the first
    pass whose outputs leave the tolerance. For a rule-based pass, the rewrites are bisected
    (re-running the pass with a rewrite limit on the pre-pass model) to name the one that broke
    the numbers."""

    inputs: Mapping[str, np.ndarray] | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    checked: list[tuple[str, float]] = field(default_factory=list)
    _feeds: dict[str, np.ndarray] = field(default_factory=dict)
    _reference: list[np.ndarray] = field(default_factory=list)
    _before: Model | None = None

    def enter_pipeline(self, model: Model, passes: Sequence[Pass], ctx: PassContext) -> None:
        self._feeds = dict(self.inputs) if self.inputs is not None else random_inputs(model)
        self._reference = run_onnxruntime(model, self._feeds)

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        self._before = model.clone()

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, result: PassResult, seconds: float) -> None:
        cmp = self._compare(model)
        self.checked.append((p.spec(), cmp.max_abs))
        if cmp.ok:
            return
        culprit = ""
        if result.rewrites and self._before is not None:
            bad = self._bisect(p, ctx, len(result.rewrites))
            if bad is not None:
                culprit = f"; first bad rewrite: {result.rewrites[bad - 1]}"
        raise NumericMismatchError(
            f"outputs changed after pass {p.spec()!r}: {cmp}{culprit}{_ran_before(ctx)}"
        )

    def _compare(self, model: Model) -> Any:
        try:
            actual = run_onnxruntime(model, self._feeds)
        except GraphoptError as e:
            return _Failed(str(e))
        return compare_outputs(self._reference, actual, rtol=self.rtol, atol=self.atol)

    def _bisect(self, p: Pass, ctx: PassContext, n: int) -> int | None:
        """Smallest k such that applying only the first k rewrites breaks the outputs."""
        assert self._before is not None

        def breaks(k: int) -> bool:
            trial = self._before.clone()  # type: ignore[union-attr]
            sub = PassContext(rewrite_limit=k, data=dict(ctx.data))
            p.run(trial, sub)
            return not self._compare(trial).ok

        lo, hi = 1, n
        if not breaks(hi):
            return None  # the pass is not deterministic, or the damage is not rewrite-local
        while lo < hi:
            mid = (lo + hi) // 2
            if breaks(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo


@dataclass
class _Failed:
    detail: str
    ok: bool = False
    max_abs: float = float("inf")

    def __str__(self) -> str:
        return self.detail


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start

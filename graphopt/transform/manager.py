"""Running pipelines: PassManager and the public `optimize()`."""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.core import Model
from graphopt.transform.instruments import (
    DumpIRInstrument,
    NumericCheckInstrument,
    PassInstrument,
    Timer,
    TimingInstrument,
    VerifyInstrument,
)
from graphopt.transform.pass_base import Pass, PassContext, PassError, PassResult
from graphopt.transform.pipeline import resolve_pipeline, with_contrib_ops


@dataclass
class PipelineResult:
    model: Model
    results: list[tuple[Pass, PassResult]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


class PassManager:
    """Runs passes in order, calling the instruments around each one.

    An exception inside a pass becomes a PassError naming the pass and the passes before it.
    """

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[PassInstrument] = (), ctx: PassContext | None = None) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.ctx = ctx or PassContext()

    def run(self, model: Model) -> PipelineResult:
        # The IR is a large web of small objects: the cyclic collector's repeated scans of it make
        # pass time grow faster than the graph. Nothing here relies on collecting cycles mid-run.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(model)
        finally:
            if was_enabled:
                gc.enable()

    def _run(self, model: Model) -> PipelineResult:
        ctx = self.ctx
        out = PipelineResult(model, log=ctx.log)
        for ins in self.instruments:
            ins.enter_pipeline(model, self.passes, ctx)
        for p in self.passes:
            ctx.history.append(p.spec())
            before = ", ".join(ctx.history[:-1]) or "none"
            for ins in self.instruments:
                ins.before_pass(p, model, ctx)
            with Timer() as t:
                try:
                    p.requires(model, ctx)
                    result = p.run(model, ctx)
                    p.ensures(model, ctx)
                except PassError:
                    raise
                except GraphoptError as e:
                    raise PassError(f"pass {p.spec()!r} failed: {e} (passes before it: {before})") from e
                except Exception as e:
                    raise PassError(
                        f"pass {p.spec()!r} crashed: {type(e).__name__}: {e} (passes before it: {before})"
                    ) from e
            if not isinstance(result, PassResult):
                raise PassError(f"pass {p.spec()!r} returned {type(result).__name__}, not PassResult")
            for ins in self.instruments:
                ins.after_pass(p, model, ctx, result, t.seconds)
            out.results.append((p, result))
        for ins in self.instruments:
            ins.exit_pipeline(model, ctx)
        return out


def optimize(
    model: Model,
    pipeline: str | Sequence[Pass] | None = "-O2",
    *,
    inplace: bool = False,
    disable: Sequence[str] = (),
    verify_each: bool = False,
    check_each: bool = False,
    inputs: Mapping[str, np.ndarray] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    dump_ir: str | None = None,
    instruments: Sequence[PassInstrument] = (),
    ctx: PassContext | None = None,
    contrib_ops: bool = False,
) -> Model:
    """Run a pipeline (`"-O2"`, a spec like `"fold-constants,dce"`, or Pass objects).

    `contrib_ops` turns on the `contrib-ops` option of every pass that has it (onnxruntime's
    com.microsoft ops may then appear in the output: for deployments on onnxruntime only).

    Works on a copy unless `inplace`. `verify_each` checks IR invariants after every pass;
    `check_each` runs onnxruntime after every pass and stops at the first one that changes the
    outputs beyond rtol/atol (naming the rewrite, for rule-based passes).
    """
    ctx = ctx or PassContext()
    passes = resolve_pipeline(pipeline, disable=disable, log=ctx.log) if isinstance(pipeline, str) else resolve_pipeline(pipeline)
    if contrib_ops:
        passes = with_contrib_ops(passes)
    target = model if inplace else model.clone()
    ins: list[PassInstrument] = [TimingInstrument()]
    if dump_ir:
        ins.append(DumpIRInstrument(dump_ir))
    if verify_each:
        ins.append(VerifyInstrument())
    if check_each:
        ins.append(NumericCheckInstrument(inputs=inputs, rtol=rtol, atol=atol))
    ins.extend(instruments)
    PassManager(passes, ins, ctx).run(target)
    target.meta["pass_timings"] = ins[0].records  # type: ignore[attr-defined]
    return target

#!/usr/bin/env python
"""Per-kernel cost of the blocked conv's accumulator tile living in a heap workspace.

`nchwc.BlockedConv` keeps a conv's register tile in a `cache_write(..., "local")` buffer. TVM's
LowerTVMBuiltin turns every "local" allocation (and every "global" one of 1024 bytes or more:
kMaxStackAlloca) into `TVMBackendAllocWorkspace`, so LLVM cannot drop the buffer: per pixel tile
the init block becomes a `memset` call (with a `vzeroupper`), and after the reduction the
accumulators are stored to the workspace and partly reloaded by the write-back. AVX-512's 24 zmm
accumulators are 1536 bytes, AVX2's 12 ymm 384 bytes: both ISAs pay it today. The cost is per
tile, so it shows on short reductions (ResNet-50's 1x1 convs with 64 input channels on 56x56,
kernels k2 / k4 / k5: 64 x 24 FMAs per tile) and vanishes on long ones.

This tool builds each kernel twice through the cpu build's TIR lowering, with the `stack_tile`
schedule knob off (the workspace tile, as before) and on (`targets/tvm/stack_tiles.py`: the tile
a stack array that LLVM promotes to registers: no workspace, no memset; where
`nchwc.stack_tile_fires`, so AVX2 builds show the same kernel twice). "calls" counts the
workspace allocations and memsets in each kernel's assembly. Times are paired rounds, medians
of the per-round ratios.

    TVM_NUM_THREADS=2 .venv/bin/python tools/bench_stack_tiles.py
    .venv/bin/python tools/bench_stack_tiles.py --only r50_1x1_64 --rounds 15 --mcpu haswell
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_nchwc_kernels as BK  # noqa: E402

def build(case: Any, target: Any, stack: bool) -> tuple[Any, list[list[int]]]:
    """`case`'s kernel scheduled by the default rules with the `stack_tile` knob on or off, built
    through the cpu build's TIR lowering (`targets.tvm.stack_tiles.tir_pipeline`)."""
    import tvm

    from graphopt.targets.machine import machine_model
    from graphopt.targets.tvm.schedules import default as TS
    from graphopt.targets.tvm.schedules import knobs
    from graphopt.targets.tvm.schedules.loop_marks import apply_loop_marks
    from graphopt.targets.tvm.stack_tiles import tir_pipeline

    func, shapes = BK.build_kernel(case, target)
    with knobs.using(knobs.ScheduleKnobs(stack_tile=stack)):
        sch, _rule, _notes = TS.default_schedule(func, target)
    assert sch is not None
    mod = tvm.IRModule({"main": apply_loop_marks(sch.mod["main"]).with_attr("global_symbol", "main")})
    return tvm.tirx.build(mod, target=target, pipeline=tir_pipeline(machine_model(target))), shapes


def workspace_calls(lib: Any) -> int:
    """Calls of TVMBackendAllocWorkspace and memset in `lib`'s assembly."""
    asm = lib.inspect_source("asm")
    return len(re.findall(r"__TVMBackendAllocWorkspace@GOTPCREL|call\w*\s+memset@PLT", asm)) if asm else 0


CASES = [
    BK._conv("r50_1x1_64_64_56", 64, 56, 64, 1, 1),
    BK._conv("r50_1x1_64_256_56_ds", 64, 56, 256, 1, 1, act="none"),
    BK._conv("r50_1x1_64_256_56+add", 64, 56, 256, 1, 1, residual=True),
    BK._conv("r50_1x1_256_64_56", 256, 56, 64, 1, 1),
    BK._conv("r50_1x1_1024_256_14", 1024, 14, 256, 1, 1),
    BK._conv("r50_3x3_128_28", 128, 28, 128, 3, 1),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--only", default="", help="comma list of case names (substrings)")
    ap.add_argument("--mcpu", default="", help="compile for this LLVM cpu (default: the host's)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))
    import tvm

    from graphopt.targets.machine import machine_model
    from graphopt.targets.tvm.build import host_target

    target = host_target(threads=a.threads, mcpu=a.mcpu or None)
    BK.MACHINE = machine_model(target)
    BK.B = BK.MACHINE.lanes(32)
    cases = [c for c in CASES if not a.only or any(o in c.name for o in a.only.split(","))]
    print(f"target {target.attrs.get('mcpu')} block {BK.B} threads {a.threads}; load {os.getloadavg()[0]:.1f}; "
          f"{a.rounds} paired rounds", flush=True)
    dev = tvm.cpu()
    for case in cases:
        _nchw, args = BK.case_data(case)
        targs = [tvm.runtime.tensor(v, dev) for v in args.values()]
        libs, outs, calls = [], [], []
        for stack in (False, True):
            lib, shapes = build(case, target, stack)
            out = tvm.runtime.tensor(np.zeros(shapes[-1], np.float32), dev)
            lib["main"](*targs, out)
            libs.append(lib)
            outs.append(out)
            calls.append(workspace_calls(lib))
        err = float(np.abs(outs[0].numpy() - outs[1].numpy()).max())
        evs = [lib.time_evaluator("main", dev, number=20, repeat=2) for lib in libs]
        times: list[list[float]] = [[], []]
        for r in range(a.rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                times[i].append(float(evs[i](*targs, outs[i]).results[-1]))
        ws, st = np.array(times[0]), np.array(times[1])
        print(f"{case.name:24s} workspace {np.median(ws) * 1e3:7.3f} ms {case.flops / np.median(ws) / 1e9:5.0f} GF/s "
              f"(calls {calls[0]})  stack {np.median(st) * 1e3:7.3f} ms {case.flops / np.median(st) / 1e9:5.0f} GF/s "
              f"(calls {calls[1]})  stack/workspace {np.median(st / ws):.3f} (min {st.min() / ws.min():.3f})  "
              f"max diff {err:.1e}", flush=True)
    print(f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

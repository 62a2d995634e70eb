"""Structural hashes of every default-scheduled kernel of a corpus model, for one machine model:
the check that a change leaves some ISA's kernels exactly as they were.

    .venv/bin/python tools/kernel_hashes.py resnet50 --mcpu znver3 > new.json
    # the same for an older commit, from a copy of its packages (graphopt/, passes/ → graphopt/passes,
    # targets/ → graphopt/targets) in OLD_TREE: --tree OLD_TREE > old.json
    .venv/bin/python tools/kernel_hashes.py --compare old.json new.json
    # an int8 (QDQ) model: a path; its int8 kernels (schedules.int8_x86) are hashed too
    .venv/bin/python tools/kernel_hashes.py .cache/int8_compile/mobilenetv2.avx512-vnni.int8.onnx --mcpu znver4

Symbolic dims are fixed to 1 (as bench_tvm_cpu does; `--keep-symbolic` leaves them, as a compile
does), the pipeline is -O2, the blocked layout and tiles are the cpu target's for `--mcpu` (older
trees read the host's mcpu: it is patched). A QDQ model goes through the cpu target's integer
rewrite (qdq-to-integer, split-zero-points) and int8 kernel rules first, as in a compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def hashes(model: str, mcpu: str, keep_symbolic: bool = False) -> dict[str, int]:
    import onnx
    import tvm
    import tvm_ffi

    import graphopt
    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.target import get_target
    from graphopt.targets.tvm import build as B
    from graphopt.targets.tvm.lower import lowerer as L
    from graphopt.targets.tvm.schedules import apply_default_schedules
    from graphopt.transform import PassContext

    B.host_cpu = lambda: mcpu  # (trees from before the machine model read the host's mcpu)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    om = onnx.load(model if model.endswith(".onnx") else os.path.join(root, ".cache", "corpus", f"{model}.onnx"))
    for vi in [] if keep_symbolic else list(om.graph.input) + list(om.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    m = graphopt.optimize(graphopt.load(onnx.shape_inference.infer_shapes(om)), "-O2")
    try:  # (trees from before the int8 kernels have no integer rewrite: nothing to do there)
        from graphopt.passes.quantize.integer import QdqToInteger, SplitZeroPoints

        QdqToInteger().run(m, PassContext())
        SplitZeroPoints().run(m, PassContext())
    except ImportError:
        pass
    PlanKernels().run(m, PassContext())
    t = get_target("cpu")
    target = B.host_target(mcpu=mcpu, threads=2)
    lowered, mod = L.lower_and_fuse(m, target, block=t.activation_block(target))
    if hasattr(t, "int8_kernels"):
        mod, _ = t.int8_kernels(mod, target, lowered.params)
    smod = apply_default_schedules(mod, target)
    return {gv.name_hint: int(tvm_ffi.structural_hash(f)) for gv, f in smod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="corpus model (.cache/corpus/NAME.onnx) or a path to an .onnx")
    ap.add_argument("--keep-symbolic", action="store_true", help="leave symbolic input dims (a symbolic batch) as they are")
    ap.add_argument("--mcpu", default="znver3", help="the machine model's mcpu (default: znver3, AVX2)")
    ap.add_argument("--tree", help="import graphopt from this folder instead (an older commit's packages)")
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two outputs of this tool")
    a = ap.parse_args(argv)
    if a.compare:
        old, new = (json.load(open(p)) for p in a.compare)
        differ = sorted(k for k in old if k in new and old[k] != new[k])
        only = sorted(set(old) ^ set(new))
        print(f"{len(old)} kernels before, {len(new)} after: {len(old) - len(differ) - len(set(old) - set(new))} equal, "
              f"{len(differ)} differ {differ[:10]}, only one side: {only[:10]}")
        return 1 if differ or only else 0
    if not a.model:
        ap.error("give a MODEL, or --compare OLD NEW")
    if a.tree:
        sys.path.insert(0, os.path.abspath(a.tree))
    print(json.dumps(hashes(a.model, a.mcpu, a.keep_symbolic)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

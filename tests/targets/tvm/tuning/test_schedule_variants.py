"""Variants of the default schedules (targets/tvm/tuning/variants.py) and the phase of tuning that
measures them before meta_schedule's search."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")
import tvm_ffi  # noqa: E402

import graphopt  # noqa: E402
from graphopt.check import run_onnxruntime  # noqa: E402
from graphopt.passes.fusion.kernel_groups import PlanKernels  # noqa: E402
from graphopt.targets.tvm.tuning.variants import variants  # noqa: E402
from graphopt.targets.tvm.lower import lowerer as L  # noqa: E402
from graphopt.targets.tvm.schedules import default_schedule  # noqa: E402
from graphopt.transform import PassContext, optimize  # noqa: E402
from tvm_kernels import AVX2_CPU, avx2_target  # noqa: E402  (the variants listed are AVX2's)

CONV = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 16, 14, 14] x) => (float[1, 16, 14, 14] y, float[1, 12, 14, 14] z) {
    c = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w, b)
    y = Relu (c)
    z = Conv <kernel_shape = [1, 1]> (x, wz)
}
"""


def _model() -> onnx.ModelProto:
    m = onnx.parser.parse_model(CONV)
    rng = np.random.default_rng(0)
    for name, shape in {"w": (16, 16, 3, 3), "b": (16,), "wz": (12, 16, 1, 1)}.items():
        m.graph.initializer.append(nh.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name))
    return onnx.shape_inference.infer_shapes(m)


def _kernels():
    g = optimize(graphopt.load(_model()), "-O2", inplace=True)
    PlanKernels().run(g, PassContext())
    target = avx2_target(threads=1)
    lowered, mod = L.lower_and_fuse(g, target, block=8)
    return target, mod, lowered


def _run(func, args):
    from graphopt.targets.tvm.schedules.loop_marks import apply_loop_marks

    func = apply_loop_marks(func)  # (as the build does)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=avx2_target(threads=1))
    arrs = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*arrs)
    return arrs[-1].numpy()


def test_variants_of_a_blocked_conv_compute_the_same():
    target, mod, lowered = _kernels()
    blocked = [gv for gv in mod.get_global_vars() if gv.name_hint in lowered.blocked_groups]
    assert len(blocked) == 1
    func = mod[blocked[0]]
    sch, rule, _ = default_schedule(func, target)
    assert rule == "blocked-conv"
    found = variants(func, target, 8)
    labels = [label for label, _ in found]
    assert len(found) >= 3 and len(set(labels)) == len(labels)  # distinct, none equal to the default
    rng = np.random.default_rng(1)
    args = [rng.standard_normal([int(d) for d in p.shape]).astype(str(p.dtype)) for p in func.params]
    want = _run(sch.mod["main"], args)
    for label, v in found:
        np.testing.assert_allclose(_run(v.mod["main"], args), want, rtol=1e-5, atol=1e-5, err_msg=label)
        # traced: the record replays on the unscheduled workload
        s2 = tvm.s_tir.Schedule(func)
        v.trace.apply_to_schedule(s2, remove_postproc=False)
        assert tvm_ffi.structural_equal(s2.mod["main"], v.mod["main"]), label


def test_no_variants_for_other_kernels():
    target, mod, lowered = _kernels()
    others = [gv for gv in mod.get_global_vars()
              if isinstance(mod[gv], tvm.tirx.PrimFunc) and gv.name_hint not in lowered.blocked_groups]
    assert others
    for gv in others:
        assert variants(mod[gv], target, 8) == [], gv.name_hint


@pytest.mark.slow
def test_tuning_measures_variants_first_and_keeps_the_fastest(tmp_path):
    m = _model()
    db = str(tmp_path / "db")
    art = graphopt.compile(m, AVX2_CPU, "-O2", tune=4, tuning_db=db, threads=1)
    ledger = json.load(open(os.path.join(db, "graphopt_ledger.json")))
    conv = [e for e in ledger.values() if e.get("default_rule") == "blocked-conv"]
    assert conv and conv[0]["variants"] >= 3
    e = conv[0]
    best = min(t for t in (e.get("default_ms"), e.get("variant_ms"), e.get("best_ms")) if t is not None)
    kept_ms = {"default": e.get("default_ms"), "variant": e.get("variant_ms"), "tuned": e.get("best_ms")}[e["kept"]]
    assert kept_ms == best
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 16, 14, 14)).astype(np.float32)}
    for got, want in zip(art.run(feeds), run_onnxruntime(graphopt.load(m), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # a second compile with the database applies it without tuning again
    again = graphopt.compile(m, AVX2_CPU, "-O2", tuning_db=db, threads=1)
    for got, want in zip(again.run(feeds), art.run(feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

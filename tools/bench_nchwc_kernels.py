#!/usr/bin/env python
"""Per-shape speed of the channel-blocked (NCHW8c) conv/pool kernels against onnxruntime.

Every ResNet-50 and MobileNetV2 conv shape (batch 1; plus their stem, depthwise and pooling
kernels) is built the way graphopt's lowering builds it for the cpu target: one fused PrimFunc
(pad → blocked compute from targets/tvm/kernels/blocked.py → bias add → Relu / Clip(0, 6) →
residual Add), through Relax LegalizeOps → FuseTIR. Each is scheduled twice:

- before: the default rules without `BlockedConv` (the generic OuterProduct / WindowReduction),
- after: the default rules as they are (`BlockedConv` first for blocked convs),

and checked against onnxruntime's output of the same NCHW operator chain. Times are taken in
paired rounds (before, after and onnxruntime back to back, ratios per round, medians of the
ratios), so load drifting on a shared machine cancels in each ratio. onnxruntime runs
ORT_ENABLE_ALL with the same thread count; its time is the kernel time of its (NCHWc) Conv /
pool node from its profiler (the ReorderInput/ReorderOutput nodes that a one-operator model
adds are left out; in a whole model they sit at the model's ends only). When onnxruntime does
not fuse the epilogue into that node (a residual Add whose other operand is an NCHW graph
input), the Add and the Relu after it are not counted: the comparison is against onnxruntime's
conv alone, the compiled kernel includes its epilogue.

    TVM_NUM_THREADS=2 nice -n 10 .venv/bin/python tools/bench_nchwc_kernels.py --threads 2
    .venv/bin/python tools/bench_nchwc_kernels.py --models resnet50 --kinds conv --rounds 9
    .venv/bin/python tools/bench_nchwc_kernels.py --only r50_3x3_64_56 --tile 4,2   # force a tile
    .venv/bin/python tools/bench_nchwc_kernels.py --only r50_3x3_128_28 --tune 16 --tuning-db /tmp/db

`--winograd M` compares, for the 3x3 stride-1 convs only, the direct kernel (before) with the
Winograd F(M x M, 3 x 3) kernel (after, targets/tvm/kernels/winograd.py) that the lowering makes
for them (`cpu{winograd=...}`):

    .venv/bin/python tools/bench_nchwc_kernels.py --models resnet50 --winograd 2

`--tune N` checks meta_schedule tuning on these kernels instead: each selected kernel's module is
tuned with targets/tvm_tuning.py (N trials, the default schedule measured as the task's default
record), the database applied, and the tuned / default / onnxruntime times printed.

Columns: ms of the after kernel, its GFLOP/s, onnxruntime's GFLOP/s, before/ORT, after/ORT,
after/before (medians of per-round ratios), before/ORT and after/ORT from the fastest round of each
(min:bef, min:aft — steadier when other jobs share the cores), the rules that scheduled the before
and after kernels, max error vs onnxruntime relative to the output's max magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # conv | stem | depthwise | maxpool | avgpool | gavgpool
    c: int
    h: int
    oc: int
    k: int
    s: int
    act: str = "relu"  # relu | clip | none
    residual: bool = False
    models: tuple[str, ...] = field(default=(), compare=False)

    @property
    def pad(self) -> int:
        return self.k // 2 if self.kind in ("conv", "stem", "depthwise", "maxpool") else 0

    @property
    def oh(self) -> int:
        if self.kind == "gavgpool":
            return 1
        return (self.h + 2 * self.pad - self.k) // self.s + 1

    @property
    def flops(self) -> float:
        if self.kind in ("conv", "stem"):
            return 2.0 * self.c * self.oc * self.k * self.k * self.oh * self.oh
        if self.kind == "depthwise":
            return 2.0 * self.c * self.k * self.k * self.oh * self.oh
        if self.kind == "gavgpool":
            return 1.0 * self.c * self.h * self.h
        return 1.0 * self.c * self.k * self.k * self.oh * self.oh


def _conv(name, c, h, oc, k, s, act="relu", residual=False, model="r50"):
    kind = "stem" if c % 8 else "conv"
    return Case(name, kind, c, h, oc, k, s, act, residual, (model,))


# ResNet-50 (torchvision v1.5, 224x224): conv → bias → Relu, or conv → bias → Add → Relu
RESNET50 = [
    _conv("r50_stem", 3, 224, 64, 7, 2),
    Case("r50_maxpool", "maxpool", 64, 112, 64, 3, 2, "none", False, ("r50",)),
    _conv("r50_1x1_64_64_56", 64, 56, 64, 1, 1),
    _conv("r50_3x3_64_56", 64, 56, 64, 3, 1),
    _conv("r50_1x1_64_256_56+add", 64, 56, 256, 1, 1, residual=True),
    _conv("r50_1x1_256_64_56", 256, 56, 64, 1, 1),
    _conv("r50_1x1_256_128_56", 256, 56, 128, 1, 1),
    _conv("r50_3x3_128_56_s2", 128, 56, 128, 3, 2),
    _conv("r50_1x1_128_512_28+add", 128, 28, 512, 1, 1, residual=True),
    _conv("r50_1x1_256_512_56_s2", 256, 56, 512, 1, 2, act="none"),
    _conv("r50_1x1_512_128_28", 512, 28, 128, 1, 1),
    _conv("r50_3x3_128_28", 128, 28, 128, 3, 1),
    _conv("r50_1x1_512_256_28", 512, 28, 256, 1, 1),
    _conv("r50_3x3_256_28_s2", 256, 28, 256, 3, 2),
    _conv("r50_1x1_256_1024_14+add", 256, 14, 1024, 1, 1, residual=True),
    _conv("r50_1x1_512_1024_28_s2", 512, 28, 1024, 1, 2, act="none"),
    _conv("r50_1x1_1024_256_14", 1024, 14, 256, 1, 1),
    _conv("r50_3x3_256_14", 256, 14, 256, 3, 1),
    _conv("r50_1x1_1024_512_14", 1024, 14, 512, 1, 1),
    _conv("r50_3x3_512_14_s2", 512, 14, 512, 3, 2),
    _conv("r50_1x1_512_2048_7+add", 512, 7, 2048, 1, 1, residual=True),
    _conv("r50_1x1_1024_2048_14_s2", 1024, 14, 2048, 1, 2, act="none"),
    _conv("r50_1x1_2048_512_7", 2048, 7, 512, 1, 1),
    _conv("r50_3x3_512_7", 512, 7, 512, 3, 1),
    Case("r50_gap", "gavgpool", 2048, 7, 2048, 7, 1, "none", False, ("r50",)),
]


def _mb(name, c, h, oc, k, s, act="clip", residual=False):
    return _conv(name, c, h, oc, k, s, act, residual, "mbv2")


def _dw(name, c, h, s):
    return Case(name, "depthwise", c, h, c, 3, s, "clip", False, ("mbv2",))


# MobileNetV2 (224x224, BatchNorm folded): expand 1x1 → Clip, depthwise 3x3 → Clip, project 1x1
# (no activation; + Add where the block has a residual)
MOBILENETV2 = [
    _mb("mb_stem", 3, 224, 32, 3, 2),
    _dw("mb_dw_32_112", 32, 112, 1),
    _mb("mb_1x1_32_16_112", 32, 112, 16, 1, 1, act="none"),
    _mb("mb_1x1_16_96_112", 16, 112, 96, 1, 1),
    _dw("mb_dw_96_112_s2", 96, 112, 2),
    _mb("mb_1x1_96_24_56", 96, 56, 24, 1, 1, act="none"),
    _mb("mb_1x1_24_144_56", 24, 56, 144, 1, 1),
    _dw("mb_dw_144_56", 144, 56, 1),
    _mb("mb_1x1_144_24_56+add", 144, 56, 24, 1, 1, act="none", residual=True),
    _dw("mb_dw_144_56_s2", 144, 56, 2),
    _mb("mb_1x1_144_32_28", 144, 28, 32, 1, 1, act="none"),
    _mb("mb_1x1_32_192_28", 32, 28, 192, 1, 1),
    _dw("mb_dw_192_28", 192, 28, 1),
    _mb("mb_1x1_192_32_28+add", 192, 28, 32, 1, 1, act="none", residual=True),
    _dw("mb_dw_192_28_s2", 192, 28, 2),
    _mb("mb_1x1_192_64_14", 192, 14, 64, 1, 1, act="none"),
    _mb("mb_1x1_64_384_14", 64, 14, 384, 1, 1),
    _dw("mb_dw_384_14", 384, 14, 1),
    _mb("mb_1x1_384_64_14+add", 384, 14, 64, 1, 1, act="none", residual=True),
    _mb("mb_1x1_384_96_14", 384, 14, 96, 1, 1, act="none"),
    _mb("mb_1x1_96_576_14", 96, 14, 576, 1, 1),
    _dw("mb_dw_576_14", 576, 14, 1),
    _mb("mb_1x1_576_96_14+add", 576, 14, 96, 1, 1, act="none", residual=True),
    _dw("mb_dw_576_14_s2", 576, 14, 2),
    _mb("mb_1x1_576_160_7", 576, 7, 160, 1, 1, act="none"),
    _mb("mb_1x1_160_960_7", 160, 7, 960, 1, 1),
    _dw("mb_dw_960_7", 960, 7, 1),
    _mb("mb_1x1_960_160_7+add", 960, 7, 160, 1, 1, act="none", residual=True),
    _mb("mb_1x1_960_320_7", 960, 7, 320, 1, 1, act="none"),
    _mb("mb_1x1_320_1280_7", 320, 7, 1280, 1, 1),
]


def _dn(name, c, h, oc, k, s):
    return _conv(name, c, h, oc, k, s, "none", False, "dn121")


# DenseNet-121 (224x224): each dense layer's 3x3 conv takes the 128 channels of its 1x1
# bottleneck (whose BN-ReLU epilogue runs in the bottleneck's kernel) to 32 (the growth rate),
# no activation; 6, 12, 24 and 16 of them on 56, 28, 14 and 7-wide maps
DENSENET121 = [_dn(f"dn_3x3_128_32_{h}", 128, h, 32, 3, 1) for h in (56, 28, 14, 7)]

MODELS = {"resnet50": RESNET50, "mobilenetv2": MOBILENETV2, "densenet121": DENSENET121}
#: the channel block between layers: the machine model's fp32 lanes (main() sets it from the
#: target, or --block)
B = 8
#: the machine model of the target (main() sets it)
MACHINE = None


# --------------------------------------------------------------------------- the kernels


def build_kernel(case: Case, target, winograd: int = 0):
    """The fused PrimFunc of `case` as the lowering makes it (Relax → LegalizeOps → FuseTIR) and
    its parameter shapes; `winograd`: the m of the F(m x m, 3 x 3) form of a 3x3 conv (0: direct)."""
    import tvm

    mod = build_module(case, target, winograd)
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1, f"{case.name}: {len(funcs)} PrimFuncs"
    func = funcs[0]
    shapes = [[int(d) for d in prm.shape] for prm in func.params]
    return func, shapes


def build_module(case: Case, target, winograd: int = 0):
    """The Relax module of `case` after FuseTIR: `main` calling the one fused kernel."""
    from tvm import relax

    from graphopt.targets.tvm.kernels import blocked as BO
    from graphopt.targets.tvm.kernels import winograd as WO
    from graphopt.targets.tvm.lower.legalize import legalize_and_fuse

    TT = relax.TensorType
    c, h, oc, k, s, oh = case.c, case.h, case.oc, case.k, case.s, case.oh
    p = case.pad
    bb = relax.BlockBuilder()
    if case.kind == "stem":
        x = relax.Var("x", TT((1, c, h, h), "float32"))
    else:
        x = relax.Var("x", TT((1, c // B, h, h, B), "float32"))
    params = [x]
    if case.kind == "conv" and winograd:
        params.append(relax.Var("w", TT(((winograd + 2) ** 2, oc // B, c // B, 1, 1, B, B), "float32")))
    elif case.kind == "conv":
        params.append(relax.Var("w", TT((oc // B, c // B, k, k, B, B), "float32")))
    elif case.kind == "stem":
        params.append(relax.Var("w", TT((oc // B, c, k, k, B), "float32")))
    elif case.kind == "depthwise":
        params.append(relax.Var("w", TT((c // B, k, k, B), "float32")))
    if case.kind in ("conv", "stem", "depthwise"):
        params.append(relax.Var("bias", TT((oc,), "float32")))
    if case.residual:
        params.append(relax.Var("r", TT((1, oc // B, oh, oh, B), "float32")))
    with bb.function("kernel", params, {"Primitive": True}, private=True):
        with bb.dataflow():
            if case.kind in ("conv", "stem", "depthwise"):
                fn = {"conv": BO.conv2d_blocked, "stem": BO.conv2d_stem, "depthwise": BO.depthwise_blocked}[case.kind]
                flat = _flat_multiple(case)
                if winograd:
                    y = bb.emit_te(WO.conv2d_winograd, x, params[1], [p] * 4, winograd, primfunc_name_hint="conv_winograd")
                elif flat:
                    y = bb.emit_te(BO.conv2d_blocked_flat, x, params[1], [s, s], [p] * 4, [1, 1], flat, primfunc_name_hint="conv_blocked")
                else:
                    y = bb.emit_te(fn, x, params[1], [s, s], [p] * 4, [1, 1], primfunc_name_hint=f"{case.kind}_blocked")
                y = bb.emit(relax.op.add(y, relax.op.reshape(params[2], [1, oc // B, 1, 1, B])))
            elif case.kind in ("maxpool", "avgpool"):
                y = bb.emit_te(BO.pool_blocked, x, case.kind[:3], [k, k], [s, s], [p] * 4, primfunc_name_hint="pool")
            else:
                y = bb.emit_te(BO.global_pool_blocked, x, "avg", primfunc_name_hint="gpool")
            if case.residual:
                y = bb.emit(relax.op.add(y, params[-1]))
            if case.act == "relu":
                y = bb.emit(relax.op.nn.relu(y))
            elif case.act == "clip":
                y = bb.emit(relax.op.clip(y, 0.0, 6.0))
            out = bb.emit_output(y)
        gv = bb.emit_func_output(out)
    mvars = [relax.Var(f"a{i}", v.ty) for i, v in enumerate(params)]
    with bb.function("main", mvars):
        with bb.dataflow():
            out = bb.emit_output(relax.Call(gv, mvars))
        bb.emit_func_output(out)
    return legalize_and_fuse(bb.get(), target)


def _flat_multiple(case: Case) -> int:
    """The pixel multiple of a conv the lowering runs on its flattened output pixels
    (`layout.flat_multiple`: unpadded 1x1 convs and small maps), or 0 (GRAPHOPT_NO_FLAT=1: never,
    to compare)."""
    from graphopt.targets.tvm import layout as LY

    if os.environ.get("GRAPHOPT_NO_FLAT") or case.kind != "conv":
        return 0
    return LY.flat_px_multiple((case.k, case.k), [case.pad] * 4, [1, 1], case.oc, case.oh, B, case.h, MACHINE)


def blocked(a: np.ndarray) -> np.ndarray:
    n, c, h, w = a.shape
    return np.ascontiguousarray(a.reshape(n, c // B, B, h, w).transpose(0, 1, 3, 4, 2))


def unblocked(a: np.ndarray) -> np.ndarray:
    n, cb, h, w, b = a.shape
    return np.ascontiguousarray(a.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w))


def case_data(case: Case, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """NCHW arrays of `case` (x, W, B, r) and the kernel's arguments made from them."""
    rng = np.random.default_rng(seed)
    c, h, oc, k, oh = case.c, case.h, case.oc, case.k, case.oh
    nchw = {"x": rng.standard_normal((1, c, h, h)).astype(np.float32)}
    if case.kind in ("conv", "stem"):
        nchw["W"] = (rng.standard_normal((oc, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    elif case.kind == "depthwise":
        nchw["W"] = (rng.standard_normal((c, 1, k, k)) / k).astype(np.float32)
    if "W" in nchw:
        nchw["B"] = (0.1 * rng.standard_normal(oc)).astype(np.float32)
    if case.residual:
        nchw["r"] = rng.standard_normal((1, oc, oh, oh)).astype(np.float32)
    args = {"x": nchw["x"] if case.kind == "stem" else blocked(nchw["x"])}
    if case.kind == "conv":
        w = nchw["W"].reshape(oc // B, B, c // B, B, k, k)  # [ob, oi, cb, ii, kh, kw]
        args["w"] = np.ascontiguousarray(w.transpose(0, 2, 4, 5, 3, 1))
    elif case.kind == "stem":
        args["w"] = np.ascontiguousarray(nchw["W"].reshape(oc // B, B, c, k, k).transpose(0, 2, 3, 4, 1))
    elif case.kind == "depthwise":
        args["w"] = np.ascontiguousarray(nchw["W"].reshape(c // B, B, k, k).transpose(0, 2, 3, 1))
    if "B" in nchw:
        args["bias"] = nchw["B"]
    if case.residual:
        args["r"] = blocked(nchw["r"])
    return nchw, args


def ort_model(case: Case):
    """The NCHW onnx model of `case` and the name of its main node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nchw, _ = case_data(case)
    p = case.pad
    inits, nodes, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, case.c, case.h, case.h])]
    if case.kind in ("conv", "stem", "depthwise"):
        inits = [numpy_helper.from_array(nchw["W"], "W"), numpy_helper.from_array(nchw["B"], "B")]
        nodes.append(helper.make_node("Conv", ["x", "W", "B"], ["y0"], name="main", kernel_shape=[case.k] * 2,
                                      pads=[p] * 4, strides=[case.s] * 2, group=case.c if case.kind == "depthwise" else 1))
    elif case.kind == "maxpool":
        nodes.append(helper.make_node("MaxPool", ["x"], ["y0"], name="main", kernel_shape=[case.k] * 2, pads=[p] * 4,
                                      strides=[case.s] * 2))
    elif case.kind == "avgpool":
        nodes.append(helper.make_node("AveragePool", ["x"], ["y0"], name="main", kernel_shape=[case.k] * 2,
                                      pads=[p] * 4, strides=[case.s] * 2))
    else:
        nodes.append(helper.make_node("GlobalAveragePool", ["x"], ["y0"], name="main"))
    last = "y0"
    if case.residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, case.oc, case.oh, case.oh]))
        nodes.append(helper.make_node("Add", [last, "r"], ["y1"], name="add"))
        last = "y1"
    if case.act == "relu":
        nodes.append(helper.make_node("Relu", [last], ["y2"], name="act"))
        last = "y2"
    elif case.act == "clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["y2"], name="act"))
        last = "y2"
    out = helper.make_tensor_value_info(last, TensorProto.FLOAT, [1, case.oc, case.oh, case.oh])
    g = helper.make_graph(nodes, case.name, inputs, [out], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


class OrtTimer:
    """onnxruntime's kernel time of the model's main node, from its profiler."""

    def __init__(self, case: Case, threads: int, feeds: dict[str, np.ndarray]) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_profiling = True
        # spinning worker threads would steal the cores from the TVM kernel timed right after
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._dir = tempfile.mkdtemp(prefix="nchwc_ort_")
        so.profile_file_prefix = os.path.join(self._dir, "p")
        self.sess = ort.InferenceSession(ort_model(case).SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.feeds = feeds
        self.out = self.sess.run(None, feeds)[0]
        self.runs: list[int] = []  # how many runs in each timed batch

    def batch(self, n: int) -> None:
        for _ in range(n):
            self.sess.run(None, self.feeds)
        self.runs.append(n)

    def finish(self) -> tuple[list[float], str]:
        """Mean main-node time (s) of each batch, and the op that ran it."""
        path = self.sess.end_profiling()
        with open(path) as f:
            events = json.load(f)
        os.remove(path)
        os.rmdir(self._dir)
        runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
        nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")), key=lambda e: e["ts"])
        per_run: list[float] = []
        op = ""
        for r in runs:
            t0, t1 = r["ts"], r["ts"] + r["dur"]
            main = [e for e in nodes if t0 <= e["ts"] <= t1 and e["args"].get("op_name") not in ("ReorderInput", "ReorderOutput")
                    and not e["name"].startswith(("add_", "act_", "Add", "Relu", "Clip"))]
            if main:
                op = main[0]["args"].get("op_name", "") + ("(nchwc)" if "nchwc" in main[0]["name"] else "")
            per_run.append(sum(e["dur"] for e in main) * 1e-6)
        per_run = per_run[1:]  # the first run was the reference run in __init__
        out, i = [], 0
        for n in self.runs:
            out.append(float(np.mean(per_run[i : i + n])))
            i += n
        return out, op


# --------------------------------------------------------------------------- main


def _compile(func, target):
    import tvm

    from graphopt.targets.tvm.schedules.loop_marks import apply_loop_marks

    return tvm.compile(tvm.IRModule({"main": apply_loop_marks(func).with_attr("global_symbol", "main")}), target=target)


def run_case(case: Case, target, threads: int, rounds: int, tile=None, winograd: int = 0) -> dict:
    """Time `case` before / after (see module docstring; `winograd`: direct vs F(m x m, 3 x 3))."""
    import tvm

    from graphopt.targets.tvm.schedules import nchwc as NS
    from graphopt.targets.tvm.schedules import default as TS

    func, shapes = build_kernel(case, target)
    rules_after = TS.default_rules(target)
    if tile is not None:
        rules_after = [NS.BlockedConv(tile) if isinstance(r, NS.BlockedConv) else r for r in rules_after]
    rules_before = [r for r in TS.default_rules(target) if not isinstance(r, NS.BlockedConv)]
    nchw, args = case_data(case)
    args_a = args
    if winograd:
        sch_b, rule_b, _ = TS.default_schedule(func, target, rules_after)
        sch_a, rule_a, notes = TS.default_schedule(build_kernel(case, target, winograd)[0], target, rules_after)
        from graphopt.targets.tvm.kernels.winograd import pack_winograd_weight_numpy

        args_a = {**args, "w": pack_winograd_weight_numpy(nchw["W"], B, winograd)}
    else:
        sch_b, rule_b, _ = TS.default_schedule(func, target, rules_before)
        sch_a, rule_a, notes = TS.default_schedule(func, target, rules_after)
    feeds = {"x": nchw["x"], **({"r": nchw["r"]} if case.residual else {})}
    ort_t = OrtTimer(case, threads, feeds)
    dev = tvm.cpu()
    targs_of = {"before": [tvm.runtime.tensor(a, dev) for a in args.values()],
                "after": [tvm.runtime.tensor(a, dev) for a in args_a.values()]}
    libs = {}
    for label, sch in (("before", sch_b), ("after", sch_a)):
        lib = _compile(sch.mod["main"], target)
        out = tvm.runtime.tensor(np.zeros(shapes[-1], np.float32), dev)
        lib["main"](*targs_of[label], out)
        libs[label] = (lib, out)
    ref = ort_t.out
    y = unblocked(libs["after"][1].numpy())
    yb = unblocked(libs["before"][1].numpy())
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(y - ref).max()) / scale
    err_b = float(np.abs(yb - ref).max()) / scale
    # batch size: ~20 ms per timed batch
    ev1 = libs["after"][0].mod.time_evaluator("main", dev, number=1, repeat=3)
    t1 = max(float(np.min(ev1(*targs_of["after"], libs["after"][1]).results)), 1e-6)
    n = int(min(max(2, 0.02 / t1), 200))
    # repeat 2, the second counted: the first of a batch pays the thread pool's wake-up
    evs = {k: lib.mod.time_evaluator("main", dev, number=n, repeat=2) for k, (lib, _) in libs.items()}
    times: dict[str, list[float]] = {"before": [], "after": []}
    ort_t.batch(n)  # warm
    for i in range(rounds):
        for k in (("before", "after") if i % 2 == 0 else ("after", "before")):
            times[k].append(float(evs[k](*targs_of[k], libs[k][1]).results[-1]))
        ort_t.batch(n)
    ort_times, ort_op = ort_t.finish()
    ort_times = ort_times[1:]
    tb, ta, to = (np.array(times["before"]), np.array(times["after"]), np.array(ort_times))
    return {
        "case": case.name, "ms": float(np.median(ta)) * 1e3, "gflops": case.flops / float(np.median(ta)) / 1e9,
        "ort_gflops": case.flops / float(np.median(to)) / 1e9,
        "before_ort": float(np.median(tb / to)), "after_ort": float(np.median(ta / to)),
        "after_before": float(np.median(ta / tb)), "after_ort_min": float(ta.min() / to.min()),
        "before_ort_min": float(tb.min() / to.min()), "rule": rule_a, "rule_before": rule_b, "err": err, "err_before": err_b,
        "ort_op": ort_op, "notes": notes,
    }


def tune_case(case: Case, target, threads: int, trials: int, db_dir: str) -> dict:
    """Tune `case`'s module into `db_dir`, apply the database, time the result against the
    default schedule and onnxruntime."""
    import tvm

    from graphopt.targets.tvm.schedules import default as TS
    from graphopt.targets.tvm.tuning import tuner as TT

    mod = build_module(case, target)
    TT.tune(mod, target, db_dir=db_dir, trials=trials, progress=False, threads=threads)
    summary = TT.last_summary(db_dir)
    applied = TT.apply_database(mod, target, db_dir)
    stats = TS.ScheduleStats()
    final = TS.apply_default_schedules(applied, target, stats=stats)
    (gv,) = [gv for gv, f in final.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    func, shapes = build_kernel(case, target)
    sch, _, _ = TS.default_schedule(func, target)
    nchw, args = case_data(case)
    feeds = {"x": nchw["x"], **({"r": nchw["r"]} if case.residual else {})}
    ort_t = OrtTimer(case, threads, feeds)
    dev = tvm.cpu()
    targs = [tvm.runtime.tensor(a, dev) for a in args.values()]
    res = {}
    for label, f in (("applied", final[gv]), ("default", sch.mod["main"])):
        lib = _compile(f, target)
        out = tvm.runtime.tensor(np.zeros(shapes[-1], np.float32), dev)
        lib["main"](*targs, out)
        err = float(np.abs(unblocked(out.numpy()) - ort_t.out).max()) / (float(np.abs(ort_t.out).max()) or 1.0)
        ev = lib.mod.time_evaluator("main", dev, number=5, repeat=5)
        res[label] = (float(np.median(ev(*targs, out).results)), err)
    ort_t.batch(25)
    ort_times, _ = ort_t.finish()
    to = ort_times[-1]
    kept = summary.get("kept", {})
    return {"case": case.name, "trials": summary.get("new_trials"), "kept": {k: v.get("kept") for k, v in kept.items()},
            "tune_default_ms": {k: v.get("default_ms") for k, v in kept.items()},
            "tune_best_ms": {k: v.get("tuned_ms") for k, v in kept.items()},
            "applied_ort": res["applied"][0] / to, "default_ort": res["default"][0] / to,
            "applied_rule": stats.by_func.get(gv.name_hint, "database"), "err": res["applied"][1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="resnet50,mobilenetv2")
    ap.add_argument("--kinds", default="", help="comma list of kinds (conv, stem, depthwise, maxpool, gavgpool); default all")
    ap.add_argument("--only", default="", help="comma list of case names (substrings)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mcpu", default="", help="compile for this LLVM cpu (default: the host's)")
    ap.add_argument("--block", type=int, default=0, help="channel block (default: the machine model's fp32 lanes)")
    ap.add_argument("--tile", default="", help="force BlockedConv's tile: rt,obt[,order]")
    ap.add_argument("--json", default="", help="write the rows to this file")
    ap.add_argument("--tune", type=int, default=0, help="check tuning: this many trials per kernel (see above)")
    ap.add_argument("--tuning-db", default="", help="database directory for --tune")
    ap.add_argument("--winograd", type=int, default=0, metavar="M",
                    help="3x3 stride-1 convs only: the direct kernel (before) vs Winograd F(M x M, 3 x 3) (after)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))
    if os.environ["TVM_NUM_THREADS"] != str(a.threads):
        print(f"warning: TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']} but --threads {a.threads}", file=sys.stderr)
    from graphopt.targets.tvm.schedules.tiles import ConvTile
    from graphopt.targets.tvm.build import host_target

    target = host_target(threads=a.threads, mcpu=a.mcpu or None)
    global B, MACHINE
    from graphopt.targets.machine import machine_model

    MACHINE = machine_model(target)
    B = a.block or MACHINE.lanes(32)
    tile = None
    if a.tile:
        v = a.tile.split(",")
        tile = ConvTile(int(v[0]), int(v[1]), *v[2:3])
    cases: list[Case] = []
    for m in a.models.split(","):
        cases += MODELS[m]
    if a.kinds:
        cases = [c for c in cases if c.kind in a.kinds.split(",")]
    if a.only:
        cases = [c for c in cases if any(o in c.name for o in a.only.split(","))]
    if a.winograd:
        cases = [c for c in cases if c.kind == "conv" and c.k == 3 and c.s == 1]
    if a.tune:
        if not a.tuning_db:
            ap.error("--tune needs --tuning-db")
        bad = 0
        for case in cases:
            r = tune_case(case, target, a.threads, a.tune, a.tuning_db)
            print(json.dumps(r), flush=True)
            bad += r["err"] > 1e-4
        return 1 if bad else 0
    print(f"target {target.attrs.get('mcpu')} block {B} threads {a.threads}; {len(cases)} kernels; ratios are medians of "
          f"per-round ratios over {a.rounds} paired rounds (shared machine: absolute times are noisy)", flush=True)
    hdr = (f"{'case':28s} {'ms':>7s} {'GF/s':>5s} {'ortGF':>5s} {'bef/ort':>7s} {'aft/ort':>7s} {'aft/bef':>7s} "
           f"{'min:bef':>7s} {'min:aft':>7s}  {'rule (before → after)':36s} {'ort op':12s} err")
    print(hdr)
    rows = []
    for case in cases:
        r = run_case(case, target, a.threads, a.rounds, tile, a.winograd)
        rows.append(r)
        print(f"{r['case']:28s} {r['ms']:7.3f} {r['gflops']:5.0f} {r['ort_gflops']:5.0f} {r['before_ort']:7.2f} {r['after_ort']:7.2f} "
              f"{r['after_before']:7.2f} {r['before_ort_min']:7.2f} {r['after_ort_min']:7.2f}  {r['rule_before'] + ' → ' + r['rule']:36s} {r['ort_op']:12s} {r['err']:.1e}", flush=True)
        if max(r["err"], r["err_before"]) > 1e-4:
            print(f"  !! {case.name}: max error {r['err']:.2e} (before {r['err_before']:.2e}) relative to max |y|", flush=True)
    for label in ("before_ort", "after_ort", "before_ort_min", "after_ort_min"):
        vals = np.array([r[label] for r in rows])
        print(f"{label}: geomean {np.exp(np.log(vals).mean()):.2f}, max {vals.max():.2f}, "
              f"shapes <= 1.0: {(vals <= 1.0).sum()}/{len(vals)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["err"] > 1e-4]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

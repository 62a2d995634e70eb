"""`convert-precision`: float32 weights and activations to fp16 or bf16, sensitive ops kept fp32."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.ir import Attr, AttrType, Builder, unique_name, DataType, Model, Node, NumpyTensor, TensorType, Value, opset_version
from graphopt.passes.cleanup.infer import infer_types
from graphopt.passes.precision import kernels
from graphopt.pattern import const_array
from graphopt.transform import Pass, PassContext, PassResult, register_pass

FP16_MAX = 65504.0
#: calibrated |x| above this keeps a tensor's producer and readers fp32: 2x headroom over fp16's
#: largest finite value, since calibration sees a sample of the inputs
OVERFLOW_LIMIT = FP16_MAX / 2

#: kept fp32 because fp16/bf16 loses too much there: accumulations over many elements
#: (reductions, normalization statistics), exponentials and powers (range), sorting and indices
SENSITIVE_OPS: dict[str, str] = {
    **{op: "reduction" for op in ("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2",
                                  "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "CumSum")},
    **{op: "softmax/normalization statistics" for op in ("Softmax", "LogSoftmax", "LayerNormalization", "GroupNormalization",
                                                         "InstanceNormalization", "MeanVarianceNormalization", "LpNormalization",
                                                         "RMSNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization")},
    **{op: "exp/log/pow" for op in ("Exp", "Log", "Pow", "Softplus")},
}
#: kept fp32 as onnxruntime's transformers float16 tool and onnxconverter-common do
#: (DEFAULT_OP_BLOCK_LIST): classical-ML ops, index/sort ops whose results change with ties,
#: Min/Max (often clamp against huge constants), Range/RandomUniformLike
BLOCKED_OPS = frozenset({
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer", "Imputer",
    "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder", "RandomUniformLike", "SVMClassifier",
    "SVMRegressor", "Scaler", "TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble", "ZipMap",
    "NonMaxSuppression", "TopK", "RoiAlign", "Range", "Min", "Max", "Upsample",
})
#: inputs that stay float32 whatever the schema allows (as onnxruntime's float16 tool keeps them)
ALWAYS_FLOAT_INPUTS = {"Resize": (2,), "GroupNorm": (1, 2), "SkipGroupNorm": (1, 2)}
#: ops whose low-precision result is the rounding of their fp32 result (data movement, max,
#: sign): converted only where one of their float inputs is already low precision -- alone
#: between fp32 ops they would only add two Casts
FOLLOWER_OPS = frozenset({
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "GatherElements",
    "GatherND", "Identity", "Expand", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "MaxPool", "GlobalMaxPool",
    "ReduceMax", "ReduceMin", "Relu", "Abs", "Neg", "Where", "Clip", "ScatterND", "ScatterElements",
})
DTYPES = {"fp16": DataType.FLOAT16, "bf16": DataType.BFLOAT16}
KERNELS = ("auto", "onnxruntime", "any")


@register_pass
@dataclass(frozen=True)
class ConvertPrecision(Pass):
    """Mixed precision: float32 ops to fp16/bf16, numerically sensitive ones kept fp32, Casts at the boundaries.

    Rewrite: an op whose float32 inputs/outputs are of one type variable T in its ONNX schema
    computes in the low precision: its constant float inputs become fp16/bf16 initializers
    (fp16: clamped to +-65504), its other float inputs are cast once per tensor (one Cast shared
    by all readers), and readers that stay fp32 get one Cast back. Conv(x, W) -> Relu (x fp32):
    Cast(x, fp16) -> Conv(., W fp16) -> Relu. Model inputs and outputs keep float32 (a Cast after
    the input, the output renamed through a Cast) unless `keep-io-types=false`. An existing
    Cast(to=float) whose readers all became low precision now casts to the low precision, and a
    Cast to the type it reads is removed: no Cast pair converts back and forth.

    Must not fire (the node stays fp32, counted per reason in the stats, named in ctx.log):
    nodes matching `keep` (fnmatch globs on the node name or first output, ':'-separated); the
    sensitive ops (reductions and CumSum, Softmax/LogSoftmax and normalization statistics --
    LayerNormalization with stash_type=1 converts, the spec computes its statistics in fp32 --,
    Exp/Log/Pow/Softplus) and onnxruntime's float16-tool block list (TopK, NonMaxSuppression,
    RoiAlign, Range, Min, Max, classical ML...); nodes that read or write a tensor whose
    calibrated |x| exceeds 32752 (fp16's max / 2; fp16 only, with calibration data: `data=` or
    the pipeline's --calibration; without data only the op lists decide); nodes with subgraphs
    (If/Loop/Scan) and everything inside them; ops outside the default domain (no schema) and
    ops whose float output type is set by an attribute (RandomNormal, EyeLike...); ops the
    runtime has no kernel for (`kernels=`); data-movement ops (Reshape, Transpose, Concat,
    MaxPool, Relu...) none of whose float inputs is low precision (they would only add Casts).
    A second run changes nothing.

    kernels= auto: on the onnx target, `onnxruntime` (see below); on a compiled target (cpu),
    Conv/ConvTranspose/MatMul/Gemm and the data-movement ops around them (the ops whose bf16
    dot products the target has), other compute ops fp32. onnxruntime: probe the installed
    onnxruntime's CPU EP for every converted signature and keep fp32 what it has no native
    kernel for (on x86-64 that is nearly every fp16 compute op: onnxruntime would wrap them in
    Casts itself; bf16 has no compute kernels at all there, and the pass says so). any: convert
    by the ONNX schema alone, for a runtime with fp16 kernels (CUDA, DirectML, ARM64 CPU).
    """

    name: ClassVar[str] = "convert-precision"
    idle_reason: ClassVar[str] = "no float32 op can run in the lower precision"
    dtype: str = "fp16"  # fp16 | bf16
    keep: tuple[str, ...] = ()  # node-name / output-name globs kept fp32
    keep_io_types: bool = True
    kernels: str = "auto"  # auto | onnxruntime | any
    data: str = ""  # calibration .npz (or folder); empty: ctx.data["calibration"] if given, else none

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r} is not one of {', '.join(KERNELS)}")

    # -------------------------------------------------------------------------------------- run
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        low = DTYPES[self.dtype]
        opset = opset_version(model, default=0)
        kernels_mode = self.kernels
        if kernels_mode == "auto":
            kernels_mode = "onnxruntime" if ctx.machine is None else "compiled"
        if kernels_mode == "onnxruntime" and low == DataType.BFLOAT16:
            core = kernels.probe_compute_ops(low, 17)
            if all(v != kernels.NATIVE for v in core.values()):
                why = ("onnxruntime's CPU EP has no bf16 kernel for " + ", ".join(core) +
                       " (it refuses such models): model left fp32; use --target cpu, or kernels=any for a runtime with bf16 kernels")
                ctx.info(f"convert-precision: refused: {why}")
                ctx.data["convert-precision"] = {"result": f"refused: {why}"}
                return PassResult(False, {}, note=f"refused: {why}")
        infer_types(model)
        ranges = self._ranges(model, ctx) if low == DataType.FLOAT16 else {}
        plan = _Planner(model, low, opset, self.keep, kernels_mode, ranges).plan()
        stats, changed = _apply(model, plan, low, self.keep_io_types)
        by_reason: dict[str, list[str]] = {}
        for node, reason in plan.kept.items():
            by_reason.setdefault(reason, []).append(node.op_type)
        for reason, ops in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            kinds = ", ".join(f"{op} x{ops.count(op)}" for op in dict.fromkeys(ops))
            ctx.info(f"convert-precision: kept fp32 ({reason}): {kinds}")
        for cat in sorted({_category(r) for r in plan.kept.values()}):
            stats[f"kept-{cat}"] = sum(1 for r in plan.kept.values() if _category(r) == cat)
        stats["kept-fp32"] = len(plan.kept)
        if changed and kernels_mode == "compiled":
            # said once, so nobody reads bf16 as "uses the bf16 dot-product instructions"
            has = getattr(ctx.machine, "has", None)
            dot = " (this CPU's avx512bf16 vdpbf16ps is not used yet)" if callable(has) and has("avx512bf16") else ""
            ctx.info(f"convert-precision: compiled kernels store {self.dtype} and compute with fp32 FMAs: TVM 0.27 "
                     f"legalizes {self.dtype} arithmetic to fp32{dot}; weights and activations take half the bytes")
        ctx.data["convert-precision"] = {
            "dtype": self.dtype, "kernels": kernels_mode, "calibrated-tensors": len(ranges),
            "converted": [n.name or n.outputs[0].name for n in plan.low],
            "kept": {(n.name or n.outputs[0].name): r for n, r in plan.kept.items()},
        }
        note = ""
        if not changed and plan.kept:
            top = max(by_reason.items(), key=lambda kv: len(kv[1]))
            note = f"nothing converted: {len(plan.kept)} float ops kept fp32, most for: {top[0]}"
        elif changed:
            note = (f"{stats['converted']} ops to {self.dtype}, {len(plan.kept)} kept fp32, {stats['casts-added']} Casts added"
                    + (f" ({len(ranges)} tensors calibrated)" if ranges else ""))
        return PassResult(changed, stats, note=note)

    def _ranges(self, model: Model, ctx: PassContext) -> dict[str, float]:
        """max |x| of every float32 tensor of the main graph over the calibration data (empty
        without data: synthetic inputs say nothing about a model's real ranges)."""
        from graphopt.calibration import as_calibration, collect_ranges, load_calibration

        if self.data:
            data = load_calibration(self.data, model)
        else:
            given = ctx.data.get("calibration")
            if given is None or (isinstance(given, str) and not given):
                return {}
            data = as_calibration(given, model)
        names = [o.name for n in model.graph for o in n.outputs if o.dtype == DataType.FLOAT and o.name]
        names += [v.name for v in model.graph.inputs if v.dtype == DataType.FLOAT and not v.is_initializer()]
        stats = collect_ranges(model, data, names)
        return {n: (np.inf if s.has_sentinels else max(abs(s.min), abs(s.max))) for n, s in stats.items()}


def _category(reason: str) -> str:
    for key in ("keep=", "sensitive", "block list", "overflow", "kernel", "subgraph", "schema", "attribute", "compiled", "isolated"):
        if key in reason:
            return {"keep=": "glob", "block list": "blocked", "attribute": "schema", "compiled": "kernel"}.get(key, key)
    return "other"


# ------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    low: dict[Node, tuple[int, ...]]  # converted node -> the input indices that become low precision
    outs: dict[Node, tuple[int, ...]]  # converted node -> the output indices that become low precision
    kept: dict[Node, str]  # float node kept fp32 -> why
    retarget: list[Node]  # Cast(to=float) nodes whose readers are all low: cast to low instead


@dataclass
class _Planner:
    model: Model
    low: DataType
    opset: int
    keep: tuple[str, ...]
    kernels: str  # onnxruntime | any | compiled
    ranges: dict[str, float]

    def plan(self) -> _Plan:
        p = _Plan({}, {}, {}, [])
        lowvals: set[Value] = set()  # values that will be low precision
        for node in self.model.graph:
            fin = [i for i, v in enumerate(node.inputs) if v is not None and v.dtype == DataType.FLOAT]
            fout = [j for j, o in enumerate(node.outputs) if o.dtype == DataType.FLOAT]
            if node.op_type in ("Cast", "CastLike", "Constant", "Shape", "Size") and not node.domain:
                continue  # Casts: decided below from their readers; Constants: converted where read; Shape/Size read any type
            if not fin and not fout:
                continue
            why = self._why_not(node, fin, fout, lowvals)
            if isinstance(why, str):
                if why:  # "" : a follower left fp32, not worth a line
                    p.kept[node] = why
                continue
            ins, outs = why
            p.low[node], p.outs[node] = ins, outs
            lowvals.update(node.outputs[j] for j in outs)
        if self.kernels == "onnxruntime":
            self._drop_islands(p, lowvals)
        for node in self.model.graph:  # Cast(to=float) read only by converted ops: cast to low directly
            if node.op_type == "Cast" and not node.domain and node.attr("to") == int(DataType.FLOAT):
                o = node.outputs[0]
                readers = o.uses()
                if readers and not o.is_graph_output() and all(n in p.low and i in p.low[n] for n, i in readers):
                    p.retarget.append(node)
        return p

    def _drop_islands(self, p: _Plan, lowvals: set[Value]) -> None:
        """A group of converted ops joined by low activations (constants and what data movement
        makes of them do not join) with fewer than two compute ops would mostly sit between Casts
        in and out (a lone LayerNormalization among fp32 ops on x86 onnxruntime, with the Gather
        after it): it stays fp32 (data-movement ops silently)."""
        constlike: set[Value] = set()
        for node, outs in p.outs.items():  # graph order: a follower of constants yields a constant
            if node.op_type in FOLLOWER_OPS and all(const_array(node.inputs[i]) is not None or node.inputs[i] in constlike
                                                    for i in p.low[node]):
                constlike.update(node.outputs[j] for j in outs)
        # groups of converted ops joined by low activations (union-find)
        parent: dict[Node, Node] = {n: n for n in p.low}

        def root(n: Node) -> Node:
            while parent[n] is not n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        for node, ins in p.low.items():
            for i in ins:
                v = node.inputs[i]
                prod = v.producer() if v is not None else None
                if prod is not None and prod in p.low and v not in constlike:
                    parent[root(node)] = root(prod)
        compute: dict[Node, int] = {}
        for node in p.low:
            compute[root(node)] = compute.get(root(node), 0) + (node.op_type not in FOLLOWER_OPS)
        for node in list(p.low):
            if compute[root(node)] < 2:
                del p.low[node]
                lowvals.difference_update(node.outputs[j] for j in p.outs.pop(node))
                if node.op_type not in FOLLOWER_OPS:
                    p.kept[node] = "isolated: its Casts would cost more than fp16 saves"

    def _why_not(self, node: Node, fin: list[int], fout: list[int], lowvals: set[Value]) -> str | tuple[tuple[int, ...], tuple[int, ...]]:
        label = [node.name, node.outputs[0].name if node.outputs else ""]
        for pat in self.keep:
            if any(s and fnmatch.fnmatchcase(s, pat) for s in label):
                return f"keep={pat}"
        if node.subgraphs():
            return "has subgraphs (If/Loop/Scan bodies stay fp32)"
        if node.domain not in ("", "ai.onnx"):
            return f"domain {node.domain!r}: no ONNX schema"
        if node.op_type in SENSITIVE_OPS and not _stats_in_fp32(node):
            return f"sensitive: {SENSITIVE_OPS[node.op_type]}"
        if node.op_type in BLOCKED_OPS:
            return "onnxruntime float16 block list"
        split = _schema_split(node, self.opset, self.low, fin, fout, compiled=self.kernels == "compiled")
        if isinstance(split, str):
            return split
        ins, outs = split
        if not ins and not outs:
            return "schema: no float input or output may change type"
        for v in [node.inputs[i] for i in fin] + [node.outputs[j] for j in fout]:
            r = self.ranges.get(v.name) if v is not None else None
            if r is not None and r > OVERFLOW_LIMIT:
                return "calibrated range overflows fp16" + (" (sentinel values)" if r == np.inf else f" (|x| up to {r:.3g})")
        if node.op_type in FOLLOWER_OPS and not any(node.inputs[i] in lowvals or const_array(node.inputs[i]) is not None for i in ins):
            return ""  # (a constant input converts for free: Gather from an embedding table does)
        if self.kernels == "compiled" and node.op_type not in COMPILED_LOW_OPS and node.op_type not in FOLLOWER_OPS:
            return f"compiled target: {self.low.name.lower()} only for the dot-product ops"
        if self.kernels == "onnxruntime":
            types = [None if v is None else (self.low if i in ins else v.dtype) for i, v in enumerate(node.inputs)]
            ranks = [None if v is None or v.shape is None else v.shape.rank for v in node.inputs]
            if any(t is None and v is not None for t, v in zip(types, node.inputs)):
                return "an input's type is unknown"
            answer, detail = kernels.onnxruntime_kernel(node, types, ranks, self.opset)
            if answer != kernels.NATIVE:
                return f"no {self.low.name.lower()} kernel in onnxruntime's CPU EP" + ("" if answer == kernels.NONE else " (it would cast to float)")
        return ins, outs


def _stats_in_fp32(node: Node) -> bool:
    """LayerNormalization computes its mean and variance in float32 whatever its input type
    (stash_type=1, the default, by the ONNX spec): its statistics stay fp32 in fp16 too."""
    return node.op_type == "LayerNormalization" and not node.domain and node.attr("stash_type", 1) == 1


#: on a compiled target, the ops that run in low precision (its dot-product instructions)
COMPILED_LOW_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def _schema_split(node: Node, opset: int, low: DataType, fin: list[int], fout: list[int], *,
                  compiled: bool = False) -> str | tuple[tuple[int, ...], tuple[int, ...]]:
    """Which float32 inputs/outputs change type: those of a type variable that allows `low`
    (`compiled`: that allows float -- a compiled target lowers any float type, whatever the
    opset's schema lists: Conv has bf16 only from opset 22). A reason string when the node
    cannot be converted consistently."""
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=opset or 21, domain=node.domain if node.domain != "ai.onnx" else "")
    except Exception:  # noqa: BLE001 - unknown op
        return "no ONNX schema for this op"
    lowstr = f"tensor({'float16' if low == DataType.FLOAT16 else 'bfloat16'})"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    always = ALWAYS_FLOAT_INPUTS.get(node.op_type, ())

    def formal(params: list[Any], i: int) -> Any:
        if i < len(params):
            return params[i]
        last = params[-1] if params else None
        return last if last is not None and last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None

    conv_vars: set[str] = set()
    ins: list[int] = []
    for i in fin:
        f = formal(schema.inputs, i)
        if f is None or i in always:
            continue
        if lowstr in allowed.get(f.type_str, ()) or (compiled and "tensor(float)" in allowed.get(f.type_str, ())):
            conv_vars.add(f.type_str)
            ins.append(i)
    outs: list[int] = []
    for j in fout:
        f = formal(schema.outputs, j)
        if f is None:
            return "schema: unknown output"
        if f.type_str in conv_vars:
            outs.append(j)
        elif f.type_str in allowed:
            if any(q.type_str == f.type_str for q in schema.inputs):
                return f"schema: {node.op_type}-{schema.since_version} has no {low.name.lower()}"
            return "output type set by an attribute"  # a type variable no input binds (RandomNormal...)
    # an input of a converted type variable that is not float32 (mixed types): leave the node
    for i, v in enumerate(node.inputs):
        f = formal(schema.inputs, i)
        if v is not None and f is not None and f.type_str in conv_vars and i not in ins and i not in always:
            return "schema: mixed input types"
    return tuple(ins), tuple(outs)


# ------------------------------------------------------------------------------------- rewriting
def _low_array(a: np.ndarray, low: DataType) -> tuple[np.ndarray, int]:
    """`a` in the low precision; fp16 clamps to its finite range (count of clamped values)."""
    a = np.asarray(a)
    clamped = 0
    if low == DataType.FLOAT16 and a.size and max(float(np.nanmax(a)), -float(np.nanmin(a))) > FP16_MAX:  # rare: a cheap check first
        finite = np.isfinite(a)
        big = finite & (np.abs(a) > FP16_MAX)
        clamped = int(big.sum())
        if clamped:
            a = np.where(big, np.sign(a) * FP16_MAX, a)
    return a.astype(low.numpy()), clamped


def _suffix(dtype: DataType) -> str:
    return {DataType.FLOAT16: "_fp16", DataType.BFLOAT16: "_bf16"}.get(dtype, "_fp32")


def _with_dtype(v: Value, dtype: DataType) -> None:
    v.type = TensorType(dtype, v.shape) if isinstance(v.type, TensorType) else TensorType(dtype)


def _apply(model: Model, p: _Plan, low: DataType, keep_io_types: bool) -> tuple[dict[str, int | float], bool]:
    g = model.graph
    b = Builder(g)
    stats: dict[str, int | float] = {"converted": len(p.low), "casts-added": 0, "initializers-converted": 0,
                                     "constants-clamped": 0, "casts-removed": 0}
    changed = False
    to_low: dict[Value, Value] = {}
    to_f32: dict[Value, Value] = {}
    old_consts: list[Value] = []

    def cast_after(v: Value, dtype: DataType) -> Value:
        prod = v.producer()
        ctx_mgr = g.inserting_after(prod) if prod is not None else g.inserting_before(next(iter(g))) if len(g) else None
        base = (v.name or "v") + _suffix(dtype)
        if ctx_mgr is None:
            node = b.node("Cast", [v], {"to": int(dtype)}, output_names=[base])
        else:
            with ctx_mgr:
                node = b.node("Cast", [v], {"to": int(dtype)}, output_names=[base])
        out = node.outputs[0]
        _with_dtype(out, dtype)
        if v.shape is not None:
            out.type = TensorType(dtype, v.shape)
        stats["casts-added"] += 1
        return out

    def low_input(v: Value) -> Value:
        if v in to_low:
            return to_low[v]
        arr = const_array(v)
        if arr is not None and arr.dtype == np.float32 and (v.is_initializer() or v.producer() is not None):
            la, clamped = _low_array(arr, low)
            nv = b.initializer(NumpyTensor(la), (v.name or "const") + _suffix(low))
            stats["initializers-converted"] += 1
            stats["constants-clamped"] += clamped
            old_consts.append(v)
        else:
            nv = cast_after(v, low)
        to_low[v] = nv
        return nv

    lowvals = [o for node, outs in p.outs.items() for o in (node.outputs[j] for j in outs)] + [n.outputs[0] for n in p.retarget]
    lowset = set(lowvals)
    # 1. inputs of converted nodes (those another converted node produces are low already)
    for node, ins in p.low.items():
        for i in ins:
            v = node.inputs[i]
            assert v is not None
            if v.dtype == low or v in lowset:
                continue
            node.replace_input_with(i, low_input(v))
            changed = True
    # 2. outputs of converted nodes change type; fp32 readers get one Cast back
    for node, outs in p.outs.items():
        for j in outs:
            o = node.outputs[j]
            _with_dtype(o, low)
            changed = True
    for node in p.retarget:  # Cast(to=float) -> Cast(to=low)
        node.set_attr(Attr("to", AttrType.INT, int(low)))
        _with_dtype(node.outputs[0], low)
        changed = True
    for o in lowvals:
        readers = [(n, i) for n, i in o.uses() if not (n in p.low and i in p.low[n]) and not _reads_any(n)]
        if readers:
            back = to_f32.get(o) or cast_after(o, DataType.FLOAT)
            to_f32[o] = back
            for n, i in readers:
                n.replace_input_with(i, back)
    # 3. model outputs: keep float32 (renamed through a Cast), or all float outputs to low
    for k, o in enumerate(list(g.outputs)):
        if keep_io_types and o.dtype == low and o in lowvals:
            back = to_f32.get(o) or cast_after(o, DataType.FLOAT)
            name = o.name
            o.name, back.name = unique_name(g, name + _suffix(low)), name
            g.outputs[k] = back
            changed = True
        elif not keep_io_types and o.dtype == DataType.FLOAT:
            lo = cast_after(o, low)
            name = o.name
            o.name, lo.name = unique_name(g, name + _suffix(DataType.FLOAT)), name
            g.outputs[k] = lo
            changed = True
    if not keep_io_types:  # model inputs become low; the fp32 Casts made for them read the input directly
        for v in g.inputs:
            if v.dtype == DataType.FLOAT and not v.is_initializer():
                cast = to_low.get(v)
                _with_dtype(v, low)
                if cast is not None:
                    cast.replace_all_uses_with(v)
                    g.remove(cast.producer())  # type: ignore[arg-type]
                    stats["casts-added"] -= 1
                f32_readers = [(n, i) for n, i in v.uses() if not (n in p.low and i in p.low[n])]
                if f32_readers:
                    back = cast_after(v, DataType.FLOAT)
                    for n, i in f32_readers:
                        n.replace_input_with(i, back)
                changed = True
    # 4. Casts that now cast to the type they read are removed (a former Cast(to=float) of a low value)
    for node in p.retarget:  # (only these: the model's own same-type Casts are remove-noops' business)
        if node.inputs and node.inputs[0] is not None \
                and node.inputs[0].dtype is not None and node.inputs[0].dtype == node.outputs[0].dtype \
                and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            g.remove(node)
            stats["casts-removed"] += 1
    # old constants nothing reads any more
    for v in old_consts:
        if v.is_initializer() and not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            g.remove_initializer(v.name)
        elif v.producer() is not None and v.producer().op_type == "Constant" and not v.uses() and not v.is_graph_output():  # type: ignore[union-attr]
            g.remove(v.producer())  # type: ignore[arg-type]
    return stats, changed


def _reads_any(node: Node) -> bool:
    """Readers that take any float type (no Cast back needed): Shape and Size read only the
    shape, a Cast to a non-float type converts from fp16/bf16 as well."""
    if node.domain:
        return False
    return node.op_type in ("Shape", "Size") or (node.op_type == "Cast" and node.attr("to") != int(DataType.FLOAT))

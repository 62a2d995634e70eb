"""quantize (dynamic int8) on com.microsoft Attention: -O2 --contrib-ops packs Q/K/V into one
Attention whose mask is an additive attention_bias; the pass makes it com.microsoft QAttention
with the Where mask as QAttention's 0/1 mask_index (passes/quantize/attention.py). Checked here:
it fires on a small BERT-like encoder (QAttention counted), verify() and the onnx checker hold,
outputs stay within int8 error of onnxruntime's fp32 ones, padded positions stay masked (a
model without the mask fails the same check), a second run changes nothing, and the near-misses
stay float with their reason."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.calibration import calibration_from_arrays
from graphopt.ir import Model
from graphopt.passes.quantize import QuantOptions, Quantize, output_metrics, plan_units
from graphopt.transform import PassContext

node = helper.make_node
B, S, H, D = 2, 6, 2, 8
E = H * D
F32_MIN = float(np.finfo(np.float32).min)
MS = "com.microsoft"


def f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _layer(i: int, x: str, rng: np.random.Generator, consts: dict[str, np.ndarray]) -> tuple[list, str]:
    """One HF BertLayer-like block: Q/K/V projections, head split, scores / √d + mask, Softmax,
    context, output projection, residual, LayerNormalization."""
    p = f"l{i}_"
    nodes = []
    for n in ("q", "k", "v"):
        consts[f"{p}w{n}"] = f32(rng.standard_normal((E, E)) * 0.3)
        consts[f"{p}b{n}"] = f32(rng.standard_normal(E) * 0.1)
        nodes += [node("MatMul", [x, f"{p}w{n}"], [f"{p}{n}l"], name=f"{p}{n}_proj"),
                  node("Add", [f"{p}{n}l", f"{p}b{n}"], [f"{p}{n}a"]),
                  node("Reshape", [f"{p}{n}a", "heads_shape"], [f"{p}{n}r"])]
    nodes += [node("Transpose", [f"{p}qr"], [f"{p}qh"], perm=[0, 2, 1, 3]),
              node("Transpose", [f"{p}kr"], [f"{p}kth"], perm=[0, 2, 3, 1]),
              node("Transpose", [f"{p}vr"], [f"{p}vh"], perm=[0, 2, 1, 3]),
              node("MatMul", [f"{p}qh", f"{p}kth"], [f"{p}scores"]),
              node("Div", [f"{p}scores", "sqrt_d"], [f"{p}scaled"]),
              node("Add", [f"{p}scaled", "ext"], [f"{p}masked"]),
              node("Softmax", [f"{p}masked"], [f"{p}probs"], axis=-1),
              node("MatMul", [f"{p}probs", f"{p}vh"], [f"{p}ctx"]),
              node("Transpose", [f"{p}ctx"], [f"{p}ctxt"], perm=[0, 2, 1, 3]),
              node("Reshape", [f"{p}ctxt", "out_shape"], [f"{p}ctx3"])]
    consts[f"{p}wo"] = f32(rng.standard_normal((E, E)) * 0.3)
    consts[f"{p}g"] = f32(1.0 + 0.1 * rng.standard_normal(E))
    consts[f"{p}be"] = f32(0.1 * rng.standard_normal(E))
    nodes += [node("MatMul", [f"{p}ctx3", f"{p}wo"], [f"{p}o"], name=f"{p}o_proj"),
              node("Add", [f"{p}o", x], [f"{p}res"]),
              node("LayerNormalization", [f"{p}res", f"{p}g", f"{p}be"], [f"{p}y"], axis=-1, epsilon=1e-5)]
    return nodes, f"{p}y"


def bert(layers: int = 2, seed: int = 0) -> Model:
    """x [B, S, E], attention_mask am [B, S] (int64 0/1) → `layers` BERT layers; the mask as HF
    writes it: Where(am[:, None, None, :] == 0, finfo.min, 0) added to the scores."""
    rng = np.random.default_rng(seed)
    consts: dict[str, np.ndarray] = dict(heads_shape=np.array([0, S, H, D], np.int64), out_shape=np.array([0, S, E], np.int64),
                                         ax12=np.array([1, 2], np.int64), zero_i=np.array(0, np.int64), fmin=f32(F32_MIN),
                                         zero_f=f32(0.0), sqrt_d=f32(math.sqrt(D)))
    nodes = [node("Unsqueeze", ["am", "ax12"], ["am4"]), node("Equal", ["am4", "zero_i"], ["pad"]),
             node("Where", ["pad", "fmin", "zero_f"], ["ext"])]
    x = "x"
    for i in range(layers):
        more, x = _layer(i, x, rng, consts)
        nodes += more
    nodes.append(node("Identity", [x], ["y"]))
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    g = helper.make_graph(nodes, "bert", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", S, E]),
                                          helper.make_tensor_value_info("am", TensorProto.INT64, ["batch", S])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", S, E])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return graphopt.load(onnx.shape_inference.infer_shapes(proto))


def feeds_of(n: int = B, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    am = np.ones((n, S), np.int64)
    am[1::2, S // 2:] = 0  # every second sequence padded after half its length
    return {"x": f32(rng.standard_normal((n, S, E))), "am": am}


def calibration(model: Model):
    f = feeds_of(8, seed=2)
    return calibration_from_arrays(model, f)


def ort_run(model: Model, feeds) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(graphopt.to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def quantize(model: Model, data=None, **opts) -> tuple:
    ctx = PassContext()
    ctx.data["calibration"] = data if data is not None else calibration(model)
    opts.setdefault("speed", "off")
    res = Quantize(**opts).run(model, ctx)
    return res, ctx


def ops(model: Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def layers(ctx) -> dict[str, dict]:
    return {layer["name"]: layer for layer in ctx.data["quantize"]["layers"]}


def contrib_bert(**kw) -> tuple[Model, Model]:
    model = bert(**kw)
    c = graphopt.optimize(model, "-O2", contrib_ops=True)
    assert [n.domain for n in c.graph if n.op_type == "Attention"] == [MS] * kw.get("layers", 2), ops(c)
    return model, c


def close(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(cosine, max abs error / max |ref|) over all positions."""
    m = output_metrics([[ref]], [[got]])
    return m["cosine"], float(np.abs(ref - got).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------- fires
def test_contrib_attention_becomes_qattention_with_the_mask() -> None:
    model, c = contrib_bert()
    res, ctx = quantize(c)
    o = ops(c)
    assert o.get("QAttention") == 2 and "Attention" not in o, o
    assert res.stats["dynamic-Attention"] == 2 and res.stats["dynamic-MatMul"] == 2  # + the two output projections
    assert all(n.domain == MS for n in c.graph if n.op_type == "QAttention")
    for q in (n for n in c.graph if n.op_type == "QAttention"):
        assert q.attr("num_heads") == H and q.attr("mask_filter_value") == pytest.approx(F32_MIN)
        assert q.inputs[1].dtype == graphopt.ir.DataType.INT8 and q.inputs[4].shape.dims == (3 * E,)  # per-column scales
        assert q.inputs[5] is not None and q.inputs[5].dtype == graphopt.ir.DataType.INT32
    masks = {n.inputs[5] for n in c.graph if n.op_type == "QAttention"}
    assert len(masks) == 1  # one mask_index for both layers
    assert "Where" not in o  # the float attention_bias is gone (nothing else reads it)
    attn = [layer for layer in ctx.data["quantize"]["layers"] if layer["op"] == "Attention"]
    assert [layer["status"] for layer in attn] == ["int8-dynamic"] * 2
    assert {layer["name"] for layer in attn} == {n.name for n in c.graph if n.op_type == "QAttention"}
    c.verify()
    onnx.checker.check_model(graphopt.to_onnx(c), full_check=True)
    f = feeds_of()
    cos, rel = close(ort_run(model, f), ort_run(c, f))
    assert cos > 0.995 and rel < 0.1, (cos, rel)


def test_padding_positions_stay_masked() -> None:
    """Garbage in the padded positions must not reach the other positions' outputs; the same
    model with the mask dropped (what onnxruntime's quantize_dynamic does) fails this check."""
    model, c = contrib_bert()
    quantize(c)
    f = feeds_of()
    noisy = {k: v.copy() for k, v in f.items()}
    noisy["x"][1, S // 2:] = 3.0 * np.random.default_rng(7).standard_normal((S - S // 2, E))
    ref = ort_run(model, noisy)
    keep = np.ones((B, S), bool)
    keep[1, S // 2:] = False  # the padded positions themselves see the garbage (as in fp32)

    def err(m: Model) -> float:
        got = ort_run(m, noisy)
        return float(np.abs(ref - got)[keep].max() / np.abs(ref[keep]).max())

    assert err(c) < 0.1
    unmasked = c.clone()
    for n in unmasked.graph:
        if n.op_type == "QAttention":
            n.replace_input_with(5, None)
    assert err(unmasked) > 0.3


def test_one_layer_excluded_keeps_the_float_mask_for_it() -> None:
    model, c = contrib_bert()
    first = next(n for n in c.graph if n.op_type == "Attention")
    name = first.name or first.outputs[0].name
    res, ctx = quantize(c, exclude=(name,))
    o = ops(c)
    assert o.get("QAttention") == 1 and o.get("Attention") == 1 and "Where" in o, o
    assert layers(ctx)[name]["status"] == "float" and "excluded" in layers(ctx)[name]["reason"]
    c.verify()
    f = feeds_of()
    cos, rel = close(ort_run(model, f), ort_run(c, f))
    assert cos > 0.995 and rel < 0.1, (cos, rel)


def test_second_run_changes_nothing() -> None:
    _, c = contrib_bert()
    quantize(c)
    text = str(c)
    res, ctx = quantize(c)
    assert not res.changed and ctx.data["quantize"]["result"].startswith("already quantized")
    assert str(c) == text


# ----------------------------------------------------- masks in other forms (one Attention node)
def attention_model(bias_nodes: list, bias: str | None, *, mask_inputs: dict[str, tuple[int, list]] | None = None,
                    attrs: dict | None = None, weight_input: bool = False, bias_consts: dict | None = None,
                    past: bool = False, qkv_bias: bool = True) -> Model:
    """x [B, S, E] → com.microsoft Attention(x, W, b, ..., attention_bias=`bias` built by bias_nodes)."""
    rng = np.random.default_rng(3)
    consts = {"W": f32(rng.standard_normal((E, 3 * E)) * 0.3), "b": f32(rng.standard_normal(3 * E) * 0.1)}
    consts.update(bias_consts or {})
    if not qkv_bias:
        del consts["b"]
    ins = ["x", "W", "b" if qkv_bias else "", "", "past" if past else "", bias or ""]
    while ins and ins[-1] == "":
        ins.pop()
    nodes = bias_nodes + [node("Attention", ins, ["y"], domain=MS, name="attn", num_heads=H, **(attrs or {}))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, E])]
    for k, (dt, shape) in (mask_inputs or {}).items():
        inputs.append(helper.make_tensor_value_info(k, dt, shape))
    if weight_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [E, 3 * E]))
        del consts["W"]
    g = helper.make_graph(nodes, "attn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, E])],
                          [numpy_helper.from_array(v, k) for k, v in consts.items()])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)], ir_version=8)
    return graphopt.load(proto)


KEY_PADDING = ([node("Unsqueeze", ["am", "ax12"], ["am4"]), node("Cast", ["am4"], ["keep"], to=TensorProto.BOOL),
                node("Where", ["keep", "zero_f", "fmin"], ["ab1"]), node("Expand", ["ab1", "ss"], ["ab"])],
               {"ax12": np.array([1, 2], np.int64), "zero_f": f32(0.0), "fmin": f32(F32_MIN), "ss": np.array([S, S], np.int64)})


def _mask_feeds(model: Model, seed: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = {"x": f32(rng.standard_normal((B, S, E)))}
    for v in model.graph.inputs:
        if v.name == "am":
            am = np.ones((B, S), np.int64)
            am[1, 2:] = 0
            f["am"] = am
        elif v.name == "cond":
            f["cond"] = rng.random(tuple(v.shape.dims)) > 0.4
        elif v.name == "amf":
            f["amf"] = f32(np.ones((B, S)))
        elif v.name != "x":  # a weight, a bias or past state given as an input
            f[v.name] = f32(rng.standard_normal(tuple(v.shape.dims)) * 0.3)
    return f


def _fires_and_matches(model: Model, min_cos: float = 0.995) -> Model:
    before = model.clone()
    f = _mask_feeds(model)
    res, ctx = quantize(model, calibration_from_arrays(model, {k: np.concatenate([v] * 4) for k, v in f.items()}), mode="dynamic")
    assert res.stats.get("dynamic-Attention") == 1, layers(ctx)
    model.verify()
    onnx.checker.check_model(graphopt.to_onnx(model), full_check=True)
    cos, rel = close(ort_run(before, f), ort_run(model, f))
    assert cos > min_cos and rel < 0.1, (cos, rel)
    return model


def test_key_padding_bias_becomes_a_2d_mask() -> None:
    nodes, consts = KEY_PADDING
    m = _fires_and_matches(attention_model(nodes, "ab", mask_inputs={"am": (TensorProto.INT64, [B, S])}, bias_consts=consts))
    q = next(n for n in m.graph if n.op_type == "QAttention")
    assert q.inputs[5].shape.dims == (B, S)  # [B, T] key padding


def test_hf_vmap_padding_mask_becomes_a_2d_mask() -> None:
    """transformers' sdpa mask as MiniLM's export has it: Expand(And(all-true [1, 1, S, 1],
    Cast(m)[B, 1, 1, T]), [B, 1, S, T]) → Where(·, 0, finfo.min): a key padding mask."""
    nodes = [node("Cast", ["am"], ["amb"], to=TensorProto.BOOL), node("Reshape", ["amb", "b11t"], ["amr"]),
             node("And", ["all_true", "amr"], ["both"]), node("Expand", ["both", "full"], ["cond4"]),
             node("Where", ["cond4", "zero_f", "fmin"], ["ab"])]
    consts = {"b11t": np.array([-1, 1, 1, S], np.int64), "all_true": np.ones((1, 1, S, 1), bool),
              "full": np.array([B, 1, S, S], np.int64), "zero_f": f32(0.0), "fmin": f32(F32_MIN)}
    m = _fires_and_matches(attention_model(nodes, "ab", mask_inputs={"am": (TensorProto.INT64, [B, S])}, bias_consts=consts))
    q = next(n for n in m.graph if n.op_type == "QAttention")
    assert q.inputs[5].shape.dims == (B, S)
    assert not {"And", "Expand", "Where"} & set(ops(m)), ops(m)  # the float mask's computation is gone


def test_fill_where_true_and_batch_broadcast_mask() -> None:
    # Where(cond, fill, 0): masked where cond holds (mask = Not(cond)); cond [1, 1, S, S] for the whole batch
    nodes = [node("Where", ["cond", "fmin", "zero_f"], ["ab"])]
    model = attention_model(nodes, "ab", mask_inputs={"cond": (TensorProto.BOOL, [1, 1, S, S])},
                            bias_consts={"zero_f": f32(0.0), "fmin": f32(-1e4)})
    m = _fires_and_matches(model)
    q = next(n for n in m.graph if n.op_type == "QAttention")
    assert q.inputs[5].shape.dims == (B, S, S) and q.attr("mask_filter_value") == -1e4
    assert "Not" in ops(m) and "Expand" in ops(m)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_without_mask_and_without_bias(qkv_bias: bool) -> None:
    m = _fires_and_matches(attention_model([], None, qkv_bias=qkv_bias))
    q = next(n for n in m.graph if n.op_type == "QAttention")
    assert len(q.inputs) == 7 and q.inputs[5] is None and q.inputs[2] is not None  # QAttention needs a bias: zeros


# ------------------------------------------------------------------------------- near-misses
def _stays_float(model: Model, reason: str, **opts) -> None:
    f = _mask_feeds(model)
    data = calibration_from_arrays(model, {k: np.concatenate([v] * 4) for k, v in f.items()})
    opts.setdefault("mode", "dynamic")
    _, ctx = quantize(model, data, **opts)
    assert "QAttention" not in ops(model)
    attn = layers(ctx)["attn"]
    assert attn["status"] == "float" and reason in attn["reason"], attn


def test_additive_float_mask_is_not_a_mask_index() -> None:
    # (1 - m)·-10000 of a float mask: values other than 0/1 in m would not be a 0/1 mask
    nodes = [node("Unsqueeze", ["amf", "ax12"], ["am4"]), node("Sub", ["one", "am4"], ["inv"]),
             node("Mul", ["inv", "big"], ["ab"])]
    model = attention_model(nodes, "ab", mask_inputs={"amf": (TensorProto.FLOAT, [B, S])},
                            bias_consts={"ax12": np.array([1, 2], np.int64), "one": f32(1.0), "big": f32(-1e4)})
    _stays_float(model, "not Where(mask, 0, fill)")


def test_bias_as_graph_input_or_per_head_stays_float() -> None:
    model = attention_model([], "ab", mask_inputs={"ab": (TensorProto.FLOAT, [B, 1, S, S])})
    _stays_float(model, "graph input")
    per_head = attention_model([node("Where", ["cond", "zero_f", "fmin"], ["ab"])], "ab",
                               mask_inputs={"cond": (TensorProto.BOOL, [B, H, S, S])},
                               bias_consts={"zero_f": f32(0.0), "fmin": f32(-1e4)})
    _stays_float(per_head, "per-head")


def test_where_with_a_non_zero_branch_stays_float() -> None:
    nodes = [node("Where", ["cond", "one", "fmin"], ["ab"])]
    model = attention_model(nodes, "ab", mask_inputs={"cond": (TensorProto.BOOL, [B, 1, S, S])},
                            bias_consts={"one": f32(1.0), "fmin": f32(-1e4)})
    _stays_float(model, "not one 0 branch")


def test_weight_not_constant_stays_float() -> None:
    _stays_float(attention_model([], None, weight_input=True), "weight is not a float32 constant")


def test_unidirectional_and_past_stay_float() -> None:
    _stays_float(attention_model([], None, attrs={"unidirectional": 1}), "unidirectional")
    past = attention_model([], None, mask_inputs={"past": (TensorProto.FLOAT, [2, B, H, 0, D])}, past=True)
    (unit,) = plan_units(past, QuantOptions(matmul="dynamic"))
    assert unit.kind == "attention" and not unit.quantized and "past" in str(unit.float_reason)


def test_excluded_static_and_budget_stay_float() -> None:
    nodes, consts = KEY_PADDING
    mk = lambda: attention_model(nodes, "ab", mask_inputs={"am": (TensorProto.INT64, [B, S])}, bias_consts=consts)  # noqa: E731
    _stays_float(mk(), "excluded", exclude=("attn",))
    _stays_float(mk(), "dynamic mode only", mode="static")
    # an accuracy budget no int8 layer can meet keeps the layer float, with the budget as the reason
    _stays_float(mk(), "accuracy budget", accuracy_budget="sqnr:200")

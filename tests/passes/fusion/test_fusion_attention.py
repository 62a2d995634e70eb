"""fuse-attention (rule sdpa-attention): fires with its statistics on the MatMul-Softmax-MatMul
subgraphs torch / HF transformers exporters emit, leaves near-misses alone, respects the opset,
is idempotent, keeps the IR valid, exports a model onnx.checker accepts, and keeps
onnxruntime's outputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.check import check_same_outputs, random_inputs
from graphopt.ir import Model
from graphopt.testing import check_pass
from graphopt.pattern import get_rule
from graphopt.transform import PassContext, get_pass

F = TensorProto.FLOAT
node = helper.make_node
B, H, S, D = 2, 3, 5, 8
SQ = [B, H, S, D]


def make(nodes, consts=None, *, opset=23, inputs=None, outputs=("y",), out_shape=SQ, extra_outputs=()) -> Model:
    inputs = inputs if inputs is not None else {"q": SQ, "k": SQ, "v": SQ}
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (consts or {}).items()]
    ins = []
    for name, shape in inputs.items():
        dt = TensorProto.BOOL if name.startswith("cond") else F
        ins.append(helper.make_tensor_value_info(name, dt, list(shape)))
    outs = [helper.make_tensor_value_info(o, F, list(out_shape)) for o in outputs]
    outs += [helper.make_tensor_value_info(o, F, None) for o in extra_outputs]
    g = helper.make_graph(nodes, "g", ins, outs, initializer=inits)
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10))


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.all_nodes()]


def run(model: Model, feeds=None, **options) -> tuple[Model, dict]:
    """fuse-attention on a copy: verify(), idempotent, checker-valid, same outputs on onnxruntime."""
    return check_pass(model, "fuse-attention", feeds, **options)


def fired(stats) -> int:
    return sum(v for k, v in stats.items() if "sdpa-attention" in k)


def f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


# --- torch-style ---------------------------------------------------------------------------------
def torch_nodes(scale_where: str, *, mask: str | None = None, softmax_axis=-1, k_transposed=False):
    """torch.onnx: MatMul(Q, Transpose(K)), scale, optional mask, Softmax, MatMul V."""
    nodes, q, kt = [], "q", "kt"
    if k_transposed:
        kt = "k"  # K is given already transposed
    if scale_where == "qk":  # torch SDPA: √√d on Q and on Kᵀ
        nodes += [node("Mul", ["q", "sqrt_scale"], ["qs"])]
        q = "qs"
        if not k_transposed:
            nodes += [node("Transpose", ["k"], ["kt0"], perm=[0, 1, 3, 2])]
        nodes += [node("Mul", ["kt0" if not k_transposed else "k", "sqrt_scale"], ["kt"])]
        kt = "kt"
    elif not k_transposed:
        nodes += [node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])]
    if scale_where == "q_div":
        nodes += [node("Div", ["q", "sqrt_d"], ["qs"])]
        q = "qs"
    if scale_where == "k_pre":  # scale on K before its Transpose
        nodes = [node("Mul", ["k", "inv_sqrt_d"], ["ks"]), node("Transpose", ["ks"], ["kt"], perm=[0, 1, 3, 2])]
    nodes += [node("MatMul", [q, kt], ["qk"])]
    s = "qk"
    if scale_where == "div":
        nodes += [node("Div", ["qk", "sqrt_d"], ["s"])]
        s = "s"
    elif scale_where == "mul":
        nodes += [node("Mul", ["inv_sqrt_d", "qk"], ["s"])]
        s = "s"
    elif scale_where == "mul_odd":  # any constant scalar scale
        nodes += [node("Mul", ["qk", "odd"], ["s"])]
        s = "s"
    if mask == "add":
        nodes += [node("Add", [s, "mask"], ["sm_in"])]
        s = "sm_in"
    elif mask == "where":  # masked_fill(cond, -inf)
        nodes += [node("Where", ["cond", "neg_inf", s], ["sm_in"])]
        s = "sm_in"
    elif mask == "where_keep":  # Where(keep, scores, finfo.min)
        nodes += [node("Where", ["cond", s, "lowest"], ["sm_in"])]
        s = "sm_in"
    nodes += [node("Softmax", [s], ["p"], axis=softmax_axis), node("MatMul", ["p", "v"], ["y"])]
    return nodes


CONSTS = {
    "sqrt_d": f32(math.sqrt(D)),
    "inv_sqrt_d": f32(1 / math.sqrt(D)),
    "sqrt_scale": f32(D**-0.25),
    "odd": f32(0.37),
    "neg_inf": f32(-np.inf),
    "lowest": f32(np.finfo(np.float32).min),
}


def consts_for(nodes, extra=None):
    used = {i for n in nodes for i in n.input}
    c = {**CONSTS, **(extra or {})}
    return {k: v for k, v in c.items() if k in used}


@pytest.mark.parametrize("scale_where", ["div", "mul", "mul_odd", "q_div", "k_pre", "qk", "none"])
def test_torch_style_fires(scale_where):
    nodes = torch_nodes(scale_where)
    out, stats = run(make(nodes, consts_for(nodes)))
    assert fired(stats) == 1, stats
    assert "Attention" in ops(out) and "Softmax" not in ops(out) and "MatMul" not in ops(out)


def test_scale_on_both_q_and_k_is_folded_into_scale_attr():
    nodes = torch_nodes("qk")
    out, _ = run(make(nodes, consts_for(nodes)))
    (att,) = [n for n in out.all_nodes() if n.op_type == "Attention"]
    assert att.attr("scale") == pytest.approx(1 / math.sqrt(D), rel=1e-6)
    assert ops(out) == ["Attention"]


def test_k_already_transposed():
    nodes = torch_nodes("div", k_transposed=True)
    model = make(nodes, consts_for(nodes), inputs={"q": SQ, "k": [B, H, D, S], "v": SQ})
    out, stats = run(model)
    assert fired(stats) == 1
    assert sorted(ops(out)) == ["Attention", "Transpose"]


@pytest.mark.parametrize("mask_shape", [[B, 1, 1, S], [1, 1, S, S], [S, S], [B, H, S, S], [S], [B, 1, S, S]])
def test_additive_mask(mask_shape):
    nodes = torch_nodes("div", mask="add")
    model = make(nodes, consts_for(nodes), inputs={"q": SQ, "k": SQ, "v": SQ, "mask": mask_shape})
    out, stats = run(model)
    assert fired(stats) == 1
    assert "Softmax" not in ops(out)


@pytest.mark.parametrize("mask", ["where", "where_keep"])
def test_where_mask(mask):
    nodes = torch_nodes("qk", mask=mask)
    model = make(nodes, consts_for(nodes), inputs={"q": SQ, "k": SQ, "v": SQ, "cond": [1, 1, S, S]})
    feeds = random_inputs(model)
    cond = np.tril(np.ones((S, S), bool))[None, None]  # causal: no fully masked row
    feeds["cond"] = ~cond if mask == "where" else cond
    out, stats = run(model, feeds)
    assert fired(stats) == 1
    assert "Softmax" not in ops(out)


def test_symbolic_dims_and_expanded_mask():
    nodes = torch_nodes("div", mask="add")
    sym = ["b", H, "s", D]
    model = make(nodes, consts_for(nodes), inputs={"q": sym, "k": sym, "v": sym, "mask": ["b", 1, 1, "s"]}, out_shape=sym)
    out, stats = run(model, {**random_inputs(model, dim_values={"b": 2, "s": 7})})
    assert fired(stats) == 1


# --- HF BERT-style -------------------------------------------------------------------------------
def bert_nodes(*, dropout_training=None):
    """HF BertSelfAttention: x→Q/K/V projections, Reshape, Transpose (K straight to [B,H,d,S]),
    MatMul, Div √d, Add extended mask (1-m)·-10000, Softmax, Dropout, MatMul, Transpose, Reshape."""
    E = H * D
    nodes = []
    for n in ("q", "k", "v"):
        nodes += [node("MatMul", ["x", f"w{n}"], [f"{n}l"]), node("Add", [f"{n}l", f"b{n}"], [f"{n}a"]),
                  node("Reshape", [f"{n}a", "heads_shape"], [f"{n}r"])]
    nodes += [node("Transpose", ["qr"], ["qh"], perm=[0, 2, 1, 3]), node("Transpose", ["kr"], ["kth"], perm=[0, 2, 3, 1]),
              node("Transpose", ["vr"], ["vh"], perm=[0, 2, 1, 3])]
    nodes += [node("Unsqueeze", ["am", "ax12"], ["am4"]), node("Sub", ["one", "am4"], ["inv"]),
              node("Mul", ["inv", "big_neg"], ["ext"])]
    nodes += [node("MatMul", ["qh", "kth"], ["scores"]), node("Div", ["scores", "sqrt_d"], ["scaled"]),
              node("Add", ["scaled", "ext"], ["masked"]), node("Softmax", ["masked"], ["probs"], axis=-1)]
    p = "probs"
    if dropout_training is not None:
        nodes += [node("Dropout", ["probs", "ratio", "train"], ["pd"])]
        p = "pd"
    nodes += [node("MatMul", [p, "vh"], ["ctx"]), node("Transpose", ["ctx"], ["ctxt"], perm=[0, 2, 1, 3]),
              node("Reshape", ["ctxt", "out_shape"], ["y"])]
    rng = np.random.default_rng(0)
    consts = {f"w{n}": f32(rng.standard_normal((E, E)) * 0.3) for n in "qkv"}
    consts.update({f"b{n}": f32(rng.standard_normal(E) * 0.1) for n in "qkv"})
    consts.update(heads_shape=np.array([B, S, H, D], np.int64), out_shape=np.array([B, S, E], np.int64),
                  ax12=np.array([1, 2], np.int64), one=f32(1.0), big_neg=f32(-10000.0), sqrt_d=f32(math.sqrt(D)))
    if dropout_training is not None:
        consts.update(ratio=f32(0.1), train=np.array(dropout_training, bool))
    return nodes, consts


def bert_model(opset: int = 23, **kw) -> Model:
    nodes, consts = bert_nodes(**kw)
    model = make(nodes, consts, opset=opset, inputs={"x": [B, S, H * D], "am": [B, S]}, out_shape=[B, S, H * D])
    # what the exporters leave in value_info: run ONNX shape inference
    proto = onnx.shape_inference.infer_shapes(graphopt.to_onnx(model))
    return graphopt.load(proto)


def bert_feeds(model):
    feeds = random_inputs(model)
    am = np.ones((B, S), np.float32)
    am[1, 3:] = 0  # padding on the second sequence
    feeds["am"] = am
    return feeds


@pytest.mark.parametrize("dropout", [None, False])
def test_hf_bert_style_fires(dropout):
    model = bert_model(dropout_training=dropout)
    out, stats = run(model, bert_feeds(model))
    assert fired(stats) == 1
    assert "Softmax" not in ops(out) and "Dropout" not in ops(out)
    assert ops(out).count("Attention") == 1


def test_hf_bert_dropout_training_does_not_fire():
    model = bert_model(dropout_training=True)
    out = model.clone()
    result = get_pass("fuse-attention")().run(out, PassContext())
    assert not result.changed
    assert "Attention" not in ops(out)


# --- near-misses ---------------------------------------------------------------------------------
def no_fire(model: Model) -> None:
    out = model.clone()
    result = get_pass("fuse-attention")().run(out, PassContext())
    assert not result.changed, result.stats
    assert "Attention" not in ops(out)
    out.verify()


def test_softmax_on_other_axis_does_not_fire():
    nodes = torch_nodes("div", softmax_axis=2)
    no_fire(make(nodes, consts_for(nodes)))


def test_opset_too_old_does_not_fire():
    nodes = torch_nodes("div")
    no_fire(make(nodes, consts_for(nodes), opset=22))


def test_rank_3_does_not_fire():
    nodes = [node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), node("MatMul", ["q", "kt"], ["qk"]),
             node("Softmax", ["qk"], ["p"], axis=-1), node("MatMul", ["p", "v"], ["y"])]
    s3 = [B, S, D]
    no_fire(make(nodes, inputs={"q": s3, "k": s3, "v": s3}, out_shape=s3))


def test_non_scalar_or_non_constant_scale_does_not_fire():
    nodes = torch_nodes("div")
    no_fire(make(nodes, {"sqrt_d": f32(np.full((S,), 2.0))}))
    no_fire(make(nodes, inputs={"q": SQ, "k": SQ, "v": SQ, "sqrt_d": []}))


def test_probabilities_as_output_do_not_fire():
    nodes = torch_nodes("div")
    no_fire(make(nodes, consts_for(nodes), extra_outputs=("p",)))


def test_scores_used_elsewhere_do_not_fire():
    nodes = torch_nodes("div") + [node("ReduceMax", ["s"], ["smax"], keepdims=0)]
    no_fire(make(nodes, consts_for(nodes), extra_outputs=("smax",)))


@pytest.mark.parametrize("mask_shape", [[B, H, S, S, 1], [2, B, H, S, S], [B, H, S, 1, S], [3, S], [B, H, 1, S, S]])
def test_mask_broadcasting_wrongly_does_not_fire(mask_shape):
    nodes = torch_nodes("div", mask="add")
    inputs = {"q": SQ, "k": SQ, "v": SQ, "mask": mask_shape}
    no_fire(make(nodes, consts_for(nodes), inputs=inputs, out_shape=[None] * max(4, len(mask_shape))))


def test_where_with_moderate_fill_does_not_fire():
    nodes = torch_nodes("div", mask="where")
    no_fire(make(nodes, {**consts_for(nodes), "neg_inf": f32(-100.0)}, inputs={"q": SQ, "k": SQ, "v": SQ, "cond": [1, 1, S, S]}))


def test_batch_broadcast_does_not_fire():
    nodes = torch_nodes("div")
    no_fire(make(nodes, consts_for(nodes), inputs={"q": [1, H, S, D], "k": SQ, "v": SQ}))


def test_scale_after_mask_is_not_the_attention_scale():
    nodes = [node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["q", "kt"], ["qk"]),
             node("Add", ["qk", "mask"], ["a"]), node("Div", ["a", "sqrt_d"], ["s"]),
             node("Softmax", ["s"], ["p"], axis=-1), node("MatMul", ["p", "v"], ["y"])]
    model = make(nodes, consts_for(nodes), inputs={"q": SQ, "k": SQ, "v": SQ, "mask": [S, S]})
    no_fire(model)


def test_explain_says_why():
    nodes = torch_nodes("div", softmax_axis=2)
    model = make(nodes, consts_for(nodes))
    root = [n for n in model.graph if n.op_type == "MatMul"][-1]
    assert "axis" in (get_rule("sdpa-attention").why_not(root) or "")


def test_dropout_with_runtime_training_mode_does_not_fire():
    nodes, consts = bert_nodes(dropout_training=False)
    consts.pop("train")
    model = make(nodes, consts, inputs={"x": [B, S, H * D], "am": [B, S], "train": []}, out_shape=[B, S, H * D])
    no_fire(model)


def test_in_pipeline_and_opset_24():
    nodes = torch_nodes("mul", mask="add")
    model = make(nodes, consts_for(nodes), opset=24, inputs={"q": SQ, "k": SQ, "v": SQ, "mask": [B, 1, 1, S]})
    out = graphopt.optimize(model.clone(), "fuse-attention,dce")
    assert ops(out).count("Attention") == 1 and "Softmax" not in ops(out)
    assert check_same_outputs(model, out).ok


# --- below opset 23 with contrib-ops: com.microsoft MultiHeadAttention ----------------------------
def test_contrib_off_below_opset_23_does_not_fire():
    no_fire(bert_model(opset=17))


def test_contrib_ops_pipeline_switch_packs_qkv():
    model = bert_model(opset=17)
    assert "MultiHeadAttention" not in ops(graphopt.optimize(model, "-O2"))
    out = graphopt.optimize(model, "-O2", contrib_ops=True)
    # MultiHeadAttention of three projections of x → one Attention with [Wq|Wk|Wv] and [bq|bk|bv]
    assert ops(out).count("Attention") == 1 and "MultiHeadAttention" not in ops(out), ops(out)
    assert "Transpose" not in ops(out) and ops(out).count("MatMul") == 0, ops(out)
    attn = next(n for n in out.graph if n.op_type == "Attention")
    assert attn.domain == "com.microsoft" and attn.inputs[1].shape.dims == (H * D, 3 * H * D)
    assert check_same_outputs(model, out, bert_feeds(model)).ok
    again = graphopt.optimize(out, "fuse-attention", contrib_ops=True)
    assert ops(again) == ops(out)


def _mha_model(*, shared_x: bool = True, extra_use: bool = False) -> Model:
    """MultiHeadAttention(x·Wq + bq, x·Wk, y·Wv + bv) as -O2 --contrib-ops leaves it."""
    E = H * D
    rng = np.random.default_rng(1)
    xv = "x" if shared_x else "x2"
    nodes = [node("MatMul", ["x", "wq"], ["ql"]), node("Add", ["ql", "bq"], ["q"]), node("MatMul", ["x", "wk"], ["k"]),
             node("MatMul", [xv, "wv"], ["vl"]), node("Add", ["bv", "vl"], ["v"]),
             node("MultiHeadAttention", ["q", "k", "v", "", "", "mask"], ["y"], domain="com.microsoft", num_heads=H)]
    outs = [helper.make_tensor_value_info("y", F, [B, S, E])]
    if extra_use:
        nodes.append(node("Relu", ["k"], ["kr"]))
        outs.append(helper.make_tensor_value_info("kr", F, [B, S, E]))
    consts = {n: f32(rng.standard_normal((E, E)) * 0.3) for n in ("wq", "wk", "wv")}
    consts.update(bq=f32(rng.standard_normal(E)), bv=f32(rng.standard_normal(E)))
    ins = [helper.make_tensor_value_info("x", F, [B, S, E]), helper.make_tensor_value_info("mask", F, [B, 1, S, S])]
    if not shared_x:
        ins.append(helper.make_tensor_value_info("x2", F, [B, S, E]))
    g = helper.make_graph(nodes, "g", ins, outs, initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return graphopt.load(onnx.shape_inference.infer_shapes(proto))


def test_packed_qkv_fires_with_partial_biases():
    model = _mha_model()
    out, stats = run(model, contrib_ops=True)
    assert stats.get("packed-qkv-attention") == 1, stats
    assert ops(out) == ["Attention"]


@pytest.mark.parametrize("kw", [{"shared_x": False}, {"extra_use": True}])
def test_packed_qkv_near_misses(kw):
    model = _mha_model(**kw)
    out = model.clone()
    assert not get_pass("fuse-attention")(contrib_ops=True).run(out, PassContext()).changed
    assert "Attention" not in ops(out) and "MultiHeadAttention" in ops(out)


@pytest.mark.parametrize("opset", [17, 20])
def test_contrib_bert_style_becomes_multi_head_attention(opset):
    model = bert_model(opset=opset)
    out, stats = run(model, bert_feeds(model), contrib_ops=True)
    assert fired(stats) == 1
    assert ops(out).count("MultiHeadAttention") == 1 and "Softmax" not in ops(out)
    assert out.opset_imports.get("com.microsoft") == 1
    # the head split/merge Transposes and Reshapes cancel with the ones the rewrite adds
    cleaned = graphopt.optimize(out.clone(), "remove-noops,fuse-linear,remove-noops,dce")
    assert "Transpose" not in ops(cleaned) and "Reshape" not in ops(cleaned), ops(cleaned)
    assert check_same_outputs(model, cleaned, bert_feeds(model)).ok


@pytest.mark.parametrize("scale_where", ["div", "mul", "q_div", "qk"])
@pytest.mark.parametrize("mask_shape", [None, [B, 1, 1, S], [S, S], [S], [B, H, S, S]])
def test_contrib_torch_style_with_masks(scale_where, mask_shape):
    nodes = torch_nodes(scale_where, mask=None if mask_shape is None else "add")
    inputs = {"q": SQ, "k": SQ, "v": SQ} | ({} if mask_shape is None else {"mask": mask_shape})
    model = make(nodes, consts_for(nodes), opset=17, inputs=inputs)
    out, stats = run(model, contrib_ops=True)
    assert fired(stats) == 1 and ops(out).count("MultiHeadAttention") == 1


def test_contrib_where_mask_and_symbolic_batch():
    nodes = torch_nodes("qk", mask="where")
    sym = ["b", H, "s", D]
    model = make(nodes, consts_for(nodes), opset=17, inputs={"q": sym, "k": sym, "v": sym, "cond": [1, 1, "s", "s"]}, out_shape=sym)
    feeds = random_inputs(model, dim_values={"b": 2, "s": 6})
    feeds["cond"] = ~np.tril(np.ones((6, 6), bool))[None, None]
    out, stats = run(model, feeds, contrib_ops=True)
    assert fired(stats) == 1 and ops(out).count("MultiHeadAttention") == 1


def test_contrib_needs_static_heads_and_float():
    nodes = torch_nodes("div")
    sym = [B, "h", S, D]
    out = make(nodes, consts_for(nodes), opset=17, inputs={"q": sym, "k": sym, "v": sym}, out_shape=sym)
    assert not get_pass("fuse-attention")(contrib_ops=True).run(out, PassContext()).changed
    d = TensorProto.DOUBLE
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, d, SQ) for n in "qkv"], [helper.make_tensor_value_info("y", d, SQ)],
        initializer=[numpy_helper.from_array(np.asarray(math.sqrt(D)), "sqrt_d")])
    m = graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    assert not get_pass("fuse-attention")(contrib_ops=True).run(m, PassContext()).changed

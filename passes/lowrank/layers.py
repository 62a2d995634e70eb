"""Which layers `low-rank` can factorize, and the graph surgery that does it.

A layer is y = x W + b seen as a 2-D weight W [K, N]:

- `MatMul(x, W)`, W a constant [K, N]; its bias is the constant [N] of an Add right after it
  (when there is one, a data-aware factorization moves the input mean into that bias);
- `Gemm(x, W[, C])` with transA = 0: W_eff = alpha·W (transB: alpha·Wᵀ), bias beta·C;
- `Conv(x, W[Co, Ci, k...][, b])` with group = 1: W_eff = W reshaped [Co, Ci·Πk]ᵀ (a 1x1 conv is
  the same with Πk = 1).

Rewrites (the original node becomes the second factor and keeps its name and output):

    MatMul(x, W)            →  MatMul(MatMul(x, A[K,r]), B[r,N])
    Gemm(x, W, C)           →  Gemm(MatMul(x, A[K,r]), B[r,N], C')      (alpha folded in)
    Conv(x, W[Co,Ci,kh,kw]) →  Conv(Conv(x, A'[r,Ci,kh,kw], strides/pads/dilations), B'[Co,r,1,1], b')

Both factor nodes carry the metadata `graphopt.low-rank` (`1/2`, `2/2`): a second run leaves
them alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from graphopt.ir import Builder, Model, Node, Value, constant_semantics
from graphopt.pattern import const_array, drop_unused_initializers

from graphopt.passes.pruning import layer_flops

from graphopt.passes.lowrank.factor import Factors

META = "graphopt.low-rank"
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass
class Layer:
    node: Node
    kind: str  # matmul | gemm | conv
    x: Value
    w_val: Value
    w: np.ndarray  # W_eff [K, N] float64
    dtype: np.dtype
    bias: np.ndarray | None  # effective bias [N] float64 (None: no bias)
    bias_val: Value | None  # the constant that holds it (Conv b, Gemm C, the Add's operand)
    bias_add: Node | None  # MatMul: the Add holding its bias
    kernel: tuple[int, ...]  # Conv kernel dims (() for matmuls)
    flops: int  # FLOPs per inference (batch dims 1), 0 when the shapes are unknown

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def k(self) -> int:
        return self.w.shape[0]

    @property
    def n(self) -> int:
        return self.w.shape[1]

    @property
    def centered(self) -> bool:
        """Whether a bias can absorb the input mean (Conv and Gemm can always take one)."""
        return self.kind != "matmul" or self.bias_add is not None

    def flops_at(self, r: int) -> int:
        return int(round(self.flops * r * (self.k + self.n) / (self.k * self.n)))

    @property
    def out(self) -> Value:
        """The value holding y = x W + b (the bias Add's output for a MatMul with one)."""
        return (self.bias_add or self.node).outputs[0]


def _bias_add(node: Node, n: int) -> tuple[Node, Value, np.ndarray] | None:
    out = node.outputs[0]
    uses = out.uses()
    if out.is_graph_output() or len(uses) != 1:
        return None
    add, i = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not node.graph:
        return None
    other = add.inputs[1 - i]
    b = const_array(other)
    if b is None or b.size != n or (b.ndim > 1 and b.shape[-1] != n) or b.dtype not in _FLOATS:
        return None
    return add, other, b.reshape(-1).astype(np.float64)


def find_layers(model: Model, min_size: int) -> tuple[list[Layer], dict[str, list[str]]]:
    """Candidates of the main graph, in graph order, and {reason: layer names} of those skipped."""
    layers: list[Layer] = []
    skipped: dict[str, list[str]] = {}

    def skip(node: Node, why: str) -> None:
        skipped.setdefault(why, []).append(node.name or node.outputs[0].name)

    with constant_semantics(model):
        for node in model.graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv"):
                continue
            if META in node.metadata_props:
                skip(node, "already factorized")
                continue
            if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
                continue
            x, wv = node.inputs[0], node.inputs[1]
            w = const_array(wv)
            if w is None:
                if const_array(x) is not None:
                    skip(node, "the constant is the first operand (W·x)")
                    continue
                p = wv.producer()
                op = p.op_type if p is not None else ""
                skip(node, {"DequantizeLinear": "weight is quantized (DequantizeLinear): run low-rank before quantize",
                            "Gather": "weight is a codebook decode (cluster-weights): run low-rank before cluster-weights"}.get(
                    op, "weight is not a constant"))
                continue
            if w.dtype not in _FLOATS:
                skip(node, f"weight dtype {w.dtype} is not float")
                continue
            if len({u for u, _ in wv.uses()}) > 1 or len(wv.uses()) > 1 or wv.is_graph_output():
                skip(node, "weight is shared with other readers (factorizing one would keep both)")
                continue
            op = node.op_type
            bias = bias_val = bias_add = None
            kernel: tuple[int, ...] = ()
            if op == "MatMul":
                if w.ndim != 2:
                    skip(node, f"MatMul weight has rank {w.ndim} (batched), not 2")
                    continue
                weff = w.astype(np.float64)
                found = _bias_add(node, w.shape[1])
                if found is not None:
                    bias_add, bias_val, bias = found
                kind = "matmul"
            elif op == "Gemm":
                if int(node.attr("transA", 0)):
                    skip(node, "Gemm with transA=1")
                    continue
                weff = float(node.attr("alpha", 1.0)) * (w.T if int(node.attr("transB", 0)) else w).astype(np.float64)
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    c = const_array(node.inputs[2])
                    if c is None or c.size not in (1, weff.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                        skip(node, "Gemm C is not a constant [N] bias")
                        continue
                    bias = float(node.attr("beta", 1.0)) * np.broadcast_to(c.reshape(-1).astype(np.float64), (weff.shape[1],)).copy()
                    bias_val = node.inputs[2]
                kind = "gemm"
            else:
                if int(node.attr("group", 1)) != 1:
                    skip(node, "grouped or depthwise Conv")
                    continue
                if w.ndim < 3:
                    skip(node, f"Conv weight has rank {w.ndim}")
                    continue
                weff = w.reshape(w.shape[0], -1).T.astype(np.float64)
                kernel = tuple(int(d) for d in w.shape[2:])
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    b = const_array(node.inputs[2])
                    if b is None:
                        skip(node, "Conv bias is not a constant")
                        continue
                    bias, bias_val = b.astype(np.float64), node.inputs[2]
                kind = "conv"
            if weff.size < min_size:
                skip(node, "smaller than min-size")
                continue
            if not np.isfinite(weff).all():
                skip(node, "weight holds NaN or Inf")
                continue
            f = layer_flops(node) or 0
            layers.append(Layer(node, kind, x, wv, weff, w.dtype, bias, bias_val, bias_add, kernel, f))
    return layers, skipped


def apply(model: Model, layer: Layer, f: Factors, rank: int) -> None:
    """Replace `layer` by its two factors (see the module docstring)."""
    node, dt = layer.node, layer.dtype
    g = node.graph
    assert g is not None
    b = Builder(g)
    base = layer.name
    old = [layer.w_val]
    meta = {META: "1/2", META + ".rank": str(rank)}
    with g.inserting_before(node):
        if layer.kind == "conv":
            ci = layer.k // math.prod(layer.kernel)
            a = b.initializer(f.a.T.reshape((rank, ci) + layer.kernel).astype(dt), base + "_lowrank_a")
            attrs = [a_ for k, a_ in node.attributes.items() if k != "group"]
            first = b.node("Conv", [layer.x, a], attrs, name=base + "_lowrank_a")
        else:
            a = b.initializer(f.a.astype(dt), base + "_lowrank_a")
            first = b.node("MatMul", [layer.x, a], name=base + "_lowrank_a")
    first.metadata_props.update(meta)
    t = first.outputs[0]
    if layer.kind == "conv":
        bw = f.b.T.reshape((layer.n, rank) + (1,) * len(layer.kernel)).astype(dt)
        for k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape"):
            node.attributes.pop(k, None)
        inputs = [t, b.initializer(bw, base + "_lowrank_b")]
        if f.bias is not None:
            if layer.bias_val is not None:
                old.append(layer.bias_val)
            inputs.append(b.initializer(f.bias.astype(dt), base + "_lowrank_bias"))
        elif layer.bias_val is not None:
            inputs.append(layer.bias_val)
        node.set_inputs(inputs)
    elif layer.kind == "gemm":
        trans = int(node.attr("transB", 0))
        bw = (f.b.T if trans else f.b).astype(dt)
        node.attributes.pop("alpha", None)
        inputs = [t, b.initializer(bw, base + "_lowrank_b")]
        if f.bias is not None:
            if layer.bias_val is not None:
                old.append(layer.bias_val)
            node.attributes.pop("beta", None)
            inputs.append(b.initializer(f.bias.astype(dt), base + "_lowrank_bias"))
        elif layer.bias_val is not None:
            inputs.append(layer.bias_val)
        node.set_inputs(inputs)
    else:
        node.set_inputs([t, b.initializer(f.b.astype(dt), base + "_lowrank_b")])
        if f.bias is not None and layer.bias_add is not None and layer.bias_val is not None:
            add = layer.bias_add
            i = 0 if add.inputs[0] is layer.bias_val else 1
            shape = const_array(layer.bias_val).shape  # type: ignore[union-attr]
            bdt = const_array(layer.bias_val).dtype  # type: ignore[union-attr]
            old.append(layer.bias_val)
            add.replace_input_with(i, b.initializer(f.bias.reshape(shape).astype(bdt), base + "_lowrank_bias"))
    node.metadata_props.update({META: "2/2", META + ".rank": str(rank)})
    with constant_semantics(model):
        drop_unused_initializers(old)


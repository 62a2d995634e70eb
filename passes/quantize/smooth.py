"""SmoothQuant for the int8 quantizer: per-channel activation scales moved into the weights.

Xiao et al. 2023 ("SmoothQuant"), what Intel Neural Compressor and NNCF offer as smooth_quant for
transformers. Rewrite (exact in float; only constants change, no node is added or removed, so the
int8 model runs the same kernels as without it):

    P(...) ─▶ X ─▶ MatMul/Gemm(X, W_i)          every reader i of X an int8 weight layer, W_i [K, N]
      →  P'(...) ─▶ X / s ─▶ MatMul/Gemm(X / s, diag(s)·W_i)

    s_k = max|X_k|^α / max_i max_n |W_i[k, n]|^(1-α)    per input channel k (α = the `smooth` option;
                                                         max|X_k| from the calibration data; the
                                                         readers of X share s)

1/s is folded into the producer P: LayerNormalization (its scale and bias), a MatMul/Gemm with a
constant weight (its output columns, and the constant bias Add after a MatMul), Mul or Div by a
constant (not a scalar one ending an activation: see below); also through ops between P and X that carry the channel axis unchanged: Transpose, a
Reshape that splits or merges the last axis (or keeps it), and an activation×activation MatMul
whose second operand carries it (attention's probabilities·V: the output projection's 1/s goes
into the V projection's weight and bias).

Must not fire (each such input is listed with its reason):
  - X is a graph input or output; X comes from a residual Add of two activations, an activation
    (Erf, Relu, Sigmoid...) or a Mul of two activations: nothing upstream can absorb 1/s without
    inserting a Mul on the hot path, and this pass inserts nothing; nor the scalar Mul/Div that
    ends an activation (GELU's x·(1+erf(x/√2))·0.5): turning its scalar into a per-channel vector
    stops onnxruntime fusing the GELU into Gelu/BiasGelu (measured 7 % slower int8 MiniLM);
  - X, or a tensor on the path from P to X, is also read by an op that is not one of the weight
    layers (a residual Add, a float layer, a graph output): 1/s would change what it reads;
  - a reader of X is excluded or stays float for another reason (its weights would still be exact,
    but the user asked for that layer to be left alone);
  - X's channel count or a Reshape on the path has no static shape to check the channel mapping;
  - X's calibrated channel maxima are not finite or hold sentinels (|x| >= 1e9).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir import Builder, Model, Node, Value
from graphopt.pattern import const_array, drop_unused_initializers

#: per-channel scales are kept within [1/S_LIMIT, S_LIMIT]
S_LIMIT = 1e5
#: channel statistics at or above this are sentinels (the calibration module's threshold)
SENTINEL = 1e9
#: rows kept per tensor for a per-channel percentile
PERCENTILE_ROWS = 65536


@dataclass
class Site:
    """One activation X read by weight layers, and whether (and how) it can be smoothed."""

    x: Value
    readers: list[Node] = field(default_factory=list)  # MatMul/Gemm reading X as input 0
    producer: Node | None = None  # the op that absorbs 1/s
    terminal: str = ""  # layernorm | matmul | matmul+bias | gemm | mul | div
    steps: list[tuple[str, Any]] = field(default_factory=list)  # from X back to the producer's output
    path: list[Node] = field(default_factory=list)  # the ops of `steps`
    reason: str | None = None  # why it is not smoothed (None: it can be)

    @property
    def name(self) -> str:
        return self.x.name


def _dims(v: Value | None) -> tuple[Any, ...] | None:
    if v is None or v.shape is None:
        return None
    return tuple(v.shape.dims)


def _same_dim(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a == b


def _weight_layer(node: Node) -> bool:
    """MatMul/Gemm with a 2-D float32 constant weight (what quantize quantizes per channel)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    w = const_array(node.inputs[1])
    return w is not None and w.ndim == 2 and w.dtype == np.float32


def _only_readers(v: Value, allowed: Iterable[Node]) -> Node | None:
    """The first op reading `v` that is neither in `allowed` nor a Shape (which reads no values)."""
    ok = set(allowed)
    for c in v.consumers():
        if c not in ok and c.op_type != "Shape":
            return c
    return None


def _const_input(node: Node) -> tuple[int, np.ndarray] | None:
    """(index, value) of `node`'s single constant input among two, if exactly one is constant."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    c = [const_array(v) for v in node.inputs]
    if (c[0] is None) == (c[1] is None):
        return None
    i = 0 if c[0] is not None else 1
    return i, c[i]  # type: ignore[return-value]


def plan_sites(model: Model, float_reason: Mapping[Node, str | None], *, activation_tails: bool = False) -> list[Site]:
    """Every activation read by a MatMul/Gemm weight layer, with its producer and path, or the
    reason it cannot be smoothed. `float_reason` maps each weight layer the quantizer considered to
    why it stays float (None: int8); a layer missing from it counts as not a weight layer.
    `activation_tails`: also fold into the scalar Mul/Div that ends an activation (exact, but
    onnxruntime then no longer fuses that GELU)."""
    sites: dict[Value, Site] = {}
    for node in model.graph:
        if node not in float_reason or not _weight_layer(node) or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        if x not in sites:
            sites[x] = Site(x)
            _check(sites[x], float_reason, activation_tails)
    return list(sites.values())


def _check(site: Site, float_reason: Mapping[Node, str | None], activation_tails: bool = False) -> None:
    x = site.x
    readers = [c for c in x.consumers() if c in float_reason and _weight_layer(c) and c.inputs[0] is x and c.inputs[1] is not x]
    site.readers = list(dict.fromkeys(readers))
    other = _only_readers(x, site.readers)
    if other is not None:
        site.reason = (f"also read by {other.op_type} (not an int8 weight layer: a residual, a float op); "
                       "1/s would change what it reads")
        return
    for rd in site.readers:
        why = float_reason.get(rd)
        if why is not None:
            site.reason = f"a reader stays float ({why})"
            return
    if x.is_graph_output():
        site.reason = "a graph output (1/s would change it)"
        return
    for rd in site.readers:
        if rd.op_type == "Gemm" and (int(rd.attr("transA", 0)) or len(_dims(x) or ()) != 2):
            site.reason = "a Gemm reader with transA or an input that is not 2-D"
            return
    dims = _dims(x)
    if dims is None or not dims or not isinstance(dims[-1], int):
        site.reason = "channel count (last axis) not static"
        return
    rank = len(dims)
    sshape: tuple[int, ...] = (1,) * (rank - 1) + (int(dims[-1]),)
    cur = x
    while True:
        p = cur.producer()
        if p is None:
            site.reason = "a graph input or a constant: nothing upstream absorbs 1/s"
            return
        if p.domain not in ("", "ai.onnx"):
            site.reason = f"produced by {p.domain}.{p.op_type}, which cannot absorb a per-channel scale"
            return
        if cur is not x:  # a tensor on the path: read only by the next op on it
            nxt = site.path[-1]
            other = _only_readers(cur, [nxt])
            if other is not None or cur.is_graph_output():
                what = f"{other.op_type}" if other is not None else "a graph output"
                site.reason = f"{p.op_type} output {cur.name!r} on the path from the producer is also read by {what}"
                return
        op = p.op_type
        nonone = [i for i, d in enumerate(sshape) if d != 1]
        if op == "Transpose" and p.inputs[0] is not None:
            r = len(sshape)
            perm = list(p.attr("perm", None) or range(r - 1, -1, -1))
            if sorted(perm) != list(range(r)):
                site.reason = "a Transpose on the path whose perm does not match its rank"
                return
            inv = [int(i) for i in np.argsort(perm)]
            sshape = tuple(sshape[inv[i]] for i in range(r))
            site.steps.append(("transpose", inv))
            site.path.append(p)
            cur = p.inputs[0]
            continue
        if op == "Reshape" and p.inputs[0] is not None:
            step = _reshape_step(_dims(p.inputs[0]), _dims(cur), sshape, nonone)
            if isinstance(step, str):
                site.reason = step
                return
            site.steps.append(step[0])
            sshape = step[1]
            site.path.append(p)
            cur = p.inputs[0]
            continue
        if op == "MatMul" and const_array(p.inputs[1]) is None and const_array(p.inputs[0]) is None:
            b = p.inputs[1]
            bd = _dims(b)
            if b is None or bd is None or len(bd) < 2 or len(bd) > len(sshape) or p.inputs[0] is b:
                site.reason = "an activation×activation MatMul whose second operand has an unknown shape"
                return
            if len(sshape) >= 2 and sshape[-2] != 1:
                site.reason = "an activation×activation MatMul with the scale on its rows"
                return
            drop = len(sshape) - len(bd)
            if any(sshape[i] != 1 for i in range(drop)):
                site.reason = "an activation×activation MatMul that broadcasts the scaled axes"
                return
            sshape = sshape[drop:]
            if any(d != 1 and not _same_dim(bd[i], d) for i, d in enumerate(sshape)):
                site.reason = "an activation×activation MatMul whose second operand broadcasts a scaled axis"
                return
            site.steps.append(("matmul-b", drop))
            site.path.append(p)
            cur = b
            continue
        # the terminal producer
        last_only = nonone == [len(sshape) - 1]
        site.producer = p
        if op == "LayerNormalization":
            r = len(_dims(p.inputs[0]) or ())
            axis = int(p.attr("axis", -1))
            if not r or axis % r != r - 1 or not last_only:
                site.reason = "a LayerNormalization over more than the channel axis"
            elif const_array(p.inputs[1]) is None or (len(p.inputs) > 2 and p.inputs[2] is not None and const_array(p.inputs[2]) is None):
                site.reason = "a LayerNormalization with non-constant scale or bias"
            else:
                site.terminal = "layernorm"
            return
        if op == "MatMul" and _weight_layer(p):
            site.terminal = "matmul" if last_only else ""
            site.reason = None if last_only else "a MatMul producer with the scale off its channel axis"
            return
        if op == "Gemm" and _weight_layer(p):
            c = p.inputs[2] if len(p.inputs) > 2 else None
            if c is not None and const_array(c) is None:
                site.reason = "a Gemm producer with a non-constant bias"
            elif not last_only:
                site.reason = "a Gemm producer with the scale off its channel axis"
            else:
                site.terminal = "gemm"
            return
        if op == "Add":
            ci = _const_input(p)
            if ci is None:
                site.reason = ("a residual Add of two activations: cannot absorb a per-channel scale"
                               if all(v is not None and const_array(v) is None for v in p.inputs) else "an Add of two constants")
                return
            m = p.inputs[1 - ci[0]]
            mp = m.producer() if m is not None else None
            if m is None or mp is None or mp.op_type != "MatMul" or not _weight_layer(mp) or _only_readers(m, [p]) is not None or m.is_graph_output():
                site.reason = "an Add of a constant to something other than a MatMul with a constant weight"
            elif not last_only:
                site.reason = "a MatMul+bias producer with the scale off its channel axis"
            else:
                site.terminal = "matmul+bias"
            return
        if op in ("Mul", "Div"):
            ci = _const_input(p)
            if ci is None:
                site.reason = (f"a {op} of two activations (e.g. a gated or GELU product): would need an inserted Mul"
                               if all(v is not None and const_array(v) is None for v in p.inputs) else f"a {op} of two constants")
            elif op == "Div" and ci[0] == 0:
                site.reason = "a Div of a constant by an activation"
            elif ci[1].ndim > len(sshape):
                site.reason = f"a {op} by a constant of higher rank than its output"
            elif ci[1].size == 1 and not activation_tails and _activation_like(p.inputs[1 - ci[0]]):
                site.reason = (f"the scalar {op} ending an activation (GELU's x·(1+erf(x/√2))·0.5): a per-channel constant "
                               "there stops runtimes fusing it (onnxruntime's Gelu/BiasGelu: 7 % slower on MiniLM; "
                               "smooth-activations=true folds it anyway)")
            else:
                site.terminal = op.lower()
            return
        site.producer = None
        site.reason = f"produced by {op} (an activation or an op that cannot absorb a per-channel scale without an inserted Mul)"
        return


ACTIVATIONS = ("Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Gelu", "HardSigmoid", "HardSwish",
               "Softplus", "Clip", "Exp")


def _activation_like(v: Value | None, depth: int = 2) -> bool:
    """Whether `v` comes from an activation or from an Add/Mul/Div of one within `depth` steps
    (GELU's x·(1+erf(x/√2)), SiLU's x·sigmoid(x))."""
    p = v.producer() if v is not None else None
    if p is None:
        return False
    if p.op_type in ACTIVATIONS:
        return True
    return depth > 0 and p.op_type in ("Add", "Mul", "Div") and any(
        _activation_like(i, depth - 1) for i in p.inputs if i is not None and const_array(i) is None)


def _reshape_step(ind: tuple[Any, ...] | None, outd: tuple[Any, ...] | None, sshape: tuple[int, ...],
                  nonone: list[int]) -> tuple[tuple[str, Any], tuple[int, ...]] | str:
    """The scale's step back through Reshape(in → out) and its shape on `in`, or why not."""
    if ind is None or outd is None or len(outd) != len(sshape):
        return "a Reshape on the path with unknown shapes"
    r = len(outd)
    if len(ind) == r + 1 and set(nonone) <= {r - 1}:  # merge: in [..., a, b] → out [..., a·b]
        a, b = ind[-2], ind[-1]
        if not (isinstance(a, int) and isinstance(b, int) and outd[-1] == a * b == sshape[-1] and all(_same_dim(i, o) for i, o in zip(ind[:-2], outd[:-1]))):
            return "a Reshape on the path that does not merge the last two axes into the channel axis"
        return ("split-last", (a, b)), sshape[:-1] + (a, b)
    if len(ind) == r - 1 and set(nonone) <= {r - 2, r - 1}:  # split: in [..., a·b] → out [..., a, b]
        a, b = outd[-2], outd[-1]
        if not (isinstance(a, int) and isinstance(b, int) and ind[-1] == a * b and all(_same_dim(i, o) for i, o in zip(ind[:-1], outd[:-2]))):
            return "a Reshape on the path that does not split the channel axis into the last two"
        return ("merge-last-two", (a, b)), sshape[:-2] + (a * b,)
    if set(nonone) <= {r - 1} and isinstance(outd[-1], int) and _same_dim(ind[-1], outd[-1]) and ind:  # keeps the last axis
        return ("rerank", len(ind)), (1,) * (len(ind) - 1) + (int(outd[-1]),)
    return "a Reshape on the path that mixes the channel axis with others"


def _step_back(s: np.ndarray, step: tuple[str, Any]) -> np.ndarray:
    kind, arg = step
    if kind == "transpose":
        return np.transpose(s, arg)
    if kind == "split-last":
        return s.reshape(s.shape[:-1] + tuple(arg))
    if kind == "merge-last-two":
        a, b = arg
        return np.broadcast_to(s, s.shape[:-2] + (a, b)).reshape(s.shape[:-2] + (a * b,))
    if kind == "matmul-b":
        return s.reshape(s.shape[arg:])
    if kind == "rerank":
        return s.reshape((1,) * (arg - 1) + (s.shape[-1],))
    raise ValueError(kind)


def smoothable_layers(model: Model) -> list[str]:
    """Names (node and output names) of the MatMul/Gemm weight layers whose input SmoothQuant could fold (structure only,
    every weight layer taken as int8; no calibration). Infers types on `model`."""
    from graphopt.passes.cleanup.infer import infer_types

    infer_types(model)
    sites = plan_sites(model, {n: None for n in model.graph if _weight_layer(n)})
    return [n for s in sites if s.reason is None for r in s.readers for n in (r.name, r.outputs[0].name) if n]


# ------------------------------------------------------------------------------ statistics


def channel_absmax(model: Model, data: Iterable[Mapping[str, np.ndarray]], names: Sequence[str], *,
                   method: str = "minmax", percentile: float = 99.999, threads: int = 0) -> dict[str, np.ndarray]:
    """Per last-axis channel: max |x| over the calibration batches (method=percentile: that
    percentile of |x| over the rows, from at most PERCENTILE_ROWS rows)."""
    from graphopt.calibration import intermediate_outputs

    names = list(dict.fromkeys(names))
    if not names:
        return {}
    sess = intermediate_outputs(model, names, threads=threads)
    amax: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    kept = dict.fromkeys(names, 0)
    rng = np.random.default_rng(0)
    for batch in data:
        for n, a in zip(names, sess.run(names, dict(batch))):
            a = np.abs(np.asarray(a, np.float32)).reshape(-1, np.shape(a)[-1])
            m = a.max(axis=0) if a.shape[0] else np.zeros(a.shape[1], np.float32)
            amax[n] = m if n not in amax else np.maximum(amax[n], m)
            if method == "percentile" and kept[n] < PERCENTILE_ROWS:
                take = a if a.shape[0] <= PERCENTILE_ROWS - kept[n] else a[rng.choice(a.shape[0], PERCENTILE_ROWS - kept[n], replace=False)]
                rows[n].append(take)
                kept[n] += take.shape[0]
    if method == "percentile":
        for n in names:
            if rows[n]:
                amax[n] = np.percentile(np.concatenate(rows[n]), percentile, axis=0).astype(np.float32)
    return amax


# ------------------------------------------------------------------------------ the rewrite


def site_scale(xmax: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """s_k = xmax_k^α / wmax_k^(1-α), wmax_k the largest |W[k, :]| over the readers' weights
    ([K, N] each); 1 where either is 0; within [1/S_LIMIT, S_LIMIT]."""
    wmax = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0).astype(np.float64)
    x = xmax.astype(np.float64)
    ok = (x > 0) & (wmax > 0)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / wmax[ok] ** (1.0 - alpha)
    return np.clip(s, 1.0 / S_LIMIT, S_LIMIT).astype(np.float32)


def _reader_weight(node: Node) -> np.ndarray:
    """The reader's weight as [K, N] (a Gemm with transB transposed)."""
    w = const_array(node.inputs[1])
    assert w is not None
    return w.T if node.op_type == "Gemm" and int(node.attr("transB", 0)) else w


def _set(b: Builder, node: Node, i: int, arr: np.ndarray, old: list[Value]) -> None:
    v = node.inputs[i]
    assert v is not None
    old.append(v)
    node.replace_input_with(i, b.initializer(np.ascontiguousarray(arr, dtype=np.float32), f"{v.name or 'c'}_smooth"))


def apply_site(model: Model, site: Site, s: np.ndarray, old: list[Value]) -> None:
    """X / s folded into the producer, diag(s)·W into every reader (constants replaced)."""
    b = Builder(model.graph)
    k = s.size
    for r in site.readers:
        w = const_array(r.inputs[1])
        assert w is not None
        tb = r.op_type == "Gemm" and int(r.attr("transB", 0))
        _set(b, r, 1, w * (s[None, :] if tb else s[:, None]), old)
    rank = len(_dims(site.x) or (k,))
    inv = (1.0 / s.astype(np.float64)).reshape((1,) * (rank - 1) + (k,))
    for step in site.steps:
        inv = _step_back(inv, step)
    p = site.producer
    assert p is not None
    last = inv.reshape(-1) if inv.size == inv.shape[-1] else None
    if site.terminal == "layernorm":
        assert last is not None
        for i in (1, 2):
            if len(p.inputs) > i and p.inputs[i] is not None:
                _set(b, p, i, const_array(p.inputs[i]) * last, old)  # type: ignore[operator]
    elif site.terminal == "matmul":
        assert last is not None
        _set(b, p, 1, const_array(p.inputs[1]) * last[None, :], old)  # type: ignore[operator]
    elif site.terminal == "matmul+bias":
        assert last is not None
        ci = _const_input(p)
        assert ci is not None
        m = p.inputs[1 - ci[0]].producer()  # type: ignore[union-attr]
        assert m is not None
        _set(b, m, 1, const_array(m.inputs[1]) * last[None, :], old)  # type: ignore[operator]
        _set(b, p, ci[0], ci[1] * last, old)
    elif site.terminal == "gemm":
        assert last is not None
        w = const_array(p.inputs[1])
        assert w is not None
        _set(b, p, 1, w * (last[:, None] if int(p.attr("transB", 0)) else last[None, :]), old)
        if len(p.inputs) > 2 and p.inputs[2] is not None:
            _set(b, p, 2, const_array(p.inputs[2]) * last, old)  # type: ignore[operator]
    elif site.terminal in ("mul", "div"):
        ci = _const_input(p)
        assert ci is not None
        c = ci[1].astype(np.float64)
        pad = c.reshape((1,) * (inv.ndim - c.ndim) + c.shape)
        _set(b, p, ci[0], pad * inv if site.terminal == "mul" else pad / inv, old)
    else:
        raise ValueError(f"site {site.name!r} has no foldable producer")


def describe_site(site: Site) -> str:
    p = site.producer
    head = f"{p.op_type} {p.name or p.outputs[0].name!r}" if p is not None else "?"
    if site.terminal == "matmul+bias":
        head = f"MatMul+Add {p.name or p.outputs[0].name!r}" if p is not None else head
    via = " → ".join(n.op_type for n in reversed(site.path))
    return head + (f" via {via}" if via else "")


def smooth_quant(model: Model, data: Iterable[Mapping[str, np.ndarray]], alpha: float, *,
           float_reason: Mapping[Node, str | None] | None = None, activation_tails: bool = False, method: str = "minmax",
           percentile: float = 99.999, threads: int = 0) -> dict[str, Any]:
    """SmoothQuant on `model` in place (see the module docstring); returns the report:
    {"alpha", "statistic", "smoothed": [per input: producer, layers, max/min scale...],
    "not-smoothed": {reason: [inputs]}, "layers": {layer name: {"alpha", "max-scale"}}}.

    `float_reason`: the weight layers to consider and why each stays float (None: int8), as the
    quantizer planned them; default: every MatMul/Gemm with a 2-D float32 constant weight, int8."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"smooth={alpha}: the migration strength alpha is in (0, 1] (0: off)")
    if float_reason is None:
        from graphopt.passes.cleanup.infer import infer_types

        infer_types(model)  # (the quantize pass has done it; the channel mapping needs shapes)
        float_reason = {n: None for n in model.graph if _weight_layer(n)}
    sites = plan_sites(model, float_reason, activation_tails=activation_tails)
    ok = [s for s in sites if s.reason is None]
    stats = channel_absmax(model, data, [s.name for s in ok], method=method, percentile=percentile, threads=threads) if ok else {}
    rep: dict[str, Any] = {"alpha": alpha, "statistic": {"minmax": "max |x| per channel", "percentile": f"{percentile} percentile of |x| per channel"}
                           .get(method, f"max |x| per channel ({method} sets per-tensor ranges only)"),
                           "smoothed": [], "not-smoothed": {}, "layers": {}}
    old: list[Value] = []
    for site in sites:
        if site.reason is None:
            xmax = stats.get(site.name)
            if xmax is None or xmax.size != int((_dims(site.x) or (0,))[-1]):
                site.reason = "no channel statistic (onnxruntime did not return the tensor)"
            elif not np.all(np.isfinite(xmax)) or float(xmax.max()) >= SENTINEL:
                site.reason = f"calibrated channel maxima hold sentinels or non-finite values (max {float(xmax.max()):.3g})"
        if site.reason is not None:
            rep["not-smoothed"].setdefault(site.reason, []).append(site.name)
            continue
        assert xmax is not None
        s = site_scale(xmax, [_reader_weight(r) for r in site.readers], alpha)
        apply_site(model, site, s, old)
        after = xmax / s
        med_b, med_a = float(np.median(xmax)), float(np.median(after))
        entry = {"input": site.name, "producer": describe_site(site), "layers": [r.name or r.outputs[0].name for r in site.readers],
                 "alpha": alpha, "max-scale": round(float(s.max()), 6), "min-scale": round(float(s.min()), 6),
                 "x-absmax": round(float(xmax.max()), 6), "x-absmax-after": round(float(after.max()), 6),
                 "x-outlier-ratio": round(float(xmax.max()) / med_b, 3) if med_b > 0 else None,
                 "x-outlier-ratio-after": round(float(after.max()) / med_a, 3) if med_a > 0 else None}
        rep["smoothed"].append(entry)
        for r in site.readers:
            rep["layers"][r.name or r.outputs[0].name] = {"alpha": alpha, "max-scale": entry["max-scale"], "input": site.name}
    for v in old:  # Constant nodes nothing reads any more
        p = v.producer()
        if p is not None and p.op_type == "Constant" and p.graph is model.graph and not v.uses() and not v.is_graph_output():
            model.graph.remove(p)
    drop_unused_initializers(old)
    return rep


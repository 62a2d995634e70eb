"""Recovery without retraining: least-squares refit of consuming layers, BN re-estimation.

After channels are removed, a layer that read them (Conv with group 1 and 2-D kernels, Gemm,
MatMul with a constant weight) is refitted so that, on calibration data, its output on the
*pruned* network's activations matches the *original* network's output (the channel-pruning
literature: He et al. 2017, ThiNet):

    min_{W', b'} || [X_p, 1] [W'; b'] - Y ||^2 + lam || W' - W_0 ||^2

X_p is read from the pruned model (im2col rows at sampled output positions for a Conv; a
transformer's real tokens only, its padding rows left out: `token_rows`), Y from the original
model at the same positions, W_0 is the pruned layer's current weight (the ridge term pulls
towards it, so few samples cannot blow a layer up). Solved in float64 from the accumulated
normal equations, the ridge λ per output column chosen on held-out calibration batches (two
folds; a column keeps its weights where no λ beats them there). A layer whose output reaches a
LayerNorm through Adds (a transformer's attention output and FFN output projections) weighs
each token's row by 1/σ_t² of that norm's input: the error the rest of the network sees.
MiniLM before these three (fixed λ, padding and outlier tokens in the fit): prune 0.1 gave
embedding cosine 0.39 with the refit, 0.89 without it. BatchNormalization nodes downstream of a change get their running
mean/variance re-estimated on the pruned model's activations.

Layers are processed in waves: a wave holds layers none of which depends on another in the same
wave, and each wave sees the refits of all earlier ones (errors do not accumulate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir import Attr, AttrType, Builder, Model, Node, Value, independent_waves, constant_semantics
from graphopt.pattern import const_array, drop_unused_initializers

from graphopt.passes.pruning.dependency import Analysis, Consumer

MAX_ROWS = 4096
RIDGE = 1e-3
#: ridge strengths (relative to mean(diag G)) the refit chooses from on held-out rows
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
CHUNK = 24  # intermediate tensors per onnxruntime session


def chunks(groups: Iterable[Sequence[str]], size: int) -> list[list[str]]:
    """Names in runs of about `size` (one onnxruntime session each), a group never split: the
    tensors a caller combines (a layer's input and its LayerNorm's input) come in one run."""
    out: list[list[str]] = []
    cur: list[str] = []
    done: set[tuple[str, ...]] = set()
    for g in groups:
        key = tuple(dict.fromkeys(g))
        if key in done:
            continue
        done.add(key)
        new = [n for n in key if n not in cur]
        if cur and len(cur) + len(new) > size:
            out.append(cur)
            cur, new = [], list(key)
        cur.extend(new)
    if cur:
        out.append(cur)
    return out


def _session_runs(model: Model, names: list[str], calib: Iterable[Mapping[str, np.ndarray]],
                  groups: Sequence[Sequence[str]] | None = None):
    """Yield (batch index, {name: array}) for every batch, reading `names` (or `groups`, each
    read together) in chunks."""
    from graphopt.calibration import intermediate_outputs

    parts = chunks(groups if groups is not None else [[n] for n in names], CHUNK)
    if not parts:
        return
    batches = list(calib) if not isinstance(calib, list) else calib
    for part in parts:
        sess = intermediate_outputs(model, part)
        for bi, feeds in enumerate(batches):
            outs = sess.run(part, dict(feeds))
            yield bi, dict(zip(part, outs))


#: cached cut tensors (all calibration batches) above this many bytes: each wave reruns the model from its inputs
CUT_CACHE_BYTES = 1 << 31


def cut_values(model: Model, changed: set[Node], names: Sequence[str]) -> list[str]:
    """Names of the tensors a run that reads `names` needs from the part of `model` that a
    rewrite of `changed` leaves as it is: the inputs, produced by nodes not downstream of
    `changed`, of the nodes downstream of `changed` that `names` depend on (graph inputs and
    initializers left out). Fetched before the rewrite, they let the run after it start there."""
    down = _downstream(model, changed)
    by_name = {v.name: v for v in model.graph.values()}
    cut: dict[str, None] = {}
    seen: set[Node] = set()
    stack = [by_name[n] for n in names if n in by_name]
    while stack:
        v = stack.pop()
        p = v.producer()
        if p is None:
            continue
        if p not in down:
            cut[v.name] = None
            continue
        if p in seen:
            continue
        seen.add(p)
        stack.extend(x for x in p.inputs if x is not None)
    return list(cut)


class WaveRunner:
    """Reads a wave's layer inputs from onnxruntime, running only the part of the model they
    need: the run starts at tensors kept from earlier runs (`keep`) that no refit since has
    changed, else at the graph inputs, so a chain of refits (a transformer's sublayers) costs
    about one pass of the model over the calibration data instead of one pass per wave.

    Before -> after: wave k ran the whole graph (graph inputs -> layer inputs of wave k); now it
    runs the slice between the cut tensors of the previous refit (`cut_values`) and its layer
    inputs. Not used (one line says why) when the graph holds subgraphs (If/Loop bodies may read
    outer tensors), or when the kept tensors would exceed CUT_CACHE_BYTES."""

    def __init__(self, batches: list[Mapping[str, np.ndarray]], log: Callable[[str], None] = lambda s: None) -> None:
        self.batches = batches
        self.cache: dict[str, list[np.ndarray]] = {}
        self.log = log
        self.cache_ok = True
        self.last_nodes = 0  # nodes in the last run's slice of the model

    def invalidate(self, model: Model, changed: set[Node]) -> None:
        """Drop the kept tensors that a rewrite of `changed` makes stale."""
        stale = {v.name for n in _downstream(model, changed) for v in n.outputs if v is not None}
        for name in stale & set(self.cache):
            del self.cache[name]

    def runs(self, model: Model, names: list[str], keep: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (batch index, {name: array}) with `names` for every batch; also keeps `keep`
        (by name, for the later runs) unless they would exceed the cache budget."""
        import onnx

        from graphopt.check import onnxruntime_session
        from graphopt.onnx_io import to_onnx

        proto = to_onnx(model)
        g = proto.graph
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for nd in g.node for a in nd.attribute):
            if self.cache_ok:
                self.log("prune: recovery runs the whole model for every wave (its graph holds subgraphs)")
                self.cache_ok = False
            yield from _session_runs(model, names, self.batches)
            return
        inputs = {i.name: i for i in g.input}
        inits = {t.name for t in g.initializer}
        keep = [k for k in dict.fromkeys(keep) if k not in self.cache and k not in inputs]
        if not self.cache_ok:
            keep = []
        want = [n for n in dict.fromkeys([*names, *keep]) if n not in self.cache and n not in inputs]
        producer = {o: i for i, nd in enumerate(g.node) for o in nd.output if o}
        need: set[int] = set()
        feeds_cut: dict[str, None] = {}
        feeds_in: dict[str, None] = {}
        stack = list(want)
        seen: set[str] = set()
        while stack:
            n = stack.pop()
            if not n or n in seen:
                continue
            seen.add(n)
            if n in self.cache:
                feeds_cut[n] = None
            elif n in inputs:
                feeds_in[n] = None
            elif n in inits:
                continue
            elif n in producer:
                i = producer[n]
                if i not in need:
                    need.add(i)
                    stack.extend(g.node[i].input)
        sess = None
        self.last_nodes = len(need)
        if want:
            vinfo = {v.name: v for v in (*g.value_info, *g.output)}
            sub = onnx.GraphProto(name=g.name)
            sub.node.extend(g.node[i] for i in sorted(need))
            used = {x for i in need for x in g.node[i].input}
            sub.initializer.extend(t for t in g.initializer if t.name in used and t.name not in self.cache)
            sub.sparse_initializer.extend(t for t in g.sparse_initializer if t.values.name in used)
            sub.input.extend(inputs[n] for n in feeds_in)
            for n in feeds_cut:
                if n in vinfo:
                    sub.input.append(vinfo[n])
                else:
                    a = self.cache[n][0]
                    sub.input.append(onnx.helper.make_tensor_value_info(
                        n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim))
            sub.output.extend(onnx.ValueInfoProto(name=n) for n in want)
            made = {o for i in need for o in g.node[i].output}
            sub.value_info.extend(v for n, v in vinfo.items() if n in made and n not in want)
            m = onnx.ModelProto()
            m.ir_version = proto.ir_version
            m.opset_import.extend(proto.opset_import)
            m.functions.extend(proto.functions)
            m.graph.CopyFrom(sub)
            try:
                sess = onnxruntime_session(m)
            except Exception as e:
                from graphopt.errors import GraphoptError

                raise GraphoptError(f"onnxruntime cannot run the model for calibration: {str(e).splitlines()[0]}") from None
        for bi, feeds in enumerate(self.batches):
            got: dict[str, np.ndarray] = {}
            if sess is not None:
                fd = {n: feeds[n] for n in feeds_in}
                fd.update({n: self.cache[n][bi] for n in feeds_cut})
                got = dict(zip(want, sess.run(want, fd)))
            if bi == 0 and keep:
                size = sum(got[k].nbytes for k in keep if k in got) * len(self.batches)
                if size + self._cached_bytes() > CUT_CACHE_BYTES:
                    self.log(f"prune: recovery reruns the model from its inputs for each wave: the tensors to keep "
                             f"between waves need {size >> 20} MiB (limit {CUT_CACHE_BYTES >> 20} MiB)")
                    self.cache_ok, keep = False, []
            for k in keep:
                if k in got:
                    self.cache.setdefault(k, []).append(got[k])
            out = {}
            for n in names:
                out[n] = got[n] if n in got else self.cache[n][bi] if n in self.cache else np.asarray(feeds[n])
            yield bi, out

    def _cached_bytes(self) -> int:
        return sum(a.nbytes for v in self.cache.values() for a in v)


def token_masks(model: Model, batches: list[Mapping[str, np.ndarray]], spec: str) -> list[np.ndarray | None]:
    """Per batch the [batch, seq] mask of a transformer's real tokens (`spec`: auto | none | a
    graph input's name; graphopt.passes.sharing.refit.token_mask), or None."""
    from graphopt.passes.sharing.refit import token_mask

    return [token_mask(model, b, spec) for b in batches]


def token_rows(a: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Flat row indices of `a` viewed as rows of its last axis: the real tokens' where the
    leading axes are the mask's [batch, seq] (padding positions are computed but never reach a
    transformer's output, and with short sentences padded to a fixed length they would
    outnumber the real tokens), else every row."""
    lead = a.shape[:-1]
    n = int(np.prod(lead)) if lead else 1
    if mask is not None and lead == mask.shape:
        return np.flatnonzero(mask.reshape(-1) != 0)
    return np.arange(n)


def channel_rms(an: Analysis, calib: Any, mask_spec: str = "auto") -> dict[str, np.ndarray]:
    """sqrt(E[x^2]) per channel of every consumer's input, over the calibration data (a
    transformer's padding tokens left out: `token_rows`)."""
    axes: dict[str, int] = {}
    for c in an.consumers:
        if not c.grouped:
            axes[c.x.name] = 1 if c.kind in ("conv", "convT", "gemm") else -1
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    batches = list(calib)
    masks = token_masks(an.model, batches, mask_spec)
    for bi, outs in _session_runs(an.model, list(axes), batches):
        for name, x in outs.items():
            x = np.asarray(x, dtype=np.float64)
            if axes[name] == -1:
                x = x.reshape(-1, x.shape[-1])[token_rows(x, masks[bi])].T
            else:
                x = np.moveaxis(x, axes[name], 0)
                x = x.reshape(x.shape[0], -1)
            sums[name] = sums.get(name, 0) + (x * x).sum(axis=1)
            counts[name] = counts.get(name, 0) + x.shape[1]
    return {k: np.sqrt(v / max(1, counts[k])) for k, v in sums.items()}


def contributions(an: Analysis, calib: Any, mask_spec: str = "auto") -> dict[int, np.ndarray]:
    """Per consumer (index into an.consumers) that is a MatMul/Gemm whose output reaches a
    LayerNorm (`norm_after`): per input position class (grouped by root id, in the order of
    np.unique) the expected squared size of what the class adds to the normalised stream,
    E_t[ w_t ‖x_t,c W_c diag(γ)‖² ] (w_t = 1/σ_t², `norm_weights`; γ the norm's constant scale),
    over the real tokens of the calibration data: exactly the error of removing that class
    alone, before any refit. Keys are consumer indices; values are aligned with
    np.unique(an.root[c.ids])."""
    assert an.root is not None
    todo: dict[int, tuple[str, str, bool]] = {}
    for i, c in enumerate(an.consumers):
        if c.grouped or c.kind not in ("matmul", "gemm"):
            continue
        out = c.node.outputs[0]
        found = norm_after(out)
        if found is not None:
            todo[i] = (c.x.name, found[0].name, found[1].op_type == "RMSNormalization")
    if not todo:
        return {}
    blocks: dict[int, np.ndarray] = {}
    layout: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
    for i in todo:
        roots = an.root[an.consumers[i].ids]
        uniq, inv = np.unique(roots, return_inverse=True)
        layout[i] = (uniq, [np.flatnonzero(inv == k) for k in range(len(uniq))])
    batches = list(calib)
    masks = token_masks(an.model, batches, mask_spec)
    acc: dict[int, list[np.ndarray]] = {}
    for bi, outs in _session_runs(an.model, [], batches, groups=[[x, ln] for x, ln, _ in todo.values()]):
        for i, (xn, ln, rms) in todo.items():
            x, a = outs.get(xn), outs.get(ln)
            if x is None or a is None or x.shape[:-1] != a.shape[:-1]:
                continue
            rows = token_rows(x, masks[bi])
            X = x.reshape(-1, x.shape[-1])[rows].astype(np.float64)
            w = norm_weights(a.reshape(-1, a.shape[-1])[rows], rms)
            _, pos = layout[i]
            cur = acc.setdefault(i, [np.zeros((len(p), len(p))) for p in pos])
            xw = X * w[:, None]
            if all(len(p) == 1 for p in pos):  # one position per class (FFN units): the diagonal
                diag = (xw * X).sum(axis=0)
                for k, p in enumerate(pos):
                    cur[k] += diag[p[0]]
                continue
            for k, p in enumerate(pos):
                cur[k] += xw[:, p].T @ X[:, p]
    with constant_semantics(an.model):
        for i, per in acc.items():
            c = an.consumers[i]
            wv = const_array(c.node.inputs[c.w_index])
            if wv is None:
                continue
            W = np.moveaxis(wv.astype(np.float64), c.w_axis, 0).reshape(len(c.ids), -1)  # [K, N]
            found = norm_after(c.node.outputs[0])
            gamma = const_array(found[1].inputs[1]) if found is not None and len(found[1].inputs) > 1 else None
            if gamma is not None and gamma.size == W.shape[1]:
                W = W * np.asarray(gamma, np.float64).reshape(1, -1)
            _, pos = layout[i]
            n = max(1, len(batches))
            blocks[i] = np.array([float(np.sum(g * (W[p] @ W[p].T))) / n for g, p in zip(per, pos)])
    return blocks


# --- tasks ----------------------------------------------------------------------------------------
@dataclass
class _Refit:
    c: Consumer
    out_mask: np.ndarray | None
    y_name: str
    rows: list[Any] = field(default_factory=list)  # per batch: (index arrays, Y rows)
    # normal equations per fold (rows of even / odd calibration batches): [2, K+1, K+1], [2, K+1, N], [2]
    G: np.ndarray | None = None
    B: np.ndarray | None = None
    yy: np.ndarray = field(default_factory=lambda: np.zeros(2))
    bias_add: Node | None = None  # MatMul: the Add that holds its bias
    norm_in: str | None = None  # the LayerNorm input its output reaches through Adds (row weights)

    @property
    def node(self) -> Node:
        return self.c.node


@dataclass
class _BN:
    node: Node
    s1: Any = 0
    s2: Any = 0
    n: int = 0


def _conv_geometry(node: Node, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int]] | None:
    """(strides, dilations, pads [top, left, bottom, right]) of a 2-D conv; a 1-D conv is the
    2-D one with a height-1 kernel over a height-1 input (stride and dilation 1, no pads in H)."""
    k = list(w_shape[2:])
    r = len(k)
    if r not in (1, 2):
        return None
    strides = list(node.attr("strides", [1] * r))
    dil = list(node.attr("dilations", [1] * r))
    auto = node.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", None, ""):
        pads = list(node.attr("pads", [0] * 2 * r))
    elif auto == "VALID":
        pads = [0] * 2 * r
    else:
        pads = [0] * 2 * r
        for i in range(r):
            size = x_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 - size)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + r] = lo, total - lo
    if r == 1:
        return [1, strides[0]], [1, dil[0]], [0, pads[0], 0, pads[1]]
    return strides, dil, pads


def _refit_tasks(an: Analysis, pruned: np.ndarray) -> tuple[list[_Refit], dict[str, str]]:
    """Refit tasks for the layers that read removed channels, and why the others get none."""
    out_masks = {id(p.node): an.keep_mask(p.ids, pruned) for p in an.producers}
    tasks = []
    skipped: dict[str, str] = {}
    with constant_semantics(an.model):
        for c in an.consumers:
            if an.keep_mask(c.ids, pruned).all():
                continue
            node = c.node
            label = node.name or node.outputs[0].name
            if c.grouped:
                skipped[label] = "grouped/depthwise conv: each output reads its own channels, it only loses them (the next dense layer is refitted)"
                continue
            if c.kind == "convT":
                skipped[label] = "ConvTranspose: no refit for it"
                continue
            w = const_array(node.inputs[c.w_index])
            if w is None:
                skipped[label] = "its weight is not a constant"
                continue
            if c.kind == "conv" and (w.ndim not in (3, 4) or int(node.attr("group", 1)) != 1):
                skipped[label] = f"{w.ndim - 2}-D conv kernel: refit handles 1-D and 2-D convs"
                continue
            if c.kind == "gemm" and int(node.attr("transA", 0)):
                skipped[label] = "Gemm with transA=1"
                continue
            t = _Refit(c, out_masks.get(id(node)), node.outputs[0].name)
            found = norm_after(node.outputs[0]) if c.kind in ("matmul", "gemm") else None
            if found is not None:
                t.norm_in = found[0].name
            if c.kind == "matmul":
                users = node.outputs[0].uses()
                if len(users) == 1 and users[0][0].op_type == "Add":
                    add = users[0][0]
                    other = add.inputs[1 - users[0][1]]
                    b = const_array(other)
                    if b is not None and b.ndim == 1 and b.shape[0] == w.shape[1]:
                        t.bias_add = add
            tasks.append(t)
    return tasks, skipped


def _rows_conv(x: np.ndarray, node: Node, wshape: tuple[int, ...], sel: tuple[np.ndarray, ...]) -> np.ndarray:
    geo = _conv_geometry(node, x.shape, wshape)
    assert geo is not None
    strides, dil, pads = geo
    if x.ndim == 3:  # 1-D: height 1
        x, wshape = x[:, :, None, :], (*wshape[:2], 1, wshape[2])
    kh, kw = wshape[2], wshape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    img, i, j = sel
    ii = (i * strides[0])[:, None] + (np.arange(kh) * dil[0])[None, :]
    jj = (j * strides[1])[:, None] + (np.arange(kw) * dil[1])[None, :]
    c = np.arange(x.shape[1])
    patch = xp[img[:, None, None, None], c[None, :, None, None], ii[:, None, :, None], jj[:, None, None, :]]
    return patch.reshape(len(img), -1)


def norm_after(v: Value) -> tuple[Value, Node] | None:
    """(input, node) of the LayerNormalization / RMSNormalization over the last axis that `v`
    reaches through single-use Adds only (a transformer sublayer's output: bias Add, residual
    Add, LayerNorm), else None. An error e_t in such an output at token t reaches the rest of
    the network as e_t / σ_t, σ_t the normalization's denominator at that token."""
    for _ in range(4):
        uses = v.uses()
        if len(uses) != 1 or v.is_graph_output():
            return None
        n = uses[0][0]
        if n.domain not in ("", "ai.onnx"):
            return None
        if n.op_type in ("LayerNormalization", "RMSNormalization") and uses[0][1] == 0:
            rank = v.shape.rank if v.shape is not None else None
            axis = int(n.attr("axis", -1))
            return (v, n) if rank is not None and axis in (-1, rank - 1) else None
        if n.op_type != "Add":
            return None
        v = n.outputs[0]
    return None


def norm_weights(a: np.ndarray, rms: bool = False) -> np.ndarray:
    """Per row of `a` (rows of its last axis): 1 / σ², σ² the variance (RMSNormalization: the
    mean square) the normalization divides by, normalised to mean 1 over the rows."""
    a = np.asarray(a, np.float64)
    var = (a * a).mean(axis=-1) if rms else a.var(axis=-1)
    w = 1.0 / (var + 1e-5 * (float(var.mean()) + 1e-12))
    return w / max(float(w.mean()), 1e-30)


def _targets(original: Model, tasks: list[_Refit], batches: list[Mapping[str, np.ndarray]], seed: int,
             masks: list[np.ndarray | None]) -> None:
    """Sample target rows Y of every refit task from the original model (a matmul's among the
    real tokens only: `token_rows`), with their weights (1, or `norm_weights` where the layer's
    output reaches a LayerNorm: the refit then fits what the normalised stream sees)."""
    per_batch = max(1, math.ceil(MAX_ROWS / max(1, len(batches))))
    groups = [[t.y_name] + ([t.norm_in] if t.norm_in else []) for t in tasks]
    for bi, outs in _session_runs(original, [], batches, groups=groups):
        for ti, t in enumerate(tasks):
            if t.y_name not in outs:
                continue
            y = outs[t.y_name]
            rng = np.random.default_rng([seed, ti, bi])
            if t.c.kind == "conv":
                n, m, ho, wo = y.shape if y.ndim == 4 else (y.shape[0], y.shape[1], 1, y.shape[2])
                y = y.reshape(n, m, ho, wo)
                total = n * ho * wo
                pick = rng.choice(total, size=min(total, per_batch), replace=False)
                img, rem = np.divmod(pick, ho * wo)
                i, j = np.divmod(rem, wo)
                rows = y[img, :, i, j]
                sel: Any = (img, i, j)
            else:
                flat = y.reshape(-1, y.shape[-1])
                cand = token_rows(y, masks[bi])
                pick = np.sort(rng.choice(cand, size=min(len(cand), per_batch), replace=False))
                rows, sel = flat[pick], pick
            w = np.ones(len(rows))
            if t.norm_in and t.norm_in in outs and t.c.kind != "conv":
                a = outs[t.norm_in]
                if a.shape[:-1] == y.shape[:-1]:
                    w = norm_weights(a.reshape(-1, a.shape[-1])[sel])
            if t.out_mask is not None:
                rows = rows[:, t.out_mask]
            t.rows.append((bi, sel, rows.astype(np.float64), w))


def _x_rows(t: _Refit, x: np.ndarray, sel: Any, wshape: tuple[int, ...]) -> np.ndarray:
    if t.c.kind == "conv":
        return _rows_conv(x, t.node, wshape, sel).astype(np.float64)
    return x.reshape(-1, x.shape[-1])[sel].astype(np.float64)


def _theta0(t: _Refit, w: np.ndarray, model: Model) -> tuple[np.ndarray, np.ndarray | None]:
    """Current weight as (in features, out features), and the current bias (or None)."""
    node, kind = t.node, t.c.kind
    with constant_semantics(model):
        if kind == "conv":
            b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            return w.reshape(w.shape[0], -1).T.astype(np.float64), None if b is None else b.astype(np.float64)
        if kind == "gemm":
            wt = w.T if int(node.attr("transB", 0)) else w
            alpha = float(node.attr("alpha", 1.0))
            beta = float(node.attr("beta", 1.0))
            c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            b = None
            if c is not None and c.size == wt.shape[1]:
                b = beta * c.reshape(-1).astype(np.float64)
            elif c is None:
                b = np.zeros(wt.shape[1])
            return alpha * wt.astype(np.float64), b
        b = None
        if t.bias_add is not None:
            b = np.zeros(w.shape[1])
        return w.astype(np.float64), b


def _write(t: _Refit, model: Model, theta: np.ndarray, bias: np.ndarray | None) -> None:
    node, kind = t.node, t.c.kind
    b = Builder(model.graph)
    w_old = node.inputs[t.c.w_index]
    w_arr = const_array(w_old)
    dtype = w_arr.dtype  # type: ignore[union-attr]
    replaced = [w_old]
    if kind == "conv":
        w_new = theta.T.reshape(w_arr.shape).astype(dtype)  # type: ignore[union-attr]
        node.replace_input_with(1, b.initializer(w_new, (w_old.name or "w") + "_refit"))
        if bias is not None:
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                replaced.append(node.inputs[2])
                node.replace_input_with(2, b.initializer(bias.astype(dtype), (node.inputs[2].name or "b") + "_refit"))
            else:
                node.set_inputs(list(node.inputs[:2]) + [b.initializer(bias.astype(dtype), "conv_bias_refit")])
    elif kind == "gemm":
        alpha = float(node.attr("alpha", 1.0))
        wt = theta / alpha
        w_new = (wt.T if int(node.attr("transB", 0)) else wt).astype(dtype)
        node.replace_input_with(1, b.initializer(w_new, (w_old.name or "w") + "_refit"))
        if bias is not None:
            c_old = node.inputs[2] if len(node.inputs) > 2 else None
            if c_old is not None:
                beta = float(node.attr("beta", 1.0))
                shape = const_array(c_old).shape  # type: ignore[union-attr]
                replaced.append(c_old)
                node.replace_input_with(2, b.initializer((bias / beta).reshape(shape).astype(dtype), (c_old.name or "c") + "_refit"))
            else:
                node.set_inputs(list(node.inputs[:2]) + [b.initializer(bias.astype(dtype), "gemm_bias_refit")])
                node.set_attr(Attr("beta", AttrType.FLOAT, 1.0))
    else:
        node.replace_input_with(1, b.initializer(theta.astype(dtype), (w_old.name or "w") + "_refit"))
        if bias is not None and t.bias_add is not None:
            add = t.bias_add
            k = 0 if add.inputs[0] is not node.outputs[0] else 1
            old = add.inputs[k]
            b_old = const_array(old)
            replaced.append(old)
            add.replace_input_with(k, b.initializer((b_old.astype(np.float64) + bias).astype(b_old.dtype), (old.name or "b") + "_refit"))  # type: ignore[union-attr]
    drop_unused_initializers([v for v in replaced if v is not None])


def recover(
    original: Model,
    model: Model,
    an: Analysis,
    pruned: np.ndarray,
    calib: Any,
    *,
    refit: bool = True,
    bn: bool = True,
    seed: int = 0,
    mask_spec: str = "auto",
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, int | float]:
    """Refit consumers / re-estimate BatchNorm statistics of the pruned `model` in place
    (`mask_spec`: which token rows count, see `token_rows`)."""
    t0 = time.perf_counter()
    batches = list(calib)
    tasks, skipped = _refit_tasks(an, pruned) if refit else ([], {})
    bn_tasks: list[_BN] = []
    if bn:
        changed = {t.node for t in tasks} | {p.node for p in an.producers if not an.keep_mask(p.ids, pruned).all()}
        changed |= {c.node for c in an.consumers if not an.keep_mask(c.ids, pruned).all()}
        down = _downstream(model, changed)
        bn_tasks = [_BN(n) for n, _ in an.bns if n in down]
    if tasks:
        _targets(original, tasks, batches, seed, token_masks(original, batches, mask_spec))
    nodes: list[Node] = [t.node for t in tasks] + [b.node for b in bn_tasks]
    all_tasks: list[Any] = list(tasks) + list(bn_tasks)
    waves = independent_waves(model.graph, nodes) if nodes else []
    errs0: list[float] = []
    errs1: list[float] = []
    ridges: list[float] = []
    def wave_inputs(wave: list[int]) -> list[str]:
        return [t.c.x.name if isinstance(t, _Refit) else t.node.inputs[0].name for t in (all_tasks[i] for i in wave)]

    runner = WaveRunner(batches, log)
    for k, wave in enumerate(waves):
        wt = [all_tasks[i] for i in wave]
        names = wave_inputs(wave)
        changed = {t.node for t in wt}
        # what the next wave's run can start from: tensors this wave's refits leave unchanged
        keep = cut_values(model, changed, wave_inputs(waves[k + 1])) if k + 1 < len(waves) else []
        with constant_semantics(model):
            wshapes = {id(t): const_array(t.node.inputs[t.c.w_index]).shape for t in wt if isinstance(t, _Refit)}  # type: ignore[union-attr]
        for bi, outs in runner.runs(model, names, keep):
            for t in wt:
                if isinstance(t, _BN):
                    x = np.moveaxis(np.asarray(outs[t.node.inputs[0].name], np.float64), 1, 0)
                    x = x.reshape(x.shape[0], -1)
                    t.s1, t.s2, t.n = t.s1 + x.sum(1), t.s2 + (x * x).sum(1), t.n + x.shape[1]
                    continue
                x = np.asarray(outs[t.c.x.name])
                for b_i, sel, y, wr in t.rows:
                    if b_i != bi:
                        continue
                    X = _x_rows(t, x, sel, wshapes[id(t)])
                    Xa = np.concatenate([X, np.ones((len(X), 1))], axis=1)
                    if t.G is None or t.B is None:
                        t.G = np.zeros((2, Xa.shape[1], Xa.shape[1]))
                        t.B = np.zeros((2, Xa.shape[1], y.shape[1]))
                        t.yy = np.zeros((2, y.shape[1]))
                    # one batch: its rows alternate between the folds
                    parts = [(bi % 2, slice(None))] if len(batches) > 1 else [(0, slice(0, None, 2)), (1, slice(1, None, 2))]
                    for f, rs in parts:
                        xf, yf, wf = Xa[rs], y[rs], wr[rs]
                        xw = xf * wf[:, None]
                        t.G[f] += xw.T @ xf
                        t.B[f] += xw.T @ yf
                        t.yy[f] += (yf * yf * wf[:, None]).sum(axis=0)
        for t in wt:
            if isinstance(t, _BN):
                _write_bn(model, t)
                continue
            if t.G is None:
                skipped[t.node.name or t.y_name] = "no calibration rows reached it"
                continue
            with constant_semantics(model):
                w = const_array(t.node.inputs[t.c.w_index])
            theta0, b0 = _theta0(t, w, model)  # type: ignore[arg-type]
            e0, e1, theta, bias, ridge = _solve(t, theta0, b0)
            errs0.append(e0)
            errs1.append(e1)
            ridges.extend(ridge)
            with constant_semantics(model):
                _write(t, model, theta, bias)
            t.G = t.B = None
            t.rows = []
        runner.invalidate(model, changed)
    stats: dict[str, int | float] = {
        "layers-refit": len(errs1),
        "layers-not-refit": len(skipped),
        "bn-reestimated": len(bn_tasks),
        "recovery-seconds": round(time.perf_counter() - t0, 3),
    }
    if errs0:
        stats["refit-rel-error-before"] = round(float(np.mean(errs0)), 5)
        stats["refit-rel-error-after"] = round(float(np.mean(errs1)), 5)
        stats["refit-columns-kept"] = sum(1 for r in ridges if math.isinf(r))
    if refit:
        msg = f"prune: recovery refit {len(errs1)} of {len(errs1) + len(skipped)} layers that read removed channels"
        if errs0:
            msg += f" (their output error {np.mean(errs0):.4f} -> {np.mean(errs1):.4f} relative"
            kept = sum(1 for r in ridges if math.isinf(r))
            on = [r for r in ridges if not math.isinf(r)]
            msg += (f"; ridge per output column chosen on held-out batches, median {float(np.median(on)):g}" if on else "")
            msg += (f"; {kept} of {len(ridges)} output columns kept their weights (no refit did better on held-out rows)" if kept else "") + ")"
        log(msg + f", re-estimated {len(bn_tasks)} BatchNorms in {len(waves)} waves")
        by_reason: dict[str, list[str]] = {}
        for name, why in skipped.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            log(f"prune: not refitted ({why}): {len(names)} layers: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    else:
        log(f"prune: recovery re-estimated {len(bn_tasks)} BatchNorms in {len(waves)} waves (no refit)")
    return stats


#: cost of one dense solve relative to one symmetric eigendecomposition of the same size (numpy's
#: LU solve against eigh, float64, d ~ 1400, 2-core Zen 4: ~0.25 s against ~1.5 s)
SOLVE_PER_EIGH = 0.2


def ridge_fits(g: np.ndarray, b: np.ndarray, th0: np.ndarray, lams: Sequence[float], cols: Sequence[np.ndarray],
               method: str = "auto") -> list[np.ndarray]:
    """Per strength lams[k]: argmin_th ||X th - Y||² + lams[k] ||th - th0||² for the columns
    cols[k] (bool over b's columns), from the normal equations (g = XᵀX, b = XᵀY), i.e.
    (g + λI)⁻¹ (b + λ th0) on those columns.

    `method`: eigh (one eigendecomposition of g serves every strength; eigenvalues clipped at 0,
    so a g that rounding left slightly indefinite still gets a positive definite system), solve
    (one LU solve of g + λI per strength), auto: solve while the strengths are few enough to
    cost less than the eigendecomposition (SOLVE_PER_EIGH), else eigh. A solve that finds g + λI
    singular falls back to eigh."""
    gs = (g + g.T) / 2
    if method == "auto":
        method = "solve" if len(lams) * SOLVE_PER_EIGH < 1.0 else "eigh"
    if method == "solve":
        eye = np.eye(len(gs))
        try:
            return [np.linalg.solve(gs + lam * eye, b[:, c] + lam * th0[:, c]) for lam, c in zip(lams, cols)]
        except np.linalg.LinAlgError:
            pass  # singular at the weakest strength: the eigendecomposition clips it
    e, q = np.linalg.eigh(gs)
    e = np.maximum(e, 0.0)
    out = []
    for lam, c in zip(lams, cols):
        out.append(q @ ((q.T @ b[:, c] + lam * (q.T @ th0[:, c])) / (e + lam)[:, None]))
    return out


def held_out_errors(ga: np.ndarray, ba: np.ndarray, gf: np.ndarray, bf: np.ndarray, yyf: np.ndarray,
                    th0: np.ndarray, lams: Sequence[float]) -> np.ndarray:
    """[len(lams), columns]: per strength λ the squared error on the held-out rows (gf = XfᵀXf,
    bf = XfᵀYf, yyf = per column YfᵀYf) of the ridge fit on the other rows (ga, ba):
    th = (ga + λI)⁻¹ (ba + λ th0), error thᵀgf th - 2 thᵀbf + yyf, clipped at 0. One
    eigendecomposition of ga serves every strength: th = q c, c = (qᵀba + λ qᵀth0) / (e + λ)
    (eigenvalues clipped at 0). Per-strength LU solves measured no faster (12 strengths)."""
    e, q = np.linalg.eigh((ga + ga.T) / 2)
    e = np.maximum(e, 0.0)
    qb, q0 = q.T @ ba, q.T @ th0
    hg, hb = q.T @ gf @ q, q.T @ bf
    out = np.empty((len(lams), ba.shape[1]))
    for i, lam in enumerate(lams):
        c = (qb + lam * q0) / (e + lam)[:, None]
        out[i] = np.maximum(0.0, (c * (hg @ c)).sum(axis=0) - 2 * (c * hb).sum(axis=0) + yyf)
    return out


def _solve(t: _Refit, theta0: np.ndarray, b0: np.ndarray | None) -> tuple[float, float, np.ndarray, np.ndarray | None, list[float]]:
    """Ridge towards the current weights, its strength chosen per output column on held-out
    rows; returns (rel. error before, after, theta, bias, the strengths chosen (relative to
    mean(diag G); inf: that column keeps its weights)).

    Two folds (even / odd calibration batches): each strength of RIDGES is fitted on one fold
    and scored on the other; every output column (an independent least-squares problem) takes
    the strength with the least held-out error, or keeps its current weights where none beats
    them. A fixed weak ridge overfits a wide layer: a transformer's FFN output layer has ~1500
    inputs for a few thousand calibration tokens (MiniLM prune 0.1: embedding cosine 0.39 after
    the refit, 0.89 without it)."""
    assert t.G is not None and t.B is not None
    d = theta0.shape[0]
    with_bias = b0 is not None
    full0 = np.concatenate([theta0, (b0 if with_bias else np.zeros(theta0.shape[1]))[None, :]], axis=0)
    Gs, Bs, yys = t.G, t.B, np.asarray(t.yy)
    if not with_bias:  # no intercept: drop the ones column
        Gs, Bs, full0 = Gs[:, :d, :d], Bs[:, :d], full0[:d]
    G, B, yy = Gs.sum(0), Bs.sum(0), yys.sum(0)
    n_out = full0.shape[1]

    def col_err(th: np.ndarray, g: np.ndarray, b: np.ndarray, y2: np.ndarray) -> np.ndarray:
        # per column ||X th - Y||^2 from the normal equations: th'G th - 2 th'B + Y'Y
        return np.maximum(0.0, (th * (g @ th)).sum(axis=0) - 2 * (th * b).sum(axis=0) + y2)

    def scale(g: np.ndarray) -> float:
        return float(np.trace(g)) / len(g) + 1e-12

    ridges = list(RIDGES)
    choice = np.full(n_out, RIDGES.index(RIDGE))  # index into ridges; len(ridges): keep the weights
    if all(float(np.trace(Gs[f])) > 0 for f in (0, 1)):
        held = np.zeros((len(ridges) + 1, n_out))
        for f in (0, 1):
            # fitted on fold 1-f, scored on fold f
            lam0 = scale(Gs[1 - f])
            held[:-1] += held_out_errors(Gs[1 - f], Bs[1 - f], Gs[f], Bs[f], yys[f], full0,
                                         [r * lam0 for r in ridges])
            held[-1] += col_err(full0, Gs[f], Bs[f], yys[f])
        choice = np.argmin(held, axis=0)
    theta = full0.copy()
    used = sorted(set(int(c) for c in choice if c < len(ridges)))
    if used:
        lams = [ridges[i] * scale(G) for i in used]
        cols = [choice == i for i in used]
        for sol, c in zip(ridge_fits(G, B, full0, lams, cols), cols):
            theta[:, c] = sol
    e0, e1 = col_err(full0, G, B, yy), col_err(theta, G, B, yy)
    worse = e1 > e0  # never make a column worse on the data it was fitted on
    theta[:, worse] = full0[:, worse]
    e1 = np.where(worse, e0, e1)
    chosen = [math.inf if c >= len(ridges) or w else ridges[int(c)] for c, w in zip(choice, worse)]
    tot = max(float(yy.sum()), 1e-30)
    rel0, rel1 = float(e0.sum()) / tot, float(e1.sum()) / tot
    if with_bias:
        return rel0, rel1, theta[:d], theta[d], chosen
    return rel0, rel1, theta, None, chosen


def _write_bn(model: Model, t: _BN) -> None:
    if not t.n:
        return
    mean = t.s1 / t.n
    var = np.maximum(t.s2 / t.n - mean * mean, 0.0)
    node = t.node
    b = Builder(model.graph)
    replaced = []
    with constant_semantics(model):
        for k, arr in ((3, mean), (4, var)):
            old = node.inputs[k]
            dtype = const_array(old).dtype  # type: ignore[union-attr]
            replaced.append(old)
            node.replace_input_with(k, b.initializer(arr.astype(dtype), (old.name or "bn") + "_reest"))  # type: ignore[union-attr]
    drop_unused_initializers([v for v in replaced if v is not None])


def _downstream(model: Model, start: set[Node]) -> set[Node]:
    seen: set[Node] = set()
    for n in model.graph:
        if n in start or any(v is not None and v.producer() in seen for v in n.inputs):
            seen.add(n)
    return seen

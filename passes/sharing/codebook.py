"""The stored form of a clustered weight: codebook + indices, and the standard-ONNX decode.

A weight W (float, shape S) clustered with b bits becomes

    codebook  float[R*k]          k = 2**b entries per row (R = 1 per tensor, or one row per
                                   output channel along `axis`), sorted within each row
    indices   one of three storages, all holding idx[i] in [0, k):
      uint8    uint8[S]
      uint4    uint4[S]            ONNX packs two per byte (opset >= 21, IR >= 10)
      packed   uint8[b, G]          G = ceil(n/8). Index i = j*G + g (slot j, column g; zero
                                   padding after n) sits in bits [j*b, (j+1)*b) of column g's
                                   little-endian 8*b-bit word (bytes packed[0..b-1, g])

and W is recomputed by a chain of standard ops that onnxruntime constant-folds when it creates
the session (so inference runs on the float weight as before):

    uint8/uint4:  i = Cast(indices, to=INT32)
    packed:       slot j (row j of an [8, G] array) is read from bytes lo = j*b//8 and
                  hi = lo+1 at shift s = j*b%8 (Gathers along axis 0: row copies):
                    opset >= 14 (uint8 all along):
                      v = Div(Gather(p, lo), 2**s) mod 2**b
                          [+ (Gather(p, hi) mod 2**(s+b-8)) * 2**(8-s)  for slots that span
                          two bytes; 3, 5, 6, 7 bits only]
                    opset < 14 (int32): v = (Gather(p, lo) + 256*Gather(p, hi)) / 2**s mod 2**b
                  i = Reshape(v, [-1]) (-> Slice [0:n] when n is not a multiple of 8) -> Reshape S
                      (-> Cast INT32)
    per channel:  i = i + offsets          offsets[c] = c*k, shaped to broadcast along `axis`
    W = Gather(codebook, i, axis=0)        the original value object, so every use (and every
                                           tie between uses) is kept

The final Gather carries the metadata property `graphopt.codebook`, a JSON object {"bits",
"storage", "axis", "indices", "codebook", "shape"} naming the two initializers; the small
decode constants (byte positions, shifts, 2**b, shapes) are root-graph initializers named
`codebook.*`, shared by all weights that need the same one. A compiled target can therefore keep the two
small tensors in its artifact and decode at load time (see `decode_numpy`), and a tool can find
clustered weights without pattern matching.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

from graphopt.codebook import decode_artifact, decode_numpy, pack, storage_bytes, unpack  # noqa: F401 - the stored form's one home
from graphopt.ir import Attr, DataType, Graph, Node, NumpyTensor, Shape, TensorType, Value, unique_name

CODEBOOK_KEY = "graphopt.codebook"
STORAGES = ("uint8", "uint4", "packed")


def encode_indices(idx: np.ndarray, bits: int, storage: str) -> NumpyTensor:
    if storage == "uint8":
        return NumpyTensor(idx.astype(np.uint8))
    if storage == "uint4":
        import ml_dtypes

        return NumpyTensor(idx.astype(ml_dtypes.uint4), dtype=DataType.UINT4)
    return NumpyTensor(pack(idx, bits))


def _const(graph: Graph, array: np.ndarray | NumpyTensor, base: str) -> Value:
    tensor = array if isinstance(array, NumpyTensor) else NumpyTensor(array)
    name = unique_name(graph, base)
    tensor.name = name
    v = Value(name, TensorType(tensor.dtype, Shape(tensor.shape)), const_value=tensor)
    graph.register_initializer(v)
    return v


class SharedConstants:
    """The small decode constants (byte positions, shifts, 2**b, [-1]...) are the same for every
    weight with the same bits: one initializer of the root graph each (visible in every
    subgraph), instead of a copy per weight."""

    def __init__(self) -> None:
        self._made: dict[tuple[int, str, bytes, tuple[int, ...]], Value] = {}

    def get(self, graph: Graph, array: np.ndarray, name: str) -> Value:
        root = graph.root()
        key = (id(root), array.dtype.str, array.tobytes(), array.shape)
        v = self._made.get(key)
        if v is None or v.graph is not root or root.initializers.get(v.name) is not v:
            v = self._made[key] = _const(root, array, "codebook." + name)
        return v


def build_decode(
    graph: Graph,
    weight: Value,
    codebook: np.ndarray,
    idx: np.ndarray,
    *,
    bits: int,
    storage: str,
    axis: int | None,
    shared: SharedConstants | None = None,
    opset: int = 21,
) -> list[Node]:
    """Replace initializer `weight` of `graph` by codebook + indices initializers and a decode
    chain at the head of `graph` whose last node (a Gather) outputs `weight` itself. Returns the
    decode nodes. `codebook` is [R, k] in the weight's dtype, `idx` [R, n] uint8 (rows along
    `axis` when per channel)."""
    shared = shared or SharedConstants()
    shape = tuple(weight.const_value.shape)  # type: ignore[union-attr]
    n = math.prod(shape)
    k = 1 << bits
    base = weight.name
    if axis is not None:  # rows were taken along `axis`: put them back in the weight's layout
        moved = list(shape)
        moved.insert(0, moved.pop(axis))
        idx_nd = np.moveaxis(idx.reshape(moved), 0, axis)
    else:
        idx_nd = idx.reshape(shape)
    idx_v = _const(graph, encode_indices(idx_nd if storage != "packed" else idx_nd.reshape(-1), bits, storage), base + ".idx")
    cb_v = _const(graph, np.ascontiguousarray(codebook.reshape(-1)), base + ".codebook")
    nodes: list[Node] = []

    def op(op_type: str, inputs: Sequence[Value], attrs: dict | None = None, out: Value | None = None) -> Value:
        o = out if out is not None else Value(unique_name(graph, f"{base}.d"))
        nodes.append(Node("", op_type, list(inputs), [Attr.infer(a, v) for a, v in (attrs or {}).items()], outputs=[o]))
        return o

    def c(array: np.ndarray, name: str) -> Value:
        return shared.get(graph, np.asarray(array), name)

    i32 = DataType.INT32
    if storage == "packed":
        j = np.arange(8)
        shift = (j * bits) % 8
        lo = (j * bits) // 8
        hi = np.minimum(lo + 1, bits - 1)
        spans = shift + bits > 8  # slot j continues into byte lo+1
        lo_i = c(lo.astype(np.int64), f"lo{bits}")
        # only where a slot spans two bytes (3, 5, 6, 7 bits): an unread initializer made
        # onnxruntime warn "Removing initializer 'codebook.hi2'" on every 2-bit model
        hi_i = c(hi.astype(np.int64), f"hi{bits}") if spans.any() else None
        if opset >= 14:
            # uint8 throughout (Div/Mod/Mul/Add take uint8 from opset 14): intermediates are n
            # bytes, not 4n, which is what onnxruntime's folding at session creation pays for
            u8 = np.uint8
            low = op("Gather", [idx_v, lo_i], {"axis": 0})  # row copies: [8, G]
            val = op("Mod", [op("Div", [low, c((1 << shift).astype(u8).reshape(8, 1), f"shift{bits}")]), c(np.array(k, u8), f"k{bits}")])
            if spans.any():  # 3, 5, 6, 7 bits: the high part of slot j is the low bits of byte lo+1
                high = op("Gather", [idx_v, hi_i], {"axis": 0})  # type: ignore[list-item]
                keep = c(np.where(spans, 1 << (shift + bits - 8), 1).astype(u8).reshape(8, 1), f"himod{bits}")
                up = c(np.where(spans, 1 << (8 - shift), 0).astype(u8).reshape(8, 1), f"himul{bits}")
                val = op("Add", [val, op("Mul", [op("Mod", [high, keep]), up])])
            ints = val
        else:
            # int32 arithmetic on (byte lo) + 256 * (byte lo+1), shifted and masked
            p32 = op("Cast", [idx_v], {"to": int(i32)})
            both = op("Gather", [p32, lo_i], {"axis": 0})
            if spans.any():
                high = op("Gather", [p32, hi_i], {"axis": 0})  # type: ignore[list-item]
                both = op("Add", [both, op("Mul", [high, c(np.where(lo + 1 < bits, 256, 0).astype(np.int32).reshape(8, 1), f"himul32_{bits}")])])
            q = op("Div", [both, c((1 << shift).astype(np.int32).reshape(8, 1), f"shift32_{bits}")])
            ints = op("Mod", [q, c(np.array(k, np.int32), f"k32_{bits}")])
        ints = op("Reshape", [ints, c(np.array([-1], np.int64), "flat")])
        if n % 8:
            starts, ends = (c(np.array([v], np.int64), nm) for v, nm in ((0, "zero"), (n, f"n{n}")))
            ints = op("Slice", [ints, starts, ends])
        ints = op("Reshape", [ints, c(np.array(shape, np.int64), "shape" + "x".join(map(str, shape)))])
        if opset >= 14:
            ints = op("Cast", [ints], {"to": int(i32)})
    else:
        ints = op("Cast", [idx_v], {"to": int(i32)})
    if axis is not None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        offsets = (np.arange(shape[axis], dtype=np.int32) * k).reshape(view)
        ints = op("Add", [ints, _const(graph, offsets, base + ".offsets")])
    graph.remove_initializer(weight.name)
    weight.const_value = None
    op("Gather", [cb_v, ints], {"axis": 0}, out=weight)
    nodes[-1].metadata_props[CODEBOOK_KEY] = json.dumps(
        {"bits": bits, "storage": storage, "axis": axis, "indices": idx_v.name, "codebook": cb_v.name, "shape": list(shape)},
        sort_keys=True, separators=(",", ":"),
    )
    head = next(iter(graph), None)
    if head is None:
        for nd in nodes:
            graph.append(nd)
    else:
        graph.insert_before(head, nodes)
    return nodes


def expand_decodes(model) -> dict[str, dict]:
    """For a compiled target that stores clustered weights compressed: replace each decode
    chain of the main graph (found by the `graphopt.codebook` metadata of its final Gather) by
    the decoded float weight as an initializer, so the kernels read a plain weight. Returns, per
    weight name, what the artifact stores instead of the float array and how to decode it at
    load time (`decode_artifact`): {"array": the decoded weight, "indices": uint8 [bits, G]
    (`pack`ed, whatever the ONNX storage was), "codebook", "bits", "axis", "shape"}."""
    g = model.graph
    out: dict[str, dict] = {}
    for node in list(g):
        meta = node.metadata_props.get(CODEBOOK_KEY)
        if meta is None or node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        info = json.loads(meta)
        iv, cv = g.initializers.get(info.get("indices", "")), g.initializers.get(info.get("codebook", ""))
        w = node.outputs[0]
        if iv is None or cv is None or iv.const_value is None or cv.const_value is None or w.is_graph_output():
            continue
        stored, cb = iv.const_value.numpy(), cv.const_value.numpy()
        bits = int(info["bits"])
        arr = np.ascontiguousarray(decode_numpy(stored, cb, info))
        n = math.prod(info["shape"])
        packed = (np.asarray(stored, dtype=np.uint8) if info["storage"] == "packed"
                  else pack(np.asarray(stored).astype(np.uint8).reshape(-1)[:n], bits))
        tensor = NumpyTensor(arr)
        new = Value(unique_name(g, w.name + ".decoded"), TensorType(tensor.dtype, Shape(tensor.shape)), const_value=tensor)
        tensor.name = new.name
        g.register_initializer(new)
        w.replace_all_uses_with(new)
        out[new.name] = {"array": arr, "indices": packed, "codebook": np.ascontiguousarray(cb.reshape(-1)),
                         "bits": bits, "axis": info["axis"], "shape": list(info["shape"])}
    if out:
        from graphopt.passes.cleanup.dce import DeadCodeElimination
        from graphopt.transform import PassContext

        DeadCodeElimination().run(model, PassContext())
    return out


def stored_params(expanded: dict[str, dict], params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The arrays an artifact stores for its params (name -> array, as `lowered` lists them),
    the expanded clustered weights (`expand_decodes`) as `<param>.indices` + `<param>.codebook`
    instead of the float array, and the manifest's `codebooks` entries {param: {"indices",
    "codebook", "bits", "axis", "shape"}}. A param is matched to its weight by identity (the
    lowering passes the initializer's array on), else by equal contents."""
    by_id = {id(e["array"]): name for name, e in expanded.items()}
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    left = dict(expanded)
    for p, arr in params.items():
        name = by_id.get(id(arr))
        if name is None or name not in left:
            name = next((nm for nm, e in left.items() if e["array"].shape == arr.shape and e["array"].dtype == arr.dtype
                         and np.array_equal(e["array"], arr)), None)
        if name is None:
            arrays[p] = arr
            continue
        e = left.pop(name)
        ik, ck = f"{p}.indices", f"{p}.codebook"
        arrays[ik], arrays[ck] = e["indices"], e["codebook"]
        entries[p] = {"indices": ik, "codebook": ck, "bits": e["bits"], "axis": e["axis"], "shape": e["shape"]}
    return arrays, entries

"""The stored form of a clustered weight: codebook + indices, and the standard-ONNX decode.

A weight W (float, shape S) clustered with b bits becomes

    codebook  float[R*k]          k = 2**b entries per row (R = 1 per tensor, or one row per
                                   output channel along `axis`), sorted within each row
    indices   one of three storages, all holding idx[i] in [0, k):
      uint8    uint8[S]
      uint4    uint4[S]            ONNX packs two per byte (opset >= 21, IR >= 10)
      packed   uint8[ceil(n/8), b] groups of 8 indices as one little-endian 8*b-bit word,
                                   index j of a group in bits [j*b, (j+1)*b)

and W is recomputed by a chain of standard ops that onnxruntime constant-folds when it creates
the session (so inference runs on the float weight as before):

    uint8/uint4:  i = Cast(indices, to=INT32)
    packed:       p = Cast(indices, to=INT32)                      [G, b]
                  i = (Gather(p, lo, axis=1) + Gather(p, hi, axis=1) * himul) / 2**shift mod 2**b
                      with lo[j] = j*b//8, shift[j] = j*b%8, hi = min(lo+1, b-1), himul =
                      256 where lo+1 < b else 0 (index j of a group spans bytes lo, lo+1;
                      for 2 and 4 bits it never spans two: the second Gather is left out)
                      -> Reshape [-1] (-> Slice [0:n] when n is not a multiple of 8) -> Reshape S
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

from graphopt.ir import Attr, AttrType, DataType, Graph, Node, NumpyTensor, Shape, TensorType, Value, unique_name

CODEBOOK_KEY = "graphopt.codebook"
STORAGES = ("uint8", "uint4", "packed")


def pack(idx: np.ndarray, bits: int) -> np.ndarray:
    """Indices (< 2**bits) → uint8 [ceil(n/8), bits]: 8 indices per `bits` bytes."""
    flat = idx.reshape(-1)
    groups = -(-flat.size // 8)
    out = np.empty((groups, bits), dtype=np.uint8)
    step = 1 << 17  # groups per chunk: the uint64 words stay small
    for g0 in range(0, groups, step):
        part = flat[g0 * 8 : (g0 + step) * 8]
        ng = -(-part.size // 8)
        cols = np.zeros(ng * 8, dtype=np.uint8)
        cols[: part.size] = part
        cols = cols.reshape(ng, 8)
        word = np.zeros(ng, dtype=np.uint64)
        for j in range(8):
            word |= cols[:, j].astype(np.uint64) << np.uint64(j * bits)
        out[g0 : g0 + ng] = word.astype("<u8").view(np.uint8).reshape(ng, 8)[:, :bits]
    return out


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack`: the first n indices as uint8."""
    groups = packed.shape[0]
    wide = np.zeros((groups, 8), dtype=np.uint8)
    wide[:, :bits] = packed
    word = wide.view("<u8").reshape(groups)
    out = np.empty((groups, 8), dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for j in range(8):
        out[:, j] = (word >> np.uint64(j * bits)) & mask
    return out.reshape(-1)[:n]


def storage_bytes(n: int, bits: int, storage: str) -> int:
    """Payload bytes of n indices in `storage`."""
    if storage == "uint8":
        return n
    if storage == "uint4":
        return (n + 1) // 2
    return -(-n // 8) * bits


def encode_indices(idx: np.ndarray, bits: int, storage: str) -> NumpyTensor:
    if storage == "uint8":
        return NumpyTensor(idx.astype(np.uint8))
    if storage == "uint4":
        import ml_dtypes

        return NumpyTensor(idx.astype(ml_dtypes.uint4), dtype=DataType.UINT4)
    return NumpyTensor(pack(idx, bits))


def decode_numpy(indices: np.ndarray, codebook: np.ndarray, info: dict) -> np.ndarray:
    """Rebuild the float weight from the stored tensors and the `graphopt.codebook` JSON
    (what a compiled target does at load time)."""
    shape = tuple(info["shape"])
    n = math.prod(shape)
    bits, axis = int(info["bits"]), info["axis"]
    if info["storage"] == "packed":
        idx = unpack(np.asarray(indices, dtype=np.uint8), bits, n).reshape(shape).astype(np.int64)
    else:
        idx = np.asarray(indices).astype(np.int64).reshape(shape)
    if axis is not None:
        k = 1 << bits
        view = [1] * len(shape)
        view[axis] = shape[axis]
        idx = idx + (np.arange(shape[axis], dtype=np.int64) * k).reshape(view)
    return np.asarray(codebook).reshape(-1)[idx]


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
        # index j of a group sits in bytes lo = j*b//8 and lo+1 at shift j*b%8: two byte Gathers
        # and int32 arithmetic (no wide words: onnxruntime's int64 ReduceSum rounds above 2**53)
        j = np.arange(8)
        lo = (j * bits) // 8
        hi = np.minimum(lo + 1, bits - 1)
        hi_mul = np.where(lo + 1 < bits, 256, 0).astype(np.int32)
        ints = op("Cast", [idx_v], {"to": int(i32)})
        both = op("Gather", [ints, c(lo.astype(np.int64), f"lo{bits}")], {"axis": 1})
        if 8 % bits:  # 3, 5, 6, 7 bits: some indices span two bytes
            high = op("Gather", [ints, c(hi.astype(np.int64), f"hi{bits}")], {"axis": 1})
            both = op("Add", [both, op("Mul", [high, c(hi_mul, f"himul{bits}")])])
        q = op("Div", [both, c((2 ** ((j * bits) % 8)).astype(np.int32), f"shift{bits}")])
        ints = op("Mod", [q, c(np.array(k, np.int32), f"k{bits}")])
        ints = op("Reshape", [ints, c(np.array([-1], np.int64), "flat")])
        if n % 8:
            starts, ends = (c(np.array([v], np.int64), nm) for v, nm in ((0, "zero"), (n, f"n{n}")))
            ints = op("Slice", [ints, starts, ends])
        ints = op("Reshape", [ints, c(np.array(shape, np.int64), "shape" + "x".join(map(str, shape)))])
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

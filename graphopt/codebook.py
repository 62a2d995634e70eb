"""The stored form of a clustered weight (codebook + indices) as numpy arrays: bit packing and
decoding. The cluster-weights pass writes it (graphopt.passes.sharing.codebook builds the ONNX
decode around it), compiled artifacts store it, and graphopt.runtime decodes it at load time; the
layout is described in graphopt.passes.sharing.codebook's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["decode_artifact", "decode_numpy", "pack", "storage_bytes", "stored_param", "unpack"]


def pack(idx: np.ndarray, bits: int) -> np.ndarray:
    """Indices (< 2**bits) → uint8 [bits, G], G = ceil(n/8): slot j (indices j*G .. j*G+G-1,
    zero-padded) takes bits [j*b, (j+1)*b) of each column's 8*b-bit little-endian word, so
    index j*G + g is recovered from row-contiguous data (see the module docstring)."""
    flat = idx.reshape(-1)
    G = max(1, -(-flat.size // 8))
    padded = np.zeros(8 * G, dtype=np.uint8)
    padded[: flat.size] = flat
    slots = padded.reshape(8, G)
    out = np.empty((bits, G), dtype=np.uint8)
    step = 1 << 17  # columns per chunk: the uint64 words stay small
    for g0 in range(0, G, step):
        part = slots[:, g0 : g0 + step]
        word = np.zeros(part.shape[1], dtype=np.uint64)
        for j in range(8):
            word |= part[j].astype(np.uint64) << np.uint64(j * bits)
        out[:, g0 : g0 + step] = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits].T
    return out


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack`: the first n indices as uint8."""
    G = packed.shape[1]
    wide = np.zeros((G, 8), dtype=np.uint8)
    wide[:, :bits] = packed.T
    word = wide.view("<u8").reshape(G)
    out = np.empty((8, G), dtype=np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for j in range(8):
        out[j] = (word >> np.uint64(j * bits)) & mask
    return out.reshape(-1)[:n]


def storage_bytes(n: int, bits: int, storage: str) -> int:
    """Payload bytes of n indices in `storage`."""
    if storage == "uint8":
        return n
    if storage == "uint4":
        return (n + 1) // 2
    return -(-n // 8) * bits


def decode_numpy(indices: np.ndarray, codebook: np.ndarray, info: dict[str, Any]) -> np.ndarray:
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


def decode_artifact(indices: np.ndarray, codebook: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """The float weight from an artifact's stored indices (`pack`ed uint8) and codebook."""
    return decode_numpy(indices, codebook, {"bits": entry["bits"], "storage": "packed", "axis": entry["axis"],
                                            "shape": entry["shape"]})


def stored_param(data: Any, name: str, rt: Mapping[str, Any]) -> np.ndarray:
    """Param `name` of a compiled artifact's params file (`data`, an .npz mapping; `rt`, the
    manifest's runtime section): a clustered weight is stored as its bit-packed indices and
    codebook and decoded here, a bfloat16 one as its uint16 bits."""
    entry = rt.get("codebooks", {}).get(name)
    if entry is None:
        if name in rt.get("bfloat16", ()):  # (.npz has no bfloat16)
            import ml_dtypes

            return np.asarray(data[name]).view(ml_dtypes.bfloat16)
        return np.asarray(data[name])
    a: np.ndarray = decode_artifact(data[entry["indices"]], data[entry["codebook"]], entry)
    if list(a.shape) != list(entry["shape"]):
        raise ValueError(f"param {name!r} decodes to shape {list(a.shape)}, its codebook entry says {entry['shape']}")
    return a

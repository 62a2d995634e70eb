"""Numeric checks against onnxruntime: run a model, make inputs, compare outputs.

Everything that changes values (fusion reorders float math, int8, pruning) is checked by
running the model before and after on onnxruntime with the same inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.core import Model
from graphopt.ir.types import DataType, TensorType


class NumericMismatchError(GraphoptError):
    """Outputs left the tolerance; the message says where it was first seen."""


#: the most bytes of random inputs made for a check (all inputs together)
MAX_RANDOM_INPUT_BYTES = 2**30


def random_inputs(
    model: Model,
    *,
    seed: int = 0,
    dim_values: Mapping[str, int] | None = None,
    max_bytes: int = MAX_RANDOM_INPUT_BYTES,
) -> dict[str, np.ndarray]:
    """Inputs for every non-initializer graph input: symbolic dims bound to `dim_values` (2 by
    default), floats ~ N(0, 1), integers in [0, 4), bools random, each in the input's own dtype.

    The sizes are checked before anything is allocated: more than `max_bytes` in all is a
    GraphoptError naming the input, its largest dim and the limit.
    """
    rng = np.random.default_rng(seed)
    dims = dict(dim_values or {})
    planned: list[tuple[str, DataType, list[int]]] = []
    total = 0
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        t = v.type
        if not isinstance(t, TensorType):
            raise GraphoptError(f"cannot make a random value for input {v.name!r} of type {t}; pass inputs")
        try:
            itemsize = 8 if t.dtype == DataType.STRING else t.dtype.numpy().itemsize
        except (KeyError, TypeError, ValueError):
            raise GraphoptError(
                f"cannot make a random value for input {v.name!r}: element type {t.dtype.name} ({int(t.dtype)}) "
                "has no array type; pass inputs"
            ) from None
        shape = [d if isinstance(d, int) else dims.setdefault(d, 2) if isinstance(d, str) else 2 for d in (t.shape or [])]
        for i, d in enumerate(shape):
            if d < 0:
                raise GraphoptError(f"input {v.name!r}: dim {i} is {d}, a negative size; pass inputs")
        total += math.prod(shape) * itemsize
        if total > max_bytes:
            axis = max(range(len(shape)), key=lambda i: shape[i])
            raise GraphoptError(
                f"input {v.name!r} of shape {shape} ({t.dtype.name.lower()}) needs {math.prod(shape) * itemsize} bytes "
                f"of random values (dim {axis} is {shape[axis]}), over the limit of {max_bytes} bytes for all inputs; "
                "pass smaller inputs"
            )
        planned.append((v.name, t.dtype, shape))
    feeds: dict[str, np.ndarray] = {}
    for name, dtype, shape in planned:
        # np.asarray: a 0-d draw comes back as a numpy scalar, which onnxruntime refuses
        feeds[name] = np.asarray(_random_array(rng, dtype, shape))
    return feeds


def _random_array(rng: np.random.Generator, dtype: DataType, shape: list[int]) -> np.ndarray:
    if dtype in (DataType.FLOAT, DataType.DOUBLE):
        # drawn in the input's own dtype: a float64 draw cast down would need twice the memory
        return rng.standard_normal(shape, dtype=dtype.numpy())
    if dtype.is_floating:
        return rng.standard_normal(shape, dtype=np.float32).astype(dtype.numpy())
    if dtype == DataType.BOOL:
        return rng.random(shape) < 0.5
    if dtype == DataType.STRING:
        return np.array(rng.choice(["a", "b", "c"], size=shape), dtype=object)
    return rng.integers(0, 4, size=shape, dtype=dtype.numpy()) if dtype.numpy().kind in "iu" \
        else rng.integers(0, 4, size=shape).astype(dtype.numpy())


def run_onnxruntime(model: Model, inputs: Mapping[str, np.ndarray], *, threads: int = 1,
                    optimize: bool = False) -> list[np.ndarray]:
    """Export and run on onnxruntime's CPU provider with all its optimisations off, so the
    result shows what the model computes, not what onnxruntime rewrote (`optimize=True`: all
    on, as deployed; the difference between the two is the reference's own rounding noise)."""
    import onnxruntime as ort

    from graphopt.onnx_io import to_onnx

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize \
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 4  # fatal only: its error log would be a second stderr line; the exception says it
    try:
        sess = ort.InferenceSession(to_onnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
        return list(sess.run(None, dict(inputs)))
    except Exception as e:
        raise GraphoptError(f"onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None


@dataclass
class Comparison:
    ok: bool
    max_abs: float
    max_rel: float
    worst_output: int | None
    detail: str

    def __str__(self) -> str:
        return self.detail


def compare_outputs(
    expected: list[np.ndarray], actual: list[np.ndarray], *, rtol: float = 1e-4, atol: float = 1e-5
) -> Comparison:
    """Element-wise |a - e| <= atol + rtol * |e| (NaN equal to NaN), over every output."""
    if len(expected) != len(actual):
        return Comparison(False, np.inf, np.inf, None, f"{len(actual)} outputs, expected {len(expected)}")
    worst_abs, worst_rel, worst_i = 0.0, 0.0, None
    for i, (e, a) in enumerate(zip(expected, actual)):
        e, a = np.asarray(e), np.asarray(a)
        if e.shape != a.shape:
            return Comparison(False, np.inf, np.inf, i, f"output {i}: shape {a.shape}, expected {e.shape}")
        if e.dtype != a.dtype:
            return Comparison(False, np.inf, np.inf, i, f"output {i}: dtype {a.dtype}, expected {e.dtype}")
        if e.dtype == object or e.dtype.kind in "USb":
            if not np.array_equal(e, a):
                return Comparison(False, np.inf, np.inf, i, f"output {i}: values differ")
            continue
        ef, af = e.astype(np.float64), a.astype(np.float64)
        if ef.size == 0:
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            # NaN matches NaN and an infinity matches the same infinity; any other pairing with
            # a NaN or an infinity is a mismatch (|e| is infinite there, so the tolerance
            # formula alone would accept anything)
            same = (np.isnan(ef) & np.isnan(af)) | (np.isinf(ef) & (ef == af))
            special = ~np.isfinite(ef) | ~np.isfinite(af)
            diff = np.where(same, 0.0, np.where(special, np.inf, np.abs(ef - af)))
            bad = (diff > atol + rtol * np.abs(np.where(special, 0.0, ef))) & ~same
            mabs = float(diff.max())
            mrel = float((diff / np.maximum(np.abs(np.where(special, 1.0, ef)), 1e-12)).max())
        if mabs > worst_abs:
            worst_abs, worst_rel, worst_i = mabs, mrel, i
        if bad.any():
            return Comparison(
                False, mabs, mrel, i, f"output {i}: max abs error {mabs:.3g}, max rel error {mrel:.3g} (rtol={rtol}, atol={atol})"
            )
    return Comparison(True, worst_abs, worst_rel, worst_i, f"max abs error {worst_abs:.3g}")


def check_same_outputs(
    before: Model,
    after: Model,
    inputs: Mapping[str, np.ndarray] | None = None,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Comparison:
    """Run both models on onnxruntime with the same inputs and compare."""
    feeds = dict(inputs) if inputs is not None else random_inputs(before)
    return compare_outputs(run_onnxruntime(before, feeds), run_onnxruntime(after, feeds), rtol=rtol, atol=atol)


@functools.lru_cache(maxsize=None)
def onnxruntime_has_kernel(op_type: str, opset: int, dtype: DataType = DataType.FLOAT, domain: str = "", num_inputs: int = 1) -> bool:
    """Whether the installed onnxruntime's CPU provider runs `op_type` under `opset` with
    `num_inputs` inputs of `dtype`, found by building a one-node session (cached).

    A rewrite that emits an op for the ONNX target must produce a model onnxruntime loads; op
    registration does not always follow the ONNX spec's version ranges (onnxruntime 1.32 runs
    Swish only under opset 24, not 25..27), so asking the runtime itself is the reliable way.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper

    tt = int(dtype)
    ins = [helper.make_tensor_value_info(f"x{i}", tt, [2]) for i in range(num_inputs)]
    node = helper.make_node(op_type, [f"x{i}" for i in range(num_inputs)], ["y"], domain=domain)
    g = helper.make_graph([node], "probe", ins, [helper.make_tensor_value_info("y", tt, None)])
    opsets = [helper.make_opsetid("", opset if not domain else max(opset, 1))]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(g, opset_imports=opsets, ir_version=min(onnx.IR_VERSION, 10))
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True

"""Numeric checks against onnxruntime: run a model, make inputs, compare outputs; the one
onnxruntime session builder (`onnxruntime_session`) and kernel probe (`onnxruntime_has_kernel`).

Everything that changes values (fusion reorders float math, int8, pruning) is checked by
running the model before and after on onnxruntime with the same inputs.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def onnxruntime_session(
    model: Model | Any,
    *,
    threads: int = 0,
    optimize: bool = True,
    spinning: bool = True,
    spin_between_runs: bool = True,
    log_severity: int = 3,
    outputs: Sequence[str] | None = None,
    extra_outputs: Sequence[str] = (),
    inter_op_threads: int = 0,
    profile_prefix: str | None = None,
    optimized_model_path: str | None = None,
) -> Any:
    """An onnxruntime CPU InferenceSession: the one place graphopt builds one.

    `model`: an IR Model, an onnx.ModelProto, serialized bytes or a path. `threads`: intra-op
    threads (0: onnxruntime's default); `spinning=False` stops the pool spinning altogether
    (measurements that alternate two sessions, or share the cores), `spin_between_runs=False`
    only once a run ends (session.force_spinning_stop: the workers still spin between one run's
    operators, and leave the cores to other threads between runs); `optimize=False` turns all
    graph optimizations off (what the model computes, not what onnxruntime rewrote it into);
    `log_severity` 3 keeps warnings quiet, 4 also errors (the exception carries them).
    `outputs` replaces the graph outputs by these names, `extra_outputs` adds intermediate values
    as outputs. `profile_prefix` turns on onnxruntime's profiler; `optimized_model_path` writes
    the graph onnxruntime runs. onnxruntime's own exceptions propagate: callers say in one line
    what failed for them.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = log_severity
    if threads:
        so.intra_op_num_threads = threads
    if inter_op_threads:
        so.inter_op_num_threads = inter_op_threads
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not spin_between_runs:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_model_path is not None:
        so.optimized_model_filepath = optimized_model_path
    source: Any = model
    if isinstance(model, Model) or outputs is not None or extra_outputs:
        import onnx

        from graphopt.onnx_io import to_onnx

        proto = to_onnx(model) if isinstance(model, Model) else (
            onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike))
            else onnx.load_from_string(model) if isinstance(model, bytes) else model)
        if outputs is not None or extra_outputs:
            if outputs is not None:
                del proto.graph.output[:]
            have = {o.name for o in proto.graph.output}
            for n in [*(outputs or ()), *extra_outputs]:
                if n not in have:
                    proto.graph.output.append(onnx.ValueInfoProto(name=n))
                    have.add(n)
        source = proto.SerializeToString()
    elif not isinstance(model, (bytes, str, os.PathLike)):
        source = model.SerializeToString()  # an onnx.ModelProto
    return ort.InferenceSession(os.fspath(source) if isinstance(source, os.PathLike) else source, so,
                                providers=["CPUExecutionProvider"])


def run_onnxruntime(model: Model, inputs: Mapping[str, np.ndarray], *, threads: int = 1,
                    optimize: bool = False) -> list[np.ndarray]:
    """Export and run on onnxruntime's CPU provider with all its optimisations off, so the
    result shows what the model computes, not what onnxruntime rewrote (`optimize=True`: all
    on, as deployed; the difference between the two is the reference's own rounding noise)."""
    try:
        # log 4, fatal only: its error log would be a second stderr line; the exception says it
        sess = onnxruntime_session(model, threads=threads, optimize=optimize, log_severity=4)
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
def onnxruntime_has_kernel(
    op_type: str,
    opset: int,
    dtype: DataType = DataType.FLOAT,
    domain: str = "",
    num_inputs: int = 1,
    *,
    shapes: tuple[tuple[int, ...], ...] | None = None,
    attributes: tuple[tuple[str, Any], ...] = (),
    run: bool = False,
) -> bool:
    """Whether the installed onnxruntime's CPU provider runs `op_type` under default-domain
    `opset` (and opset 1 of `domain`), found by building a one-node session (cached): the one
    onnxruntime kernel probe.

    Inputs: `num_inputs` of `dtype`, rank 1 ([2]) unless `shapes` gives each input's shape (ops
    whose shape inference wants real ranks: Attention, Conv); `attributes` as (name, value)
    pairs; `run=True` also runs it once on zeros (a kernel that loads but fails at run time).

    A rewrite that emits an op for the ONNX target must produce a model onnxruntime loads; op
    registration does not always follow the ONNX spec's version ranges (onnxruntime 1.32 runs
    Swish only under opset 24, not 25..27), so asking the runtime itself is the reliable way.
    """
    import onnx
    from onnx import helper

    tt = int(dtype)
    dims = list(shapes) if shapes is not None else [(2,)] * num_inputs
    names = [f"x{i}" for i in range(len(dims))]
    ins = [helper.make_tensor_value_info(n, tt, list(d)) for n, d in zip(names, dims)]
    node = helper.make_node(op_type, names, ["y"], domain=domain, **dict(attributes))
    g = helper.make_graph([node], "probe", ins, [helper.make_tensor_value_info("y", tt, None)])
    opsets = [helper.make_opsetid("", opset if not domain else max(opset, 1))]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(g, opset_imports=opsets, ir_version=min(onnx.IR_VERSION, 10))
    try:
        sess = onnxruntime_session(model.SerializeToString(), log_severity=4)
        if run:
            sess.run(None, {n: np.zeros(d, dtype.numpy()) for n, d in zip(names, dims)})
    except Exception:  # noqa: BLE001 - any refusal (load or run) means: no kernel here
        return False
    return True

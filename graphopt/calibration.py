"""Calibration: the data a quantizer looks at, and streaming range observers.

    data = load_calibration("calib.npz", model)          # or a folder of .npz files
    data = synthetic_calibration(model, num_batches=8)    # random inputs, labelled as such
    stats = collect_ranges(model, data, ["conv1_out", "relu3"], method="entropy")
    stats["relu3"].lo, stats["relu3"].hi

Data: a `.npz` archive holds one array per model input with the samples stacked along the
input's batch axis (e.g. (N, 3, 224, 224) for an input of shape (1, 3, 224, 224)); it is cut into
batches of the model's batch size (a symbolic batch dim takes `batch_size`). A folder is read
file by file in name order, so a data set never has to fit in memory at once.

Observers are streaming: each batch updates a running min/max and a 2048-bin histogram over
[-R, R], where R is the smallest power of two strictly above the largest magnitude seen so far.
When R has to grow it doubles, and pairs of bins merge exactly, so the histogram after any
number of batches equals the one built from all the data at once (bin edges are exact binary
fractions). Ranges come from the histogram: minmax, percentile, entropy (KL divergence, as in
TensorRT) or mse (the clipping range with the least expected quantization error).

Sentinels: values with magnitude >= `sentinel` (1e9 by default), NaN or infinity never enter a
range. An additive attention mask (-3.4e38 = float32 min) would otherwise stretch the range of
every tensor it reaches; observers count such values instead (`TensorStats.sentinels`), so a
quantizer can keep the ops that see them in float.

Intermediate tensors are read with onnxruntime by making them extra graph outputs, `chunk_size`
tensors per session, so the activations of one batch for one chunk are all that is held.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.ir.core import Model
from graphopt.ir.types import DataType, TensorType

__all__ = [
    "METHODS",
    "CalibrationData",
    "CalibrationError",
    "HistogramObserver",
    "TensorStats",
    "collect_ranges",
    "intermediate_outputs",
    "load_calibration",
    "synthetic_calibration",
]

#: range-selection methods collect_ranges understands
METHODS = ("minmax", "percentile", "entropy", "mse")
NUM_BINS = 2048
DEFAULT_SENTINEL = 1e9


class CalibrationError(GraphoptError):
    """Calibration data that does not fit the model (missing input, wrong shape, unreadable file)."""


# ----------------------------------------------------------------------------------------- data


@dataclass
class CalibrationData:
    """A re-iterable source of input batches (dicts input name -> array).

    `source` says where the data came from ("calib.npz: 64 samples in 64 batches of 1", or
    "synthetic: ..."); `synthetic` is True for random inputs, and reports must say so.
    """

    batches: Sequence[str] | None  # files to read (None: `make` produces the batches)
    input_names: list[str]
    batch_sizes: dict[str, int | None]
    source: str
    synthetic: bool = False
    make: object = None  # callable() -> Iterator[dict] for in-memory / synthetic data
    num_samples: int = 0
    dtypes: dict[str, np.dtype | None] | None = None  # input -> the float dtype file arrays are cast to (float64 data)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.make is not None:
            yield from self.make()  # type: ignore[operator]
            return
        for path in self.batches or ():
            yield from _split_file(path, self.input_names, self.batch_sizes, self.dtypes)

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first `n` batches, in memory."""
        out = []
        for b in self:
            if len(out) >= n:
                break
            out.append(b)
        return out

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _model_inputs(model: Model) -> list:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _batch_sizes(model: Model, batch_size: int | None) -> dict[str, int | None]:
    """Per input: the batch size to cut the stacked samples into (None: scalar input, not cut)."""
    out: dict[str, int | None] = {}
    for v in _model_inputs(model):
        shape = v.shape
        if shape is None or len(shape.dims) == 0:
            out[v.name] = None
            continue
        d = shape.dims[0]
        out[v.name] = d if isinstance(d, int) else (batch_size or 1)
    return out


def load_calibration(path: str, model: Model, *, batch_size: int | None = None, limit: int | None = None) -> CalibrationData:
    """Calibration batches from a .npz file or a folder of .npz files (read lazily, in name order).

    `batch_size` applies to inputs whose batch dim is symbolic (default 1); `limit` caps the
    number of samples read.
    """
    names = [v.name for v in _model_inputs(model)]
    sizes = _batch_sizes(model, batch_size)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npz"))
        if not files:
            raise CalibrationError(f"calibration folder {path} holds no .npz files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise CalibrationError(f"calibration data {path}: no such file or folder")
    total = 0
    for f in files:  # check every file up front (names, dtypes and sample counts); arrays are read later
        total += _check_file(f, names, model)
    files_dtypes = {k: (d.numpy() if d is not None and d.is_floating else None) for k, d in model_input_dtypes(model).items()}
    if limit is not None:
        total = min(total, limit)
    first = next(iter(sizes.values()), None) or 1
    nb = math.ceil(total / first) if total else 0
    desc = f"{path}: {total} samples in {nb} batches of {first}" + (f" from {len(files)} files" if len(files) > 1 else "")
    data = CalibrationData(files, names, sizes, desc, num_samples=total, dtypes=files_dtypes)
    if limit is not None:
        def make(files: list[str] = files, limit: int = limit) -> Iterator[dict[str, np.ndarray]]:
            seen = 0
            for f in files:
                for b in _split_file(f, names, sizes, files_dtypes):
                    if seen >= limit:
                        return
                    n = _batch_len(b, sizes)
                    if seen + n > limit:
                        b = {k: (a[: limit - seen] if sizes.get(k) else a) for k, a in b.items()}
                    seen += n
                    yield b
        data.make = make
    return data


def _batch_len(b: Mapping[str, np.ndarray], sizes: Mapping[str, int | None]) -> int:
    for k, a in b.items():
        if sizes.get(k):
            return int(a.shape[0])
    return 1


def _open(path: str) -> Mapping[str, np.ndarray]:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file {path}: not a readable .npz archive: {str(e).splitlines()[0]}") from None


def _check_file(path: str, names: list[str], model: Model) -> int:
    data = _open(path)
    if not hasattr(data, "files"):
        raise CalibrationError(f"calibration file {path}: expected a .npz archive with one array per model input")
    missing = [n for n in names if n not in data.files]
    if missing:
        raise CalibrationError(f"calibration file {path}: no array for model input {missing[0]!r} (has: {', '.join(data.files) or 'none'})")
    counts = set()
    for v in _model_inputs(model):
        arr = _ArrayHeader(path, v.name)  # the header only: shape, not payload
        want = v.dtype.numpy() if v.dtype is not None else None
        # float64 data for a float32 input is cast when read (as onnxruntime's tools do); any
        # other mismatch would be a wrong file
        if want is not None and arr.dtype is not None and arr.dtype != want and not (arr.dtype.kind == want.kind == "f"):
            raise CalibrationError(f"calibration file {path}: input {v.name!r} has dtype {arr.dtype}, the model expects {want}")
        shape = v.shape
        if shape is not None and len(shape.dims) != arr.ndim:
            raise CalibrationError(
                f"calibration file {path}: input {v.name!r} has rank {arr.ndim}, the model expects {len(shape.dims)}"
            )
        if shape is not None:
            for i, d in enumerate(shape.dims[1:], 1):
                if isinstance(d, int) and arr.shape[i] != d:
                    raise CalibrationError(
                        f"calibration file {path}: input {v.name!r} has shape {list(arr.shape)}, the model expects "
                        f"{[x if isinstance(x, int) else '?' for x in shape.dims]} (samples stacked on axis 0)"
                    )
        if arr.ndim:
            counts.add(int(arr.shape[0]))
    if len(counts) > 1:
        raise CalibrationError(f"calibration file {path}: inputs hold different numbers of samples {sorted(counts)}")
    return counts.pop() if counts else 1


class _ArrayHeader:
    """ndim/shape of one array in a .npz, read from its .npy header without loading the payload."""

    def __init__(self, path: str, name: str) -> None:
        import zipfile

        try:
            with zipfile.ZipFile(path) as z, z.open(name + ".npy") as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = np.lib.format._read_array_header(f, version)  # type: ignore[attr-defined]
        except Exception as e:  # compressed oddities: fall back to loading it
            try:
                a = np.load(path, allow_pickle=False)[name]
                shape, dtype = a.shape, a.dtype
            except Exception:
                raise CalibrationError(f"calibration file {path}: cannot read array {name!r}: {e}") from None
        self.shape = tuple(int(d) for d in shape)
        self.dtype: np.dtype | None = np.dtype(dtype)
        self.ndim = len(self.shape)


def _split_file(path: str, names: list[str], sizes: Mapping[str, int | None],
                dtypes: Mapping[str, np.dtype | None] | None = None) -> Iterator[dict[str, np.ndarray]]:
    data = _open(path)
    cast = dtypes or {}
    yield from _split({n: np.asarray(data[n], dtype=cast.get(n)) for n in names}, sizes)


def _split(arrays: Mapping[str, np.ndarray], sizes: Mapping[str, int | None]) -> Iterator[dict[str, np.ndarray]]:
    """Batch i takes rows [i·b, (i+1)·b) of each input, b being that input's batch size; inputs
    without a batch axis (scalars) go whole into every batch."""
    cut = {k: sizes.get(k) for k in arrays if sizes.get(k)}
    n = min((math.ceil(int(arrays[k].shape[0]) / b) for k, b in cut.items()), default=1)  # type: ignore[operator]
    for i in range(n):
        yield {k: (np.ascontiguousarray(a[i * cut[k] : (i + 1) * cut[k]]) if k in cut else a) for k, a in arrays.items()}  # type: ignore[operator]


def calibration_from_arrays(model: Model, arrays: Mapping[str, np.ndarray], *, batch_size: int | None = None,
                            source: str = "arrays") -> CalibrationData:
    """Calibration batches from in-memory arrays stacked along the batch axis (as in a .npz)."""
    names = [v.name for v in _model_inputs(model)]
    sizes = _batch_sizes(model, batch_size)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationError(f"calibration arrays: no array for model input {missing[0]!r}")
    n = max((int(np.asarray(arrays[k]).shape[0]) for k in names if sizes.get(k)), default=1)
    bs = next((s for s in sizes.values() if s), 1)
    arrs = {k: np.asarray(arrays[k]) for k in names}

    def make() -> Iterator[dict[str, np.ndarray]]:
        yield from _split(arrs, sizes)

    return CalibrationData(None, names, sizes, f"{source}: {n} samples in {math.ceil(n / bs)} batches of {bs}",
                           make=make, num_samples=n)


def synthetic_calibration(model: Model, *, num_batches: int = 8, seed: int = 0, batch_size: int | None = None) -> CalibrationData:
    """Random inputs (floats ~ N(0, 1); integer inputs 0/1, all ones when named like a mask):
    only for when no real data exists.

    Ranges calibrated on noise rarely match real activations; `synthetic` is True and `source`
    says so, and reports must repeat it.
    """
    from graphopt.check import random_inputs

    names = [v.name for v in _model_inputs(model)]
    sizes = _batch_sizes(model, batch_size)
    dims: dict[str, int] = {}
    for v in _model_inputs(model):
        if v.shape is not None and v.shape.dims and isinstance(v.shape.dims[0], str):
            dims[v.shape.dims[0]] = sizes[v.name] or 1

    def make() -> Iterator[dict[str, np.ndarray]]:
        for i in range(num_batches):
            feeds = random_inputs(model, seed=seed + i, dim_values=dims)
            for k, a in feeds.items():  # integer inputs are ids and masks: keep them valid
                if a.dtype.kind in "iu":
                    feeds[k] = np.ones_like(a) if "mask" in k.lower() else (a % 2).astype(a.dtype)
            yield feeds

    bs = next((s for s in sizes.values() if s), 1)
    return CalibrationData(None, names, sizes, f"synthetic: {num_batches} batches of {bs} random inputs (seed {seed}); "
                           "not real data", synthetic=True, make=make, num_samples=num_batches * bs)


# ------------------------------------------------------------------------------------ observers


@dataclass
class TensorStats:
    """What calibration learned about one tensor. `lo`/`hi` is the chosen range (always
    containing 0); `min`/`max` the extremes of the finite, non-sentinel values."""

    name: str
    lo: float
    hi: float
    min: float
    max: float
    count: int
    sentinels: int = 0
    method: str = "minmax"

    @property
    def has_sentinels(self) -> bool:
        return self.sentinels > 0


@dataclass
class HistogramObserver:
    """Streaming min/max + histogram of one tensor's values (see the module docstring)."""

    name: str = ""
    sentinel: float = DEFAULT_SENTINEL
    bins: int = NUM_BINS
    min: float = math.inf
    max: float = -math.inf
    count: int = 0
    sentinels: int = 0
    zeros: int = 0  # exact zeros seen before any nonzero value fixed R
    radius: float | None = None
    hist: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def update(self, x: np.ndarray) -> None:
        a = np.asarray(x, dtype=np.float64).ravel()
        bad = ~np.isfinite(a) | (np.abs(a) >= self.sentinel)
        nbad = int(bad.sum())
        if nbad:
            self.sentinels += nbad
            a = a[~bad]
        if a.size == 0:
            return
        self.count += int(a.size)
        lo, hi = float(a.min()), float(a.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(abs(lo), abs(hi))
        if amax == 0.0:
            if self.radius is None:
                self.zeros += int(a.size)
            else:
                self.hist[self.bins // 2] += a.size
            return
        need = 2.0 ** (math.floor(math.log2(amax)) + 1)  # a power of two strictly above amax
        if self.radius is None:
            self.radius = need
            self.hist = np.zeros(self.bins, np.int64)
            self.hist[self.bins // 2] += self.zeros
            self.zeros = 0
        while self.radius < need:
            self._double()
        width = 2.0 * self.radius / self.bins
        idx = np.floor((a + self.radius) / width).astype(np.int64)
        self.hist += np.bincount(idx, minlength=self.bins)

    def _double(self) -> None:
        """[-R, R] -> [-2R, 2R]: old bin j lands in new bin (j + bins/2) // 2, exactly."""
        assert self.radius is not None
        half = self.bins // 2
        new = np.zeros(self.bins, np.int64)
        np.add.at(new, (np.arange(self.bins) + half) // 2, self.hist)
        self.hist = new
        self.radius *= 2.0

    # --- ranges -----------------------------------------------------------------------------
    def stats(self, method: str = "minmax", *, percentile: float = 99.999, levels: int = 256) -> TensorStats:
        if method not in METHODS:
            raise UsageError(f"unknown calibration method {method!r} (have: {', '.join(METHODS)})")
        if self.count == 0:
            lo = hi = mn = mx = 0.0
        else:
            mn, mx = self.min, self.max
            if method == "minmax" or self.radius is None:
                lo, hi = mn, mx
            elif method == "percentile":
                lo, hi = self._percentile(percentile)
            elif method == "entropy":
                t = self._entropy_threshold()
                lo, hi = max(mn, -t), min(mx, t)
            else:
                lo, hi = self._mse_range(levels)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        return TensorStats(self.name, float(lo), float(hi), float(mn) if self.count else 0.0,
                           float(mx) if self.count else 0.0, self.count, self.sentinels, method)

    def _edges(self) -> np.ndarray:
        assert self.radius is not None
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def _percentile(self, p: float) -> tuple[float, float]:
        tail = (100.0 - p) / 200.0
        cdf = np.cumsum(self.hist) / max(self.hist.sum(), 1)
        edges = self._edges()
        i_lo = int(np.searchsorted(cdf, tail, side="right"))
        i_hi = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        return max(self.min, float(edges[i_lo])), min(self.max, float(edges[min(i_hi + 1, self.bins)]))

    def _abs_hist(self) -> np.ndarray:
        half = self.bins // 2
        return self.hist[half:] + self.hist[:half][::-1]

    def _entropy_threshold(self, target_bins: int = 128) -> float:
        """TensorRT's KL-divergence threshold over the |x| histogram."""
        h = self._abs_hist().astype(np.float64)
        n = h.size
        width = self.radius / n  # type: ignore[operator]
        if n <= target_bins:
            return float(self.radius)  # type: ignore[arg-type]
        best, best_i = math.inf, n
        for i in range(target_bins, n + 1, max(1, (n - target_bins) // 256)):
            p = h[:i].copy()
            p[i - 1] += h[i:].sum()  # outliers land in the last bin
            nz = p > 0
            # merge the first i bins into target_bins, spread each back over the bins p uses
            idx = (np.arange(i) * target_bins) // i
            sums = np.bincount(idx, weights=h[:i], minlength=target_bins)
            cnts = np.bincount(idx, weights=nz.astype(np.float64), minlength=target_bins)
            q = np.where(nz, sums[idx] / np.maximum(cnts[idx], 1), 0.0)
            ps, qs = p[nz] / p.sum(), q[nz] / max(q.sum(), 1e-300)
            # a bin p uses but q left empty (outliers only) costs like a tiny q, not infinity
            kl = float(np.sum(ps * np.log(ps / np.maximum(qs, 1e-12))))
            if kl < best:
                best, best_i = kl, i
        return min(float(best_i * width), max(abs(self.min), abs(self.max)))

    def _mse_range(self, levels: int) -> tuple[float, float]:
        """The clipping range [max(min, -t), min(max, t)] with the least expected squared error."""
        edges = self._edges()
        centres = (edges[:-1] + edges[1:]) / 2
        w = self.hist.astype(np.float64)
        amax = max(abs(self.min), abs(self.max))
        ts = amax * np.linspace(0.05, 1.0, 96)
        best, best_r = math.inf, (self.min, self.max)
        for t in ts:
            lo, hi = min(max(self.min, -t), 0.0), max(min(self.max, t), 0.0)
            if hi - lo <= 0:
                continue
            s = (hi - lo) / (levels - 1)
            q = np.clip(np.round((centres - lo) / s), 0, levels - 1) * s + lo
            err = float(np.sum(w * (centres - q) ** 2))
            if err < best:
                best, best_r = err, (lo, hi)
        return best_r


# --------------------------------------------------------------------------------- collection


def intermediate_outputs(model: Model, names: Sequence[str], *, optimize: bool = True, threads: int = 0):
    """An onnxruntime session over `model` whose outputs are `names` (any tensors of the main graph)."""
    import onnx
    import onnxruntime as ort

    from graphopt.onnx_io import to_onnx

    proto = to_onnx(model)
    del proto.graph.output[:]
    for n in names:
        proto.graph.output.append(onnx.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise GraphoptError(f"onnxruntime cannot run the model for calibration: {str(e).splitlines()[0]}") from None


def _float_tensor_bytes(model: Model, name: str) -> int | None:
    for v in model.graph.values():
        if v.name == name and isinstance(v.type, TensorType) and v.shape is not None:
            n = 1
            for d in v.shape.dims:
                if not isinstance(d, int):
                    return None
                n *= d
            return n * 4
    return None


def collect_ranges(
    model: Model,
    data: Iterable[Mapping[str, np.ndarray]],
    tensors: Sequence[str],
    *,
    method: str = "minmax",
    percentile: float = 99.999,
    levels: int = 256,
    chunk_size: int = 128,
    sentinel: float = DEFAULT_SENTINEL,
    threads: int = 0,
    observers: dict[str, HistogramObserver] | None = None,
) -> dict[str, TensorStats]:
    """Run `model` on every batch of `data` and observe `tensors` (float tensors of the main
    graph), `chunk_size` at a time; returns each tensor's TensorStats under `method`.

    Pass `observers` to keep the raw observers (e.g. to try several methods without re-running).
    """
    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r} (have: {', '.join(METHODS)})")
    names = list(dict.fromkeys(tensors))
    obs = observers if observers is not None else {}
    for n in names:
        obs.setdefault(n, HistogramObserver(n, sentinel=sentinel))
    graph_inputs = {v.name for v in _model_inputs(model)}
    inner = [n for n in names if n not in graph_inputs]
    direct = [n for n in names if n in graph_inputs]
    seen_batch = False
    for start in range(0, max(len(inner), 1), max(chunk_size, 1)):
        chunk = inner[start : start + chunk_size]
        sess = intermediate_outputs(model, chunk, threads=threads) if chunk else None
        for batch in data:
            seen_batch = True
            if start == 0:
                for n in direct:
                    obs[n].update(batch[n])
            if sess is not None:
                try:
                    outs = sess.run(chunk, dict(batch))
                except Exception as e:
                    raise CalibrationError(f"onnxruntime failed on a calibration batch: {str(e).splitlines()[0]}") from None
                for n, a in zip(chunk, outs):
                    obs[n].update(a)
                del outs
        del sess
    if not seen_batch:
        raise CalibrationError("the calibration data holds no batches")
    return {n: obs[n].stats(method, percentile=percentile, levels=levels) for n in names}


def model_input_dtypes(model: Model) -> dict[str, DataType | None]:
    return {v.name: v.dtype for v in _model_inputs(model)}

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError, UsageError
from graphopt.ir.core import Model, Value
from graphopt.ir.types import DataType, TensorType

__all__ = [
    "METHODS",
    "CalibrationData",
    "CalibrationError",
    "as_calibration",
    "batch_axes",
    "calibration_from_arrays",
    "calibration_from_feeds",
    "calibration_sequences",
    "HistogramObserver",
    "TensorStats",
    "collect_ranges",
    "intermediate_outputs",
    "load_calibration",
    "parse_batch_axes",
    "state_feedback",
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
    `batch_sizes` and `batch_axes` give, per input, the batch size its samples are cut into and
    the axis they are stacked on (None: the input is not cut, e.g. a scalar).
    """

    batches: Sequence[str] | None  # files to read (None: `make` produces the batches)
    input_names: list[str]
    batch_sizes: dict[str, int | None]
    source: str
    synthetic: bool = False
    make: object = None  # callable() -> Iterator[dict] for in-memory / synthetic data
    num_samples: int = 0
    dtypes: dict[str, np.dtype | None] | None = None  # input -> the float dtype file arrays are cast to (float64 data)
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    input_ranks: dict[str, int] = field(default_factory=dict)  # a sample file may omit the batch axis

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.make is not None:
            yield from self.make()  # type: ignore[operator]
            return
        for path in self.batches or ():
            yield from _split_file(path, self.input_names, self.batch_sizes, self.batch_axes, self.input_ranks, self.dtypes)

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first `n` batches, in memory."""
        out: list[dict[str, np.ndarray]] = []
        for b in self:
            if len(out) >= n:
                break
            out.append(b)
        return out

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _model_inputs(model: Model) -> list[Value]:
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _unknown(d: object) -> bool:
    """A dim whose size the model leaves open: a symbol, None, or ONNX's -1/0 placeholders."""
    return not isinstance(d, int) or d <= 0


#: symbol names that say "batch" (compared lower-case)
_BATCH_NAMES = ("batch", "batch_size", "batchsize", "n", "b", "bs", "num_samples")


def batch_axes(model: Model, override: Mapping[str, int] | None = None) -> dict[str, int | None]:
    """Per model input, the axis its calibration samples are stacked on (None: not cut).

    Given: `override` (e.g. {"state": 1}). Else detected from the model's dims: the batch symbol
    is a symbolic dim named like a batch ("batch", "N", "batch_size"...) or else the symbol found
    at axis 0 of the most inputs; an input that has it (a VAD state [2, batch, 128]) is stacked
    on that axis. Otherwise an input whose only unknown dim is unnamed (-1) is stacked there,
    and everything else on axis 0. Rank-0 inputs (a sample rate) are never cut.
    """
    override = dict(override or {})
    ins = _model_inputs(model)
    names = {v.name for v in ins}
    for k in override:
        if k not in names:
            raise CalibrationError(f"calibration batch axis for {k!r}: the model has no input of that name "
                                   f"(inputs: {', '.join(sorted(names)) or 'none'})")
    first: dict[str, int] = {}
    for v in ins:
        dims = v.shape.dims if v.shape is not None else ()
        if dims and isinstance(dims[0], str):
            first[dims[0]] = first.get(dims[0], 0) + 1
    syms = {d for v in ins if v.shape is not None for d in v.shape.dims if isinstance(d, str)}
    named = [d for d in syms if d.lower() in _BATCH_NAMES or "batch" in d.lower()]
    batch_sym = named[0] if len(named) == 1 else (max(first, key=lambda k: first[k]) if first else None)
    out: dict[str, int | None] = {}
    for v in ins:
        shape = v.shape
        if v.name in override:
            ax = override[v.name]
            rank = len(shape.dims) if shape is not None else None
            if rank is not None and not -rank <= ax < rank:
                raise CalibrationError(f"calibration batch axis {ax} for {v.name!r}: the input has rank {rank}")
            out[v.name] = ax % rank if rank else ax
            continue
        if shape is None or len(shape.dims) == 0:
            out[v.name] = None
            continue
        dims = shape.dims
        if batch_sym is not None and batch_sym in dims:
            out[v.name] = dims.index(batch_sym)
            continue
        unnamed = [i for i, d in enumerate(dims) if d is None or (isinstance(d, int) and d <= 0)]
        out[v.name] = unnamed[0] if len(unnamed) == 1 and not _unknown(dims[0]) else 0
    return out


#: output-name suffixes that mark a recurrent state's next value (state -> stateN, h0 -> hn)
_NEXT_SUFFIXES = ("n", "N", "_n", "_out", "out", "Out", "_next", "_new", "T")


def state_feedback(model: Model) -> dict[str, str]:
    """Recurrent state pairs of a streaming model, {input: output}: a float input X and an output
    with the same declared shape named X + `N`/`_out`/`_next`/... (`state` -> `stateN`), or with a
    trailing `0`/`_in` of X replaced so (`h0` -> `hn`, `c_in` -> `c_out`). Empty when none."""
    outs = {v.name: v for v in model.graph.outputs}
    pairs: dict[str, str] = {}
    for v in _model_inputs(model):
        if v.shape is None or v.dtype is None or not v.dtype.is_floating:
            continue
        bases = [v.name] + [v.name[: -len(t)] for t in ("0", "_in", "In") if v.name.endswith(t) and len(v.name) > len(t)]
        for cand in (b + sfx for b in bases for sfx in _NEXT_SUFFIXES):
            o = outs.get(cand)
            if o is not None and o.shape is not None and o.shape.dims == v.shape.dims and cand not in pairs.values():
                pairs[v.name] = cand
                break
    return pairs


def parse_batch_axes(items: Iterable[str]) -> dict[str, int]:
    """["state:1", "x:0"] or ("state", "1", "x", "0") (the pipeline's tuple syntax) -> {"state": 1, "x": 0}."""
    parts: list[str] = []
    for it in items:
        parts.extend(p for p in str(it).replace(",", ":").split(":") if p != "")
    if len(parts) % 2:
        raise UsageError(f"calibration batch axis {':'.join(parts)!r}: expected NAME:AXIS pairs")
    out: dict[str, int] = {}
    for name, ax in zip(parts[::2], parts[1::2]):
        try:
            out[name] = int(ax)
        except ValueError:
            raise UsageError(f"calibration batch axis {name}:{ax}: AXIS must be an integer") from None
    return out


def _batch_sizes(model: Model, batch_size: int | None, axes: Mapping[str, int | None] | None = None) -> dict[str, int | None]:
    """Per input: the batch size to cut the stacked samples into (None: not cut). A batch dim the
    model fixes keeps its size; an open one (symbol, -1) takes `batch_size` (default 1)."""
    axes = batch_axes(model) if axes is None else axes
    out: dict[str, int | None] = {}
    for v in _model_inputs(model):
        ax = axes.get(v.name)
        if ax is None or v.shape is None or ax >= len(v.shape.dims):
            out[v.name] = None
            continue
        d = v.shape.dims[ax]
        out[v.name] = d if isinstance(d, int) and not _unknown(d) else (batch_size or 1)
    return out


def _describe(where: str, total: int, sizes: Mapping[str, int | None], nb: int, nfiles: int = 1) -> str:
    b = next((x for x in sizes.values() if x), 1)
    return f"{where}: {total} samples in {nb} batches of {b}" + (f" from {nfiles} files" if nfiles > 1 else "")


def load_calibration(path: str, model: Model, *, batch_size: int | None = None, limit: int | None = None,
                     batch_axis: Mapping[str, int] | None = None) -> CalibrationData:
    """Calibration batches from a .npz file or a folder of .npz files (read lazily, in name order).

    Every file is checked now (names, ranks, fixed dims, sample counts; headers only, no payload).
    Samples are stacked along each input's batch axis (see batch_axes; `batch_axis` overrides
    it per input); a file may hold one sample without the batch axis at all, and files of a
    folder may differ in their open dims (images of different sizes, one per file).
    `batch_size` applies to inputs whose batch dim is open (default 1); `limit` caps the number
    of samples read.
    """
    names = [v.name for v in _model_inputs(model)]
    axes = batch_axes(model, batch_axis)
    sizes = _batch_sizes(model, batch_size, axes)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npz"))
        if not files:
            raise CalibrationError(f"calibration folder {path} holds no .npz files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise CalibrationError(f"calibration data {path}: no such file or folder")
    counts = [_check_file(f, names, model, axes) for f in files]  # arrays are read later
    b = next((x for x in sizes.values() if x), 1)
    total, nb, left = 0, 0, limit
    for c in counts:
        c = c if left is None else min(c, left)
        total += c
        nb += math.ceil(c / b)
        if left is not None:
            left -= c
    if total == 0:
        raise CalibrationError(f"calibration data {path} holds no samples")
    files_dtypes = {k: (d.numpy() if d is not None and d.is_floating else None) for k, d in model_input_dtypes(model).items()}
    ranks = {v.name: len(v.shape.dims) for v in _model_inputs(model) if v.shape is not None}
    data = CalibrationData(files, names, sizes, _describe(path, total, sizes, nb, len(files)), num_samples=total,
                           batch_axes=axes, input_ranks=ranks, dtypes=files_dtypes)
    if limit is not None:
        def make(files: list[str] = files, limit: int = limit) -> Iterator[dict[str, np.ndarray]]:
            seen = 0
            for f in files:
                for bt in _split_file(f, names, sizes, axes, ranks, files_dtypes):
                    if seen >= limit:
                        return
                    n = _batch_len(bt, sizes, axes)
                    if seen + n > limit:
                        bt = {k: (_take(a, axes[k], 0, limit - seen) if sizes.get(k) else a) for k, a in bt.items()}
                    seen += n
                    yield bt
        data.make = make
    return data


def _take(a: np.ndarray, axis: int | None, start: int, stop: int) -> np.ndarray:
    idx = [slice(None)] * a.ndim
    idx[axis or 0] = slice(start, stop)
    return np.ascontiguousarray(a[tuple(idx)])


def _batch_len(b: Mapping[str, np.ndarray], sizes: Mapping[str, int | None], axes: Mapping[str, int | None]) -> int:
    for k, a in b.items():
        if sizes.get(k):
            return int(a.shape[axes.get(k) or 0])
    return 1


def _open(path: str) -> Mapping[str, np.ndarray]:
    try:
        archive: Mapping[str, np.ndarray] = np.load(path, allow_pickle=False)  # an NpzFile for .npz
        return archive
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file {path}: not a readable .npz archive: {str(e).splitlines()[0]}") from None


def _check_file(path: str, names: list[str], model: Model, axes: Mapping[str, int | None]) -> int:
    data = _open(path)
    if not hasattr(data, "files"):
        raise CalibrationError(f"calibration file {path}: expected a .npz archive with one array per model input")
    missing = [n for n in names if n not in data.files]
    if missing:
        raise CalibrationError(f"calibration file {path}: no array for model input {missing[0]!r} (has: {', '.join(data.files) or 'none'})")
    counts: dict[str, int] = {}
    for v in _model_inputs(model):
        arr = _ArrayHeader(path, v.name)  # the header only: shape, not payload
        want_dt = v.dtype.numpy() if v.dtype is not None else None
        # float64 data for a float32 input is cast when read (as onnxruntime's tools do); any
        # other mismatch would be a wrong file
        if want_dt is not None and arr.dtype is not None and arr.dtype != want_dt and not (arr.dtype.kind == want_dt.kind == "f"):
            raise CalibrationError(f"calibration file {path}: input {v.name!r} has dtype {arr.dtype}, the model expects {want_dt}")
        shape, ax = v.shape, axes.get(v.name)
        if shape is None:
            continue
        dims = list(shape.dims)
        want = [x if not _unknown(x) else "?" for x in dims]
        got = list(arr.shape)
        if ax is not None and arr.ndim == len(dims) - 1:
            got.insert(ax, 1)  # one sample, written without its batch axis
        elif arr.ndim != len(dims):
            raise CalibrationError(
                f"calibration file {path}: input {v.name!r} has rank {arr.ndim}, the model expects {len(dims)} {want}"
                + (f" (or {len(dims) - 1} for one sample without the batch axis {ax})" if ax is not None else ""))
        for i, d in enumerate(dims):
            if i != ax and not _unknown(d) and got[i] != d:
                where = f"samples stacked on axis {ax}" if ax is not None else "not cut into samples"
                raise CalibrationError(f"calibration file {path}: input {v.name!r} has shape {list(arr.shape)}, the model "
                                       f"expects {want} ({where}; --calibration-batch-axis NAME:AXIS to change it)")
        if ax is not None:
            counts[v.name] = int(got[ax])
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k} {c} (axis {axes.get(k)})" for k, c in counts.items())
        raise CalibrationError(f"calibration file {path}: inputs hold different numbers of samples: {detail}; "
                               "give each input's batch axis with --calibration-batch-axis NAME:AXIS")
    return next(iter(counts.values()), 1)


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
                axes: Mapping[str, int | None] | None = None, ranks: Mapping[str, int] | None = None,
                dtypes: Mapping[str, np.dtype | None] | None = None) -> Iterator[dict[str, np.ndarray]]:
    data = _open(path)
    cast = dtypes or {}
    yield from _split({n: np.asarray(data[n], dtype=cast.get(n)) for n in names}, sizes, axes or {}, ranks)


def _split(arrays: Mapping[str, np.ndarray], sizes: Mapping[str, int | None], axes: Mapping[str, int | None] | None = None,
           ranks: Mapping[str, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batch i takes samples [i·b, (i+1)·b) along each input's batch axis, b being that input's
    batch size; inputs without a batch axis (scalars) go whole into every batch."""
    axes = axes or {}
    cut = {k: sizes.get(k) for k in arrays if sizes.get(k)}
    arrays = {k: _with_batch_axis(a, axes.get(k) or 0, ranks.get(k) if ranks else None) if k in cut else a
              for k, a in arrays.items()}
    n = min((math.ceil(int(arrays[k].shape[axes.get(k) or 0]) / b) for k, b in cut.items()), default=1)  # type: ignore[operator]
    for i in range(n):
        yield {k: (_take(a, axes.get(k) or 0, i * cut[k], (i + 1) * cut[k]) if k in cut else a)  # type: ignore[operator]
               for k, a in arrays.items()}


def _with_batch_axis(a: np.ndarray, axis: int, rank: int | None) -> np.ndarray:
    """One sample written without its batch axis gets it back (rank known from the model)."""
    if rank is not None and a.ndim == rank - 1:
        return np.expand_dims(a, axis)
    return a


def calibration_from_arrays(model: Model, arrays: Mapping[str, np.ndarray], *, batch_size: int | None = None,
                            source: str = "arrays", batch_axis: Mapping[str, int] | None = None) -> CalibrationData:
    """Calibration batches from in-memory arrays stacked along each input's batch axis (as in a .npz)."""
    names = [v.name for v in _model_inputs(model)]
    axes = batch_axes(model, batch_axis)
    sizes = _batch_sizes(model, batch_size, axes)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationError(f"calibration arrays: no array for model input {missing[0]!r}")
    ranks = {v.name: len(v.shape.dims) for v in _model_inputs(model) if v.shape is not None}
    arrs = {k: np.asarray(arrays[k]) for k in names}
    arrs = {k: _with_batch_axis(a, axes.get(k) or 0, ranks.get(k)) if sizes.get(k) else a for k, a in arrs.items()}
    n = max((int(arrs[k].shape[axes.get(k) or 0]) for k in names if sizes.get(k)), default=1)
    bs = next((s for s in sizes.values() if s), 1)

    def make() -> Iterator[dict[str, np.ndarray]]:
        yield from _split(arrs, sizes, axes)

    return CalibrationData(None, names, sizes, _describe(source, n, sizes, math.ceil(n / bs)),
                           make=make, num_samples=n, batch_axes=axes)


class _Replay:
    """Re-iterable view of a one-shot iterable (a generator, a CalibrationDataReader): the first
    pass pulls from it and keeps what it pulled, later passes replay that."""

    def __init__(self, pull: Callable[[], Iterator[Any]]) -> None:
        self._pull: Callable[[], Iterator[Any]] | None = pull
        self._it: Iterator[Any] | None = None
        self.cache: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            if i < len(self.cache):
                yield self.cache[i]
                i += 1
                continue
            if self._pull is None:
                return
            if self._it is None:
                self._it = self._pull()
            try:
                item = next(self._it)
            except StopIteration:
                self._pull = self._it = None
                return
            self.cache.append(item)


def _reader_items(reader: Any) -> Iterator[Any]:
    while True:
        item = reader.get_next()
        if item is None:
            return
        yield item


def calibration_from_feeds(model: Model, feeds: Any, *, source: str = "feeds") -> CalibrationData:
    """Calibration batches from any iterable of feed dicts (input name -> array, one batch each,
    shaped as the model takes them), or an object with `get_next()` returning such dicts and
    None at the end (onnxruntime's CalibrationDataReader). A one-shot iterable (a generator, a
    reader) is read once and kept in memory; a list or other re-iterable is iterated again."""
    names = [v.name for v in _model_inputs(model)]
    if hasattr(feeds, "get_next"):
        src: Any = _Replay(lambda: _reader_items(feeds))
    elif isinstance(feeds, Iterable):
        src = _Replay(lambda: iter(feeds)) if iter(feeds) is feeds else feeds
    else:
        raise CalibrationError(f"calibration data: a {type(feeds).__name__} is not an iterable of feed dicts")

    def make() -> Iterator[dict[str, np.ndarray]]:
        for i, f in enumerate(src):
            if not isinstance(f, Mapping):
                raise CalibrationError(f"calibration {source}: item {i} is a {type(f).__name__}, not a dict of input arrays")
            missing = [n for n in names if n not in f]
            if missing:
                raise CalibrationError(f"calibration {source}: item {i} has no array for model input {missing[0]!r}")
            yield {n: np.asarray(f[n]) for n in names}

    first = next(make(), None)  # checked now, before any pass runs
    if first is None:
        raise CalibrationError(f"calibration {source}: holds no batches")
    axes = batch_axes(model)
    k = next((n for n in names if axes.get(n) is not None and first[n].ndim > (axes[n] or 0)), None)
    b = int(first[k].shape[axes[k] or 0]) if k else 1
    sizes = {n: (b if axes.get(n) is not None else None) for n in names}
    n_batches = len(src.cache) if isinstance(src, _Replay) and src._pull is None else None
    desc = f"{source}: " + (f"{n_batches} batches" if n_batches is not None else "an iterable of batches") + f" of {b}"
    return CalibrationData(None, names, sizes, desc, make=make, num_samples=0, batch_axes=axes)


def calibration_sequences(model: Model, sequences: Iterable[Iterable[Mapping[str, np.ndarray]]], feedback: Mapping[str, str],
                          *, initial: Mapping[str, np.ndarray] | None = None, source: str = "sequences") -> CalibrationData:
    """Calibration for stateful models: each sequence is an iterable of step feeds without the
    state inputs; `feedback` maps a state input to the output that becomes its next value
    ({"state": "stateN"}). The model runs step by step on onnxruntime (the original model, so
    the states are the float model's), the first step of each sequence taking `initial[input]`
    (default zeros, open dims sized from the step's other inputs), and every step's full feed
    is a calibration batch. The batches are computed once and kept in memory."""
    ins = {v.name: v for v in _model_inputs(model)}
    outs = {v.name for v in model.graph.outputs}
    for i, o in feedback.items():
        if i not in ins:
            raise CalibrationError(f"calibration feedback {i}<-{o}: the model has no input {i!r}")
        if o not in outs:
            raise CalibrationError(f"calibration feedback {i}<-{o}: the model has no output {o!r}")
    order = list(dict.fromkeys(feedback.values()))
    sess = intermediate_outputs(model, order, optimize=True)

    def run() -> Iterator[dict[str, np.ndarray]]:
        for s, seq in enumerate(sequences):
            state: dict[str, np.ndarray] = {}
            for t, step in enumerate(seq):
                feed = {k: np.asarray(v) for k, v in step.items()}
                for name in feedback:
                    if name not in state:
                        state[name] = _initial_state(ins[name], feed, ins, initial, s)
                    feed[name] = state[name]
                missing = [n for n in ins if n not in feed]
                if missing:
                    raise CalibrationError(f"calibration {source}: step {t} of sequence {s} has no array for input {missing[0]!r}")
                yield dict(feed)
                try:
                    res = dict(zip(order, sess.run(order, feed)))
                except Exception as e:
                    raise CalibrationError(f"calibration {source}: onnxruntime failed on step {t} of sequence {s}: "
                                           f"{str(e).splitlines()[0]}") from None
                for name, o in feedback.items():
                    state[name] = res[o]

    data = calibration_from_feeds(model, _Replay(run), source=source)
    steps = len(list(data))
    data.source = f"{source}: {steps} steps, state fed back ({', '.join(f'{i} <- {o}' for i, o in feedback.items())})"
    data.num_samples = steps
    return data


def _initial_state(v: Any, feed: Mapping[str, np.ndarray], ins: Mapping[str, Any], initial: Mapping[str, np.ndarray] | None,
                   seq: int) -> np.ndarray:
    if initial is not None and v.name in initial:
        return np.asarray(initial[v.name])
    sym: dict[str, int] = {}
    for n, a in feed.items():
        w = ins.get(n)
        if w is not None and w.shape is not None and len(w.shape.dims) == np.ndim(a):
            sym.update({d: int(s) for d, s in zip(w.shape.dims, np.shape(a)) if isinstance(d, str)})
    dims = []
    for d in (v.shape.dims if v.shape is not None else ()):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        elif isinstance(d, str) and d in sym:
            dims.append(sym[d])
        else:
            raise CalibrationError(f"calibration sequence {seq}: cannot size the zero initial state of {v.name!r} "
                                   f"(dim {d!r} is not set by the other inputs): give initial={{{v.name!r}: array}}")
    dtype = v.dtype.numpy() if v.dtype is not None else np.float32
    return np.zeros(dims, dtype)


def as_calibration(data: Any, model: Model, *, batch_size: int | None = None, limit: int | None = None,
                   batch_axis: Mapping[str, int] | None = None) -> CalibrationData:
    """Whatever a user may hand over as calibration data, as CalibrationData: CalibrationData
    itself, a .npz path or folder, a dict of stacked arrays, or an iterable of feed dicts / a
    CalibrationDataReader."""
    if isinstance(data, CalibrationData):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_calibration(os.fspath(data), model, batch_size=batch_size, limit=limit, batch_axis=batch_axis)
    if isinstance(data, Mapping):
        return calibration_from_arrays(model, data, batch_size=batch_size, batch_axis=batch_axis)
    return calibration_from_feeds(model, data)


def synthetic_calibration(model: Model, *, num_batches: int = 8, seed: int = 0, batch_size: int | None = None) -> CalibrationData:
    """Random inputs (floats ~ N(0, 1); integer inputs 0/1, all ones when named like a mask):
    only for when no real data exists.

    Ranges calibrated on noise rarely match real activations; `synthetic` is True and `source`
    says so, and reports must repeat it.
    """
    from graphopt.check import random_inputs

    names = [v.name for v in _model_inputs(model)]
    axes = batch_axes(model)
    sizes = _batch_sizes(model, batch_size, axes)
    dims: dict[str, int] = {}
    for v in _model_inputs(model):
        ax = axes.get(v.name)
        sym = v.shape.dims[ax] if ax is not None and v.shape is not None else None
        if isinstance(sym, str):
            dims[sym] = sizes[v.name] or 1

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
        return np.asarray(self.hist[half:] + self.hist[:half][::-1])

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


def intermediate_outputs(model: Model, names: Sequence[str], *, optimize: bool = True, threads: int = 0) -> Any:
    """An onnxruntime session over `model` whose outputs are `names` (any tensors of the main graph)."""
    from graphopt.check import onnxruntime_session

    try:
        return onnxruntime_session(model, threads=threads, optimize=optimize, outputs=list(names))
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

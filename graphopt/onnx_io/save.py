"""Writing models to disk: atomically, with external data when the model needs it.

Nothing is ever half-written: the .onnx file and its data file are written to temporary files
in the target folder and renamed into place (data first). Tensors that are memory-mapped from
the source model are streamed to the new data file in chunks, never loaded whole.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.ir.core import Model
from graphopt.ir.tensor import ExternalTensor, SparseTensor, Tensor
from graphopt.onnx_io.exporter import to_onnx

#: protobuf's hard limit is 2 GiB; leave room for the graph itself
PROTOBUF_LIMIT = 2**31 - 64 * 2**20
_CHUNK = 64 * 2**20


def _initializer_bytes(model: Model) -> int:
    total = 0
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, Tensor) and not isinstance(t, SparseTensor):
                total += t.nbytes
    return total


def _has_external(model: Model) -> bool:
    return any(
        isinstance(v.const_value, ExternalTensor) for g in model.graphs() for v in g.initializers.values()
    )


def _external_tensors(model: Model) -> Iterator[ExternalTensor]:
    for g in model.graphs():
        for v in g.initializers.values():
            if isinstance(v.const_value, ExternalTensor):
                yield v.const_value
        for n in g:
            for a in n.attributes.values():
                for t in a.value if isinstance(a.value, list) else [a.value]:
                    if isinstance(t, ExternalTensor):
                        yield t


@contextlib.contextmanager
def _staged(path: str, mode: str = "wb") -> Iterator[tuple[BinaryIO, str]]:
    """A temporary file next to `path`, flushed to disk at the end of the block and deleted if
    the block (or anything after it in an enclosing block) fails. The caller renames it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f, tmp  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file next to `path`; rename it onto `path` only if the block succeeds."""
    with _staged(path, mode) as (f, tmp):
        yield f
    os.replace(tmp, path)


def save(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    location: str | None = None,
    size_threshold: int = 1024,
) -> None:
    """Write `model` to `path`.

    external_data: None decides by itself (external when the model already had external data
    or would not fit in one protobuf); True/False force it. Tensors of at least
    `size_threshold` bytes go to `location` (default: "<model file name>.data") beside the model.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GraphoptError(f"{path}: folder {folder!r} does not exist")
    if external_data is None:
        external_data = _has_external(model) or _initializer_bytes(model) > PROTOBUF_LIMIT
    if not external_data:
        proto = to_onnx(model)
        if proto.ByteSize() > PROTOBUF_LIMIT:
            raise GraphoptError(f"{path}: the model is over 2 GB; save it with external_data=True")
        data = proto.SerializeToString(deterministic=True)
        with atomic_write(path) as f:
            f.write(data)
        return

    location = location or os.path.basename(path) + ".data"
    if os.path.isabs(location) or os.path.normpath(location).startswith(".."):
        raise GraphoptError(f"external data location {location!r} must be a plain name inside the model's folder")
    data_path = os.path.join(folder, location)
    # both files are complete on disk before either is renamed into place: a failure anywhere
    # leaves the old model and its old data file as they were (they must stay a matching pair)
    data_tmp = model_tmp = ""
    try:
        with _staged(data_path) as (df, data_tmp):
            offset = 0

            def writer(t: Tensor, name: str) -> tuple[str, int, int] | None:
                nonlocal offset
                if t.dtype.name == "STRING" or t.nbytes < size_threshold:
                    return None
                align = 4096 if t.nbytes >= 65536 else 16
                pad = (-offset) % align
                if pad:
                    df.write(b"\0" * pad)
                    offset += pad
                start = offset
                if isinstance(t, ExternalTensor):
                    mm = t.raw_memmap()
                    for i in range(0, mm.size, _CHUNK):
                        df.write(np.asarray(mm[i : i + _CHUNK]).tobytes())
                    length = int(mm.size)
                else:
                    payload = t.tobytes()
                    df.write(payload)
                    length = len(payload)
                offset += length
                return (location, start, length)

            proto = to_onnx(model, external_writer=writer)
            data = proto.SerializeToString(deterministic=True)
        with _staged(path) as (f, model_tmp):
            f.write(data)
        # tensors still read from the file about to be replaced keep the old bytes mapped
        target = os.path.realpath(data_path)
        for t in _external_tensors(model):
            if os.path.realpath(t.path) == target:
                t.pin()
        os.replace(data_tmp, data_path)
    except BaseException:
        for tmp in (data_tmp, model_tmp):
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        raise
    os.replace(model_tmp, path)

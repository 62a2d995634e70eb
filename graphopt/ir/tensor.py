"""Constant tensors: lazy, numpy-backed, and memory-mapped when their bytes live in external data.

A tensor read from a model keeps the original protobuf (no decode until someone asks for the
values), so an unchanged model exports the exact bytes it was loaded with. Tensors stored as
external data are `np.memmap`-ed from their file: a 10 GB model costs address space, not RAM.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.ir.types import DataType

if TYPE_CHECKING:
    import onnx


class Tensor:
    """Base of all constant tensors. Subclasses provide `numpy()`; everything else derives."""

    dtype: DataType
    shape: tuple[int, ...]
    name: str
    doc_string: str
    metadata_props: dict[str, str]

    def numpy(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Bytes of the packed payload (sub-byte types count their packed size)."""
        if self.dtype == DataType.STRING:
            return int(sum(len(s) for s in self.numpy().ravel()))
        return (self.size * self.dtype.bitwidth + 7) // 8

    def tobytes(self) -> bytes:
        """Little-endian payload as ONNX stores it in `raw_data` (packed for 2/4-bit types)."""
        from onnx import numpy_helper

        return numpy_helper.from_array(self.numpy()).raw_data

    def content_hash(self) -> str:
        """sha256 of dtype, shape and payload: equal hashes mean equal tensors."""
        h = hashlib.sha256()
        h.update(f"{int(self.dtype)}:{self.shape}".encode())
        if self.dtype == DataType.STRING:
            for s in self.numpy().ravel():
                h.update(len(s).to_bytes(8, "little") + (s if isinstance(s, bytes) else str(s).encode()))
        else:
            h.update(self.tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.dtype.text}{list(self.shape)})"


class NumpyTensor(Tensor):
    """A tensor that owns a numpy array (what passes create)."""

    def __init__(
        self,
        array: np.ndarray | Any,
        name: str = "",
        *,
        dtype: DataType | None = None,
        doc_string: str = "",
        metadata_props: dict[str, str] | None = None,
    ) -> None:
        arr = np.asarray(array)
        self.dtype = DataType(dtype) if dtype is not None else DataType.from_numpy(arr.dtype)
        if self.dtype == DataType.STRING and arr.dtype != object:
            arr = arr.astype(object)
        self._array = arr
        self.shape = tuple(int(d) for d in arr.shape)
        self.name = name
        self.doc_string = doc_string
        self.metadata_props = dict(metadata_props or {})

    def numpy(self) -> np.ndarray:
        return self._array


class ProtoTensor(Tensor):
    """A tensor read from an ONNX `TensorProto`, decoded on first use only."""

    def __init__(self, proto: onnx.TensorProto) -> None:
        self._proto = proto
        self._array: np.ndarray | None = None
        self.dtype = DataType(proto.data_type)
        self.shape = tuple(int(d) for d in proto.dims)
        self.name = proto.name
        self.doc_string = proto.doc_string
        self.metadata_props = {p.key: p.value for p in proto.metadata_props}

    @property
    def proto(self) -> onnx.TensorProto:
        return self._proto

    def numpy(self) -> np.ndarray:
        if self._array is None:
            from onnx import numpy_helper

            from graphopt.errors import ModelLoadError

            try:
                arr = numpy_helper.to_array(self._proto)
            except Exception as e:  # a corrupt payload (size mismatch...) surfaces here
                raise ModelLoadError(f"tensor {self.name!r}: cannot decode its data: {e}") from None
            arr.flags.writeable = False
            self._array = arr
        return self._array


class ExternalTensor(Tensor):
    """A tensor whose payload is `length` bytes at `offset` of a file, memory-mapped on use."""

    def __init__(
        self,
        path: str,
        offset: int,
        length: int | None,
        dtype: DataType,
        shape: tuple[int, ...],
        name: str = "",
        *,
        location: str = "",
        doc_string: str = "",
        metadata_props: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.location = location or os.path.basename(path)
        self.offset = offset
        self.dtype = DataType(dtype)
        self.shape = tuple(shape)
        self.length = length if length is not None else self.nbytes
        self.name = name
        self.doc_string = doc_string
        self.metadata_props = dict(metadata_props or {})
        self._array: np.ndarray | None = None
        self._pinned: np.ndarray | None = None

    def pin(self) -> None:
        """Map the payload now and keep the mapping, so the bytes stay readable after the file
        is replaced (saving over the model's own data file) or deleted. Costs address space, not RAM."""
        if self._pinned is None:
            self._pinned = self.raw_memmap()

    def raw_memmap(self) -> np.ndarray:
        """The bytes of the payload as a read-only uint8 memmap (no copy)."""
        from graphopt.errors import ExternalDataError

        if self._pinned is not None:
            return self._pinned
        try:
            return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.length,))
        except (OSError, ValueError) as e:
            raise ExternalDataError(
                f"tensor {self.name!r}: cannot map {self.length} bytes at offset {self.offset} "
                f"of {self.location!r}: {e}"
            ) from None

    def numpy(self) -> np.ndarray:
        if self._array is None:
            from graphopt.errors import ExternalDataError

            if self.dtype == DataType.STRING:
                raise ExternalDataError(f"tensor {self.name!r}: string tensors cannot live in external data")
            raw = self.raw_memmap()
            if self.dtype.bitwidth < 8:
                import onnx
                from onnx import numpy_helper

                proto = onnx.helper.make_tensor(self.name, int(self.dtype), self.shape, bytes(raw), raw=True)
                self._array = numpy_helper.to_array(proto)
            else:
                np_dtype = self.dtype.numpy().newbyteorder("<")
                if raw.size != self.size * np_dtype.itemsize:
                    raise ExternalDataError(
                        f"tensor {self.name!r}: {raw.size} bytes in {self.location!r} "
                        f"but shape {list(self.shape)} of {self.dtype.text} needs {self.size * np_dtype.itemsize}"
                    )
                self._array = raw.view(np_dtype).reshape(self.shape)
        return self._array

    def tobytes(self) -> bytes:
        return bytes(self.raw_memmap())


class SparseTensor:
    """ONNX's COO sparse tensor: `values` (1-D), `indices` ([NNZ] linear or [NNZ, rank]), dims."""

    def __init__(self, values: Tensor, indices: Tensor, dims: tuple[int, ...]) -> None:
        self.values = values
        self.indices = indices
        self.dims = tuple(int(d) for d in dims)

    @property
    def name(self) -> str:
        return self.values.name

    @property
    def dtype(self) -> DataType:
        return self.values.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dims

    def numpy(self) -> np.ndarray:
        """The dense array."""
        dense = np.zeros(self.dims, dtype=self.values.numpy().dtype)
        idx = self.indices.numpy()
        vals = self.values.numpy()
        try:
            if idx.ndim == 1:
                dense.reshape(-1)[idx] = vals
            else:
                dense[tuple(idx.T)] = vals
        except (IndexError, ValueError) as e:  # indices past the dims, or counts that disagree
            from graphopt.errors import ModelLoadError

            raise ModelLoadError(f"sparse tensor {self.name!r}: its indices do not fit its dims "
                                 f"{list(self.dims)}: {e}") from None
        return dense

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(f"sparse:{self.dims}".encode())
        h.update(self.values.content_hash().encode())
        h.update(self.indices.content_hash().encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"SparseTensor({self.name!r}, {self.dtype.text}{list(self.dims)}, nnz={self.values.size})"

"""Element types, shapes with symbolic dims, and the value types of the IR.

All types are immutable and compare by value, so `a.type == b.type` is a real check and types
can be shared freely between values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

import numpy as np


class DataType(enum.IntEnum):
    """Tensor element types; the numbers are ONNX's `TensorProto.DataType`."""

    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26
    FLOAT6E2M3 = 27
    FLOAT6E3M2 = 28

    @property
    def text(self) -> str:
        """The spelling used by the textual IR (ONNX's textual syntax names)."""
        return _TEXT_NAMES[self]

    @classmethod
    def from_text(cls, name: str) -> DataType:
        try:
            return _FROM_TEXT[name]
        except KeyError:
            raise ValueError(f"unknown element type {name!r}") from None

    def numpy(self) -> np.dtype:
        """The numpy dtype that holds one element (ml_dtypes for the small float formats)."""
        import onnx.helper

        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(self)))

    @classmethod
    def from_numpy(cls, dtype: np.dtype | type) -> DataType:
        import onnx.helper

        return cls(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    @property
    def bitwidth(self) -> int:
        if self in (DataType.UINT2, DataType.INT2):
            return 2
        if self in (DataType.UINT4, DataType.INT4, DataType.FLOAT4E2M1):
            return 4
        if self in (DataType.FLOAT6E2M3, DataType.FLOAT6E3M2):
            return 6
        if self == DataType.STRING:
            raise ValueError("string elements have no fixed width")
        return self.numpy().itemsize * 8

    @property
    def is_floating(self) -> bool:
        return self in _FLOATING


_FLOATING = frozenset(
    {
        DataType.FLOAT,
        DataType.FLOAT16,
        DataType.DOUBLE,
        DataType.BFLOAT16,
        DataType.FLOAT8E4M3FN,
        DataType.FLOAT8E4M3FNUZ,
        DataType.FLOAT8E5M2,
        DataType.FLOAT8E5M2FNUZ,
        DataType.FLOAT4E2M1,
        DataType.FLOAT8E8M0,
        DataType.FLOAT6E2M3,
        DataType.FLOAT6E3M2,
    }
)
_TEXT_NAMES = {dt: dt.name.lower() for dt in DataType}
_FROM_TEXT = {v: k for k, v in _TEXT_NAMES.items()}

#: One dimension: a known size, a symbolic name ("N", "batch"), or None (unknown).
Dim = Union[int, str, None]


@dataclass(frozen=True)
class Shape:
    """A tensor shape: each dim is an int, a symbol (str) or None; `denotations` is ONNX's
    optional per-dim semantic label, kept for a faithful round trip."""

    dims: tuple[Dim, ...]
    denotations: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        for d in self.dims:
            if not (d is None or isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool))):
                raise TypeError(f"a dim must be int, str or None, not {d!r}")
        if self.denotations is not None:
            object.__setattr__(self, "denotations", tuple(self.denotations))
            if len(self.denotations) != len(self.dims):
                raise ValueError("one denotation per dim is required")

    @property
    def rank(self) -> int:
        return len(self.dims)

    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)

    def numel(self) -> int | None:
        """Element count when every dim is known."""
        if not self.is_static():
            return None
        n = 1
        for d in self.dims:
            assert isinstance(d, int)  # is_static
            n *= d
        return n

    def __len__(self) -> int:
        return len(self.dims)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.dims)

    def __getitem__(self, i: int) -> Dim:
        return self.dims[i]

    def __str__(self) -> str:
        return "[" + ",".join("?" if d is None else str(d) for d in self.dims) + "]"


@dataclass(frozen=True)
class TensorType:
    """A dense tensor. `shape` None means the rank is unknown."""

    dtype: DataType
    shape: Shape | None = None
    denotation: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DataType(self.dtype))
        if self.shape is not None and not isinstance(self.shape, Shape):
            object.__setattr__(self, "shape", Shape(tuple(self.shape)))

    def __str__(self) -> str:
        return f"{self.dtype.text}{'' if self.shape is None else self.shape}"


@dataclass(frozen=True)
class SparseTensorType:
    dtype: DataType
    shape: Shape | None = None
    denotation: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DataType(self.dtype))
        if self.shape is not None and not isinstance(self.shape, Shape):
            object.__setattr__(self, "shape", Shape(tuple(self.shape)))

    def __str__(self) -> str:
        return f"sparse({self.dtype.text}{'' if self.shape is None else self.shape})"


@dataclass(frozen=True)
class SequenceType:
    elem: Type | None
    denotation: str = ""

    def __str__(self) -> str:
        return f"seq({'?' if self.elem is None else self.elem})"


@dataclass(frozen=True)
class OptionalType:
    elem: Type | None
    denotation: str = ""

    def __str__(self) -> str:
        return f"optional({'?' if self.elem is None else self.elem})"


@dataclass(frozen=True)
class MapType:
    key: DataType
    value: Type | None
    denotation: str = ""

    def __str__(self) -> str:
        return f"map({self.key.text},{'?' if self.value is None else self.value})"


@dataclass(frozen=True)
class OpaqueType:
    domain: str = ""
    name: str = ""
    denotation: str = ""

    def __str__(self) -> str:
        return f"opaque({self.domain},{self.name})"


Type = Union[TensorType, SparseTensorType, SequenceType, OptionalType, MapType, OpaqueType]

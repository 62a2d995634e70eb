"""The graph IR: what a pass author works with."""

from graphopt.ir.builder import Builder, unique_name
from graphopt.ir.core import Attr, AttrType, Function, Graph, Model, Node, Value
from graphopt.ir.tensor import ExternalTensor, NumpyTensor, ProtoTensor, SparseTensor, Tensor
from graphopt.ir.types import (
    DataType,
    Dim,
    MapType,
    OpaqueType,
    OptionalType,
    SequenceType,
    Shape,
    SparseTensorType,
    TensorType,
    Type,
)
from graphopt.ir.order import independent_waves
from graphopt.ir.verify import verify, verify_graph

__all__ = [
    "Builder", "unique_name",
    "Attr", "AttrType", "DataType", "Dim", "ExternalTensor", "Function", "Graph", "MapType", "Model",
    "Node", "NumpyTensor", "OpaqueType", "OptionalType", "ProtoTensor", "SequenceType", "Shape",
    "SparseTensor", "SparseTensorType", "Tensor", "TensorType", "Type", "Value", "independent_waves", "verify", "verify_graph",
]

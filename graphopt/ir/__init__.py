"""The graph IR: what a pass author works with.

Classes (Model, Graph, Node, Value, tensors, types), the Builder, and the pass author's
toolbox: constant / shape / dtype / opset queries (graphopt.ir.query) and the small edits
around constants and aliases (graphopt.ir.edit).
"""

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
from graphopt.ir.query import (
    NONDETERMINISTIC_OPS,
    STANDARD_DOMAINS,
    attr_key,
    const_array,
    const_ints,
    const_numel,
    constant_semantics,
    dims_of,
    dtype_of,
    enclosing_function,
    in_function,
    is_constant,
    opset_version,
    slice_params,
    static_shape,
)
from graphopt.ir.edit import alias, is_dead, make_constant, remove_if_dead, replace_with_constant
from graphopt.ir.verify import verify, verify_graph

__all__ = [
    "Builder", "unique_name",
    "Attr", "AttrType", "DataType", "Dim", "ExternalTensor", "Function", "Graph", "MapType", "Model",
    "Node", "NumpyTensor", "OpaqueType", "OptionalType", "ProtoTensor", "SequenceType", "Shape",
    "SparseTensor", "SparseTensorType", "Tensor", "TensorType", "Type", "Value", "independent_waves", "verify", "verify_graph",
    # pass-author toolbox (query, edit)
    "NONDETERMINISTIC_OPS", "STANDARD_DOMAINS", "alias", "attr_key", "const_array", "const_ints", "const_numel",
    "constant_semantics", "dims_of", "dtype_of", "enclosing_function", "in_function", "is_constant", "is_dead",
    "make_constant", "opset_version", "remove_if_dead", "replace_with_constant", "slice_params", "static_shape",
]

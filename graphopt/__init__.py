"""graphopt: a compiler for trained neural networks.

Stable public API: `load`, `save`, `to_onnx` (and the IR classes in `graphopt.ir`);
`compile` (a compiled target's Artifact) and `graphopt.runtime.load` (run a saved artifact).
"""

from graphopt.errors import (
    ExternalDataError,
    GraphoptError,
    ModelLoadError,
    ParseError,
    UsageError,
    VerifyError,
)
from graphopt.ir import Graph, Model, Node, Value
from graphopt.onnx_io import load, save, to_onnx
from graphopt.target import Artifact, compile  # noqa: A004 - graphopt.compile is the public name
from graphopt.transform import Pass, PassContext, PassResult, optimize, register_pass

__version__ = "0.1.0"


def search(model: str, eval_data: str, **options):  # type: ignore[no-untyped-def]
    """Search for the best compression pipeline under an accuracy budget (graphopt.pipeline_search;
    needs optuna: pip install 'graphopt[search]'). Returns a pipeline_search.SearchResult."""
    from graphopt.pipeline_search import search as _search

    return _search(model, eval_data, **options)


__all__ = [
    "Artifact",
    "compile",
    "ExternalDataError",
    "Graph",
    "GraphoptError",
    "Model",
    "ModelLoadError",
    "Node",
    "ParseError",
    "UsageError",
    "Value",
    "VerifyError",
    "__version__",
    "Pass",
    "PassContext",
    "PassResult",
    "load",
    "optimize",
    "register_pass",
    "save",
    "search",
    "to_onnx",
]

"""graphopt: a compiler for trained neural networks.

Stable API (the README's "Stable API" section lists the same; tests/test_public_api.py records
names and signatures): what `__all__` exports in `graphopt` (load, save, to_onnx, optimize,
compile, the IR and pass classes, the errors), `graphopt.errors`, `graphopt.ir` (IR classes,
Builder, the pass author's constant/shape/opset queries and edits), `graphopt.pattern` (patterns,
rules, the rewrite driver), `graphopt.transform` (passes, pipelines, registry),
`graphopt.runtime` (load and run a saved artifact) and `graphopt.testing` (pass checks and
hypothesis strategies). Everything else may change between versions.
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

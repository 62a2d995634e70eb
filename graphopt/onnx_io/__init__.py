"""ONNX ⇄ graphopt IR: import, export and saving (with external data)."""

from graphopt.onnx_io.exporter import export_type, to_onnx
from graphopt.onnx_io.importer import import_model, import_tensor, import_type, load, resolve_external_path
from graphopt.onnx_io.save import atomic_write, save

__all__ = [
    "atomic_write",
    "export_type",
    "import_model",
    "import_tensor",
    "import_type",
    "load",
    "resolve_external_path",
    "save",
    "to_onnx",
]

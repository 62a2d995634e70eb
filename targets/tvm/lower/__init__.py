"""ONNX -> Relax: `lowerer` (the driver: kernel groups, legalization, fusion), `registry` (the
converter registry and the helpers converters share), `converters` (graphopt's converters for ops
TVM's frontend lacks or gets wrong), `dynamic` (run-time control flow and data-dependent shapes)."""

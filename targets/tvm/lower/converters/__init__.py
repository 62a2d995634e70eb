"""More of graphopt's own Relax converters (ops Relax's ONNX frontend lacks or gets wrong).

Registered into `registry.CONVERTERS` on import (the lowerer imports this package). Each
converter takes (block builder, node, relax inputs (None for omitted ones), opset) and returns a
Relax expression or a list of them (one per node output), or NotImplemented to fall back to the
frontend's converter. RNN/GRU/LSTM run as one kernel looping over their sequence length, which
may be symbolic (`kernels.recurrent`; the unrolled form is kept for sequences up to UNROLL_STEPS, 0
now: crnn_dyn's 40-step BiLSTM unrolled into one kernel of generic schedule and a 230 s compile of
the whole model on a loaded 2-core box); LinearAttention is unrolled over its static length.

One module per op family; the `runtime_*` modules chain converters in front of the ones registered
for constant inputs (`common.chained`), so they are imported last.
"""

from . import activations, attention, convolution, losses, math, normalization, quantized, recurrent, resize, tensor  # noqa: F401
from . import runtime_axes, runtime_resize, runtime_shapes  # noqa: F401  (after the converters they chain in front of)

"""Built-in passes, installed as `graphopt.passes`. They use only graphopt's public API."""

if __name__ != "graphopt.passes":  # pragma: no cover - guards against a second import as `passes`
    raise ImportError(
        "passes/ must be imported as graphopt.passes (install graphopt with `pip install -e .` "
        "and run pytest with --import-mode=importlib)"
    )

from graphopt.passes import cleanup  # noqa: E402,F401  (registers fold-constants, simplify-shapes, remove-noops, cse, dce)
from graphopt.passes import fusion  # noqa: E402,F401  (registers fuse-conv-bn and its rules conv-bn, conv-add-bias, conv-mul-scale)
from graphopt.passes import sharing  # noqa: E402,F401  (registers share-weights, cluster-weights)
from graphopt.passes import quantize  # noqa: E402,F401  (registers quantize: int8 QDQ with calibration, accuracy budget, speed check)
from graphopt.passes import pruning  # noqa: E402,F401  (registers prune: structured channel pruning with dependency groups and recovery)
from graphopt.passes import precision  # noqa: E402,F401  (registers convert-precision: fp16/bf16 mixed precision)
from graphopt.passes import lowrank  # noqa: E402,F401  (registers low-rank: SVD factorization of MatMul/Gemm/Conv weights)

"""Fusion passes: `fuse-conv-bn` folds per-channel affine ops into Conv/ConvTranspose/Gemm/MatMul weights;
`fuse-activations` fuses GELU/SiLU/HardSwish and `fuse-normalization` LayerNorm/RMSNorm spelled in primitive ops;
`fuse-linear` MatMul+Add → Gemm, Transposes into Gemm/MatMul, Pad into Conv/pools, Reshape chains."""

from graphopt.passes.fusion.fold_affine import ConvAddBias, ConvBatchNorm, ConvMulScale, FuseConvBn
from graphopt.passes.fusion.kernel_groups import PlanKernels, kernel_groups  # noqa: F401  (registers plan-kernels)
from graphopt.passes.fusion.linear import FuseLinear, MatMulAddToGemm, PadIntoConv, PadIntoPool, ReshapeChain, TransposeIntoGemm, TransposeIntoMatMul
from graphopt.passes.fusion.activations import BiasGelu, FuseActivations, GeluErf, GeluTanh, HardSwishRule, Silu
from graphopt.passes.fusion.normalization import FuseNormalization, LayerNorm, RmsNorm, SkipLayerNorm
from graphopt.passes.fusion.attention import FuseAttention, SdpaAttention
from graphopt.passes.fusion.conv_activation import ConvActivation, FuseConvActivation

__all__ = [
    "BiasGelu", "ConvActivation", "ConvAddBias", "ConvBatchNorm", "ConvMulScale", "FuseActivations", "FuseAttention", "FuseConvActivation", "FuseConvBn", "FuseLinear",
    "FuseNormalization", "GeluErf", "GeluTanh", "HardSwishRule", "LayerNorm", "MatMulAddToGemm", "PadIntoConv",
    "PadIntoPool", "ReshapeChain", "RmsNorm", "SdpaAttention", "Silu", "SkipLayerNorm", "TransposeIntoGemm", "TransposeIntoMatMul",
]

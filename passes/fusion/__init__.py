"""Fusion passes: `fuse-conv-bn` folds per-channel affine ops into Conv/ConvTranspose/Gemm/MatMul weights."""

from graphopt.passes.fusion.fold_affine import ConvAddBias, ConvBatchNorm, ConvMulScale, FuseConvBn

__all__ = ["ConvAddBias", "ConvBatchNorm", "ConvMulScale", "FuseConvBn"]

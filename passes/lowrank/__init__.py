"""Low-rank factorization of weight matrices (`low-rank`): plain or data-aware truncated SVD."""

from graphopt.passes.lowrank.pass_ import LowRank

__all__ = ["LowRank"]

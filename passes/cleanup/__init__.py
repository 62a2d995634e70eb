"""Cleanup passes (the -O1 pipeline): fold-constants, simplify-shapes, remove-noops, cse, dce.

Each pass walks every graph of the model (main graph, function bodies, If/Loop/Scan bodies) in
one or two linear sweeps, and never changes the interface of a graph: the names, number and
types of its inputs and outputs stay as they are.
"""

from graphopt.passes.cleanup.cse import CommonSubexpressionElimination
from graphopt.passes.cleanup.dce import DeadCodeElimination
from graphopt.passes.cleanup.fold import FoldConstants
from graphopt.passes.cleanup.noops import RemoveNoops
from graphopt.passes.cleanup.shapes import SimplifyShapes

__all__ = ["CommonSubexpressionElimination", "DeadCodeElimination", "FoldConstants", "RemoveNoops", "SimplifyShapes"]

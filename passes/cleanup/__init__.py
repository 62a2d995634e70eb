"""Cleanup passes (the -O1 pipeline): fold-constants, simplify-shapes, remove-noops, cse, dce,
simplify-control-flow (constant-condition Ifs inlined, unused If/Loop outputs removed),
slices-to-split (Slices that tile an axis become one Split).

Each pass walks every graph of the model (main graph, function bodies, If/Loop/Scan bodies) in
one or two linear sweeps, and never changes the interface of the model: the names, number and
types of its inputs and outputs stay as they are (simplify-control-flow drops If/Loop body
outputs together with the owning node's outputs that nothing reads).
"""

from graphopt.passes.cleanup.control_flow import SimplifyControlFlow
from graphopt.passes.cleanup.cse import CommonSubexpressionElimination
from graphopt.passes.cleanup.dce import DeadCodeElimination
from graphopt.passes.cleanup.fold import FoldConstants
from graphopt.passes.cleanup.noops import RemoveNoops
from graphopt.passes.cleanup.shapes import SimplifyShapes
from graphopt.passes.cleanup.slices import SlicesToSplit

__all__ = ["CommonSubexpressionElimination", "DeadCodeElimination", "FoldConstants", "RemoveNoops", "SimplifyControlFlow", "SimplifyShapes", "SlicesToSplit"]

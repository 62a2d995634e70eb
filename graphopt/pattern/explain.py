"""`explain`: why a rule does (or does not) fire on a model (`graphopt-compile --explain RULE`).

For every candidate root (a node whose op the pattern's root accepts) the rule is tried; when
none matches, the candidates are ranked by how deep their partial match got, and each is shown
with the nodes it matched and the first reason it failed, e.g.

    rule 'fuse-bn' does not fire: 2 candidate roots (BatchNormalization), none matches
    pattern: BatchNormalization(Conv(any, const), const, const, const, const)
      1. at 'bn1' (BatchNormalization) -- matched 2 nodes: 'bn1' (BatchNormalization), 'conv1' (Conv)
         node 'bn1' (BatchNormalization): input 1 'scale' is not a constant (a graph input)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from graphopt.ir.core import Graph, Model, Node
from graphopt.pattern.matcher import MatchResult
from graphopt.pattern.context import model_context
from graphopt.pattern.rule import Rule


@dataclass
class Candidate:
    """One candidate root and what happened there."""

    graph: str
    result: MatchResult


def _graph_label(model: Model, g: Graph) -> str:
    if g is model.graph:
        return ""
    for f in model.functions.values():
        if f.graph is g:
            return f"function {f.domain}::{f.name}" if f.domain else f"function {f.name}"
    owner = g.parent
    return f"subgraph {g.name!r} of {owner.label()}" if isinstance(owner, Node) else f"graph {g.name!r}"


def explain_candidates(model: Model, rule: Rule, options: Mapping[str, object] | None = None) -> list[Candidate]:
    """Try `rule` at every candidate root of every graph; matches first, then deepest failures.
    `options`: the pass options the checks see (as in a pass run), e.g. {"contrib_ops": True}."""
    out: list[Candidate] = []
    matcher = rule.matcher()
    with model_context(model, options):  # the checks see the same model-wide facts as in a pass
        for g in model.graphs():
            where = _graph_label(model, g)
            for n in rule.candidates(g):
                out.append(Candidate(where, rule.try_match(n, matcher, model=model, options=options)))
    # stable sort: graph order among equals
    out.sort(key=lambda c: (not bool(c.result), -c.result.depth))
    return out


def explain(model: Model, rule: Rule, *, limit: int = 5, options: Mapping[str, object] | None = None) -> str:
    """A readable multi-line account of where `rule` fires, or why it fires nowhere."""
    assert rule.pattern is not None
    ops = ", ".join(op if not dom else f"{dom}::{op}" for dom, op in rule.root_ops)
    cands = explain_candidates(model, rule, options)
    header_pattern = f"pattern: {rule.pattern.describe()}"
    if not cands:
        return f"rule {rule.name!r} does not fire: the model has no {ops} node\n{header_pattern}"
    hits = [c for c in cands if c.result]
    lines: list[str] = []
    if hits:
        lines.append(f"rule {rule.name!r} fires at {len(hits)} of {len(cands)} candidate roots ({ops}):")
        for c in hits[:limit]:
            assert c.result.match is not None
            nodes = ", ".join(n.label() for n in c.result.match.nodes)
            lines.append(f"  - at {c.result.node.label()}{_in(c.graph)}: {nodes}")
        if len(hits) > limit:
            lines.append(f"  ... and {len(hits) - limit} more")
        misses = [c for c in cands if not c.result]
        if misses:
            lines.append(f"it does not fire at {len(misses)} other candidates; the deepest miss:")
            lines += _miss_lines(misses[:1], 1)
        return "\n".join(lines)
    lines.append(f"rule {rule.name!r} does not fire: {len(cands)} candidate roots ({ops}), none matches")
    lines.append(header_pattern)
    lines.append("best partial matches (deepest first):")
    lines += _miss_lines(cands[:limit], 1)
    if len(cands) > limit:
        lines.append(f"  ... and {len(cands) - limit} more candidates")
    return "\n".join(lines)


def _in(where: str) -> str:
    return f" in {where}" if where else ""


def _miss_lines(cands: list[Candidate], start: int) -> list[str]:
    lines: list[str] = []
    for i, c in enumerate(cands, start):
        r = c.result
        nodes = ", ".join(n.label() for n in r.partial) or "nothing"
        lines.append(f"  {i}. at {r.node.label()}{_in(c.graph)} -- matched {len(r.partial)} node(s): {nodes}")
        lines.append(f"     {r.reason}")
    return lines

"""Orderings of a graph's nodes that passes share."""

from __future__ import annotations

from collections.abc import Sequence

from graphopt.ir.core import Graph, Node


def independent_waves(graph: Graph, nodes: Sequence[Node]) -> list[list[int]]:
    """Indices into `nodes` (nodes of `graph`) in waves, each wave in topological order: no node
    of a wave depends on another of the same wave, so one run of the model reads the inputs of
    a whole wave (layer refits read a wave's inputs, rewrite it, then run again)."""
    order = {n: i for i, n in enumerate(graph)}
    idx = {n: i for i, n in enumerate(nodes)}
    upstream: dict[Node, frozenset[int]] = {}
    for n in graph:
        acc: set[int] = set()
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if p is not None and p in upstream:
                acc |= upstream[p]
                if p in idx:
                    acc.add(idx[p])
        upstream[n] = frozenset(acc)
    waves: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(range(len(nodes)), key=lambda i: order[nodes[i]]):
        if any(j in upstream[nodes[i]] for j in cur):
            waves.append(cur)
            cur = []
        cur.append(i)
    if cur:
        waves.append(cur)
    return waves

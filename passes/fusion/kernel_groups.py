"""`plan-kernels`: decide which nodes the compiled targets emit as one kernel.

Like TVM's FuseOps, every op has a pattern kind (`op_pattern`):

    elemwise < broadcast < injective < comm-reduce < out-ewise-fusable  ...  opaque

and nodes are grouped along the post-dominator tree (networkx.immediate_dominators on the
reversed DAG, rooted at a virtual sink that every graph output and every unread value flows
into). A node's group is fused into the group of its immediate post-dominator `d` together with
every node on the paths between them; since every path from the node leads into `d`, the merged
group cannot be left and re-entered, so no cycle appears. Per phase:

- phase 0 — an anchor group (Conv, ConvTranspose, MatMul, Gemm, pooling: out-ewise-fusable) or a
  reduction group (ReduceX, ArgMax/Min, Softmax, LayerNormalization...: comm-reduce) takes its
  elementwise/broadcast epilogue chain (`Conv→BatchNormalization→Relu`, `MatMul→Add→Gelu`,
  `ReduceMax→Sub→Exp`); an elementwise/broadcast group fuses forward into an elemwise, broadcast,
  injective or reduction consumer (a prologue; paths may cross injective ops) and, with
  `allow-prologue`, into an anchor;
- phase 1 — injective chains (Reshape, Transpose, Slice, Concat, Gather, Pad...) fuse together.

A group holds at most one anchor or reduction (its *anchor*) and at most `max-group-size` nodes.
Opaque ops (control flow, nodes with subgraphs, custom domains, ops not listed, nodes with more
than one used output other than Split) are never grouped with others.

Decisions:
- Graph outputs: a value that is a graph output must be materialised. Its producer may *end* a
  group (the group's result is that output), but a group never continues past it: a consumer of
  a graph output is never in its producer's group (the virtual sink makes the producer's
  post-dominator the sink, and every merge checks it explicitly).
- Groups never span (sub)graphs: every graph (main graph, function bodies, If/Loop/Scan bodies)
  is planned on its own; group ids are unique across the model.
- `Constant` nodes (and `ConstantOfShape` of a constant shape) are data, not compute: they get
  no group and do not constrain grouping.
- Every other node gets a group, a singleton if nothing fuses with it.

Result, in node metadata (printed by the textual IR as `@meta`, kept by the ONNX export):
- `graphopt.kernel` = "k<N>": the group id, numbered 0.. in topological order of each group's
  first node (main graph first, then function bodies and subgraphs in `Model.graphs()` order);
- `graphopt.kernel.anchor` = "true" on the anchor (the Conv/MatMul/reduction) of a group.

Overrides (read from node metadata; kept across runs):
- `graphopt.fuse` = "never": the node stays alone;
- `graphopt.fuse.with` = "<node name>": force the node into that node's group (planned before
  the automatic grouping, bypassing the kind and size rules). Raises a GraphoptError naming both
  nodes when it is illegal: different graphs, an opaque or `never` node, a graph output read in
  the group, or a merge that would create a cycle;
- option `forbid=Op1:Op2`: nodes of these op types are never fused (like `never`).

A second run recomputes the same groups (earlier `graphopt.kernel*` keys are ignored and
rewritten), so the pass is idempotent. `kernel_groups(model)` returns the groups; the
postcondition (`ensures`) checks that the graph of groups is acyclic in every graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import networkx as nx

from graphopt import GraphoptError, UsageError
from graphopt.ir import Graph, Model, Node
from graphopt.transform import Pass, PassContext, PassResult, register_pass

KERNEL_KEY = "graphopt.kernel"
ANCHOR_KEY = "graphopt.kernel.anchor"
FUSE_KEY = "graphopt.fuse"
FUSE_WITH_KEY = "graphopt.fuse.with"

# pattern kinds, ordered like TVM's OpPatternKind
ELEMWISE, BROADCAST, INJECTIVE, COMM_REDUCE, OUT_EWISE_FUSABLE, OPAQUE = 0, 1, 2, 3, 4, 8
KIND_NAMES = {
    ELEMWISE: "elemwise",
    BROADCAST: "broadcast",
    INJECTIVE: "injective",
    COMM_REDUCE: "comm-reduce",
    OUT_EWISE_FUSABLE: "out-ewise-fusable",
    OPAQUE: "opaque",
}

_ELEMWISE = frozenset(
    """Abs Acos Acosh Asin Asinh Atan Atanh BitwiseNot Cast Ceil Celu Clip Cos Cosh Dropout Elu Erf
    Exp Floor Gelu HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal
    Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Tan Tanh ThresholdedRelu""".split()
)
_BROADCAST = frozenset(
    """Add And BatchNormalization BitShift BitwiseAnd BitwiseOr BitwiseXor CastLike DequantizeLinear
    Div Equal Greater GreaterOrEqual Less LessOrEqual Max Mean Min Mod Mul Or Pow PRelu
    QuantizeLinear Sub Sum Where Xor""".split()
)
_INJECTIVE = frozenset(
    """Concat DepthToSpace Expand Flatten Gather GatherElements GatherND Pad Reshape Resize
    ReverseSequence Slice SpaceToDepth Split Squeeze Tile Transpose Trilu Unsqueeze""".split()
)
_COMM_REDUCE = frozenset(
    """ArgMax ArgMin GroupNormalization InstanceNormalization LayerNormalization LogSoftmax
    LpNormalization ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare Softmax""".split()
)
_OUT_EWISE_FUSABLE = frozenset(
    """AveragePool Conv ConvInteger ConvTranspose Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    LpPool MatMul MatMulInteger MaxPool""".split()
)
_TABLE = {
    **{op: ELEMWISE for op in _ELEMWISE},
    **{op: BROADCAST for op in _BROADCAST},
    **{op: INJECTIVE for op in _INJECTIVE},
    **{op: COMM_REDUCE for op in _COMM_REDUCE},
    **{op: OUT_EWISE_FUSABLE for op in _OUT_EWISE_FUSABLE},
}
_STANDARD = ("", "ai.onnx")
_MASTERS = (COMM_REDUCE, OUT_EWISE_FUSABLE)


def op_pattern(node: Node) -> str:
    """The pattern kind of `node`: elemwise, broadcast, injective, comm-reduce,
    out-ewise-fusable or opaque."""
    return KIND_NAMES[_kind(node)]


def _kind(node: Node) -> int:
    if node.domain not in _STANDARD or node.subgraphs():
        return OPAQUE
    kind = _TABLE.get(node.op_type, OPAQUE)
    used = sum(1 for v in node.outputs if v.uses() or v.is_graph_output())
    if used > 1 and node.op_type != "Split":
        return OPAQUE
    if node.op_type == "BatchNormalization" and node.attr("training_mode", 0):
        return OPAQUE
    return kind


def _is_data(node: Node) -> bool:
    """Constant, or ConstantOfShape of a constant shape: data, not compute."""
    if node.domain not in _STANDARD:
        return False
    if node.op_type == "Constant":
        return True
    if node.op_type == "ConstantOfShape" and node.inputs and node.inputs[0] is not None:
        shape = node.inputs[0]
        src = shape.producer()
        return shape.const_value is not None or (src is not None and src.op_type == "Constant" and src.domain in _STANDARD)
    return False


def kernel_groups(model: Model) -> dict[str, list[Node]]:
    """The kernel groups `plan-kernels` stored in `model`: group id → its nodes (graph order),
    groups ordered by id number. Nodes without a `graphopt.kernel` key are left out."""
    groups: dict[str, list[Node]] = {}
    for g in model.graphs():
        for n in g.nodes:
            k = n.metadata_props.get(KERNEL_KEY)
            if k is not None:
                groups.setdefault(k, []).append(n)
    return dict(sorted(groups.items(), key=lambda kv: _id_key(kv[0])))


def _id_key(k: str) -> tuple[int, str]:
    return (int(k[1:]), k) if k[:1] == "k" and k[1:].isdigit() else (1 << 62, k)


def check_kernel_groups(model: Model) -> None:
    """Raise GraphoptError when a group spans graphs, or the graph of groups has a cycle, or a
    group continues past a graph output."""
    where: dict[str, Graph] = {}
    for g in model.graphs():
        nodes = g.nodes
        q = nx.DiGraph()
        for n in nodes:
            k = n.metadata_props.get(KERNEL_KEY)
            if k is None:
                continue
            if where.setdefault(k, g) is not g:
                raise GraphoptError(f"kernel group {k} spans more than one graph (node {n.name!r})")
            q.add_node(k)
            for v in n.outputs:
                for user in v.consumers():
                    c = _enclosing(user, g)
                    kc = c.metadata_props.get(KERNEL_KEY) if c is not None else None
                    if kc is None:
                        continue
                    if kc == k and v.is_graph_output() and c is not n:
                        raise GraphoptError(
                            f"kernel group {k} continues past graph output {v.name!r} (read by {c.name!r})"
                        )
                    if kc != k:
                        q.add_edge(k, kc)
        if not nx.is_directed_acyclic_graph(q):
            cycle = nx.find_cycle(q)
            raise GraphoptError(f"kernel groups form a cycle: {' -> '.join(a for a, _ in cycle)}")


def _enclosing(node: Node, graph: Graph) -> Node | None:
    """`node` or the node of `graph` that encloses it through subgraphs; None when none does."""
    n: Node | None = node
    while n is not None and n.graph is not graph:
        parent = n.graph.parent if n.graph is not None else None
        n = parent if isinstance(parent, Node) else None
    return n


@register_pass
@dataclass(frozen=True)
class PlanKernels(Pass):
    """Group nodes into kernels (anchor + epilogue, injective chains, reductions) for the compiled targets.

    Before → after (metadata only, the graph is unchanged):
    `c = Conv(x, w); b = BatchNormalization(c, ...); y = Relu(b)` → all three carry
    `@meta("graphopt.kernel": "k0")`, the Conv also `"graphopt.kernel.anchor": "true"`.

    Options: `max-group-size` (nodes per group), `allow-prologue` (elementwise producers may fuse
    into a Conv/MatMul/pooling group; reductions always take them), `forbid=Op1:Op2` (op types
    never fused). Node metadata `graphopt.fuse=never` and `graphopt.fuse.with=<node name>`
    override the grouping. See the module docstring for the rules.
    """

    name: ClassVar[str] = "plan-kernels"
    idle_reason: ClassVar[str] = "the kernel groups are planned already"
    max_group_size: int = 64
    allow_prologue: bool = True
    forbid: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_group_size < 1:
            raise UsageError(f"pass 'plan-kernels': max-group-size must be >= 1, not {self.max_group_size}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before = _snapshot(model)
        graphs = list(model.graphs())
        names: dict[str, Graph] = {}
        for g in graphs:
            for n in g.nodes:
                if n.name:
                    names.setdefault(n.name, g)
        plans = [_Planner(g, self, names).plan() for g in graphs]
        counter = 0
        stats = {"groups": 0, "fused-groups": 0, "nodes-fused": 0, "largest-group": 0, "anchors": 0}
        for g, plan in zip(graphs, plans):
            for n in g.nodes:
                n.metadata_props.pop(KERNEL_KEY, None)
                n.metadata_props.pop(ANCHOR_KEY, None)
            for members, anchor in plan:
                gid = f"k{counter}"
                counter += 1
                for n in members:
                    n.metadata_props[KERNEL_KEY] = gid
                if anchor is not None:
                    anchor.metadata_props[ANCHOR_KEY] = "true"
                    stats["anchors"] += 1
                stats["groups"] += 1
                if len(members) > 1:
                    stats["fused-groups"] += 1
                    stats["nodes-fused"] += len(members)
                stats["largest-group"] = max(stats["largest-group"], len(members))
        changed = _snapshot(model) != before
        ctx.info(f"plan-kernels: {stats['groups']} groups, {stats['fused-groups']} with more than one node")
        return PassResult(changed, stats)

    def ensures(self, model: Model, ctx: PassContext) -> None:
        check_kernel_groups(model)


def _snapshot(model: Model) -> list[tuple[str | None, str | None]]:
    return [
        (n.metadata_props.get(KERNEL_KEY), n.metadata_props.get(ANCHOR_KEY))
        for g in model.graphs()
        for n in g.nodes
    ]


_SINK = -1


class _Planner:
    """Grouping of one graph: union-find over the nodes (indices in topological order)."""

    def __init__(self, graph: Graph, opts: PlanKernels, names: dict[str, Graph]) -> None:
        self.graph = graph
        self.opts = opts
        self.names = names
        nodes = [n for n in graph.nodes if not _is_data(n)]
        pos = {id(n): i for i, n in enumerate(nodes)}
        dag = nx.DiGraph()
        dag.add_nodes_from(range(len(nodes)))
        to_sink: set[int] = set()
        for i, n in enumerate(nodes):
            if not n.outputs:
                to_sink.add(i)
            for v in n.outputs:
                if v.is_graph_output() or not v.uses():
                    to_sink.add(i)
                for user in v.consumers():
                    c = _enclosing(user, graph)
                    j = pos.get(id(c)) if c is not None else None
                    if j is not None and j != i:
                        dag.add_edge(i, j)
        # stable topological order (the graph's own order when it already is one)
        order = list(nx.lexicographical_topological_sort(dag, key=lambda i: i))
        self.nodes = [nodes[i] for i in order]
        remap = {old: new for new, old in enumerate(order)}
        n_nodes = len(self.nodes)
        self.succ: list[list[int]] = [[] for _ in range(n_nodes)]
        for a, b in dag.edges:
            self.succ[remap[a]].append(remap[b])
        for s in self.succ:
            s.sort()
        self.to_sink = {remap[i] for i in to_sink}
        self.kind = [_kind(n) for n in self.nodes]
        forbid = set(opts.forbid)
        self.never = [n.metadata_props.get(FUSE_KEY) == "never" or n.op_type in forbid for n in self.nodes]
        # outputs that are graph outputs: their readers must stay outside the producer's group
        self.materialised = [
            {id(_enclosing(u, graph)) for v in n.outputs if v.is_graph_output() for u in v.consumers()}
            for n in self.nodes
        ]
        # union-find state, keyed by the root index
        self.parent = list(range(n_nodes))
        self.members: dict[int, list[int]] = {i: [i] for i in range(n_nodes)}
        self.ipdom = self._post_dominators()

    # --- analysis ------------------------------------------------------------------------------
    def _post_dominators(self) -> list[int]:
        rev = nx.DiGraph()
        rev.add_node(_SINK)
        rev.add_nodes_from(range(len(self.nodes)))
        for i, s in enumerate(self.succ):
            for j in s:
                rev.add_edge(j, i)
        for i in self.to_sink:
            rev.add_edge(_SINK, i)
        idom = nx.immediate_dominators(rev, _SINK)
        return [idom.get(i, _SINK) for i in range(len(self.nodes))]

    def _between(self, src: int, dom: int) -> list[int]:
        """Nodes on paths from `src` to its post-dominator `dom`, both excluded."""
        seen: set[int] = set()
        stack = [j for j in self.succ[src] if j != dom]
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            stack.extend(j for j in self.succ[u] if j != dom and j not in seen)
        return sorted(seen)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def pattern(self, root: int) -> int:
        return max(self.kind[m] for m in self.members[root])

    # --- merging ------------------------------------------------------------------------------
    def _refusal(self, roots: set[int], *, forced: bool) -> str | None:
        """Why the union of these groups is not a legal group; None when it is."""
        members = [m for r in roots for m in self.members[r]]
        ids = {id(self.nodes[m]) for m in members}
        for m in members:
            if self.kind[m] == OPAQUE:
                return f"{self._label(m)} is opaque ({self.nodes[m].op_type})"
            if self.never[m]:
                return f"{self._label(m)} must not be fused ({FUSE_KEY}=never or forbid)"
            if self.materialised[m] & ids:
                return f"{self._label(m)} produces a graph output that would be read inside the group"
        if not forced:
            if len(members) > self.opts.max_group_size:
                return "group too large"
            if sum(1 for m in members if self.kind[m] in _MASTERS) > 1:
                return "more than one anchor"
        if self._would_cycle(set(members)):
            return "would create a cycle"
        return None

    def _would_cycle(self, group: set[int]) -> bool:
        """True when a path leaves `group` and comes back into it through other groups."""
        top = max(group)
        stack = [j for m in group for j in self.succ[m] if j not in group]
        visited: set[int] = set()
        while stack:
            u = stack.pop()
            r = self.find(u)
            if r in visited:
                continue
            visited.add(r)
            mem = self.members[r]
            if min(mem) > top:  # topological order: nothing in this group reaches back
                continue
            for m in mem:
                for j in self.succ[m]:
                    if j in group:
                        return True
                    stack.append(j)
        return False

    def _union(self, roots: set[int]) -> None:
        keep = min(roots)
        for r in roots:
            if r != keep:
                self.parent[r] = keep
                self.members[keep].extend(self.members.pop(r))
        self.members[keep].sort()

    def _label(self, i: int) -> str:
        n = self.nodes[i]
        return repr(n.name) if n.name else f"<unnamed {n.op_type}>"

    # --- the plan -------------------------------------------------------------------------------
    def plan(self) -> list[tuple[list[Node], Node | None]]:
        self._forced()
        for phase in (0, 1):
            for i in range(len(self.nodes)):
                self._visit(i, phase)
        out = []
        for root in sorted(self.members, key=lambda r: self.members[r][0]):
            mem = self.members[root]
            masters = [m for m in mem if self.kind[m] in _MASTERS]
            out.append(([self.nodes[m] for m in mem], self.nodes[masters[0]] if masters else None))
        return out

    def _forced(self) -> None:
        index = {n.name: i for i, n in enumerate(self.nodes) if n.name}
        for i, n in enumerate(self.nodes):
            target = n.metadata_props.get(FUSE_WITH_KEY)
            if target is None:
                continue
            where = f"plan-kernels: cannot fuse node {self._label(i)} with node {target!r}"
            j = index.get(target)
            if j is None:
                if target in self.names:
                    raise GraphoptError(f"{where}: they are in different graphs")
                raise GraphoptError(f"{where}: no node is named {target!r}")
            roots = {self.find(i), self.find(j)}
            if len(roots) == 1:
                continue
            why = self._refusal(roots, forced=True)
            if why is not None:
                raise GraphoptError(f"{where}: {why}")
            self._union(roots)

    def _visit(self, i: int, phase: int) -> None:
        if self.kind[i] == OPAQUE or self.never[i]:
            return
        d = self.ipdom[i]
        if d == _SINK:
            return
        gi = self.find(i)
        if self.find(d) == gi:
            return
        gp = self.pattern(gi)
        kd = self.kind[d]
        if phase == 0:
            if gp in _MASTERS:  # epilogue: elementwise chain after an anchor or reduction
                if kd > BROADCAST:
                    return
                path_max = BROADCAST
            elif gp <= BROADCAST:  # prologue: fuse forward into the consumer
                if not (kd <= INJECTIVE or kd == COMM_REDUCE or (kd == OUT_EWISE_FUSABLE and self.opts.allow_prologue)):
                    return
                if not self.opts.allow_prologue and self.pattern(self.find(d)) == OUT_EWISE_FUSABLE:
                    return
                path_max = INJECTIVE
            else:
                return
        else:
            if gp != INJECTIVE or kd > INJECTIVE:
                return
            path_max = INJECTIVE
        path = self._between(i, d)
        if any(self.kind[p] > path_max for p in path):
            return
        roots = {gi, self.find(d)} | {self.find(p) for p in path}
        if self._refusal(roots, forced=False) is None:
            self._union(roots)


def plan_kernels(model: Model, **options: object) -> dict[str, list[Node]]:
    """Run `plan-kernels` on `model` (in place) and return `kernel_groups(model)`."""
    p = PlanKernels(**options)  # type: ignore[arg-type]
    p.run(model, PassContext())
    p.ensures(model, PassContext())
    return kernel_groups(model)


__all__ = [
    "ANCHOR_KEY", "FUSE_KEY", "FUSE_WITH_KEY", "KERNEL_KEY", "PlanKernels", "check_kernel_groups",
    "kernel_groups", "op_pattern", "plan_kernels",
]

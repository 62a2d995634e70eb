"""Lower graphopt IR to a Relax IRModule: one private primitive Relax function per kernel group.

    main(inputs..., params...)            # attribute num_input = number of model inputs
        lv0 = k0(x, w0, b0)                # each group a private function with Primitive=True
        lv1 = k1(lv0, w1)
        ...

Groups come from `plan-kernels` (node metadata `graphopt.kernel`); TVM's FuseOps never runs, so
the kernels are exactly graphopt's groups. `legalize_and_fuse` then runs LegalizeOps →
AnnotateTIROpPattern → FuseTIR, giving one TIR PrimFunc per group, named after it.

Per node, Relax expressions come from Relax's ONNX frontend converters where one exists (they
are called one node at a time, with the block builder, the node's inputs and its parsed
attributes; this relies on private helpers of apache-tvm 0.27, so the version is pinned) and
from graphopt's own converters (`CONVERTERS`, registered by `converters/`) for ops it lacks or gets wrong.

Constants: large initializers (weights) become parameters of `main` (bound at load time from
the artifact's params file, so the library stays small) and reach a group as arguments (FuseTIR
rejects a constant captured inside a primitive function). Small constants (integer tensors up
to 4096 elements, any tensor of at most 16 elements) are inlined, so converters specialise
shapes, axes, pads, sizes and k from them; any that are still data after conversion are lifted
out of the group into arguments again.

A group that cannot be a primitive function (an op that does not legalize into a TIR kernel,
shape computations, data-dependent output shapes) is emitted inline into `main` instead, node
by node; `LoweredModule.inline_groups` lists them with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import tvm
import tvm.sym  # the Analyzer (0.27 moved tvm.arith to tvm.sym)
from tvm import relax

from graphopt import GraphoptError
from graphopt.ir import Model, Node, TensorType, Value
from graphopt.targets.machine import MachineModel, machine_model

from .. import layout as _layout
from . import converters  # noqa: F401  (registers graphopt's converters into CONVERTERS)
from .dynamic import function_scope
from .checks import check_body_arity, check_not_empty, check_outputs, check_schema, check_size
from .legalize import legalize_and_fuse
from .node import convert_node, split_outputs
from .registry import LoweringError, const_value, contiguous_array, dims_of, relax_constant
from .symbolic import ShapeUnificationError, Sym, sym_eval, check_unified, materialise


KERNEL_KEY = "graphopt.kernel"

#: int32/int64/bool constants up to this many elements are inlined (shape-deciding inputs, indices;
#: not 8-bit weights: a depthwise int8 conv's inlined weight was repacked inside its kernel, 3.5x slower)
INLINE_INT_ELEMS = 4096
#: any constant up to this many elements is inlined
INLINE_ANY_ELEMS = 16


@dataclass
class LoweredModule:
    mod: tvm.IRModule
    input_names: list[str]
    output_names: list[str]
    params: dict[str, np.ndarray]  # main's parameters after the inputs, in order
    groups: list[str] = field(default_factory=list)  # group functions emitted as primitives
    inline_groups: dict[str, str] = field(default_factory=dict)  # group → why it was inlined
    symbolic_groups: list[str] = field(default_factory=list)  # shape arithmetic, no kernel
    blocked_groups: list[str] = field(default_factory=list)  # groups on channel-blocked activations
    winograd_convs: dict[str, int] = field(default_factory=dict)  # conv node → m of its F(m x m, 3 x 3)
    block: int | None = None  # channel block of the blocked groups (None: NCHW throughout)
    # main's binding (var name) → the group whose node it computes: kernels not named after a
    # group (an inline group's ops, layout changes) are traced back to ONNX nodes through it
    bindings: dict[str, str] = field(default_factory=dict)
    # PrimFunc name → the group whose lowering created it (not the ones reused from an earlier
    # group): read where a later pass gives main's bindings new var names (weight prepacking)
    kernel_groups: dict[str, str] = field(default_factory=dict)
    group_nodes: dict[str, list[Node]] = field(default_factory=dict)  # group name → its nodes
    # symbolic input dims: name → {"input", "axis", "multiple"} (multiple > 1: the dim is
    # re-expressed as multiple x a new var, checked at run time; see `lower_and_fuse`)
    symbolic_dims: dict[str, dict[str, Any]] = field(default_factory=dict)
    winograd_symbolic: list[str] = field(default_factory=list)  # convs kept direct: symbolic maps
    unrolled: dict[str, int] = field(default_factory=dict)  # Loop/Scan node -> iterations unrolled


#: ops whose spatial output dims must be at least 1 (a window that fits the input)
WINDOW_OPS = {"Conv", "ConvInteger", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"}




def _dtype(v: Value) -> str:
    if v.dtype is None:
        raise LoweringError(f"value {v.name!r} has no known element type")
    dt = v.dtype.numpy()
    if dt.kind not in "biuf" and dt.name not in ("bfloat16",):
        raise LoweringError(f"value {v.name!r} has element type {v.dtype.name.lower()}, which the cpu target does not support")
    if dt == np.dtype(bool):
        return "bool"
    return str(dt)


def _is_inline(arr: np.ndarray) -> bool:
    wide_int = arr.dtype.kind == "b" or (arr.dtype.kind in "iu" and arr.dtype.itemsize >= 4)
    return arr.size <= INLINE_ANY_ELEMS or (wide_int and arr.size <= INLINE_INT_ELEMS)


@relax.expr_functor.mutator
class _LiftConstants(relax.PyExprMutator):
    """Replace tensor constants in a function body with new parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.lifted: list[tuple[relax.Var, tvm.ir.GenericConst]] = []

    def visit_generic_const_(self, op: tvm.ir.GenericConst) -> relax.Expr:  # noqa: N802
        v = relax.Var(f"c{len(self.lifted)}", op.ty)
        self.lifted.append((v, op))
        return v


def _lift_constants(func: relax.Function) -> tuple[relax.Function, list[tvm.ir.GenericConst]]:
    m = _LiftConstants()
    body = m.visit_expr(func.body)
    if not m.lifted and not any(str(p.name) == "dims" for p in func.params):
        return func, []
    shapes = [p for p in func.params if str(p.name) == "dims"]  # (kept last: see _primitive)
    params = shapes + [p for p in func.params if str(p.name) != "dims"] + [v for v, _ in m.lifted]
    new = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
    return new, [c for _, c in m.lifted]


#: ops that legalize into one TIR kernel each; anything else keeps a group out of primitive form
_NOT_PRIMITIVE = {
    "relax.shape_of", "relax.tensor_to_shape", "relax.shape_to_tensor", "relax.call_dps_packed",
    "relax.call_pure_packed", "relax.call_builtin_with_ctx", "relax.nonzero", "relax.unique",
    "relax.null_value", "relax.print", "relax.assert_op", "relax.hint_on_device", "relax.to_vdevice",
    "relax.builtin.alloc_tensor", "relax.memory.alloc_storage", "relax.memory.alloc_tensor",
    "relax.sort", "relax.argsort", "relax.topk", "relax.cumsum", "relax.cumprod", "relax.scatter_elements",
    "relax.scatter_nd", "relax.multinomial_from_uniform", "relax.nn.attention", "relax.nn.attention_bias",
    "relax.nn.attention_var_len", "relax.call_inplace_packed", "relax.wrap_param", "relax.dequantize",
    "relax.quantize", "relax.vision.all_class_non_max_suppression",
}


def _primitive_refusal(func: relax.Function) -> str | None:
    """Why `func` cannot be a primitive function FuseTIR turns into one kernel; None when it can."""
    why: list[str] = []

    def visit(e: relax.Expr) -> None:
        if why:
            return
        if isinstance(e, relax.Call):
            op = e.op
            if isinstance(op, tvm.ir.Op):
                if op.name in _NOT_PRIMITIVE:
                    why.append(f"{op.name} is not a TIR kernel")
                elif op.name != "relax.call_tir" and op.get_attr("FLegalize") is None:
                    why.append(f"{op.name} has no legalization")
            elif not isinstance(op, tvm.ir.GlobalVar):
                why.append("calls a non-operator")
        elif isinstance(e, (relax.If, relax.MatchCast)):
            why.append(f"{type(e).__name__} inside")
        if isinstance(e, relax.Var) or isinstance(e, relax.Call):
            ty = e.ty
            if isinstance(ty, (relax.ShapeType, relax.ObjectType)) or (isinstance(ty, relax.TensorType) and ty.ndim < 0):
                why.append(f"a {type(ty).__name__} value (not a tensor of known rank)")

    relax.analysis.post_order_visit(func.body, visit)
    if why:
        return why[0]
    for blk in func.body.blocks:
        for b in blk.bindings:
            if isinstance(b, relax.MatchCast):
                return "match_cast inside (data-dependent shape)"
            ty = b.var.ty
            if isinstance(ty, relax.TensorType) and (ty.ndim < 0 or ty.shape is None):
                return "a tensor of unknown shape inside"
            if not isinstance(ty, (relax.TensorType, relax.TupleType)):
                return f"a {type(ty).__name__} binding inside"
    return None


def _topo_groups(model: Model) -> list[tuple[str, list[Node]]]:
    """Kernel groups of the main graph in an order that respects data flow."""
    groups: dict[str, list[Node]] = {}
    order: dict[str, int] = {}
    anon = 0
    for i, n in enumerate(model.graph.nodes):
        k = n.metadata_props.get(KERNEL_KEY)
        if k is None:  # Constant nodes (data), or a model planned without plan-kernels
            k = f"_n{anon}"
            anon += 1
        groups.setdefault(k, []).append(n)
        order.setdefault(k, i)
    owner = {id(n): k for k, ns in groups.items() for n in ns}
    dag = nx.DiGraph()
    dag.add_nodes_from(groups)
    for k, ns in groups.items():
        for n in ns:
            for v in n.inputs:
                p = v.producer() if v is not None else None
                if p is not None and owner.get(id(p), k) != k:
                    dag.add_edge(owner[id(p)], k)
    if not nx.is_directed_acyclic_graph(dag):
        raise LoweringError("kernel groups form a cycle; run plan-kernels again")
    ordered = list(nx.lexicographical_topological_sort(dag, key=lambda k: order[k]))
    return [(k, groups[k]) for k in ordered]


def _group_name(k: str) -> str:
    return k if k.isidentifier() else "g_" + "".join(c if c.isalnum() else "_" for c in k)


class _Lowerer:
    def __init__(self, model: Model, force_inline: dict[str, str] | None = None, block: int | None = None,
                 winograd: str | None = None, machine: MachineModel | None = None, activity: Any = None,
                 multiples: dict[str, int] | None = None, loop_unroll: int | None = None) -> None:
        self.model = model
        # Loops with a static trip count above this run as a runtime loop (None: LOOP_UNROLL)
        self.loop_unroll = LOOP_UNROLL if loop_unroll is None else loop_unroll
        self.unrolled: dict[str, int] = {}  # Loop/Scan node -> iterations unrolled
        self.multiples = dict(multiples or {})  # symbolic input dim → the multiple it is re-expressed in
        self.definers: list[Any] = []  # main's tensors whose plain dims define symbolic vars (see _primitive)
        self.windows: list[Any] = []  # symbolic output dims of convs and pools (see _note_window)
        self.dim_shapes: dict[tuple[str, ...], Any] = {}  # `_dim_shape`'s match_casts
        self.activity = activity  # told the node being lowered (the compile watchdog names it)
        self.machine = machine  # the target's machine model (blocked convs' tiles)
        self.force_inline = dict(force_inline or {})
        self.block = block  # channel block of activations between convs (None: NCHW throughout)
        self.winograd = winograd  # layout.plan_layout's Winograd mode (None: auto)
        self.plan: _layout.LayoutPlan | None = None
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.bb = relax.BlockBuilder()
        self.sym: dict[str, tvm.tirx.Var] = {}
        self.env: dict[int, Any] = {}  # id(Value) → relax expr in main
        self.params: list[tuple[relax.Var, np.ndarray]] = []
        self.groups: list[str] = []
        self.inline: dict[str, str] = {}
        self.symbolic: list[str] = []  # groups evaluated at compile time (shape arithmetic)
        self.bindings: dict[str, str] = {}  # LoweredModule.bindings
        self.kernel_groups: dict[str, str] = {}  # LoweredModule.kernel_groups

    # shapes
    def _shape(self, v: Value) -> list[Any] | None:
        s = v.shape
        if s is None:
            return None
        dims: list[Any] = []
        for i, d in enumerate(s.dims):
            if isinstance(d, int):
                dims.append(d)
            else:
                name = d if isinstance(d, str) and d.isidentifier() else f"{_group_name(v.name or 'v')}_d{i}"
                dims.append(self.sym.setdefault(name, tvm.tirx.Var(name, "int64")))
        return dims

    def _var(self, v: Value, name: str) -> relax.Var:
        if not isinstance(v.type, TensorType):
            raise LoweringError(f"input {v.name!r} is a {type(v.type).__name__}; the cpu target takes tensors only")
        dims = self._shape(v)
        if dims is not None:
            check_size(f"input {v.name!r}", dims, _dtype(v))
        return relax.Var(name, relax.TensorType(dims, _dtype(v)))

    def lower(self) -> LoweredModule:
        g = self.model.graph
        inputs = [v for v in g.inputs if not (v.is_initializer() and v.const_value is not None)]
        in_vars = []
        for i, v in enumerate(inputs):
            rv = self._var(v, _group_name(v.name) if v.name else f"input{i}")
            self.env[id(v)] = rv
            in_vars.append(rv)
        # initializers: inline or parameter
        for name, v in g.initializers.items():
            if v.const_value is None or not v.uses() and not v.is_graph_output():
                continue
            self._constant(v, v.const_value.numpy())
        param_vars = [p for p, _ in self.params]
        groups = _topo_groups(self.model)
        if self.block:
            if self.machine is None:
                raise ValueError("a blocked layout needs the target's machine model (lower(..., machine=...))")
            self.plan = _layout.choose_plan(self.model, groups, self.block, self.machine, self.winograd)
        # parameters must be known before the function opens: collect Constant-node weights too
        for _, nodes in groups:
            for n in nodes:
                if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                    self._constant_node(n)
        param_vars = [p for p, _ in self.params]
        sym_dims: dict[str, dict[str, Any]] = {}
        for v, rv in zip(inputs, in_vars):
            if isinstance(rv.ty.shape, relax.ShapeExpr):
                for ax, d in enumerate(rv.ty.shape.values):
                    if isinstance(d, tvm.tirx.Var) and d.name not in sym_dims:
                        sym_dims[d.name] = {"input": v.name, "axis": ax, "multiple": int(self.multiples.get(d.name, 1))}
        self.symbolic_dims = sym_dims
        with function_scope(self.bb, "main", in_vars + param_vars, {"num_input": len(in_vars)}):
            with self.bb.dataflow():
                self._reexpress_dims(inputs, in_vars)
                for k, nodes in groups:
                    nodes = [n for n in nodes if id(n.outputs[0]) not in self.env] if nodes else nodes
                    if not nodes:
                        continue
                    before = {gv.name_hint for gv in self.bb.get().get_global_vars()}
                    self._group(k, nodes)
                    for gv in self.bb.get().get_global_vars():
                        if gv.name_hint not in before:
                            self.kernel_groups.setdefault(gv.name_hint, _group_name(k))
                    for n in nodes:  # (the values it computes: see `bindings`)
                        for v in n.outputs:
                            e = self.env.get(id(v))
                            if isinstance(e, relax.Var):
                                self.bindings.setdefault(str(e.name), _group_name(k))
                outs = []
                for v in g.outputs:
                    e = self._in_form(self.bb, self.env, v, _layout.PLAIN)
                    if e is None:
                        raise LoweringError(f"graph output {v.name!r} is not computed")
                    if isinstance(e, Sym):  # (shape arithmetic as an output: Shape -> Gather of a symbolic dim)
                        e = materialise(self.bb, e, "")
                    outs.append(e)
                res = self.bb.emit_output(relax.Tuple(outs) if len(outs) != 1 else outs[0])
            self.bb.emit_func_output(res)
        mod = self.bb.get()
        self._min_sizes()
        return LoweredModule(
            mod=mod,
            input_names=[v.name for v in inputs],
            output_names=[v.name for v in g.outputs],
            params={str(p.name): arr for p, arr in self.params},
            groups=self.groups,
            inline_groups=self.inline,
            symbolic_groups=self.symbolic,
            blocked_groups=[_group_name(k) for k in self.plan.groups] if self.plan is not None else [],
            winograd_convs=self._winograd_convs(),
            block=self.plan.block if self.plan is not None and self.plan.groups else None,
            bindings=self.bindings,
            kernel_groups=self.kernel_groups,
            group_nodes={_group_name(k): list(ns) for k, ns in groups},
            symbolic_dims=self.symbolic_dims,
            winograd_symbolic=list(self.plan.winograd_symbolic) if self.plan is not None else [],
            unrolled=dict(self.unrolled),
        )

    def _reexpress_dims(self, inputs: list[Value], in_vars: list[relax.Var]) -> None:
        """Each symbolic input dim D with a multiple m > 1 becomes m * D_m (D_m = D // m, a new
        var defined by a match_cast of a shape, the input then match_cast to the new dims: the VM
        checks D == m * D_m when it runs). Strided convs and pools then give exact dims (a 3x3
        stride-2 conv of 8 * H_8 rows has 4 * H_8), equal where the upsampled maps meet their skip
        connections, so Concat and Add keep their shapes."""
        self.definers = [rv for rv in in_vars if isinstance(rv.ty.shape, relax.ShapeExpr)]
        new: dict[str, Any] = {}
        for name, m in self.multiples.items():
            if m > 1 and name in self.sym:
                new[name] = tvm.tirx.Var(f"{name}_{m}", "int64")
        if not new:
            return
        names = sorted(new)
        # (through a run-time tensor: a D_m defined by the ShapeExpr D // m directly is resolved
        # back to that expression by FuseTIR's RemoveUnusedParameters, which FuseTIR then rejects:
        # "All shape inputs are expected to be single tirx var")
        R = relax.op
        t = self.bb.emit(R.shape_to_tensor(relax.ShapeExpr([self.sym[n] for n in names])))
        t = self.bb.emit(R.floor_divide(t, relax.const(np.array([self.multiples[n] for n in names], np.int64), "int64")))
        sh = self.bb.emit(R.tensor_to_shape(t))
        self.definers.insert(0, self.bb.match_cast(sh, relax.ShapeType([new[n] for n in names])))
        for v, rv in zip(inputs, in_vars):
            if not isinstance(rv.ty.shape, relax.ShapeExpr):
                continue
            dims = [new[d.name] * self.multiples[d.name] if isinstance(d, tvm.tirx.Var) and d.name in new else d
                    for d in rv.ty.shape.values]
            if any(not a.same_as(b) for a, b in zip(dims, rv.ty.shape.values)):
                self.env[id(v)] = self.bb.match_cast(rv, relax.TensorType(dims, rv.ty.dtype))

    def _constant(self, v: Value, arr: np.ndarray) -> None:
        if arr.dtype == object or arr.dtype.kind in "SUO":
            raise LoweringError(f"constant {v.name!r} of dtype {arr.dtype} is not supported by the cpu target")
        if _is_inline(arr):
            self.env[id(v)] = relax_constant(arr)
        else:
            p = relax.Var(f"p{len(self.params)}", relax.TensorType(list(arr.shape), "bool" if arr.dtype == np.bool_ else str(arr.dtype)))
            self.params.append((p, contiguous_array(arr)))
            self.env[id(v)] = p

    def _constant_node(self, n: Node) -> None:
        # Constant's value attributes: value, value_float(s), value_int(s)
        for key, a in n.attributes.items():
            if key == "value":
                arr = np.asarray(a.value.numpy())
            elif key == "value_float":
                arr = np.asarray(a.value, np.float32)
            elif key == "value_floats":
                arr = np.asarray(a.value, np.float32)
            elif key == "value_int":
                arr = np.asarray(a.value, np.int64)
            elif key == "value_ints":
                arr = np.asarray(a.value, np.int64)
            else:
                raise LoweringError(f"node {n.label()}: Constant attribute {key!r} is not supported by the cpu target")
            self._constant(n.outputs[0], arr)
            return
        raise LoweringError(f"node {n.label()}: Constant without a value")

    def _in_form(self, bb: relax.BlockBuilder, env: dict[Any, Any], v: Value, want: str) -> Any:
        """`v`'s expression in `env`, in form `want` (converted once per scope, see layout.py)."""
        if self.plan is None:
            return env.get(id(v))
        have = self.plan.native(v)
        if want == have:
            return env.get(id(v))
        e = env.get((id(v), want))
        if e is None:
            src = env.get(id(v))
            if src is None:
                return None
            if isinstance(src, Sym):
                src = materialise(bb, src, "")
            e = env[(id(v), want)] = _layout.convert_form(bb, src, v, have, want, self.plan.block)
        return e

    def _winograd_convs(self) -> dict[str, int]:
        if self.plan is None:
            return {}
        return {n.label(): self.plan.winograd[id(n)] for n in self.model.graph.nodes if id(n) in self.plan.winograd}

    def _wants(self, n: Node, i: int) -> str:
        return self.plan.wants(n, i) if self.plan is not None else _layout.PLAIN

    def _convert_into(self, bb: relax.BlockBuilder, nodes: list[Node], env: dict[Any, Any]) -> None:
        for n in nodes:
            if self.activity is not None:
                self.activity.what = f"lowering node {n.label()}"
            check_schema(n, self.opset)
            ins: list[Any] = []
            for i, v in enumerate(n.inputs):
                if v is None or (not v.name and v.producer() is None and not v.is_graph_input()):
                    ins.append(None)
                    continue
                e = self._in_form(bb, env, v, self._wants(n, i))
                if e is None:
                    raise LoweringError(f"node {n.label()}: input {v.name!r} is not computed before it")
                ins.append(e)
            check_not_empty(n, ins)
            role = self.plan.role(n) if self.plan is not None else None
            if role is not None:
                out = _layout.convert_blocked(bb, n, role, ins, self.plan,
                                              lambda b_, n_, i_: convert_node(b_, n_, i_, self.opset),
                                              self.plan.winograd.get(id(n), 0))
                check_unified(n, ins, [out])
                self._note_window(n, [out])
                env[id(n.outputs[0])] = out
                continue
            sym = sym_eval(n, ins) if n.domain in ("", "ai.onnx") else None
            if sym is not None:
                for v, e in zip(n.outputs, sym):
                    env[id(v)] = e
                continue
            if n.op_type in ("If", "Scan", "Loop") and n.domain in ("", "ai.onnx") and n.subgraphs():
                check_body_arity(n, len(ins))
                outs = self._control_flow(bb, n, ins, env)
                if len(outs) < len(n.outputs):
                    raise LoweringError(f"node {n.label()}: {n.op_type} computes {len(outs)} outputs, the node has {len(n.outputs)}")
                check_outputs(n, outs)
                for v, e in zip(n.outputs, outs):
                    env[id(v)] = e
                continue
            ins = [materialise(bb, e, n.op_type) if isinstance(e, Sym) else e for e in ins]
            try:
                out = convert_node(bb, n, ins, self.opset)
            except GraphoptError:
                raise
            except Exception as e:  # the frontend raises anything from asserts to TVMError
                msg = str(e).strip().splitlines()
                detail = msg[-1] if msg else type(e).__name__
                raise LoweringError(f"node {n.label()}: {n.op_type} cannot be lowered: {type(e).__name__}: {detail[:300]}") from None
            outs = split_outputs(bb, n, out, self.opset)
            check_unified(n, ins, outs)
            self._note_window(n, outs)
            check_outputs(n, outs)
            for v, e in zip(n.outputs, outs):
                env[id(v)] = e

    # control flow: If with a constant condition, Scan and Loop with static trip counts are
    # unrolled at compile time (their bodies converted once per iteration); a Loop of more
    # iterations than `loop_unroll` runs as a runtime loop instead (dynamic.runtime_loop)
    MAX_UNROLL = 256

    def _body(self, bb: relax.BlockBuilder, g: Any, args: list[Any], env: dict[int, Any]) -> list[Any]:
        """Convert subgraph `g` with its inputs bound to `args`; its outputs' expressions."""
        sub = dict(env)
        for v, a in zip(g.inputs, args):
            sub[id(v)] = a
        for v in g.initializers.values():
            if v.const_value is not None:
                sub[id(v)] = relax_constant(np.asarray(v.const_value.numpy()))
        self._convert_into(bb, list(g.nodes), sub)
        outs = []
        for v in g.outputs:
            if id(v) not in sub:
                raise LoweringError(f"subgraph output {v.name!r} is not computed")
            e = sub[id(v)]
            outs.append(materialise(bb, e, "") if isinstance(e, Sym) else e)
        return outs

    def _control_flow(self, bb: relax.BlockBuilder, n: Node, ins: list[Any], env: dict[int, Any]) -> list[Any]:
        R = relax.op
        if n.op_type == "If":
            c = ins[0].static() if isinstance(ins[0], Sym) else const_value(ins[0])
            if c is None:  # both branches compiled, one chosen at run time
                from . import dynamic

                return dynamic.runtime_if(self, bb, n, ins[0], env)
            branch = n.attr("then_branch") if bool(np.asarray(c).reshape(-1)[0]) else n.attr("else_branch")
            return self._body(bb, branch, [], env)
        ins = [materialise(bb, e, "") if isinstance(e, Sym) else e for e in ins]
        if n.op_type == "Scan":
            if self.opset < 9:
                raise LoweringError(f"node {n.label()}: Scan-8 (batched, sequence_lens) is not supported by the cpu target")
            body = n.attr("body")
            m = int(n.attr("num_scan_inputs"))
            nstate = len(ins) - m
            states, xs = list(ins[:nstate]), ins[nstate:]
            in_axes = list(n.attr("scan_input_axes") or [0] * m)
            in_dirs = list(n.attr("scan_input_directions") or [0] * m)
            k = len(body.outputs) - nstate
            out_axes = list(n.attr("scan_output_axes") or [0] * k)
            out_dirs = list(n.attr("scan_output_directions") or [0] * k)
            if not xs:
                raise LoweringError(f"node {n.label()}: Scan without scan inputs")
            in_axes = [a + xs[i].ty.ndim if a < 0 else a for i, a in enumerate(in_axes)]
            t = dims_of(xs[0])[in_axes[0]]
            if not isinstance(t, int) or t > self.MAX_UNROLL:
                raise LoweringError(f"node {n.label()}: Scan needs a static sequence length ≤ {self.MAX_UNROLL} on the cpu target")
            per: list[list[Any]] = [[] for _ in range(k)]
            for it in range(t):
                sl = []
                for i, x in enumerate(xs):
                    j = t - 1 - it if in_dirs[i] else it
                    sl.append(bb.emit(R.squeeze(R.strided_slice(x, axes=[in_axes[i]], begin=[j], end=[j + 1]), [in_axes[i]])))
                outs = self._body(bb, body, states + sl, env)
                states = outs[:nstate]
                for i in range(k):
                    per[i].append(outs[nstate + i])
            self.unrolled[n.label()] = t
            results = list(states)
            for i in range(k):
                seq = per[i][::-1] if out_dirs[i] else per[i]
                r = seq[0].ty.ndim + 1
                ax = out_axes[i] + r if out_axes[i] < 0 else out_axes[i]
                results.append(bb.emit(R.stack(seq, axis=ax)))
            return results
        # Loop(M, cond, v...): body(i, cond, v...) → (cond, v..., scan outputs...)
        body = n.attr("body")
        trip = ins[0] if ins else None
        cond = ins[1] if len(ins) > 1 else None
        carried = list(ins[2:])
        tv = const_value(trip) if trip is not None else None
        max_trip = int(np.asarray(tv).reshape(-1)[0]) if tv is not None else None
        cv = const_value(cond) if cond is not None else None
        if trip is not None and tv is None or cond is not None and cv is None:  # a recursive function, run on the host
            from . import dynamic

            return dynamic.runtime_loop(self, bb, n, ins, env)
        go = True if cv is None else bool(np.asarray(cv).reshape(-1)[0])
        if max_trip is not None and max_trip > self.loop_unroll and go:
            from . import dynamic

            return dynamic.runtime_loop(self, bb, n, ins, env)
        if max_trip is None and cond is None:
            raise LoweringError(f"node {n.label()}: Loop without a trip count or condition")
        k = len(body.outputs) - 1 - len(carried)
        per = [[] for _ in range(k)]
        it = 0
        while go and (max_trip is None or it < max_trip):
            if it >= self.MAX_UNROLL:
                raise LoweringError(f"node {n.label()}: Loop runs more than {self.MAX_UNROLL} iterations; the cpu target unrolls loops")
            i_e = relax_constant(np.array(it, dtype=np.int64))
            c_e = relax_constant(np.array(True))
            outs = self._body(bb, body, [i_e, c_e] + carried, env)
            c_out = const_value(outs[0]) if isinstance(outs[0], relax.Expr) else None
            if c_out is None:
                raise LoweringError(f"node {n.label()}: Loop whose condition is computed at run time is not supported by the cpu target")
            go = bool(np.asarray(c_out).reshape(-1)[0])
            carried = outs[1 : 1 + len(carried)]
            for i in range(k):
                per[i].append(outs[1 + len(carried) + i])
            it += 1
        self.unrolled[n.label()] = it
        results = list(carried)
        for i in range(k):
            if not per[i]:
                raise LoweringError(f"node {n.label()}: Loop with zero iterations and scan outputs")
            results.append(bb.emit(R.stack(per[i], axis=0)))
        return results

    def _group(self, k: str, nodes: list[Node]) -> None:
        if len(nodes) == 1 and nodes[0].op_type == "Constant":
            return
        gname = _group_name(k)
        inside = {id(v) for n in nodes for v in n.outputs}
        ext: list[tuple[Value, str]] = []  # (value, the form the group reads it in)
        seen: set[tuple[int, str]] = set()
        for n in nodes:
            for i, v in enumerate(n.inputs):
                if v is None or id(v) in inside:
                    continue
                form = self._wants(n, i) if not self._is_inline_const(v) else _layout.PLAIN
                if (id(v), form) in seen:
                    continue
                seen.add((id(v), form))
                ext.append((v, form))
        members = {id(n) for n in nodes}
        outs = [v for n in nodes for v in n.outputs if v.is_graph_output() or any(id(u) not in members for u in v.consumers())]
        if not outs:  # nothing outside reads the group
            return
        if self._try_symbolic(nodes):
            self.symbolic.append(gname)
            return
        why = self.force_inline.get(gname)
        func = None
        if why is None:
            try:
                func, consts, dim_args = self._primitive(gname, nodes, ext, outs)
            except LoweringError as e:
                why = str(e)
        if func is not None:
            why = _primitive_refusal(func)
        if why is None and func is not None:
            gv = self.bb.add_func(func, gname)
            dim_args = [self._dim_shape(a) if isinstance(a, relax.ShapeExpr) else a for a in dim_args]
            args = [self._in_form(self.bb, self.env, v, form) for v, form in ext if not self._is_inline_const(v)] + consts
            args = dim_args + args  # (the vars' definer first: FuseTIR maps the kernel's vars from it)
            call = self.bb.emit(relax.Call(gv, args))
            if len(outs) == 1:
                self.env[id(outs[0])] = call
            else:
                for i, v in enumerate(outs):
                    self.env[id(v)] = self.bb.emit(relax.TupleGetItem(call, i))
            self.groups.append(gname)
            return
        # inline into main, node by node
        self.inline[gname] = why or "not a primitive function"
        self._convert_into(self.bb, nodes, self.env)

    def _note_window(self, n: Node, outs: list[Any]) -> None:
        """Keep the symbolic spatial output dims of a convolution or pooling window: each must be
        at least 1, which sets the smallest input size (`_min_sizes`)."""
        if n.op_type not in WINDOW_OPS:
            return
        for o in outs:
            ty = getattr(o, "ty", None) if isinstance(o, relax.Expr) else None
            if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr) and ty.ndim >= 3:
                self.windows.extend(d for d in list(ty.shape.values)[2:] if not isinstance(d, tvm.tirx.IntImm))

    def _min_sizes(self) -> None:
        """symbolic_dims[D]["min"]: the smallest size of D (a multiple of its "multiple") for which
        every window output that depends on D alone is at least 1 (searched up to 2**16; window
        outputs grow with D, so the last size that failed and the first that fits bound it)."""
        by_var: dict[str, list[Any]] = {}
        for e in self.windows:
            names = {v.name for v in tvm.tirx.analysis.undefined_vars(e)}
            if len(names) == 1:
                by_var.setdefault(names.pop(), []).append(e)
        for name, info in self.symbolic_dims.items():
            m = int(info["multiple"])
            var_name = f"{name}_{m}" if m > 1 else name
            exprs = by_var.get(var_name, [])
            if not exprs:
                info["min"] = m
                continue
            var = next(v for v in tvm.tirx.analysis.undefined_vars(exprs[0]) if v.name == var_name)

            def ok(k: int) -> bool:  # (k: the var's value)
                a = tvm.sym.Analyzer()
                a.bind(var, tvm.tirx.IntImm("int64", k))
                vals = [a.simplify(e) for e in exprs]
                return all(isinstance(v, tvm.tirx.IntImm) and int(v.value) >= 1 for v in vals)

            k, last_bad = 1, 0
            while k < (1 << 16) and not ok(k):
                last_bad = k
                k += 1 if k < 64 else k // 8
            while k - last_bad > 1:  # (the steps above 64 overshoot: the least size between, by bisection)
                mid = (k + last_bad) // 2
                if ok(mid):
                    k = mid
                else:
                    last_bad = mid
            info["min"] = k * m if m > 1 else k

    def _dim_shape(self, shape: relax.ShapeExpr) -> relax.Expr:
        """A group's shape argument as a match_cast var in main (FuseTIR rejects a ShapeExpr,
        bound or not: "All shape inputs are expected to be single tirx var"), one per var list."""
        key = tuple(str(v) for v in shape.values)
        cache = self.dim_shapes
        if key not in cache:
            cache[key] = self.bb.match_cast(self.bb.emit(shape), relax.ShapeType(list(shape.values)))
        return cache[key]

    def _try_symbolic(self, nodes: list[Node]) -> bool:
        """Evaluate a group of shape arithmetic at compile time (no kernel); False if it is not one."""
        local: dict[int, Any] = {}
        for n in nodes:
            if n.domain not in ("", "ai.onnx"):
                return False
            if self.plan is not None and any(v is not None and self.plan.native(v) != _layout.PLAIN for v in n.inputs):
                return False
            ins = [None if v is None else local.get(id(v), self.env.get(id(v))) for v in n.inputs]
            sym = sym_eval(n, ins)
            if sym is None:
                return False
            for v, e in zip(n.outputs, sym):
                local[id(v)] = e
        self.env.update(local)
        return True

    def _is_inline_const(self, v: Value) -> bool:
        return isinstance(self.env.get(id(v)), (tvm.ir.GenericConst, Sym))

    def _primitive(self, gname: str, nodes: list[Node], ext: list[tuple[Value, str]], outs: list[Value]
                   ) -> tuple[relax.Function, list[tvm.ir.GenericConst], list[relax.Expr]]:
        gbb = relax.BlockBuilder()
        env: dict[Any, Any] = {}
        params = []
        for i, (v, form) in enumerate(ext):
            e = self.env.get(id(v))
            if e is None:
                raise LoweringError(f"value {v.name!r} is read before it is computed")
            if isinstance(e, (tvm.ir.GenericConst, Sym)):
                env[id(v)] = e  # inlined: converters specialise on it; lifted below if still data
                continue
            e = self._in_form(self.bb, self.env, v, form)  # a layout change: a kernel of its own, in main
            ty = e.ty
            if not isinstance(ty, relax.TensorType):
                raise LoweringError(f"input {v.name!r} is a {type(ty).__name__}")
            p = relax.Var(f"a{i}", ty)
            params.append(p)
            native = self.plan is None or self.plan.native(v) == form
            env[id(v) if native else (id(v), form)] = p
        # a param dim that is an expression of symbolic dims (`(H - 1) // 2 + 1` after a stride-2
        # conv) defines no var: its vars come in as a shape argument, else the function's shapes
        # are erased to rank-only ones (and blocked TE computes, pooling, Resize cannot take those)
        defined = {v for p in params for v in relax.analysis.definable_tir_vars_in_type(p.ty)}
        used = {v for p in params for v in relax.analysis.tir_vars_in_type(p.ty)}
        # ... and the vars of symbolic shape values the group reads (a ConstantOfShape of
        # [2, batch, 64], PyTorch's zero initial LSTM state: nothing else brings `batch` in)
        for v, _form in ext:
            e = env.get(id(v))
            if isinstance(e, Sym):
                used |= {u for x in e.vals if not isinstance(x, int) for u in tvm.tirx.analysis.undefined_vars(x)}
        missing = sorted({v for v in used if v not in defined}, key=lambda v: v.name)
        dim_args: list[relax.Expr] = []
        if missing:
            # a tensor of main whose dims include those vars as plain dims (an input, or the
            # zero-copy view of one that `_reexpress_dims` makes), passed along unread: a Shape
            # argument defines them too, but FuseTIR rejects it in some modules ("All shape
            # inputs are expected to be single tirx var")
            definer = next((d for d in self.definers
                            if set(missing) <= set(relax.analysis.definable_tir_vars_in_type(d.ty))), None)
            if definer is not None:
                params.append(relax.Var("dims", definer.ty))
                dim_args.append(definer)
            else:
                params.append(relax.Var("dims", relax.ShapeType(missing)))
                dim_args.append(relax.ShapeExpr(missing))
        with function_scope(gbb, gname, params, {"Primitive": True}, private=True):
            with gbb.dataflow():
                self._convert_into(gbb, nodes, env)
                missing = [v.name for v in outs if id(v) not in env]
                if missing:
                    raise LoweringError(f"value {missing[0]!r} is not computed")
                res = [env[id(v)] for v in outs]
                for r in res:
                    if not isinstance(r, relax.Expr) or not isinstance(r.ty, relax.TensorType):
                        raise LoweringError("a group output is not a tensor")
                    if isinstance(r, (tvm.ir.GenericConst, relax.Tuple)) or any(r.same_as(p) for p in params):
                        raise LoweringError("a group output is not computed inside the group")
                out = gbb.emit_output(res[0] if len(res) == 1 else relax.Tuple(res))
            gbb.emit_func_output(out)
        func = gbb.get()[gname]
        sub = gbb.get()
        extra = [gv for gv in sub.get_global_vars() if gv.name_hint != gname]
        if extra:  # emit_te created PrimFuncs: carry them over as call_tir targets
            # (add_func renames a clash, e.g. two groups' `conv_blocked` of different shapes, and
            # returns an equal function's GlobalVar: map each by what it returned, not by name)
            own = [sub[gv].attrs[_OWN_KERNEL] for gv in extra
                   if isinstance(sub[gv], tvm.tirx.PrimFunc) and sub[gv].attrs is not None and _OWN_KERNEL in sub[gv].attrs]
            if own:  # a hand-written kernel (a recurrence looping over time) stays a kernel of its own
                raise LoweringError(f"a hand-written kernel ({own[0]}) runs on its own")
            table = {gv: self.bb.add_func(sub[gv], gv.name_hint) for gv in extra}
            func = _rebind_globals(func, table)
        func, consts = _lift_constants(func)
        return func, consts, dim_args


def _rebind_globals(func: relax.Function, table: dict[tvm.ir.GlobalVar, tvm.ir.GlobalVar]) -> relax.Function:
    """`func` with its GlobalVars replaced per `table`."""
    if not table:
        return func

    @relax.expr_functor.mutator
    class _M(relax.PyExprMutator):
        def visit_global_var_(self, op: tvm.ir.GlobalVar) -> relax.Expr:  # noqa: N802
            return table.get(op, op)

    return _M().visit_expr(func)


def lower(model: Model, force_inline: dict[str, str] | None = None, block: int | None = None,
          winograd: str | None = None, machine: MachineModel | None = None, activity: Any = None,
          multiples: dict[str, int] | None = None, loop_unroll: int | None = None) -> LoweredModule:
    """Lower `model` (planned with `plan-kernels`). Groups named in `force_inline` are emitted
    inline into main (with that reason). With `block`, convolution groups run on channel-blocked
    activations where they can (see layout.py), 3x3 convs in Winograd form per `winograd` (a
    `layout.plan_layout` mode), tiled for `machine` (the target's machine model; needed with `block`).
    `activity` (a compile_watchdog.Activity) is told which node is being lowered. `loop_unroll`:
    Loops of more static iterations run as runtime loops (None: LOOP_UNROLL)."""
    return _Lowerer(model, force_inline, block, winograd, machine, activity, multiples, loop_unroll).lower()


#: a PrimFunc attribute (kernels.recurrent.OWN_KERNEL_ATTR): the group holding it is emitted inline into main
_OWN_KERNEL = "graphopt.own_kernel"

#: the default `loop_unroll`: Loops of up to this many static iterations are unrolled (the body
#: converted once per iteration: kernels as fast as a static graph's, compile time growing
#: faster than the count; a 256-step Loop took 120-229 s, mostly LLVM); longer ones run as a
#: runtime loop (a recursive function: ~20 µs per step over the body's kernels, and its scan
#: outputs grown by concatenation)
LOOP_UNROLL = 256
#: unrolled Loops/Scans past this many iterations are named in a compile warning
UNROLL_WARN = 64

#: how many times `lower_unified` re-lowers with larger multiples before it gives up
UNIFY_ROUNDS = 4


def lower_unified(model: Model, **kw: Any) -> LoweredModule:
    """`lower`, re-expressing symbolic input dims as multiples where a node needs dims equal that
    are not for every size (see ShapeUnificationError): each round raises the multiples to what
    the failing node's dim expressions divide by; a node still failing after UNIFY_ROUNDS, or one
    that names no divisor, is reported."""
    import math

    multiples: dict[str, int] = {}
    why: dict[str, str] = {}
    for _ in range(UNIFY_ROUNDS + 1):
        try:
            lowered = lower(model, multiples=multiples, **kw)
        except ShapeUnificationError as e:
            grown = {k: math.lcm(multiples.get(k, 1), m) for k, m in e.divisors.items() if m > 1}
            if not grown or all(multiples.get(k, 1) == m for k, m in grown.items()):
                raise LoweringError(f"{e}; fix those dims with --dim NAME=N or --input-shape") from None
            multiples.update(grown)
            node = str(e).split(": ", 1)[0].removeprefix("node ")
            for k in grown:
                why.setdefault(k, f"{node} joins maps of different strides")
            continue
        for k, info in lowered.symbolic_dims.items():
            if k in why and info["multiple"] > 1:
                info["why"] = why[k]
        return lowered
    raise LoweringError(f"symbolic dims still not unified with multiples {multiples}")


def lower_and_fuse(model: Model, target: tvm.target.Target, block: int | None = None,
                   winograd: str | None = None, activity: Any = None,
                   loop_unroll: int | None = None) -> tuple[LoweredModule, tvm.IRModule]:
    """`lower` then `legalize_and_fuse`. When FuseTIR refuses the module, each primitive group is
    tried on its own, the ones it refuses are emitted inline instead, and the model is lowered again."""
    machine = machine_model(target)
    lowered = lower_unified(model, block=block, winograd=winograd, machine=machine, activity=activity,
                            loop_unroll=loop_unroll)
    multiples = {k: d["multiple"] for k, d in lowered.symbolic_dims.items() if d["multiple"] > 1}
    if activity is not None:
        activity.what = "legalizing and fusing the kernels (LegalizeOps, FuseTIR)"
    try:
        return lowered, legalize_and_fuse(lowered.mod, target)
    except Exception as first:  # TVMError / InternalError from FuseTIR
        bad = failing_groups(lowered.mod, target)
        if not bad:
            raise LoweringError(f"LegalizeOps/FuseTIR failed: {_last_line(first)}") from None
    lowered = lower(model, force_inline=bad, block=block, winograd=winograd, machine=machine, activity=activity,
                    multiples=multiples, loop_unroll=loop_unroll)
    if activity is not None:
        activity.what = "legalizing and fusing the kernels (LegalizeOps, FuseTIR)"
    try:
        return lowered, legalize_and_fuse(lowered.mod, target)
    except Exception as again:  # inline, the same nodes fail again: name them
        groups = {_group_name(k): ns for k, ns in _topo_groups(model)}
        named = "; ".join(f"{g} ({', '.join(n.label() for n in groups.get(g, []))})" for g in bad)
        raise LoweringError(f"kernel groups the cpu target cannot compile: {named}: {_last_line(again)}") from None


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def failing_groups(mod: tvm.IRModule, target: tvm.target.Target) -> dict[str, str]:
    """Primitive group functions that LegalizeOps/FuseTIR cannot turn into one kernel (each
    tried in a module of its own, called once from a stub main), with the reason."""
    prims = {gv: mod[gv] for gv in mod.get_global_vars() if isinstance(mod[gv], tvm.tirx.PrimFunc)}
    bad: dict[str, str] = {}
    for gv in mod.get_global_vars():
        f = mod[gv]
        if not (isinstance(f, relax.Function) and f.attrs is not None and "Primitive" in f.attrs):
            continue
        params = [relax.Var(f"x{i}", p.ty) for i, p in enumerate(f.params)]
        stub = relax.Function(params, relax.Call(gv, params), f.ret_ty)
        sub = tvm.IRModule({gv: f, tvm.ir.GlobalVar("main"): stub, **prims})
        try:
            legalize_and_fuse(sub, target)
        except Exception as e:
            bad[gv.name_hint] = f"FuseTIR: {_last_line(e)}"
    return bad

"""Which ONNX nodes each kernel of a compiled module computes, recorded in the artifact's manifest
(`kernel_map`) for the profiler (`graphopt-run ARTIFACT --profile`).

    [{"kernel": "k3", "group": "k3", "role": "kernel", "nodes": ["/layer1/conv1/Conv", ...],
      "ops": ["Conv", "Relu"], "flops": 231211008, "int8": false, "schedule": "nchw16c blocked-conv"}, ...]

One entry per kernel call in `main`, in call order, then the calls of the branch functions. A group's own PrimFunc is named after the
group (role "kernel"); an inline group's ops are kernels named after the op (role "inline");
anything else `main` calls — a layout change between plain and channel-blocked activations, a
weight-independent prologue — is charged to the group it feeds, the next one `main` computes
(role "layout"); the kernels of a run-time If's branch functions are charged to the If's group
(role "branch", `function`: the branch function); a kernel whose call the weight prepacking re-emitted (`_prepacked`) is charged
to the group whose lowering created it. `flops` is twice the multiply-adds of the unscheduled kernel (0 for kernels
without a multiply-accumulate reduction: copies, pooling, softmax; see tir_match.kernel_flops).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import tvm
from tvm import relax

from graphopt.targets.tvm.tir_match import mac_flops_terms
from graphopt.targets.tvm.schedules import GENERIC_RULES

_CALL_TIR = ("relax.call_tir", "relax.call_tir_inplace")
# (a kernel whose weight packing was hoisted: SplitLayoutRewritePreproc renames it)
_SUFFIXES = ("_prepacked",)


def base_name(kernel: str) -> str:
    for s in _SUFFIXES:
        if kernel.endswith(s):
            return kernel[: -len(s)]
    return kernel


def _py(e: Any) -> str:
    """A TIR integer expression as Python arithmetic over its variables' names."""
    from tvm import tirx

    if isinstance(e, tirx.IntImm):
        return str(int(e.value))
    if isinstance(e, tirx.Var):
        return str(e.name)
    if isinstance(e, tirx.Cast):
        return _py(e.value)
    ops = {tirx.Mul: "*", tirx.Add: "+", tirx.Sub: "-", tirx.FloorDiv: "//", tirx.Div: "//"}
    for cls, sym in ops.items():
        if isinstance(e, cls):
            return f"({_py(e.a)} {sym} {_py(e.b)})"
    raise ValueError(f"cannot write {type(e).__name__} as arithmetic")


def _mac_flops(func: Any) -> int | str:
    """tir_match.kernel_flops, symbolic extents kept: an int, or Python arithmetic over the
    PrimFunc's shape variables (a symbolic batch: "(2 * N * 3456)")."""
    import tvm.sym

    terms = mac_flops_terms(func)
    if not terms:
        return 0
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    total = tvm.sym.Analyzer().simplify(total)
    return int(total.value) if isinstance(total, tvm.tirx.IntImm) else _py(total)


def _shape_vars(func: Any) -> dict[str, list[int]]:
    """Each shape variable of `func`'s buffers → [argument index, dim] where it can be read."""
    from tvm import tirx

    out: dict[str, list[int]] = {}
    for i, b in enumerate(func.params):
        for d, x in enumerate(getattr(b, "shape", ())):
            if isinstance(x, tirx.Var):
                out.setdefault(str(x.name), [i, d])
    return out


def kernel_facts(mod: tvm.IRModule) -> dict[str, dict[str, Any]]:
    """{PrimFunc name: {"flops", "int8"[, "dims"]}} of an unscheduled module (after
    legalize_and_fuse: scheduled loops would count a peeled body twice). `flops` is an int, or
    Python arithmetic over shape variables that `dims` locates in the arguments (graphopt.profiler evaluates it on each call's argument shapes)."""
    out: dict[str, dict[str, Any]] = {}
    for gv, f in mod.functions_items():
        if not isinstance(f, tvm.tirx.PrimFunc):
            continue
        try:
            flops: int | str = _mac_flops(f)
        except Exception:  # noqa: BLE001 - a kernel the counter does not understand counts 0
            flops = 0
        dts = {str(b.dtype) for b in f.params if hasattr(b, "shape")}
        e: dict[str, Any] = {"flops": flops, "int8": bool(flops) and bool(dts & {"int8", "uint8"})}
        if isinstance(flops, str):
            used = set(re.findall(r"[A-Za-z_]\w*", flops))
            e["dims"] = {k: v for k, v in _shape_vars(f).items() if k in used}
        out[gv.name_hint] = e
    return out


def schedule_label(name: str, group: str | None, *, rules: Mapping[str, str], int8: Mapping[str, str],
                   tuned: bool, blocked: set[str], block: int | None, winograd: int | None,
                   other: str = "unscheduled") -> str:
    """How kernel `name` was scheduled, in words: layout, then the rule (`rules`: the default
    schedules' rule per PrimFunc; `int8`: the int8 micro-kernels' kind; otherwise a database's
    tuned schedule when one was applied; `other` for the rest, e.g. "dlight gpu")."""
    parts = []
    if group in blocked and block:
        parts.append(f"nchw{block}c")
    base = base_name(name)
    if base in int8:
        parts.append(f"int8 {int8[base]}")
    elif base in rules:
        rule = rules[base]
        parts.append(f"{rule} (generic fallback)" if rule in GENERIC_RULES else rule)
    elif tuned:
        parts.append("tuned")
    else:
        parts.append(other)
    if winograd:
        parts.append(f"F({winograd}x{winograd},3x3)" if "winograd" in parts[-1] else f"winograd F({winograd}x{winograd},3x3)")
    return " ".join(parts)


def node_labels(lowered: Any, width: int = 2) -> dict[str, str]:
    """{kernel group: its ONNX nodes, the first `width` named and "+N" more} of a
    lower.LoweredModule (tuning's progress bar names what it tunes with these)."""
    out = {}
    for group, nodes in lowered.group_nodes.items():
        names = [n.name or n.label() for n in nodes]
        if names:
            out[group] = ", ".join(names[:width]) + (f" +{len(names) - width}" if len(names) > width else "")
    return out


def kernel_map(mod: tvm.IRModule, lowered: Any, facts: Mapping[str, Mapping[str, Any]], *,
               rules: Mapping[str, str], int8: Mapping[str, str], tuned: bool,
               other: str = "unscheduled") -> list[dict[str, Any]]:
    """The manifest's `kernel_map` for `mod` (the module that is built: `main` calls the kernels)
    lowered as `lowered` (a lower.LoweredModule). See the module docstring."""
    groups: dict[str, list[Any]] = lowered.group_nodes
    blocked = set(lowered.blocked_groups)
    wino: dict[str, int] = lowered.winograd_convs  # node label → m

    def entry(kernel: str, group: str | None, role: str) -> dict[str, Any]:
        nodes = groups.get(group, []) if group else []
        f = facts.get(base_name(kernel), {})
        m = max((wino.get(n.label(), 0) for n in nodes), default=0) if role == "kernel" else 0
        return {"kernel": kernel, "group": group, "role": role,
                "nodes": [n.name or n.label() for n in nodes],
                "ops": sorted({n.op_type for n in nodes}, key=[n.op_type for n in nodes].index),
                "flops": f.get("flops", 0), "int8": bool(f.get("int8", False)),
                **({"dims": f["dims"]} if "dims" in f else {}),
                "schedule": schedule_label(kernel, group, rules=rules, int8=int8, tuned=tuned, blocked=blocked,
                                           block=lowered.block, winograd=m or None, other=other)}

    out: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # calls not yet charged to a group
    main = mod["main"]
    blocks = main.body.blocks if isinstance(main.body, relax.SeqExpr) else []
    for blk in blocks:
        for b in blk.bindings:
            v = b.value
            callee = None
            if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in _CALL_TIR:
                callee = v.args[0].name_hint
            group = lowered.bindings.get(str(b.var.name))
            if callee is not None and callee != base_name(callee):
                # (the prepacking rewrite re-emits these calls under fresh var names, which can
                # be another group's: the group that created the kernel is the one it computes)
                group = lowered.kernel_groups.get(base_name(callee))
            if callee is not None:
                own = base_name(callee)
                if own in groups:  # (a group's PrimFunc that an equal later group calls too)
                    e = entry(callee, group if group in groups and group not in lowered.inline_groups else own, "kernel")
                elif group is not None:
                    e = entry(callee, group, "inline" if group in lowered.inline_groups else "layout")
                else:
                    e = entry(callee, None, "layout")
                    pending.append(e)
                out.append(e)
            if group is not None and pending:
                role = "inline" if group in lowered.inline_groups else "layout"
                for e in pending:
                    e.update({k: v for k, v in entry(e["kernel"], group, role).items() if k != "kernel"})
                pending = []
    # kernels of the Relax functions a group's lowering created (the branches of a run-time If):
    # charged to that group, role "branch" (a run takes one branch: the others' do not run)
    for gv, f in mod.functions_items():
        group = lowered.kernel_groups.get(gv.name_hint)
        if gv.name_hint == "main" or not isinstance(f, relax.Function) or group is None:
            continue
        for callee in _kernel_calls(f):
            out.append({**entry(callee, group, "branch"), "function": gv.name_hint})
    return out


def _kernel_calls(func: relax.Function) -> list[str]:
    """The PrimFuncs `func` calls (call_tir), in the order its body is visited."""
    names: list[str] = []

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name in _CALL_TIR:
            names.append(e.args[0].name_hint)

    relax.analysis.post_order_visit(func.body, visit)
    return names

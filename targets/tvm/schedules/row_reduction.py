"""`RowReduction` (softmax, layer norm, mean over the last axis): one parallel loop over rows,
every step computed inside it, reductions rfactored into a vector of partial results."""

from __future__ import annotations

from typing import Any

from ..tir_match import static_int
from . import knobs
from .loop_marks import PEEL_LAST
from .base import ScheduleRule, fuse_parallel, inline_arg_copies, is_reduction, region_vars, root_block, root_parts, vars_in

__all__ = ["RowReduction"]


class RowReduction(ScheduleRule):
    """Kernels made of reductions over the innermost axis of rows and elementwise steps on the
    same rows (softmax, layer norm): one parallel loop over the rows with every block computed
    inside it, elementwise steps vectorised, each reduction split into `lanes` partial results
    (rfactor) accumulated as one vector and summed at the end. dlight's CPU Reduction ran each
    reduction as a serial chain of 128-768 dependent adds/maxes per row (softmax 12x128x128:
    3.7x onnxruntime's time).

    A static row length that is no multiple of the lanes (77 attention scores on 16 lanes;
    RAGGED_ROWS): `for k in range(77)` -> `for ko in range(5): for ki in vectorized(16): if
    ko*16+ki < 77`, for the reductions (partial results) and the elementwise steps alike, the
    last `ko` peeled (loop_marks.PEEL_LAST) so the whole vectors run without the predicate and
    only the last one keeps it. The partial results get the predicate back (`_guard_partials`):
    a shifted last vector (outer_product's SHIFT_SYMBOLIC_TILES) would count elements twice in a
    sum. Not for rows under one vector, nor for a symbolic length that is no multiple of the
    lanes (those keep scalar rows, see `_ragged`)."""

    name = "row-reduction"

    def apply(self, func, target, lanes):
        sch = self._apply(func, target, lanes)
        if sch is not None and knobs.current().vector_symbolic_rows:
            both = _whole_vector_rows(self, func, sch, target, lanes)
            if both is not None:
                return both
        return sch

    def _apply(self, func, target, lanes):
        from tvm import s_tir
        from tvm.tirx import IterVar

        if not knobs.current().row_reduction:
            return None
        sch = s_tir.Schedule(func)
        if knobs.current().inline_arg_copies:
            inline_arg_copies(sch, func)
        blocks = sch.get_child_blocks(root_block(sch))
        stmts = [sch.get(b) for b in blocks]
        reds = [st for st in stmts if is_reduction(st)]
        if not reds or is_reduction(stmts[-1]):
            return None
        for st in reds:
            kinds = [iv.iter_type for iv in st.iter_vars]
            if kinds.count(IterVar.CommReduce) != 1 or kinds[-1] != IterVar.CommReduce or len(st.writes) != 1:
                return None
            # a row reduction: the reduced axis indexes the last dimension of what it reads
            rv = st.iter_vars[-1].var
            block_vars = {iv.var for iv in st.iter_vars}
            if not any(region_vars(r, block_vars) and region_vars(r, block_vars)[-1] == {rv} for r in st.reads):
                return None
            if len({r.source.name for r in st.reads if not r.source.same_as(st.writes[0].source)}) > 1 and \
                    _mac_like(st):
                return None  # a matmul: not this rule's
        # one result per row: the reductions' spatial domain is the output's rows (x - mean(x) written
        # transposed would recompute every row's mean for each output row)
        out_rows = [static_int(sch.get(lp).extent) for lp in sch.get_loops(blocks[-1])[:-1]]
        out_rows = [e for e in out_rows if e != 1]
        for st in reds:
            dom = [e for e in (static_int(iv.dom.extent) for iv in st.iter_vars[:-1]) if e != 1]
            if dom != out_rows:
                return None
        # reductions: `lanes` partial results (rfactor) accumulated as one vector, summed at the end
        rf_blocks: list[Any] = []
        ragged_rf: list[tuple[Any, str]] = []
        for block in blocks:
            stmt = sch.get(block)
            if not is_reduction(stmt):
                continue
            k = sch.get_loops(block)[-1]
            if not _whole_vectors(sch.get(k).extent, lanes) and not _ragged(sch.get(k).extent, lanes):
                continue
            _rfactor(sch, block, lanes, rf_blocks, ragged_rf)
        blocks = sch.get_child_blocks(root_block(sch))
        last = blocks[-1]
        loops = sch.get_loops(last)
        if len(loops) < 2 or (static_int(sch.get(loops[-1]).extent) is None and not knobs.current().symbolic_rows):
            return None  # (a symbolic row length, softmax over S: rows parallel, not vectorised)
        row = _row_loop(sch, loops[:-1])
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, row, preserve_unit_loops=False)
        row_var = sch.get(row).loop_var  # (the For node itself is replaced as its body changes)
        rf_names = {sch.get(b).name_hint for b in rf_blocks}
        ragged_names = {sch.get(b).name_hint: n for b, n in ragged_rf}
        guards: list[tuple[str, str, str, str, str]] = []
        for name in [sch.get(b).name_hint for b in sch.get_child_blocks(root_block(sch))]:
            block = sch.get_sblock(name)
            stmt = sch.get(block)
            bl = sch.get_loops(block)
            pos = next((i for i, lp in enumerate(bl) if sch.get(lp).loop_var.same_as(row_var)), None)
            if pos is None or pos == len(bl) - 1:
                continue
            inner = bl[pos + 1:]
            if stmt.name_hint in rf_names:
                # its loops: the partial-result axis (spatial, `lanes`) innermost and vectorised
                spatial_loops = [lp for lp in inner if not _loop_is_reduce(sch, block, lp)]
                red_loops = [lp for lp in inner if _loop_is_reduce(sch, block, lp)]
                if len(spatial_loops) != 1 or len(red_loops) != 1:
                    continue
                sch.reorder(red_loops[0], spatial_loops[0])
                sch.vectorize(spatial_loops[0])
                init = sch.decompose_reduction(block, red_loops[0])
                sch.vectorize(sch.get_loops(init)[-1])
                if stmt.name_hint in ragged_names:
                    # whole vectors, then the predicated tail
                    sch.annotate(red_loops[0], *_tail_mark(ragged_names[stmt.name_hint]))
                    ko, ki = sch.get(red_loops[0]).loop_var, sch.get(spatial_loops[0]).loop_var
                    guards.append((sch.get(block).name_hint, _binding_index(sch, block, ko),
                                   _binding_index(sch, block, ki), str(ko.ty), ragged_names[stmt.name_hint]))
            elif not is_reduction(stmt):
                ext = sch.get(inner[-1]).extent
                ragged = not _whole_vectors(ext, lanes) and _ragged(ext, lanes)
                if not _whole_vectors(ext, lanes) and not ragged:
                    continue
                vo, vi = sch.split(inner[-1], factors=[None, lanes])
                sch.vectorize(vi)
                if ragged:
                    sch.annotate(vo, *_tail_mark(_bound_text(ext)))
        sch = _guard_partials(sch, guards, lanes) if guards else sch
        if any(not n.isdigit() for n in ragged_names.values()):
            sch = _symbolic_tails(sch, row_var.name, next(n for n in ragged_names.values() if not n.isdigit()), lanes)
        return sch


def _whole_vectors(extent: Any, lanes: int) -> bool:
    """Whether a row of `extent` is a whole number of vectors, at least two: a static multiple of
    `lanes`, or a symbolic one (`S_vec * lanes`, the specialised branch of `_whole_vector_rows`)."""
    import tvm

    ext = static_int(extent)
    if ext is not None:
        return ext % lanes == 0 and ext >= 2 * lanes
    ms = tvm.sym.Analyzer().modular_set(extent)
    return int(ms.base) == 0 and int(ms.coeff) > 0 and int(ms.coeff) % lanes == 0


def _rfactor(sch: Any, block: Any, lanes: int, rf_blocks: list[Any], ragged_rf: list[tuple[Any, str]]) -> None:
    """The reduction `block` over its innermost loop split by `lanes` and rfactored into a vector of
    partial results (appended to `rf_blocks`; to `ragged_rf` with the row length too where the
    split is predicated)."""
    k = sch.get_loops(block)[-1]
    whole = _whole_vectors(sch.get(k).extent, lanes)
    n = "" if whole else _bound_text(sch.get(k).extent)
    _, ki = sch.split(k, factors=[None, lanes])
    rf_blocks.append(sch.rfactor(ki, factor_axis=len(sch.get(block).writes[0].region)))
    if not whole:
        ragged_rf.append((rf_blocks[-1], n))


def _binding_index(sch: Any, block: Any, loop_var: Any) -> int:
    """The position, among `block`'s axis bindings, of the one bound to `loop_var` alone."""
    import tvm_ffi

    realize = tvm_ffi.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    return next(i for i, v in enumerate(realize.iter_values) if v.same_as(loop_var))


def _guard_partials(sch: Any, guards: list[tuple[str, int, int, str, str]], lanes: int) -> Any:
    """The split predicate `ko * lanes + ki < n` put back on the rfactor blocks of ragged rows:
    TVM 0.27's rfactor drops it (the last vector's partial results then read past the row: wrong
    sums and maxima). The rewrite is made on the TVMScript text (no schedule primitive adds a
    predicate): the `T.where` goes after the block's axis bindings. The loop names are read from
    the printed bindings (`T.axis.remap("SSR", [ax0_1, ax0, ax1])`), by position: the printer
    renames a loop whose name an enclosing loop has (the row loop `ax0` around a lane loop also
    named `ax0`), and the name before printing then named the row loop (wrong softmax sums)."""
    import re

    import tvm
    from tvm import s_tir

    lines = sch.mod["main"].script().split("\n")
    for name, ko_at, ki_at, dtype, n in guards:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == f'with T.sblock("{name}"):')
        j, bound = start + 1, []
        while re.match(r"^\s*[\w, ]+ = T\.axis\.", lines[j]):
            remap = re.match(r'^\s*[\w, ]+ = T\.axis\.remap\("\w+", \[([\w, ]+)\]\)$', lines[j])
            one = re.match(r"^\s*\w+ = T\.axis\.\w+\(.*, (\w+)\)$", lines[j])
            bound += [v.strip() for v in remap.group(1).split(",")] if remap else [one.group(1) if one else ""]
            j += 1
        ko, ki = (bound[k] if k < len(bound) else "" for k in (ko_at, ki_at))
        if not (ko and ki):
            raise ValueError(f"ragged rows: the loops bound in {name} are not readable from its TVMScript")
        ind = lines[start + 1][: len(lines[start + 1]) - len(lines[start + 1].lstrip())]
        num = (lambda v: f"T.{dtype}({v})") if dtype in ("int64", "int32") else str
        lines.insert(j, f"{ind}T.where({ko} * {num(lanes)} + {ki} < {num(n) if n.isdigit() else n})")
    return s_tir.Schedule(tvm.script.from_source("\n".join(lines)))


def _ragged(extent: Any, lanes: int) -> bool:
    """Whether a row of `extent` that is no whole number of vectors is split anyway into whole
    vectors and a predicated last one (RAGGED_ROWS): a static length over one vector, or a bare
    symbolic length S (the `else` branch of `_whole_vector_rows`, S % lanes != 0; its tails are
    made by `_symbolic_tails`)."""
    from tvm import tirx

    if not knobs.current().ragged_rows:
        return False
    ext = static_int(extent)
    if ext is None:
        return isinstance(extent, tirx.Var) and knobs.current().ragged_symbolic_rows
    return ext > lanes and ext % lanes != 0


#: loop annotation of a symbolic ragged row's vector loop (`_symbolic_tails` rewrites it)
RAGGED_TAIL = "graphopt.ragged_tail"


def _tail_mark(bound: str) -> tuple[str, int]:
    """The annotation of a ragged row's vector loop: a static row's last vector peeled by
    loop_marks (PEEL_LAST), a symbolic one's split off by `_symbolic_tails`."""
    return (PEEL_LAST, 1) if bound.isdigit() else (RAGGED_TAIL, 1)


def _symbolic_tails(sch: Any, row: str, name: str, lanes: int) -> Any:
    """A symbolic ragged row S's loops after scheduling, on the TVMScript text:

    - a producer computed at the row loop over the split's padded range (softmax's exp: `for ax0
      in range(max(1, ceil(S/l)*l) - min(0, ceil(S/l)*l - 1))` guarded by `0 <= i < S`) is the row
      itself, `range(S)` (equal for every S >= 0), and gets split into vectors too;
    - every loop marked RAGGED_TAIL, `for ko in range(ceil(S / l))` whose body is guarded by
      `ko * l + ki < S`, becomes `for ko in range(S // l)` without the guards (whole vectors:
      ko * l + ki <= S - 1) then the tail: for the partial results of a reduction the guarded
      `for ko in range(S // l, ceil(S / l))` (a shifted vector would count elements twice), for
      an elementwise step (exp, normalise) one whole vector shifted back to end at S (it writes
      the values the vector before wrote again; the guarded loop where S < l). A guarded tail of
      scalar exps left the S = 77 softmax no faster than the scalar rows.

    TVM's arithmetic proves neither (the split guard stays on every vector and the vectoriser
    scalarises it; the producer's padded range is no vector loop)."""
    import re

    import tvm
    from tvm import s_tir

    L = f"T.int64({lanes})"
    ceil = f"({name} + T.int64({lanes - 1})) // {L}"
    text = sch.mod["main"].script()
    text = text.replace(f"T.min(T.int64(0), {ceil} * {L} - T.int64(1))", "T.int64(0)")
    text = text.replace(f"T.max(T.int64(1), {ceil} * {L})", name)
    sch = s_tir.Schedule(tvm.script.from_source(text))
    row_loops = [lp for b in sch.get_child_blocks(root_block(sch)) for lp in sch.get_loops(b)
                 if sch.get(lp).loop_var.name == row]
    for block in sch.get_child_blocks(root_block(sch)):
        st = sch.get(block)
        loops = sch.get_loops(block)
        if is_reduction(st) or not loops or not row_loops:
            continue
        inner = sch.get(loops[-1])
        if str(inner.extent) != name or not any(sch.get(lp).loop_var.name == row for lp in loops[:-1]) \
                or inner.kind != tvm.tirx.ForKind.SERIAL:
            continue
        vo, vi = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(vi)
        sch.annotate(vo, RAGGED_TAIL, 1)
    scalar = [sch.get(b).name_hint for b in sch.get_child_blocks(root_block(sch))
              if not is_reduction(sch.get(b)) and sch.get_loops(b)
              and any(sch.get(lp).loop_var.name == row for lp in sch.get_loops(b)[:-1])
              and sch.get(sch.get_loops(b)[-1]).kind == tvm.tirx.ForKind.SERIAL]
    if scalar:  # (nothing silent: the printed forms this rewrite expects were not there)
        import warnings

        warnings.warn(f"row reduction over the symbolic length {name}: step(s) {', '.join(scalar)} stay scalar "
                      "(their padded loop is not in a form the ragged-row rewrite knows)", stacklevel=2)
    lines = sch.mod["main"].script().split("\n")
    head = re.compile(rf'^(\s*)for (\w+) in T\.serial\((.+), annotations=\{{"{RAGGED_TAIL}": 1\}}\):$')
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = head.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        ind, var, ext = m.group(1), m.group(2), m.group(3)
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(ind)):
            j += 1
        body = lines[i + 1:j]
        idx = rf"{var} \* {re.escape(L)} \+ \w+"
        term = re.compile(rf"^(T\.int64\(0\) <= {idx}|{idx} < {name})$")

        def split_guard(ln: str, _term: Any = term) -> bool:  # every conjunct: 0 <= ko * l + ki, ko * l + ki < S
            m = re.match(r"^\s*T\.where\((.*)\)$", ln)
            return m is not None and all(_term.match(t.strip()) for t in m.group(1).split(" and "))

        whole = [ln for ln in body if not split_guard(ln)]
        out.append(f"{ind}for {var} in range({name} // {L}):")
        out += whole
        shifted = [re.sub(rf"\b{var} \* {re.escape(L)}", f"({name} - {L})", ln) for ln in whole]
        if any("T.axis.reduce" in ln for ln in body) or any(re.search(rf"\b{var}\b", ln) for ln in shifted):
            out.append(f"{ind}for {var} in range({name} // {L}, {ext}):")  # partial results: the guarded tail
            out += body
        else:  # an elementwise step: the last vector shifted back to end at S (recomputes equal values)
            out.append(f"{ind}if {name} % {L} != T.int64(0) and {name} >= {L}:")
            out += ["    " + ln for ln in shifted]
            out.append(f"{ind}elif {name} < {L}:")
            out.append(f"{ind}    for {var} in range({ext}):")
            out += ["    " + ln for ln in body]
        i = j
    return s_tir.Schedule(tvm.script.from_source("\n".join(out)))


def _bound_text(extent: Any) -> str:
    """A row length as the split predicate's TVMScript writes it: digits, or the variable's name."""
    ext = static_int(extent)
    return str(ext) if ext is not None else str(extent.name)


def _whole_vector_rows(rule: "RowReduction", func: Any, scalar: Any, target: Any, lanes: int) -> Any:
    """A row length that is a bare symbolic S (softmax over [N, h, S, S]): the kernel scheduled
    twice, `if S % lanes == 0: <rows as S_vec * lanes: rfactor into a vector of partial results,
    vectorised steps> else: <scalar rows>`, where a fixed S gets one or the other at compile time
    (at S = 128 the scalar softmax ran 6x the fixed-shape kernel). The vector branch is the rule
    applied to the kernel with S written S_vec * lanes, then S_vec read back as S // lanes (its
    buffers renamed). None (keep `scalar`) where the row length is not a bare variable, the vector
    branch did not vectorise, or the TVMScript does not parse back. (A ragged S is not split with
    a predicate: TVM 0.27's rfactor drops it, wrong sums; loop_partition refuses symbolic extents.)"""
    import re

    import tvm
    from tvm import s_tir, tirx

    out = func.params[-1]
    shape = getattr(out, "shape", None)
    if shape is None and hasattr(func, "buffer_map") and out in func.buffer_map:
        shape = func.buffer_map[out].shape
    if not shape or not isinstance(shape[-1], tirx.Var):
        return None
    name = shape[-1].name
    src = func.script()
    vname = f"{name}_vec"
    if re.search(rf"\b{vname}\b", src) or not re.search(rf'^{name} = TypeVar\("{name}"\)$', src, re.M):
        return None
    dtype = str(shape[-1].ty)
    whole = f"T.{dtype}({lanes})" if dtype in ("int64", "int32") else None
    if whole is None:
        return None
    spec = re.sub(rf'^{name} = TypeVar\("{name}"\)$', f'{vname} = TypeVar("{vname}")', src, flags=re.M)
    spec = re.sub(rf"(?<![\w.\"]){name}(?![\w\"])", f"({vname} * {whole})", spec.replace(f'{vname} = TypeVar("{vname}")', "@@DECL@@"))
    spec = spec.replace("@@DECL@@", f'{vname} = TypeVar("{vname}")')
    try:
        vec = rule._apply(tvm.script.from_source(spec), target, lanes)
    except Exception:  # noqa: BLE001 - the vector branch is an extra: keep the scalar kernel
        return None
    if vec is None:
        return None
    vtext = vec.mod["main"].script()
    if "T.vectorized(" not in vtext or "_rf" not in vtext:
        return None

    s_parts, v_parts = root_parts(scalar.mod["main"].script()), root_parts(vtext)
    if s_parts is None or v_parts is None:
        return None
    s_body = [ln for c in s_parts[2] for ln in c]
    v_allocs, v_body = v_parts[1], "\n".join(ln for c in v_parts[2] for ln in c)
    for ln in v_parts[1]:
        buf = ln.split("=", 1)[0].strip()
        v_allocs = [re.sub(rf"\b{buf}\b", f"{buf}_vec", a) for a in v_allocs]
        v_body = re.sub(rf"\b{buf}\b", f"{buf}_vec", v_body)
    back = f"({name} // {whole})"
    v_allocs = [re.sub(rf"\b{vname}\b", back, a) for a in v_allocs]
    v_body = re.sub(rf"\b{vname}\b", back, v_body)
    head = [ln for ln in s_parts[0] if ln != f'{vname} = TypeVar("{vname}")']
    text = "\n".join(head + s_parts[1] + v_allocs
                      + [f"    if {name} % {whole} == T.{dtype}(0):"] + ["    " + ln for ln in v_body.split("\n")]
                      + ["    else:"] + ["    " + ln for ln in s_body])
    try:
        both = tvm.script.from_source(text)
    except Exception:  # noqa: BLE001 - TVMScript that does not parse back: the scalar kernel
        return None
    return s_tir.Schedule(both)


def _row_loop(sch, rows: list) -> Any:
    """The loop every step is computed at: the row loops fused into one parallel loop, except
    where a symbolic row loop would be fused with others (softmax over [N, h, S, S]: h x S rows).
    There the row index is recovered as fused // S and fused % S, the compacted per-row buffers
    lose their bound (every row allocated the whole [h, S, S] exp buffer: a 128-token softmax
    ran 16x its fixed-shape time), so the outer static loop is parallel and the rows serial in it."""
    lead = 0
    while lead < len(rows) - 1 and static_int(sch.get(rows[lead]).extent) is None:
        lead += 1
    rest = rows[lead:]
    if len(rest) > 1 and any(static_int(sch.get(lp).extent) is None for lp in rest):
        static = [lp for lp in rest if static_int(sch.get(lp).extent) is not None]
        first_sym = next(i for i, lp in enumerate(rest) if static_int(sch.get(lp).extent) is None)
        if knobs.current().symbolic_row_loops and first_sym > 0 and static:
            outer = rest[:first_sym]
            par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(par)
            inner = rest[first_sym:]
            return sch.fuse(*inner) if len(inner) > 1 else inner[0]
    return fuse_parallel(sch, rows)


def _is_reduce_iv(iv) -> bool:
    from tvm.tirx import IterVar

    return iv.iter_type == IterVar.CommReduce


def _loop_is_reduce(sch, block, loop) -> bool:
    """Whether `loop` drives a reduction iter var of `block` (that var's binding uses the loop var)."""
    import tvm_ffi

    stmt = sch.get(block)
    realize = tvm_ffi.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    lv = sch.get(loop).loop_var
    return any(_is_reduce_iv(iv) and lv in vars_in(val) for iv, val in zip(stmt.iter_vars, realize.iter_values))


def _mac_like(stmt) -> bool:
    """`acc = acc + x[..] * y[..]` (casts allowed): a matmul/conv, not a sum of squares of
    differences (layer norm's variance)."""
    from tvm import tirx

    def load(e: Any) -> bool:
        while isinstance(e, tirx.Cast):
            e = e.value
        return type(e).__name__ in ("BufferLoad", "TensorLoad")

    v = getattr(stmt.body, "value", None)
    if not isinstance(v, tirx.Add):
        return False
    mul = v.b if load(v.a) else v.a
    return isinstance(mul, tirx.Mul) and load(mul.a) and load(mul.b)

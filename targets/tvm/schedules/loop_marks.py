"""Loop rewrites a schedule asks for with annotations and the build applies after scheduling
(`apply_loop_marks_to_module`: the cpu build and tuning's builder): the ragged last pixel tile
peeled into code of its own (`PEEL_LAST`), a conv's row passes bounded per kernel row
(`ROW_PASS`). TVM's schedule primitives cannot express either."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

__all__ = ["PEEL_BOUND", "PEEL_LAST", "ROW_PASS", "apply_loop_marks", "apply_loop_marks_to_module"]

#: loop annotation: the loop's last iteration becomes a copy of the body of its own (see
#: `apply_loop_marks`)
PEEL_LAST = "graphopt.peel_last"
#: loop annotations of a conv's row passes (ConvTile.row_passes): "kh" on the kernel-row loop,
#: "lo,hi;lo,hi;..." (per kernel row, `row_tile_ranges`) on the pixel-tile loop inside it
ROW_PASS = "graphopt.row_pass"
#: loop annotation beside PEEL_LAST (whose value is then the tile's pixel count) on a symbolic
#: tile loop: the split extent, as TVMScript text; the whole tiles' copy drops its split predicates
PEEL_BOUND = "graphopt.peel_bound"


def apply_loop_marks(func: "tvm.tirx.PrimFunc") -> "tvm.tirx.PrimFunc":
    """Rewrite the loops a schedule marked (the build and the tuning builder run this after
    scheduling; unmarked functions come back as they are):

    - PEEL_LAST: `for v in range(n)` → `for v in range(n - 1)` + `for v in range(n - 1, n)`,
      the body twice. A ragged pixel tile (3-pixel tiles over 7 columns) is a predicated copy of
      the whole tile; with the last iteration apart, lowering proves the predicates of the whole
      tiles true and folds the ragged tile's to constants once its pixel loop is unrolled, so
      neither keeps a condition per FMA (which kept the accumulators in memory).
    - ROW_PASS: the pixel-tile loop `for t in range(n)` inside the kernel-row loop `kh` →
      `for t in range(lo[kh], hi[kh])`: the tiles whose input rows for that kernel row are all
      padding are skipped (they would add zeros).

    Marked loops nested in marked loops (a matmul's column and row tiles over a symbolic length,
    outer_product) are rewritten pass by pass, the outer first: each pass copies the inner loop
    with its marks into every part of the outer one. A marked symbolic loop that is parallel stays
    parallel in every copy.

    apache-tvm 0.27's Python API has no statement mutator, its loop_partition primitive crashes
    on these nests and loop bounds cannot depend on an outer loop in a schedule, so the rewrite
    is made on the function's TVMScript text and parsed back."""
    import tvm

    text = func.script()
    if PEEL_LAST not in text and ROW_PASS not in text:
        return func
    for _ in range(8):  # (one pass per level of nested marks; two in practice)
        new = _apply_marks_once(text)
        if new == text:
            break
        text = new
        if PEEL_LAST not in text and ROW_PASS not in text:
            break
    return tvm.script.from_source(text)


def _apply_marks_once(text: str) -> str:
    """One pass of `apply_loop_marks` over a kernel's TVMScript: every marked loop not inside
    another marked loop rewritten (the copies of its body keep the marks of loops inside)."""
    import re

    lines = text.split("\n")
    out: list[str] = []
    i = 0
    head = re.compile(r"^(\s*)for (\w+) in T\.serial\((T\.int64\()?(\d+)\)?, annotations=\{([^}]*)\}\):$")
    sym_head = re.compile(r"^(\s*)for (\w+) in T\.(serial|parallel)\((.+), annotations=\{([^}]*)\}\):$")
    row_var = None
    while i < len(lines):
        mt = head.match(lines[i])
        ms = sym_head.match(lines[i]) if mt is None else None
        if ms is not None and PEEL_LAST in ms.group(5):  # a symbolic tile count (a conv on a symbolic map)
            ind, var, kind, n_expr = ms.group(1), ms.group(2), ms.group(3), ms.group(4)
            one = "T.int64(1)" if "T.int64" in n_expr else "1"
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(ind)):
                j += 1
            body = lines[i + 1 : j]
            split = _symbolic_split(ms.group(5))
            if split is None:
                out.append(f"{ind}for {var} in range({n_expr} - {one}):")
                out += body
                out.append(f"{ind}for {var} in range({n_expr} - {one}, {n_expr}):")
                out += body
            else:
                out += _shift_last_tile(text, out, body, ind, var, n_expr, *split, parallel=kind == "parallel")
            i = j
            continue
        if mt is None or (PEEL_LAST not in mt.group(5) and ROW_PASS not in mt.group(5)):
            out.append(lines[i])
            i += 1
            continue
        ind, var, n = mt.group(1), mt.group(2), int(mt.group(4))
        ty = "T.int64" if mt.group(3) else ""
        num = (lambda v: f"{ty}({v})") if ty else str
        if ROW_PASS in mt.group(5):
            value = re.search(rf'"{ROW_PASS}": "([^"]*)"', mt.group(5))
            assert value is not None, mt.group(5)
            if value.group(1) == "kh":
                row_var = var
                out.append(f"{ind}for {var} in range({num(n)}):")
            else:
                assert row_var is not None, "a ROW_PASS tile loop outside a marked kernel-row loop"
                ranges = [tuple(int(v) for v in r.split(",")) for r in value.group(1).split(";")]

                def pick(k: int, _ranges=ranges) -> str:  # the bound for the value of row_var
                    expr = num(_ranges[-1][k])
                    for kh in range(len(_ranges) - 2, -1, -1):
                        expr = f"T.Select({row_var} == {num(kh)}, {num(_ranges[kh][k])}, {expr})"
                    return expr

                out.append(f"{ind}for {var} in range({pick(0)}, {pick(1)}):")
            i += 1
            continue
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(ind)):
            j += 1
        body = lines[i + 1 : j]
        last = body
        if n > 1 and _tiles_apart(text, out, body, var):
            body, last = _local_per_part(text, out, [body, body], "1")
        if n > 1:
            out.append(f"{ind}for {var} in range({num(n - 1)}):")
            out += body
        out.append(f"{ind}for {var} in range({num(n - 1)}, {num(n)}):")
        out += last
        i = j
    return "\n".join(out)


def _symbolic_split(annotations: str) -> tuple[int, str] | None:
    """(rt, bound) of a symbolic tile loop marked with PEEL_LAST = rt and PEEL_BOUND = bound."""
    import re

    rt = re.search(rf'"{PEEL_LAST}": (\d+)', annotations)
    bound = re.search(rf'"{PEEL_BOUND}": "([^"]*)"', annotations)
    if rt is None or bound is None or int(rt.group(1)) < 2:
        return None
    return int(rt.group(1)), bound.group(1)


def _shift_last_tile(text: str, out: list[str], body: list[str], ind: str, var: str, n_expr: str, rt: int,
                     bound: str, parallel: bool = False) -> list[str]:
    """The symbolic tile loop `for var in range(n)` (n = ceildiv(bound, rt), bound symbolic) as

        if rt <= bound:                  # every tile whole, the last one shifted back to end at bound
            for var in range(n):
                body[var * rt := min(var * rt, bound - rt)], the split predicates dropped
        else:                            # a map narrower than one tile: the predicated tile
            for var in range(n):
                body

    The split predicates `var * rt + inner < bound` kept a branch around each FMA and the
    accumulators in memory (TVM's arithmetic cannot prove them over a symbolic bound, where a
    static row peels its ragged tile, `apply_loop_marks`). The shifted last tile recomputes up
    to rt - 1 pixels of the tile before it, with the same code, so it writes the same values
    again. Local buffers used only inside the loop get a copy per branch (`_local_per_part`), so
    each is compacted to one tile, which LLVM keeps in registers. Only predicates written exactly
    so are dropped; a body that uses `var` otherwise than as `var * rt` is left as it was.
    `parallel`: the loop was parallel; every copy of it is."""
    import re

    k = f"(?:T\\.int64\\({rt}\\)|{rt})"
    v = re.escape(var)
    # the conjuncts that hold on every tile: the split's `var * rt + inner < bound`, and the
    # write-back's `var - n < 0` (from its loop's range)
    true = [re.compile(rf"{v} \* {k} \+ \w+ < {re.escape(bound)}"), re.compile(rf"{v} - {re.escape(n_expr)} < (T\.int64\(0\)|0)")]
    ty = "T.int64" if "T.int64" in n_expr or "T.int64" in bound else ""
    rt_s = f"{ty}({rt})" if ty else str(rt)
    tile = re.compile(rf"\b{v} \* {k}")
    kept = [ln for ln in (_drop_conjuncts(ln, true) for ln in body) if ln is not None]
    loop = f"T.parallel({n_expr})" if parallel else f"range({n_expr})"
    if any(re.search(rf"\b{v}\b", tile.sub("", ln)) for ln in kept) or not _locals_inside(text, out, body):
        return [f"{ind}for {var} in {loop}:", *body]
    whole = [tile.sub(f"T.min({var} * {rt_s}, {bound} - {rt_s})", ln) for ln in kept]
    whole, ragged = _local_per_part(text, out, [whole, body], rt_s)
    return [f"{ind}if {rt_s} <= {bound}:", f"{ind}    for {var} in {loop}:", *("    " + ln for ln in whole),
            f"{ind}else:", f"{ind}    for {var} in {loop}:", *("    " + ln for ln in ragged)]


def _drop_conjuncts(line: str, true: list[Any]) -> str | None:
    """`line` without the conjuncts of its `T.where(...)` that one of the patterns `true` matches
    whole; None where none is left (no predicate); other lines as they are."""
    import re

    mw = re.match(r"^(\s*)T\.where\((.*)\)$", line)
    if mw is None:
        return line
    terms, depth, cur = [], 0, ""
    for tok in re.split(r"( and |[()])", mw.group(2)):
        if tok == " and " and depth == 0:
            terms.append(cur)
            cur = ""
            continue
        depth += (tok == "(") - (tok == ")")
        cur += tok
    terms.append(cur)
    left = [t for t in terms if not any(p.fullmatch(t.strip()) for p in true)]
    if not left:
        return None
    return line if len(left) == len(terms) else f"{mw.group(1)}T.where({' and '.join(left)})"


def _tiles_apart(text: str, out: list[str], body: list[str], var: str) -> bool:
    """Whether the copies of a static peeled loop's `body` can each have local buffers of their
    own (`_local_per_part`): every local buffer the body uses is used nowhere else
    (`_locals_inside`), and `var` is bound only to spatial block axes in it (each iteration
    computes elements of its own: a conv's pixel tile, which starts its accumulators afresh; not
    a reduction's chunk loop, whose partial sums carry from one iteration to the next). Why: with
    one buffer shared by the whole tiles and the peeled last one, the buffer's place is above the
    tile loop and it is compacted to the whole row (a ragged 8x1 tile over a flat 56x56 map:
    3138 accumulator vectors, a 200 KB heap workspace per row instead of 8 vectors in registers:
    every tuned variant with a ragged tile ran so)."""
    import re

    if not _locals_inside(text, out, body):
        return False
    v = re.compile(rf"\b{re.escape(var)}\b")
    remap = re.compile(r'T\.axis\.remap\("([SR]+)", \[([^\]]*)\]\)')
    for ln in body:
        if "T.axis.reduce(" in ln and v.search(ln):
            return False
        for kinds, names in remap.findall(ln):
            if any(k == "R" and v.search(x) for k, x in zip(kinds, names.split(","))):
                return False
    return True


def _locals_inside(text: str, out: list[str], body: list[str]) -> bool:
    """Whether every local buffer `body` uses is used nowhere else: the shifted last tile
    recomputes pixels of the tile before it, right only where each tile starts its accumulators
    afresh (a conv whose reduction runs in chunks keeps all the row's accumulators in one local
    buffer across the tiles: the overlap would be added twice)."""
    import re

    decl = re.compile(r"^\s*(\w+) = T\.sblock_alloc_buffer\(.*scope=\"local\"\)$")
    for ln in out:
        md = decl.match(ln)
        if md is None:
            continue
        word = re.compile(rf"\b{md.group(1)}\b")
        in_body = sum(len(word.findall(x)) for x in body)
        if in_body and len(word.findall(text)) != in_body + 1:
            return False
    return True


def _local_per_part(text: str, out: list[str], parts: list[list[str]], rt_s: str) -> list[list[str]]:
    """`parts` (copies of one loop body) with each local buffer that only the body uses renamed
    per copy (`NAME_p0`, `NAME_p1`, ...), its allocation line in `out` replaced by one per copy
    whose symbolic dims are declared at least `rt_s` (`_at_least`)."""
    import re

    decl = re.compile(r"^(\s*)(\w+) = T\.sblock_alloc_buffer\((.*)scope=\"local\"\)$")
    for at in reversed(range(len(out))):
        ln = out[at]
        md = decl.match(ln)
        if md is None:
            continue
        name = md.group(2)
        word = re.compile(rf"\b{name}\b")
        in_body = sum(len(word.findall(x)) for x in parts[-1])
        if not in_body or len(word.findall(text)) != in_body + 1:  # (used outside the loop too)
            continue
        ln = _at_least(ln, rt_s)
        out[at : at + 1] = [word.sub(f"{name}_p{p}", ln, count=1) for p in range(len(parts))]
        parts = [[word.sub(f"{name}_p{p}", x) for x in part] for p, part in enumerate(parts)]
    return parts


def _at_least(decl: str, rt_s: str) -> str:
    """A buffer allocation line with each symbolic dim `e` of its shape declared `T.max(e, rt_s)`:
    compacting a buffer takes the smaller of the region a tile touches and the declared dim, and
    min(12, max(e, 12)) folds to 12 where min(12, e) stays symbolic (a heap workspace). Declaring
    a larger dim is safe: the accesses stay inside the smaller one."""
    import re

    start = decl.index("T.sblock_alloc_buffer((") + len("T.sblock_alloc_buffer((")
    depth, dims, cur, end = 0, [], "", start
    for end in range(start, len(decl)):
        ch = decl[end]
        if ch == ")" and depth == 0:
            break
        if ch == "," and depth == 0:
            dims.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        cur += ch
    dims.append(cur.strip())
    static = re.compile(r"^(T\.int64\(\d+\)|\d+)$")
    dims = [d if not d or static.match(d) else f"T.max({d}, {rt_s})" for d in dims]
    return decl[:start] + ", ".join(d for d in dims if d) + decl[end:]


def apply_loop_marks_to_module(mod: "tvm.IRModule") -> "tvm.IRModule":
    """`apply_loop_marks` on every PrimFunc of `mod` (the build and the tuning builder run it
    after scheduling)."""
    import tvm

    changed = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            g = apply_loop_marks(f)
            if g is not f:
                changed[gv] = g.with_attrs(f.attrs) if f.attrs is not None else g
    if not changed:
        return mod
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions_items()))
    for gv, f in changed.items():
        mod.update_func(gv, f)
    return mod

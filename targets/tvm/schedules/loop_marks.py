"""Loop rewrites a schedule asks for with annotations and the build applies after scheduling
(`apply_loop_marks_to_module`: the cpu build and tuning's builder): the ragged last pixel tile
peeled into code of its own (`PEEL_LAST`), a conv's row passes bounded per kernel row
(`ROW_PASS`). TVM's schedule primitives cannot express either."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tvm

__all__ = ["PEEL_LAST", "ROW_PASS", "apply_loop_marks", "apply_loop_marks_to_module"]

#: loop annotation: the loop's last iteration becomes a copy of the body of its own (see
#: `apply_loop_marks`)
PEEL_LAST = "graphopt.peel_last"
#: loop annotations of a conv's row passes (ConvTile.row_passes): "kh" on the kernel-row loop,
#: "lo,hi;lo,hi;..." (per kernel row, `row_tile_ranges`) on the pixel-tile loop inside it
ROW_PASS = "graphopt.row_pass"


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

    apache-tvm 0.27's Python API has no statement mutator, its loop_partition primitive crashes
    on these nests and loop bounds cannot depend on an outer loop in a schedule, so the rewrite
    is made on the function's TVMScript text and parsed back."""
    import re

    import tvm

    text = func.script()
    if PEEL_LAST not in text and ROW_PASS not in text:
        return func
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    head = re.compile(r"^(\s*)for (\w+) in T\.serial\((T\.int64\()?(\d+)\)?, annotations=\{([^}]*)\}\):$")
    sym_head = re.compile(r"^(\s*)for (\w+) in T\.serial\((.+), annotations=\{([^}]*)\}\):$")
    row_var = None
    while i < len(lines):
        mt = head.match(lines[i])
        ms = sym_head.match(lines[i]) if mt is None else None
        if ms is not None and PEEL_LAST in ms.group(4):  # a symbolic tile count (a conv on a symbolic map)
            ind, var, n_expr = ms.group(1), ms.group(2), ms.group(3)
            one = "T.int64(1)" if "T.int64" in n_expr else "1"
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > len(ind)):
                j += 1
            body = lines[i + 1 : j]
            out.append(f"{ind}for {var} in range({n_expr} - {one}):")
            out += body
            out.append(f"{ind}for {var} in range({n_expr} - {one}, {n_expr}):")
            out += body
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
        if n > 1:
            out.append(f"{ind}for {var} in range({num(n - 1)}):")
            out += body
        out.append(f"{ind}for {var} in range({num(n - 1)}, {num(n)}):")
        out += body
        i = j
    return tvm.script.from_source("\n".join(out))


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

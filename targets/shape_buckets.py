"""Shape buckets of the cpu target: kernels specialised for sizes the user names, beside the
symbolic kernels that serve every other size.

    cpu{buckets=H:320,640,960;W:320,640}

compiles the model once with its dims symbolic (as without buckets) and once per combination of
the named sizes (here 3 x 2 = 6) with those dims fixed, into one artifact: each bucket's library
and weights sit beside the symbolic ones (`bucket_H320_W640.so`, its params file when its packed
weights differ), its manifest inside the main one (`buckets.entries[i].manifest`). At run time
graphopt.runtime picks the bucket whose sizes equal the input's; any other size runs the symbolic
kernels (`Runner.last_dispatch` says which ran, and graphopt-run prints it).

Dispatch is by exact match, never by padding to a larger bucket: padding is exact only where no
op reads the padded border into the true region, and nearly every model has one that does. A
conv's zero padding equals the added zeros only for the first conv: after its bias, BatchNorm or
activation the border is no longer zero, and the next window (conv, pooling) reads it into the
true region's last rows and columns; MaxPool pads with -inf, not 0; GlobalAveragePool and
ReduceMean divide by the padded area; Resize maps coordinates through the input size; a
recurrence or attention over a padded axis runs extra steps (and a reverse direction starts in
the padding). `padding_note` names the first such node of the model, recorded in the manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

from graphopt.errors import UsageError
from graphopt.ir import Model

#: combinations of bucket sizes one artifact may hold (each a full compile of the model)
MAX_BUCKETS = 16

_SYNTAX = "expected DIM:SIZE,SIZE,...;DIM:SIZE,..., e.g. buckets=H:320,640;W:320,640"

#: ops that read a padded border into the true region, or whose result depends on the padded size
_LEAKS = {
    "GlobalAveragePool": "averages over the padded area",
    "GlobalMaxPool": "takes the maximum over the padded area",
    "GlobalLpPool": "pools over the padded area",
    "ReduceMean": "averages over the padded area",
    "Resize": "maps coordinates through the input size",
    "Upsample": "maps coordinates through the input size",
    "LSTM": "runs extra steps over the padding (and a reverse direction starts in it)",
    "GRU": "runs extra steps over the padding",
    "RNN": "runs extra steps over the padding",
    "Softmax": "normalises over the padding",
    "LayerNormalization": "normalises over the padding",
    "InstanceNormalization": "normalises over the padded area",
    "Reshape": "mixes the padded axis into others",
    "Flatten": "mixes the padded axis into others",
    "MatMul": "sums over a padded axis",
}
_WINDOWS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv"}


def parse_buckets(text: str) -> dict[str, list[int]]:
    """`H:320,640;W:320` -> {"H": [320, 640], "W": [320]}; UsageError (one line) on bad syntax."""
    where = f"target cpu: buckets={text!r}"
    out: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, colon, sizes = (x.strip() for x in part.partition(":"))
        if not colon or not re.fullmatch(r"[A-Za-z_][\w.\-]*", name):
            raise UsageError(f"{where}: {part!r} is not DIM:SIZE,... ({_SYNTAX})")
        if name in out:
            raise UsageError(f"{where}: dim {name} given twice ({_SYNTAX})")
        vals: list[int] = []
        for s in filter(None, (x.strip() for x in sizes.split(","))):
            if not s.isdigit() or int(s) < 1:
                raise UsageError(f"{where}: size {s!r} of {name} is not a whole number >= 1 ({_SYNTAX})")
            if int(s) not in vals:
                vals.append(int(s))
        if not vals:
            raise UsageError(f"{where}: dim {name} has no sizes ({_SYNTAX})")
        out[name] = sorted(vals)
    if not out:
        raise UsageError(f"{where}: no buckets ({_SYNTAX})")
    n = 1
    for v in out.values():
        n *= len(v)
    if n > MAX_BUCKETS:
        raise UsageError(f"{where}: {n} combinations of sizes, over the {MAX_BUCKETS} one artifact may hold "
                         "(each is a compile of the whole model)")
    return out


def combinations(buckets: dict[str, list[int]]) -> list[dict[str, int]]:
    names = list(buckets)
    return [dict(zip(names, sizes)) for sizes in itertools.product(*(buckets[n] for n in names))]


def bucket_name(sizes: dict[str, int]) -> str:
    return "_".join(f"{re.sub(r'[^A-Za-z0-9]', '', k) or 'd'}{v}" for k, v in sizes.items())


def padding_note(model: Model, dims: list[str]) -> str:
    """Why padding an input to a larger bucket would not give the true-size result: the first
    node that reads the padded border or depends on the padded size (see the module docstring)."""
    dirty = False  # the padded region holds something other than zeros (after a bias, BN, activation)
    for n in model.graph.nodes:
        if n.op_type in _LEAKS:
            return f"not used: padding is not exact for this model: {n.label()} {_LEAKS[n.op_type]}"
        if n.op_type in _WINDOWS:
            pads = [int(p) for p in (n.attr("pads") or [])]
            reaches = any(pads[len(pads) // 2:]) or bool(n.attr("ceil_mode", 0)) or \
                (n.attr("auto_pad", b"NOTSET") or b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")
            if n.op_type in ("MaxPool", "LpPool") and any(pads):
                return f"not used: padding is not exact for this model: {n.label()} pads with -inf, not the zeros added"
            if n.op_type == "AveragePool" and any(pads) and not n.attr("count_include_pad", 0):
                return f"not used: padding is not exact for this model: {n.label()} divides by the true count of its window"
            if dirty and reaches:  # (a window ending inside the true region, pads_end 0, never reads the border)
                return (f"not used: padding is not exact for this model: {n.label()} reads the padded border, "
                        "no longer zero after the ops before it, into the true region")
            dirty = True
    return "not used: sizes without a bucket run the symbolic kernels (exact for every size)"


def compile_with_buckets(target: Any, model: Model, options: Any, source_sha256: str | None,
                         fix_dims: Callable[[Model, dict[str, int]], Any]) -> Any:
    """The symbolic artifact of `model` with a specialised library per bucket merged in (module
    docstring). `target` is the CpuTarget holding `buckets`; `fix_dims(model, sizes)` fixes
    symbolic input dims in place (graphopt.input_shapes.fix_input_shapes)."""
    from graphopt.input_shapes import symbolic_input_dims
    from graphopt.target import MANIFEST, REPORT, sha256_file, write_manifest

    buckets: dict[str, list[int]] = target.buckets
    syms = {d for ds in symbolic_input_dims(model).values() for d in ds}
    unknown = [d for d in buckets if d not in syms]
    if unknown:
        raise UsageError(f"target cpu: buckets: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a symbolic "
                         f"input dim of this model (symbolic: {', '.join(sorted(syms)) or 'none'})")
    plain = copy.copy(target)
    plain.buckets = None
    combos = combinations(buckets)
    clones = [model.clone() for _ in combos]  # (before the symbolic compile changes the model)
    note = padding_note(model, list(buckets))
    art = plain.compile(model, options, source_sha256=source_sha256)
    sym = art.manifest.get("dims", {}).get("symbolic", {})
    entries = []
    for sizes, m in zip(combos, clones):
        for d, v in sizes.items():  # a size the symbolic library refuses cannot be a bucket of it either
            info = sym.get(d) or {}
            if int(info.get("multiple", 1)) > 1 and v % int(info["multiple"]):
                raise UsageError(f"target cpu: buckets: {d}={v} is not a multiple of {info['multiple']}, which the model "
                                 f"needs ({info.get('why', 'strided maps meet again')})")
            if v < int(info.get("min", 0)):
                raise UsageError(f"target cpu: buckets: {d}={v} is under {info['min']}, the smallest size the model takes")
        fix_dims(m, sizes)
        try:
            # (the sizes of --tune-shapes are for the symbolic kernels: the buckets' are specialised)
            sub = plain.compile(m, dataclasses.replace(options, tune_shapes=None), source_sha256=source_sha256)
        except UsageError as e:
            raise UsageError(f"target cpu: bucket {bucket_name(sizes)}: {e}") from None
        name = bucket_name(sizes)
        with open(os.path.join(sub.path, MANIFEST), encoding="utf-8") as f:
            man = json.load(f)
        files = man["files"]
        lib = f"bucket_{name}.so"
        shutil.copy2(os.path.join(sub.path, files["library"]["path"]), os.path.join(art.path, lib))
        files["library"]["path"] = lib
        if files["params"]["sha256"] == art.manifest["files"]["params"]["sha256"]:
            files["params"]["path"] = art.manifest["files"]["params"]["path"]  # the same packed weights: stored once
        else:
            params = f"bucket_{name}.params.npz"
            shutil.copy2(os.path.join(sub.path, files["params"]["path"]), os.path.join(art.path, params))
            files["params"]["path"] = params
        assert sha256_file(os.path.join(art.path, lib)) == files["library"]["sha256"]
        entries.append({"sizes": sizes, "manifest": man})
        del sub
    manifest = dict(art.manifest)
    manifest["buckets"] = {"dims": list(buckets), "dispatch": "exact", "padding": note, "entries": entries}
    write_manifest(art.path, manifest)
    art.manifest = manifest
    rpath = os.path.join(art.path, REPORT)
    with open(rpath, encoding="utf-8") as f:
        report = json.load(f)
    report["buckets"] = {"dims": list(buckets), "sizes": [e["sizes"] for e in entries], "dispatch": "exact", "padding": note}
    with open(rpath, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    return art

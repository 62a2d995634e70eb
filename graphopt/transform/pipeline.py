"""The one pipeline syntax (CLI `--passes`, Python, config file) and the -O levels.

    spec     := item ("," item)*
    item     := "-O" DIGIT | NAME ["{" option ("," option)* "}"]
    option   := KEY "=" VALUE          (VALUE has no ",{}="; lists are ":"-separated)

`-O0`..`-O3` are plain named pipelines (see OPT_LEVELS): no hidden per-pass gating.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from graphopt.errors import UsageError
from graphopt.transform.pass_base import Pass
from graphopt.transform.registry import get_pass

#: The -O levels, spelled in the pipeline syntax itself so `--print-pipeline` shows the truth.
OPT_LEVELS: dict[str, str] = {
    "-O0": "",
    "-O1": "fold-constants,fuse-conv-bn,simplify-shapes,simplify-control-flow,remove-noops,cse,slices-to-split,dce",
    # fuse-attention comes before fuse-linear, whose contrib FusedMatMul would hide Q·Kᵀ;
    # fuse-conv-activation only fires with contrib-ops; the second fuse-linear merges the Reshape
    # pairs that fuse-attention's head split/merge leaves once remove-noops cancels the Transposes
    # (then fuse-attention again: with contrib-ops it packs Q/K/V projections into one Attention)
    "-O2": "-O1,fuse-attention,fuse-linear,fuse-activations,fuse-normalization,fuse-conv-activation,remove-noops,fuse-linear,fold-constants,remove-noops,fuse-attention,cse,dce",
    "-O3": "-O2",
}

_TOKEN = re.compile(r"\s*(?:(?P<level>-O\d)|(?P<name>[A-Za-z][A-Za-z0-9_.-]*)(?P<opts>\{[^{}]*\})?)\s*(?:,|$)")


def _split_options(name: str, body: str) -> dict[str, str]:
    options: dict[str, str] = {}
    inner = body[1:-1].strip()
    if not inner:
        return options
    for part in inner.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise UsageError(f"pass {name!r}: option {part.strip()!r} is not key=value")
        if key in options:
            raise UsageError(f"pass {name!r}: option {key!r} given twice")
        options[key] = value
    return options


def parse_pipeline(spec: str, *, disable: Sequence[str] = (), log: list[str] | None = None) -> list[Pass]:
    """Turn a spec like `-O1,prune{ratio=0.3}` into pass instances.

    Passes named in `disable` are dropped, and each drop is written to `log` (never silent);
    disabling a name that does not occur is an error, so typos do not go unnoticed.
    """
    passes = _parse(spec.strip(), depth=0)
    if disable:
        kept = []
        unused = set(disable)
        for p in passes:
            if p.name in disable:
                unused.discard(p.name)
                if log is not None:
                    log.append(f"--disable: skipped pass {p.spec()}")
                continue
            kept.append(p)
        for name in sorted(unused):
            get_pass(name)  # unknown name -> UsageError with a suggestion
            raise UsageError(f"--disable {name}: the pipeline has no pass {name!r}")
        passes = kept
    return passes


def _parse(spec: str, depth: int) -> list[Pass]:
    if depth > 8:
        raise UsageError("pipeline levels refer to each other too deeply")
    passes: list[Pass] = []
    if not spec:
        return passes
    pos = 0
    while pos < len(spec):
        m = _TOKEN.match(spec, pos)
        if m is None or m.end() == pos:
            raise UsageError(f"bad pipeline spec at column {pos + 1}: {spec[pos:pos + 30]!r}")
        if m.group("level"):
            level = m.group("level")
            if level not in OPT_LEVELS:
                raise UsageError(f"unknown optimisation level {level} (have {', '.join(OPT_LEVELS)})")
            passes.extend(_parse(OPT_LEVELS[level], depth + 1))
        else:
            name = m.group("name")
            cls = get_pass(name)
            options = _split_options(name, m.group("opts")) if m.group("opts") else {}
            passes.append(cls.from_options(options))
        pos = m.end()
    return passes


def with_contrib_ops(passes: Sequence[Pass], enabled: bool = True) -> list[Pass]:
    """The pipeline with `contrib-ops` set on every pass that has that option: the pipeline-wide
    switch (`graphopt-compile --contrib-ops`, `optimize(..., contrib_ops=True)`) for deployments on
    onnxruntime only, which may then use its com.microsoft ops."""
    return [dataclasses.replace(p, **{"contrib_ops": enabled}) if hasattr(p, "contrib_ops") else p for p in passes]


def format_pipeline(passes: Sequence[Pass]) -> str:
    """The pipeline syntax for a list of passes (what --print-pipeline prints)."""
    return ",".join(p.spec() for p in passes)


def resolve_pipeline(pipeline: str | Sequence[Pass] | None, **kwargs: object) -> list[Pass]:
    if pipeline is None:
        return []
    if isinstance(pipeline, str):
        return parse_pipeline(pipeline, **kwargs)  # type: ignore[arg-type]
    out = list(pipeline)
    for p in out:
        if not isinstance(p, Pass):
            raise UsageError(f"pipeline item {p!r} is not a Pass")
    return out

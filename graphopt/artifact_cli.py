"""graphopt-compile for the compiled targets (`--target cpu`): `-o` names the artifact folder.

    graphopt-compile model.onnx --target cpu -O2 [--tune N --tune-minutes M --tuning-db DIR]
                     [--threads T] -o out/ [--verify [--inputs x.npz] --rtol R --atol A]

The pipeline runs as for the onnx target, then the target compiles the optimized IR into an
artifact (library, params, manifest.json, report.json). `--verify` runs the artifact and the
original model on onnxruntime on the same inputs and fails the compile (exit 3, nothing
written) when the outputs leave the tolerance. The artifact folder appears only complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from graphopt.errors import UsageError


def compile_artifact(opts: Any) -> int:
    from graphopt import cli
    from graphopt.check import NumericMismatchError
    from graphopt.report import pass_details
    from graphopt.verification import reference_outputs, verify_outputs
    from graphopt.target import CompileOptions, get_target, sha256_file
    from graphopt.transform import PassContext, optimize

    start = time.perf_counter()
    if not opts.model:
        raise UsageError("no MODEL given (see graphopt-compile --help)")
    if not opts.output:
        raise UsageError(f"no output given: add -o OUT_DIR (the artifact folder of target {opts.target})")
    if os.path.exists(opts.output) and not os.path.isdir(opts.output):
        raise UsageError(f"-o {opts.output} is a file; target {opts.target} writes an artifact folder")
    if opts.inputs and not opts.verify:
        raise UsageError("--inputs is only used by --verify; add it")
    if opts.tune and not opts.tuning_db:
        raise UsageError("--tune needs --tuning-db DIR (the database later compiles reuse)")
    if opts.tune < 0 or (opts.tune_minutes is not None and opts.tune_minutes <= 0):
        raise UsageError("--tune and --tune-minutes must be positive")
    if opts.threads is not None and opts.threads < 1:
        raise UsageError("--threads must be at least 1")
    target = get_target(opts.target)
    if getattr(opts, "compare", False) and target.name != "cpu":
        raise UsageError(f"--compare runs the result on this machine: it supports --target onnx and cpu, not {target.name}")

    machine = target.machine_model(opts.threads)
    if opts.verify and machine is not None:
        from graphopt.targets.machine import missing_features

        missing = missing_features(machine)
        if missing:
            raise UsageError(f"--verify runs the artifact here, and this CPU lacks {', '.join(missing)} "
                             f"(target mcpu={machine.mcpu}): drop --verify, or verify on such a machine")
    ctx = PassContext(machine=machine)
    model = cli.load_input(opts, ctx.log)  # checked by onnx's checker, sparse initializers dense
    passes = cli._resolve(opts, ctx.log)
    feeds = cli._feeds(opts, model) if opts.verify else None
    reference = reference_outputs(model, feeds) if feeds is not None else None
    t = time.perf_counter()
    optimized = optimize(model, passes, verify_each=opts.verify_each, ctx=ctx)
    pass_seconds = time.perf_counter() - t
    options = CompileOptions(pipeline=cli._format(passes), threads=opts.threads, tune=opts.tune or 0,
                             tune_minutes=opts.tune_minutes, tuning_db=opts.tuning_db, progress=not opts.quiet,
                             extra={"watchdog-hard-exit": True})  # (this process is graphopt-compile's own)
    art = target.compile(optimized, options, source_sha256=sha256_file(opts.model))
    report = art.report
    report["model"] = opts.model
    report["output"] = opts.output
    report["disabled"] = list(opts.disable)
    report["log"] = list(ctx.log)
    report.update(pass_details(ctx.data))
    report.setdefault("seconds", {})["passes"] = round(pass_seconds, 3)
    status = "ok"
    if reference is not None and feeds is not None:
        actual = art.run(feeds)
        verified = verify_outputs(reference, actual, rtol=opts.rtol, atol=opts.atol, feeds=feeds,
                                  inputs=opts.inputs or f"random(seed={opts.seed})", thresholds=getattr(opts, "verify_metric", ()))
        report["verify"] = asdict(verified)
        if not verified.ok:
            status = "verify-failed"
    report["status"] = status
    report["seconds"]["wall"] = round(time.perf_counter() - start, 3)
    if getattr(opts, "compare", False) and status == "ok":  # (after "wall": that is the compile's time)
        from graphopt.compare import compare_models

        t = time.perf_counter()
        report["compare"] = compare_models(opts.model, art.path, kind="artifact", model=model, eval_data=opts.eval_data,
                                           seed=opts.seed, threads=opts.threads)
        report["seconds"]["compare"] = round(time.perf_counter() - t, 3)
    with open(os.path.join(art.path, "report.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2, default=str) + "\n")
    if opts.report:
        from graphopt.html_report import is_html, render_html
        from graphopt.onnx_io import atomic_write

        text = render_html(report) if is_html(opts.report) else json.dumps(report, indent=2, default=str) + "\n"
        with cli.writing(opts.report):  # a read-only or full disk is exit 2 naming the path
            os.makedirs(os.path.dirname(os.path.abspath(opts.report)), exist_ok=True)
            with atomic_write(opts.report) as f:
                f.write(text.encode())
    if status != "ok":
        raise NumericMismatchError(f"--verify: the compiled artifact's outputs differ from the original: "
                                   f"{report['verify']['detail']}; {opts.output} was not written")
    with cli.writing(opts.output):
        art.save(opts.output)
    if not opts.quiet:
        k = report.get("kernels", {})
        secs = report.get("seconds", {})
        line = (f"{cli.PROG}: {opts.output}: target {opts.target}, {k.get('groups', '?')} kernel groups "
                f"({len(k.get('inline', {}))} inline), compiled in {secs.get('wall', 0):.1f} s")
        print(line, file=sys.stderr)
        if "verify" in report:
            print(verified.summary(), file=sys.stderr)
        if "compare" in report:
            from graphopt.compare import format_table

            print(format_table(report["compare"]), file=sys.stderr)
    for w in report.get("warnings", []):  # (shown with --quiet too)
        print(f"{cli.PROG}: warning: {w}", file=sys.stderr)
    return 0

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
from typing import Any

from graphopt.errors import UsageError


def compile_artifact(opts: Any) -> int:
    from graphopt import cli
    from graphopt.check import NumericMismatchError, compare_outputs, run_onnxruntime
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

    machine = target.machine_model(opts.threads)
    if opts.verify and machine is not None:
        from graphopt.targets.machine import missing_features

        missing = missing_features(machine)
        if missing:
            raise UsageError(f"--verify runs the artifact here, and this CPU lacks {', '.join(missing)} "
                             f"(target mcpu={machine.mcpu}): drop --verify, or verify on such a machine")
    ctx = PassContext(machine=machine)
    model = cli.load_input(opts, ctx.log)  # checked by onnx's checker, sparse initializers dense
    cli.load_calibration_data(opts, model, ctx)
    passes = cli._resolve(opts, ctx.log)
    feeds = cli._feeds(opts, model) if opts.verify else None
    reference = run_onnxruntime(model, feeds) if feeds is not None else None
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
    report.setdefault("seconds", {})["passes"] = round(pass_seconds, 3)
    status = "ok"
    if reference is not None and feeds is not None:
        actual = art.run(feeds)
        cmp = compare_outputs(reference, actual, rtol=opts.rtol, atol=opts.atol)
        report["verify"] = {"ok": cmp.ok, "max_abs": cmp.max_abs, "max_rel": cmp.max_rel, "rtol": opts.rtol,
                            "atol": opts.atol, "inputs": opts.inputs or f"random(seed={opts.seed})", "detail": cmp.detail}
        if not cmp.ok:
            status = "verify-failed"
    report["status"] = status
    report["seconds"]["wall"] = round(time.perf_counter() - start, 3)
    with open(os.path.join(art.path, "report.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2, default=str) + "\n")
    if opts.report:
        from graphopt.onnx_io import atomic_write

        with cli.writing(opts.report):  # a read-only or full disk is exit 2 naming the path
            os.makedirs(os.path.dirname(os.path.abspath(opts.report)), exist_ok=True)
            with atomic_write(opts.report) as f:
                f.write((json.dumps(report, indent=2, default=str) + "\n").encode())
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
        if "verify" in report:
            v = report["verify"]
            line += f"; verify ok (max abs {v['max_abs']:.3g}, max rel {v['max_rel']:.3g})"
        print(line, file=sys.stderr)
    for w in report.get("warnings", []):  # (shown with --quiet too)
        print(f"{cli.PROG}: warning: {w}", file=sys.stderr)
    return 0

"""graphopt-compile for the compiled targets (`--target cpu`): `-o` names the artifact folder.

    graphopt-compile model.onnx --target cpu -O2 [--tune N --tune-minutes M --tuning-db DIR]
                     [--threads T] -o out/ [--verify [--inputs x.npz] --rtol R --atol A]

The pipeline runs as for the onnx target, then the target compiles the optimized IR into an
artifact (library, params, manifest.json, report.json). The report and the terminal summary are
the onnx target's (passes with what each did, nodes, size, verification, warnings; --dump-ir
works) plus the target's own sections (kernels, schedules, tuning, compile_seconds). `--verify` runs the artifact and the
original model on onnxruntime on the same inputs and fails the compile (exit 3, nothing
written) when the outputs leave the tolerance. The artifact folder appears only complete.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from graphopt.errors import UsageError


def compile_artifact(opts: Any) -> int:
    import graphopt
    from graphopt import cli
    from graphopt.check import NumericMismatchError
    from graphopt.report import Report, op_counts, pass_details
    from graphopt.target import CompileOptions, compile_model, get_target, sha256_file
    from graphopt.transform import PassContext, TimingInstrument, optimize
    from graphopt.verification import reference_outputs, verify_outputs

    start = time.perf_counter()
    if not opts.model:
        raise UsageError("no MODEL given (see graphopt-compile --help)")
    if not opts.output:
        raise UsageError(f"no output given: add -o OUT_DIR (the artifact folder of target {opts.target})")
    if os.path.exists(opts.output) and not os.path.isdir(opts.output):
        raise UsageError(f"-o {opts.output} is a file; target {opts.target} writes an artifact folder")
    if opts.inputs and not (opts.verify or getattr(opts, "profile", False)):
        raise UsageError("--inputs is only used by --verify or --profile; add one of them")
    if opts.tune and not opts.tuning_db:
        raise UsageError("--tune needs --tuning-db DIR (the database later compiles reuse)")
    if opts.tune < 0 or (opts.tune_minutes is not None and opts.tune_minutes <= 0):
        raise UsageError("--tune and --tune-minutes must be positive")
    if opts.threads is not None and opts.threads < 1:
        raise UsageError("--threads must be at least 1")
    target = get_target(opts.target)
    if getattr(opts, "compare", False) and target.name != "cpu":
        raise UsageError(f"--compare runs the result on this machine: it supports --target onnx and cpu, not {target.name}")
    if getattr(opts, "profile", False) and target.name != "cpu":
        raise UsageError(f"--profile times the kernels on this machine: it supports --target onnx and cpu, not "
                         f"{target.name} (profile the artifact on its own hardware: graphopt-run OUT --profile)")

    machine = target.machine_model(opts.threads)
    if opts.verify and machine is not None:
        from graphopt.targets.machine import missing_features

        missing = missing_features(machine)
        if missing:
            raise UsageError(f"--verify runs the artifact here, and this CPU lacks {', '.join(missing)} "
                             f"(target mcpu={machine.mcpu}): drop --verify, or verify on such a machine")
    ctx = PassContext(machine=machine)
    model = cli.load_input(opts, ctx.log)  # checked by onnx's checker, sparse initializers dense
    sizes = None
    if getattr(opts, "tune_shapes", None):  # checked against the model before any pass runs
        from graphopt.input_shapes import check_tune_shapes, parse_tune_shapes

        if target.name != "cpu":
            raise UsageError(f"--tune-shapes times kernels on this machine: it supports --target cpu, not {target.name}")
        sizes = check_tune_shapes(model, parse_tune_shapes(str(opts.tune_shapes)))
    cli.load_calibration_data(opts, model, ctx)
    passes = cli._resolve(opts, ctx.log)
    feeds = cli._feeds(opts, model) if opts.verify else None
    reference = reference_outputs(model, feeds) if feeds is not None else None
    # the onnx target's report (passes, nodes, size, verification), plus the target's kernels
    report = Report(graphopt_version=graphopt.__version__, model=opts.model, output=opts.output, target=opts.target,
                    pipeline=cli._format(passes), disabled=list(opts.disable), log=ctx.log,
                    nodes_before=op_counts(model), size_before=cli._model_bytes(opts.model, model),
                    notes=[line for line in ctx.log if line.startswith("input shapes:")])
    timing = TimingInstrument()
    report.passes = timing.records
    t = time.perf_counter()
    optimized = optimize(model, passes, verify_each=opts.verify_each, dump_ir=opts.dump_ir, instruments=[timing], ctx=ctx)
    pass_seconds = time.perf_counter() - t
    report.nodes_after = op_counts(optimized)
    options = CompileOptions(pipeline=cli._format(passes), threads=opts.threads, tune=opts.tune or 0,
                             tune_minutes=opts.tune_minutes, tuning_db=opts.tuning_db, progress=not opts.quiet,
                             tune_shapes=sizes,
                             extra={"watchdog-hard-exit": True})  # (this process is graphopt-compile's own)
    art = compile_model(target, optimized, options, source_sha256=sha256_file(opts.model))
    own = dict(art.report)
    own["compile_seconds"] = {**own.pop("seconds", {}), "passes": round(pass_seconds, 3)}
    report.warnings = cli.option_warnings(timing.records) + tune_warnings(opts.tune or 0, own.get("tuning")) \
        + [str(w) for w in own.pop("warnings", [])]
    report.target_report = own
    if opts.output.endswith(".onnx"):  # (a folder named like a file is a likely slip)
        report.warnings.append(f"-o {opts.output}: target {opts.target} writes an artifact folder (library, params, "
                               "manifest), not an .onnx file; the folder has that name")
    report.size_after = sum(os.path.getsize(os.path.join(art.path, f)) for f in os.listdir(art.path)
                            if os.path.isfile(os.path.join(art.path, f)))
    report.details = pass_details(ctx.data)
    if reference is not None and feeds is not None:
        report.verify = verify_outputs(reference, art.run(feeds), rtol=opts.rtol, atol=opts.atol, feeds=feeds,
                                       inputs=opts.inputs or f"random(seed={opts.seed})",
                                       thresholds=getattr(opts, "verify_metric", ()))
        if not report.verify.ok:
            report.status = "verify-failed"
    report.seconds = time.perf_counter() - start
    if getattr(opts, "compare", False) and report.status == "ok":  # (after the compile's time)
        from graphopt.compare import compare_models

        t = time.perf_counter()
        report.compare = compare_models(opts.model, art.path, kind="artifact", model=model, eval_data=opts.eval_data,
                                        seed=opts.seed, threads=opts.threads)
        report.target_report.setdefault("compile_seconds", {})["compare"] = round(time.perf_counter() - t, 3)
    if getattr(opts, "profile", False) and report.status == "ok":
        t = time.perf_counter()
        report.profile = cli.profile_result(art.path, "artifact", model, opts)
        report.target_report.setdefault("compile_seconds", {})["profile"] = round(time.perf_counter() - t, 3)
    text = report.to_json()
    with open(os.path.join(art.path, "report.json"), "w", encoding="utf-8") as f:
        f.write(text)
    if opts.report:
        from graphopt.html_report import is_html, render_html
        from graphopt.onnx_io import atomic_write

        text = render_html(report.to_dict()) if is_html(opts.report) else text
        with cli.writing(opts.report):  # a read-only or full disk is exit 2 naming the path
            os.makedirs(os.path.dirname(os.path.abspath(opts.report)), exist_ok=True)
            with atomic_write(opts.report) as out:
                out.write(text.encode())
    if report.status != "ok":
        assert report.verify is not None
        raise NumericMismatchError(f"--verify: the compiled artifact's outputs differ from the original: "
                                   f"{report.verify.detail}; {opts.output} was not written")
    with cli.writing(opts.output):
        art.save(opts.output)
    if not opts.quiet:
        print(report.format_table(), file=sys.stderr)
    for w in report.warnings:  # (shown with --quiet too)
        print(f"{cli.PROG}: warning: {cli._one_line(w)}", file=sys.stderr)
    return 0


def tune_warnings(trials: int, tuning: Any) -> list[str]:
    """`--tune N` that left every kernel on its default schedule is a warning, with the reason."""
    if trials <= 0 or not isinstance(tuning, dict):
        return []
    if tuning.get("error") or tuning.get("stopped") in ("child failed", "interrupted"):
        return [f"--tune {trials} changed nothing: tuning stopped ({tuning.get('stopped')}): {tuning.get('error', '')}".rstrip(": ")]
    if not tuning.get("tasks_selected", 1):
        return [f"--tune {trials} changed nothing: no kernel to tune ({tuning.get('tasks_total', 0)} tasks, "
                f"{tuning.get('tasks_skipped_done', 0)} already in the database, {tuning.get('tasks_dynamic', 0)} with "
                "symbolic shapes: fix them with --input-shape/--dim, or pick their schedules at sizes with --tune-shapes)"]
    kept = [k.get("kept") for k in (tuning.get("kept") or {}).values() if isinstance(k, dict)]
    if kept and all(k == "default" for k in kept):
        return [f"--tune {trials} changed nothing: tuning did not beat the default schedule of any of the "
                f"{len(kept)} kernels it tuned (more trials may)"]
    return []

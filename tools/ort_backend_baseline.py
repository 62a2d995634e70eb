"""Which ONNX backend-test cases does plain onnxruntime fail on the *unmodified* model?

Runs `onnx.backend.test.BackendTest` with `onnxruntime.backend` (no graphopt involved),
collects every case that does not pass, and writes tests/data/ort_backend_exclusions.txt:
one exact test name per line, grouped under a comment stating onnxruntime's error. The
conformance test (tests/onnx_io/test_backend_conformance.py) excludes exactly those names, so every
case onnxruntime passes must also pass after graphopt's import → export round trip.

    .venv/bin/python tools/ort_backend_baseline.py            # rewrite the exclusions file
    .venv/bin/python tools/ort_backend_baseline.py --dry-run  # print the counts only

Regenerate it whenever the onnx or onnxruntime version changes (the header records both).
Only "_cpu" cases are listed: "_cuda" cases are skipped by both backends when onnxruntime
has no CUDA device.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import platform
import re
import sys
import tempfile
import time
import unittest
from dataclasses import dataclass

import numpy
import onnx
import onnx.backend.test
import onnxruntime
import onnxruntime.backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "tests", "data", "ort_backend_exclusions.txt")

#: BackendTest's category → the suite it comes from. BackendTest's "Real" models are, since
#: onnx 1.16, the "light" models shipped in onnx/backend/test/data/light (no download).
KINDS = {
    "OnnxBackendNodeModelTest": "node",
    "OnnxBackendSimpleModelTest": "simple",
    "OnnxBackendPyTorchConvertedModelTest": "pytorch-converted",
    "OnnxBackendPyTorchOperatorModelTest": "pytorch-operator",
    "OnnxBackendRealModelTest": "real (light models)",
}


@dataclass
class Outcome:
    name: str
    kind: str
    status: str  # pass | fail | error | skip | xfail | xpass
    detail: str = ""


class _Collect(unittest.TestResult):
    def __init__(self, kind: str, into: list[Outcome]) -> None:
        super().__init__()
        self.kind = kind
        self.into = into

    def _add(self, test: unittest.TestCase, status: str, detail: str = "") -> None:
        self.into.append(Outcome(test._testMethodName, self.kind, status, detail))

    def addSuccess(self, test):  # noqa: N802
        self._add(test, "pass")

    def addFailure(self, test, err):  # noqa: N802
        self._add(test, "fail", _describe(err))

    def addError(self, test, err):  # noqa: N802
        self._add(test, "error", _describe(err))

    def addSkip(self, test, reason):  # noqa: N802
        self._add(test, "skip", str(reason))

    def addExpectedFailure(self, test, err):  # noqa: N802
        self._add(test, "xfail", _describe(err))

    def addUnexpectedSuccess(self, test):  # noqa: N802
        self._add(test, "xpass")


def _describe(err) -> str:
    etype, value, _ = err
    return f"{etype.__name__}: {value}"


def run_suite(backend) -> list[Outcome]:
    """Every case of BackendTest run with `backend`, through unittest (no pytest)."""
    bt = onnx.backend.test.BackendTest(backend, __name__)
    outcomes: list[Outcome] = []
    for cls_name, cls in sorted(bt.test_cases.items()):
        kind = KINDS.get(cls_name, cls_name)
        unittest.defaultTestLoader.loadTestsFromTestCase(cls).run(_Collect(kind, outcomes))
    return outcomes


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : ")
_NODE_NAME = re.compile(r" node with name '[^']*'")
_SRC_PATH = re.compile(r"/\S*/onnxruntime/(core/\S+)")
_NUMPY_TYPE = re.compile(r"Numpy_type (\d+) ")


@functools.cache
def _ml_dtype_names() -> dict[int, str]:
    """numpy's numbers for ml_dtypes' types: assigned at registration, so name them instead."""
    try:
        import ml_dtypes  # noqa: PLC0415
    except ImportError:
        return {}
    names = {}
    for n in dir(ml_dtypes):
        t = getattr(ml_dtypes, n)
        if isinstance(t, type) and issubclass(t, numpy.generic):
            try:
                names[numpy.dtype(t).num] = n
            except TypeError:
                continue
    return names


def reason(outcome: Outcome) -> str:
    """A one-line reason, the same for every case that fails the same way."""
    if outcome.status == "skip":
        return f"onnxruntime.backend skips it: {outcome.detail.splitlines()[0] if outcome.detail else ''}"
    if outcome.status == "xpass":
        return "unexpected success"
    etype, _, msg = outcome.detail.partition(": ")
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if etype == "AssertionError":
        if lines and lines[0].startswith("Not equal to tolerance"):
            what = "inf/nan location differs" if len(lines) > 1 and "location mismatch" in lines[1] else "values differ"
            return f"onnxruntime: output differs from the reference ({what}; {lines[0][len('Not equal to ') :]})"
        if lines and lines[0].startswith("Items are not equal"):
            rest = "; ".join(ln for ln in lines[1:3])
            return f"onnxruntime: output differs from the reference ({rest})"
        return f"onnxruntime: AssertionError: {lines[0] if lines else ''}"
    first = lines[0] if lines else ""
    first = _ORT_PREFIX.sub("", first)
    first = _NODE_NAME.sub("", first)
    first = _SRC_PATH.sub(r"\1", first)
    first = re.sub(r"\s+:\s+", ": ", first, count=1)
    m = _NUMPY_TYPE.search(first)
    if m and int(m.group(1)) in _ml_dtype_names():
        first = first.replace(m.group(0), f"Numpy_type {int(m.group(1))} (ml_dtypes.{_ml_dtype_names()[int(m.group(1))]}) ")
    if len(first) > 200:
        first = first[:197] + "..."
    return f"onnxruntime: {etype}: {first}"


def render(outcomes: list[Outcome]) -> str:
    excluded = [o for o in outcomes if o.name.endswith("_cpu") and o.status != "pass"]
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for o in excluded:
        groups[reason(o)].append(o.name)
    out = [
        "# Backend-test cases that plain onnxruntime fails on the UNMODIFIED model.",
        "# tests/onnx_io/test_backend_conformance.py excludes exactly these names (each as ^name$);",
        "# every other case must pass after graphopt's import -> export round trip.",
        "#",
        "# Generated by: python tools/ort_backend_baseline.py (do not edit by hand; regenerate",
        "# after upgrading onnx or onnxruntime).",
        f"# onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__} ({onnxruntime.get_device()}),"
        f" numpy {numpy.__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"# {len(excluded)} of {sum(o.name.endswith('_cpu') for o in outcomes)} cpu cases excluded, in {len(groups)} groups;"
        " cuda cases are skipped by both backends without a CUDA device.",
        "",
    ]
    for key in sorted(groups):
        out.append(f"# {key}")
        out.extend(sorted(groups[key]))
        out.append("")
    return "\n".join(out)


def summary(outcomes: list[Outcome]) -> str:
    cpu = [o for o in outcomes if o.name.endswith("_cpu")]
    lines = ["cases (cpu)            total   pass  excluded"]
    for kind in sorted({o.kind for o in cpu}):
        ks = [o for o in cpu if o.kind == kind]
        passed = sum(o.status == "pass" for o in ks)
        lines.append(f"  {kind:<20} {len(ks):>6} {passed:>6} {len(ks) - passed:>9}")
    passed = sum(o.status == "pass" for o in cpu)
    lines.append(f"  {'all':<20} {len(cpu):>6} {passed:>6} {len(cpu) - passed:>9}")
    groups = collections.Counter(reason(o) for o in cpu if o.status != "pass")
    lines.append(f"excluded by reason ({len(groups)} groups):")
    lines.extend(f"  {n:>4}  {key}" for key, n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=DEFAULT_OUTPUT, help="exclusions file to write (default: %(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="print the counts, write nothing")
    args = ap.parse_args(argv)
    # BackendTest writes the light models' test data under $ONNX_MODELS; keep it out of ~/.onnx
    with tempfile.TemporaryDirectory(prefix="onnx_models_") as models:
        os.environ["ONNX_MODELS"] = models
        t0 = time.perf_counter()
        outcomes = run_suite(onnxruntime.backend)
        elapsed = time.perf_counter() - t0
    print(summary(outcomes))
    print(f"ran {len(outcomes)} cases (cpu and cuda) in {elapsed:.1f}s")
    if not args.dry_run:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(render(outcomes))
        print(f"wrote {os.path.relpath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A reproducible fuzz campaign against graphopt-compile and graphopt-run, run as a user's tools
would run them: each case writes its inputs to a folder, runs the installed commands in a child
process (a timeout, an address-space limit, its own process group) and classifies what came back.

    python tools/fuzz.py --runs 300 --seed 0 --jobs 2 --out /tmp/fuzz
    python tools/fuzz.py --out /tmp/fuzz --case proto:0:17        # replay one case

Families (--families): truncate, bitflip (damaged model files), proto (protobuf-level mutations:
wrong types and attribute types, missing inputs, unknown ops, opset 0/99, wrong raw_data lengths,
odd arities, sparse initializers, loops, recursive functions), external (hostile external data),
dims (0, negative, 2**40, symbolic), artifact (tampered cpu artifacts with hashes updated),
io (read-only output, a full disk, missing files), kill (SIGKILL of a compile), valid-o2,
valid-pass, valid-cpu (random valid graphs through -O2 --verify, each registered pass, and
--target cpu --verify, with NaN, +-Inf, -0.0, denormals and huge values in the inputs, compared
with onnxruntime).

Outcomes: ok; clean-error (exit 2, one stderr line); internal-error (exit 1, or any other code);
crash (killed by a signal); hang (past --timeout); mismatch (numbers or NaN/Inf positions differ
from onnxruntime, or --verify failed); invalid-output (exit 0 with an output that fails onnx's
checker or onnxruntime, or a killed compile left a staging folder or a half-written output);
multi-line-stderr (a refusal of more than one stderr line); unrefused (exit 0 on an input that must
be refused: a tampered artifact, an external-data escape).

Resumable: `OUT/ledger.jsonl` has a line per finished case; a re-run skips them. A case id
(`family:seed:index`) regenerates its inputs exactly. Failures are kept under `OUT/failures/ID/`
with the inputs and `command.sh`. The last line is the summary: runs and counts per outcome.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUTCOMES = ("ok", "clean-error", "internal-error", "crash", "hang", "mismatch", "invalid-output",
            "multi-line-stderr", "unrefused")
BAD = ("internal-error", "crash", "hang", "mismatch", "invalid-output", "multi-line-stderr", "unrefused")
FAMILIES = ("truncate", "bitflip", "proto", "external", "dims", "artifact", "io", "kill", "valid-o2",
            "valid-pass", "valid-cpu")
OPSET = 17
BIN = Path(sys.executable).parent  # the environment's graphopt-compile / graphopt-run


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    seed: int
    index: int

    @property
    def id(self) -> str:
        return f"{self.family}:{self.seed}:{self.index}"

    @property
    def slug(self) -> str:
        return self.id.replace(":", "-")

    @staticmethod
    def parse(case_id: str) -> "Case":
        family, seed, index = case_id.rsplit(":", 2)
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r} in case id {case_id!r}")
        return Case(family, int(seed), int(index))

    def rng(self) -> random.Random:
        return random.Random(self.id)


@dataclasses.dataclass
class Plan:
    """What one case runs: setup commands (must succeed), then the command under test; `judge`
    decides an exit-0 outcome (None: ok); `must_refuse`: exit 0 is `unrefused`."""

    argv: list[str]
    setup: list[list[str]] = dataclasses.field(default_factory=list)
    kill_after: float | None = None
    must_refuse: bool = False
    judge: Callable[["Proc"], tuple[str, str] | None] | None = None
    rlimits: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Proc:
    argv: list[str]
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str
    seconds: float


@dataclasses.dataclass
class Outcome:
    id: str
    family: str
    outcome: str
    detail: str
    command: str
    seconds: float


@dataclasses.dataclass
class Settings:
    out: Path
    timeout: float
    memory_gb: float
    fixtures: Path


# --------------------------------------------------------------------------- running commands


def run(argv: list[str], cfg: Settings, cwd: Path, timeout: float | None = None, kill_after: float | None = None,
        rlimits: dict[int, int] | None = None) -> Proc:
    """Run `argv` in a new process group with an address-space limit; on a timeout (or at
    `kill_after`) the whole group is SIGKILLed."""
    limits = {resource.RLIMIT_AS: int(cfg.memory_gb * 2**30), resource.RLIMIT_CORE: 0, **(rlimits or {})}

    def preexec() -> None:
        for what, value in limits.items():
            resource.setrlimit(what, (value, value))

    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONHASHSEED="0")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec,
                         start_new_session=True, env=env)
    limit = kill_after if kill_after is not None else (timeout or cfg.timeout)
    try:
        out, err = p.communicate(timeout=limit)
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = -signal.SIGKILL if kill_after is not None else None
    return Proc(argv, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.monotonic() - t0)


def classify(proc: Proc, must_refuse: bool = False) -> tuple[str, str]:
    """The outcome of one command from its exit status and stderr."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    last = lines[-1][:300] if lines else ""
    if proc.returncode is None:
        return "hang", f"no exit after {proc.seconds:.0f} s"
    if proc.returncode < 0:
        return "crash", f"signal {signal.Signals(-proc.returncode).name}: {last}"
    if proc.returncode == 0:
        return ("unrefused", "exit 0") if must_refuse else ("ok", "")
    if proc.returncode == 2:
        return ("clean-error", last) if len(lines) == 1 else ("multi-line-stderr", f"{len(lines)} lines: {last}")
    if proc.returncode == 3:
        return "mismatch", f"--verify failed: {last}"
    return "internal-error", f"exit {proc.returncode}: {last}"


def judge_call(cfg: Settings, cwd: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Checks that need onnx's checker or onnxruntime run in a child too (a damaged model can
    crash them): `python tools/fuzz.py --judge REQUEST.json`."""
    req = cwd / "judge.json"
    req.write_text(json.dumps(request))
    p = run([sys.executable, __file__, "--judge", str(req)], cfg, cwd, timeout=max(60.0, cfg.timeout))
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        return {"error": f"judge exit {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:200]}"}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- the judge (child side)


def model_problem(path: str) -> str:
    """'' when onnx's full checker and onnxruntime both accept the model, else why not."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:  # noqa: BLE001 - any rejection is the answer
        return f"checker: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}"
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return f"onnxruntime: {str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}"
    return ""


def ort_run(path: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def compare(ref: list[np.ndarray], got: list[np.ndarray], rtol: float = 1e-3, atol: float = 1e-4) -> str:
    """'' when `got` matches `ref`: same shapes, NaN and +-Inf at the same places, the finite
    values close."""
    if len(ref) != len(got):
        return f"{len(got)} outputs, onnxruntime has {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got)):
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            return f"output {i}: shape {g.shape}, onnxruntime {r.shape}"
        if r.dtype.kind not in "fc":
            if not np.array_equal(r, g):
                return f"output {i}: {int(np.sum(r != g))} values differ"
            continue
        rn, gn = np.isnan(r), np.isnan(g)
        if not np.array_equal(rn, gn):
            return f"output {i}: NaN at {int(rn.sum())} places in onnxruntime, {int(gn.sum())} here ({int((rn != gn).sum())} differ)"
        bad = ~np.isclose(r, g, rtol=rtol, atol=atol, equal_nan=True)
        if bad.any():
            j = tuple(int(k) for k in np.argwhere(bad)[0])
            return f"output {i}: {int(bad.sum())} values differ, e.g. at {j}: {g[j]!r} vs onnxruntime {r[j]!r}"
    return ""


def judge_main(request_path: str) -> None:
    req = json.loads(Path(request_path).read_text())
    res: dict[str, Any] = {}
    for key, path in req.get("check", {}).items():
        res[key] = model_problem(path)
    if "reference" in req:
        inputs = dict(np.load(req["inputs"]))
        try:
            ref = ort_run(req["reference"], inputs)
        except Exception as e:  # noqa: BLE001 - the reference itself fails: nothing to compare
            res["compare"] = ""
            res["reference_error"] = str(e).strip().splitlines()[0][:200]
        else:
            if "candidate_model" in req:
                got = ort_run(req["candidate_model"], inputs)
            else:
                arrays = np.load(req["candidate_outputs"])
                got = [arrays[k] for k in req["output_names"]] if all(k in arrays for k in req["output_names"]) \
                    else list(arrays.values())
            res["compare"] = compare(ref, got)
            if res["compare"] and "candidate_outputs" in req:
                # a max/min that read a NaN: ONNX leaves its answer open, and the cpu target skips
                # NaN; the reference is then onnxruntime doing the same, as --verify's is
                import graphopt
                from graphopt.verification import reference_outputs

                second = reference_outputs(graphopt.load(req["reference"]), inputs)
                if second.skip_nan_outputs is not None:
                    res["compare"] = compare(second.skip_nan_outputs, got)
                    res["nan_skipped"] = second.nan_skipped
    print(json.dumps(res))


# --------------------------------------------------------------------------- model makers


def _vi(name: str, shape: list[Any], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _const(rng: random.Random, name: str, shape: list[int], positive: bool = False) -> TensorProto:
    a = np.random.default_rng(rng.randrange(2**32)).standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(np.abs(a) + 0.5 if positive else a, name)


def random_graph(rng: random.Random, shape: list[Any] | None = None, nodes: int | None = None) -> onnx.ModelProto:
    """A random valid model over a 4-D float input: elementwise, Conv, pools, normalisation,
    reductions, Softmax, then maybe Flatten -> MatMul/Gemm; checked with onnx's checker."""
    shape = shape or [1, rng.choice([2, 3, 4]), rng.choice([4, 5, 6]), rng.choice([4, 6])]
    vals: list[tuple[str, list[Any]]] = [("x", list(shape))]
    body: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    counter = iter(range(10**6))

    def new(prefix: str) -> str:
        return f"{prefix}{next(counter)}"

    unary = ["Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Softplus", "Elu", "LeakyRelu", "HardSigmoid",
             "Sqrt", "Log", "Erf", "Floor", "Sign", "Reciprocal", "Identity"]
    flat = False
    for _ in range(nodes or rng.randrange(2, 9)):
        src, s = rng.choice(vals) if not flat else vals[-1]
        kind = rng.choice(["unary"] * 4 + ["binary"] * 3 + ["clip", "conv", "pool", "gpool", "bn", "reduce",
                                                             "softmax", "transpose", "concat", "flatten"])
        out = new("v")
        if len(s) == 2 or kind == "flatten":  # the 2-D tail: linear layers and elementwise
            if len(s) == 4:
                body.append(helper.make_node("Flatten", [src], [out], axis=1))
                s = [s[0], s[1] * s[2] * s[3]] if all(isinstance(d, int) for d in s[1:]) else None
                if s is None:
                    return random_graph(rng, None, nodes)
                vals.append((out, s))
                flat = True
                continue
            m = rng.choice([3, 5, 8])
            w = new("W")
            inits.append(_const(rng, w, [s[1], m]))
            if rng.random() < 0.5:
                body.append(helper.make_node("MatMul", [src, w], [out]))
            else:
                b = new("B")
                inits.append(_const(rng, b, [m]))
                body.append(helper.make_node("Gemm", [src, w, b], [out], alpha=rng.choice([1.0, 0.5])))
            vals.append((out, [s[0], m]))
            if rng.random() < 0.5:
                out2 = new("v")
                body.append(helper.make_node(rng.choice(unary[:9]), [out], [out2]))
                vals.append((out2, [s[0], m]))
            continue
        n, c, h, w_ = s
        if kind == "unary":
            body.append(helper.make_node(rng.choice(unary), [src], [out]))
            vals.append((out, s))
        elif kind == "binary":
            same = [v for v, vs in vals if vs == s and v != src]
            if same and rng.random() < 0.5:
                other = rng.choice(same)
            else:
                other = new("C")
                inits.append(_const(rng, other, rng.choice([[c, 1, 1], [1], list(s)]), positive=True))
            body.append(helper.make_node(rng.choice(["Add", "Sub", "Mul", "Div", "Max", "Min"]), [src, other], [out]))
            vals.append((out, s))
        elif kind == "clip":
            lo, hi = new("lo"), new("hi")
            inits += [numpy_helper.from_array(np.array(-1.0, np.float32), lo), numpy_helper.from_array(np.array(6.0, np.float32), hi)]
            body.append(helper.make_node("Clip", [src, lo, hi], [out]))
            vals.append((out, s))
        elif kind == "conv":
            k, groups = rng.choice([1, 3]), rng.choice([1, c])
            oc = c if groups == c else rng.choice([2, 4, 8])
            wname = new("W")
            inits.append(_const(rng, wname, [oc, c // groups, k, k]))
            ins = [src, wname]
            if rng.random() < 0.6:
                bname = new("B")
                inits.append(_const(rng, bname, [oc]))
                ins.append(bname)
            p = k // 2 if rng.random() < 0.7 else 0
            body.append(helper.make_node("Conv", ins, [out], kernel_shape=[k, k], pads=[p] * 4, group=groups))
            vals.append((out, [n, oc, h + 2 * p - k + 1, w_ + 2 * p - k + 1]))
        elif kind == "pool" and h >= 2 and w_ >= 2:
            st = rng.choice([1, 2])
            op = rng.choice(["MaxPool", "AveragePool"])
            body.append(helper.make_node(op, [src], [out], kernel_shape=[2, 2], strides=[st, st]))
            vals.append((out, [n, c, (h - 2) // st + 1, (w_ - 2) // st + 1]))
        elif kind == "gpool":
            body.append(helper.make_node(rng.choice(["GlobalAveragePool", "GlobalMaxPool"]), [src], [out]))
            vals.append((out, [n, c, 1, 1]))
        elif kind == "bn":
            names = [new(p) for p in ("s", "b", "m", "var")]
            inits += [_const(rng, names[0], [c]), _const(rng, names[1], [c]), _const(rng, names[2], [c]),
                      _const(rng, names[3], [c], positive=True)]
            body.append(helper.make_node("BatchNormalization", [src, *names], [out], epsilon=1e-5))
            vals.append((out, s))
        elif kind == "reduce":
            op = rng.choice(["ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum"])
            axis = rng.choice([1, 2, 3, -1])
            if op == "ReduceSum":  # axes became an input in opset 13
                ax = new("axes")
                inits.append(numpy_helper.from_array(np.array([axis], np.int64), ax))
                body.append(helper.make_node(op, [src, ax], [out], keepdims=1))
            else:
                body.append(helper.make_node(op, [src], [out], axes=[axis], keepdims=1))
            r = list(s)
            r[axis] = 1
            vals.append((out, r))
        elif kind == "softmax":
            body.append(helper.make_node("Softmax", [src], [out], axis=rng.choice([1, -1])))
            vals.append((out, s))
        elif kind == "transpose":
            perm = [0] + rng.sample([1, 2, 3], 3)
            body.append(helper.make_node("Transpose", [src], [out], perm=perm))
            vals.append((out, [s[i] for i in perm]))
        else:  # concat (or a pool on a map too small for it)
            body.append(helper.make_node("Concat", [src, src], [out], axis=1))
            vals.append((out, [n, 2 * c, h, w_]))
    if not body:
        return random_graph(rng, shape, nodes)
    outputs = [vals[-1]]
    produced = {o for nd in body for o in nd.output}
    extra = [v for v in vals[1:-1] if v[0] in produced]
    if extra and rng.random() < 0.3:
        outputs.append(rng.choice(extra))
    g = helper.make_graph(body, "fuzz", [_vi("x", shape)], [_vi(v, vs) for v, vs in outputs], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


#: ops whose NaN result onnxruntime decides by the NaN's position (it skips NaN unless the NaN is
#: the element its loop starts from: ReduceMax([nan, 1, ...]) is NaN), while the cpu target skips
#: NaN everywhere (maxNum; tests/targets/tvm/test_tvm_robustness.py checks that against numpy's fmax): their
#: graphs get no NaN inputs
NAN_POSITIONAL_OPS = frozenset({"MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin"})
#: ops that sum many elements: near 3e38 they overflow to Inf or not depending on the summation
#: order (ordinary float behaviour, no order is specified), so their graphs get no huge values
SUMMING_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "ReduceSum", "ReduceMean", "ReduceL1", "ReduceL2",
                         "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "GlobalAveragePool", "AveragePool",
                         "Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "LpNormalization",
                         "CumSum", "Einsum"})


def special_inputs(rng: random.Random, model: onnx.ModelProto, path: Path, dims: dict[str, int] | None = None) -> None:
    """Random inputs with NaN, +-Inf, -0.0, denormals and huge values at random places (no NaN
    into a graph with a NAN_POSITIONAL_OPS op, no huge values into one with a SUMMING_OPS op)."""
    ops = {n.op_type for n in model.graph.node}
    specials = np.array([v for v in [np.nan, np.inf, -np.inf, -0.0, 1e-40, -1e-42, 1e30, -3e38]
                         if not (np.isnan(v) and ops & NAN_POSITIONAL_OPS) and not (abs(v) >= 1e30 and ops & SUMMING_OPS)],
                        np.float32)
    arrays = {}
    g = np.random.default_rng(rng.randrange(2**32))
    for i in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else (dims or {}).get(d.dim_param, 1)
                 for d in i.type.tensor_type.shape.dim]
        a = g.standard_normal(shape).astype(np.float32)
        flat = a.reshape(-1)
        if flat.size:
            k = max(1, flat.size // 10)
            flat[g.integers(0, flat.size, k)] = g.choice(specials, k)
        arrays[i.name] = a
    np.savez(path, **arrays)


def save(m: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(m.SerializeToString())
    return path


# --------------------------------------------------------------------------- families


def compile_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["graphopt-compile", str(model), "-o", str(out), "-q", *extra]


def judge_output(cfg: Settings, work: Path, model: Path, output: Path, inputs: Path | None) -> Callable[[Proc], tuple[str, str] | None]:
    """After exit 0: the output must pass onnx's checker and onnxruntime (whatever the input
    was: graphopt checks its input first), and compute what the input computes on onnxruntime
    when `inputs` is given."""

    def judge(_: Proc) -> tuple[str, str] | None:
        req: dict[str, Any] = {"check": {"input": str(model), "output": str(output)}}
        if inputs is not None:
            req.update(reference=str(model), candidate_model=str(output), inputs=str(inputs))
        res = judge_call(cfg, work, req)
        if "error" in res:
            return "invalid-output", f"judging the output failed: {res['error']}"
        if res["output"]:
            if res["input"] and all("NOT_IMPLEMENTED" in r for r in (res["input"], res["output"])):
                return None  # valid ONNX that onnxruntime has no kernel for (an int32 Gemm): kept so
            was = "checker-valid input" if not res["input"] else f"input already invalid ({res['input']})"
            return "invalid-output", f"{res['output']} ({was})"
        if res.get("compare"):
            return "mismatch", res["compare"]
        return None

    return judge


def fam_damaged(case: Case, work: Path, cfg: Settings) -> Plan:
    """truncate / bitflip: a valid model's bytes cut or with bits flipped."""
    rng = case.rng()
    data = bytearray(random_graph(rng).SerializeToString())
    if case.family == "truncate":
        data = data[: rng.randrange(len(data))]
    else:
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    model = work / "model.onnx"
    model.write_bytes(bytes(data))
    extra = rng.choice([[], [], ["--verify"], ["-O3"]])
    return Plan(compile_argv(model, work / "out.onnx", *extra), judge=judge_output(cfg, work, model, work / "out.onnx", None))


def _proto_mutation(rng: random.Random, m: onnx.ModelProto) -> str:
    """One targeted mutation of `m` (in place); returns its name."""
    g = m.graph
    node = rng.choice(g.node)
    kind = rng.choice(["elem_type", "attr_type", "missing_input", "unknown_op", "opset", "raw_data", "arity",
                       "string_group", "sparse", "loop", "recursive_function", "dangling_output", "dup_name",
                       "unknown_domain", "ir_version", "no_opset"])
    if kind == "elem_type":
        target = rng.choice([*g.initializer, *[i.type.tensor_type for i in g.input], *[o.type.tensor_type for o in g.output]])
        if isinstance(target, TensorProto):
            target.data_type = rng.choice([0, 8, 16, 99, 6, 11])
        else:
            target.elem_type = rng.choice([0, 8, 16, 99, 6, 11])
    elif kind == "attr_type" and node.attribute:
        a = rng.choice(node.attribute)
        v = helper.make_attribute(a.name, rng.choice(["text", 1.5, 3, [1, 2], [0.5]]))
        a.CopyFrom(v)
    elif kind == "missing_input" and node.input:
        if rng.random() < 0.5:
            del node.input[rng.randrange(len(node.input))]
        else:
            node.input[rng.randrange(len(node.input))] = "nowhere"
    elif kind == "unknown_op":
        node.op_type = rng.choice(["NoSuchOp", "Conv2D", "relu"])
    elif kind == "opset":
        if not m.opset_import:  # (an earlier mutation of this case removed it)
            m.opset_import.add(domain="")
        m.opset_import[0].version = rng.choice([0, 99, 1, 5])
    elif kind == "raw_data" and g.initializer:
        t = rng.choice(g.initializer)
        raw = numpy_helper.to_array(t).tobytes()
        t.ClearField("float_data")
        t.raw_data = raw[: max(0, len(raw) - rng.choice([1, 4]))] if rng.random() < 0.5 else raw + b"\0" * rng.choice([1, 4])
    elif kind == "arity":
        conv = [n for n in g.node if n.op_type == "Conv"]
        n = rng.choice(conv) if conv else node
        if rng.random() < 0.5:
            del n.input[1:]
        else:
            n.input.extend(["x"] * (5 - len(n.input)))
    elif kind == "string_group":
        conv = [n for n in g.node if n.op_type == "Conv"]
        n = rng.choice(conv) if conv else node
        n.attribute.append(helper.make_attribute("group", "two"))
    elif kind == "sparse":  # a valid sparse initializer read by an Add
        shape = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
        size = int(np.prod(shape))
        idx = sorted(rng.sample(range(size), min(size, 3)))
        sp = helper.make_sparse_tensor(helper.make_tensor("sp", TensorProto.FLOAT, [len(idx)], [1.0] * len(idx)),
                                       helper.make_tensor("sp_i", TensorProto.INT64, [len(idx)], idx), shape)
        g.sparse_initializer.append(sp)
        old = g.output[0].name
        for n in g.node:
            for i, o in enumerate(n.output):
                if o == old:
                    n.output[i] = old + "_pre"
        g.node.append(helper.make_node("Add", [old + "_pre", "sp"], [old]))
    elif kind == "loop":  # a Loop whose body has too few outputs
        body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
                                 [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("a_in", None)],
                                 [_vi("c_out", [], TensorProto.BOOL)])
        g.initializer.extend([numpy_helper.from_array(np.array(2, np.int64), "trip"), numpy_helper.from_array(np.array(True), "cond")])
        old = g.output[0].name
        for n in g.node:
            for i, o in enumerate(n.output):
                if o == old:
                    n.output[i] = old + "_pre"
        g.node.append(helper.make_node("Loop", ["trip", "cond", old + "_pre"], [old], body=body))
    elif kind == "recursive_function":
        f = helper.make_function("fz", "Rec", ["a"], ["b"], [helper.make_node("Rec", ["a"], ["b"], domain="fz")],
                                 [helper.make_opsetid("", OPSET), helper.make_opsetid("fz", 1)])
        m.functions.append(f)
        m.opset_import.append(helper.make_opsetid("fz", 1))
        node.op_type, node.domain = "Rec", "fz"
        del node.attribute[:]
        del node.input[1:]
    elif kind == "dangling_output":
        g.output[0].name = "never_made"
    elif kind == "dup_name" and len(g.node) > 1:
        g.node[-1].output[0] = g.node[0].output[0]
    elif kind == "unknown_domain":
        node.domain = "com.nowhere"
    elif kind == "ir_version":
        m.ir_version = rng.choice([0, 2, 99])
    else:
        del m.opset_import[:]
    return kind


def fam_proto(case: Case, work: Path, cfg: Settings) -> Plan:
    rng = case.rng()
    m = random_graph(rng)
    kinds = [_proto_mutation(rng, m) for _ in range(rng.choice([1, 1, 2]))]
    model = save(m, work / "model.onnx")
    (work / "mutation.txt").write_text(",".join(kinds) + "\n")
    extra = rng.choice([[], ["--verify"], ["--target", "cpu"]])
    out = work / ("out" if "cpu" in extra else "out.onnx")
    judge = judge_output(cfg, work, model, out, None) if "cpu" not in extra else None
    return Plan(compile_argv(model, out, *extra), judge=judge)


def fam_external(case: Case, work: Path, cfg: Settings) -> Plan:
    """A model whose weight lives in external data, pointed at places it must not read."""
    rng = case.rng()
    model_dir = work / "model"
    model_dir.mkdir()
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    (model_dir / "w.bin").write_bytes(x.tobytes())
    (work / "secret.bin").write_bytes(x.tobytes() * 4)
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4], data_location=TensorProto.EXTERNAL)
    attack = rng.choice(["parent", "absolute", "symlink", "offset_past_end", "negative_length", "huge_length",
                         "directory", "fifo", "dev_zero", "nul_in_name", "missing", "valid"])
    loc, extra = "w.bin", {}
    if attack == "parent":
        loc = "../secret.bin"
    elif attack == "absolute":
        loc = str(work / "secret.bin")
    elif attack == "symlink":
        os.symlink(work / "secret.bin", model_dir / "link.bin")
        loc = "link.bin"
    elif attack == "offset_past_end":
        extra = {"offset": str(rng.choice([64, 2**40]))}
    elif attack == "negative_length":
        extra = {"length": "-64"}
    elif attack == "huge_length":
        extra = {"length": str(2**40)}
    elif attack == "directory":
        (model_dir / "d").mkdir()
        loc = "d"
    elif attack == "fifo":
        os.mkfifo(model_dir / "pipe")
        loc = "pipe"
    elif attack == "dev_zero":
        loc = "/dev/zero"
    elif attack == "nul_in_name":
        loc = "w.bin\0x"
    elif attack == "missing":
        loc = "nope.bin"
    w.external_data.add(key="location", value=loc)
    for k, v in extra.items():
        w.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "ext", [_vi("x", [2, 4])], [_vi("y", [2, 4])], initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    model = save(m, model_dir / "model.onnx")
    (work / "attack.txt").write_text(attack + "\n")
    out = work / "out.onnx"
    return Plan(compile_argv(model, out, *rng.choice([[], ["--verify"]])), must_refuse=attack != "valid",
                judge=judge_output(cfg, work, model, out, None) if attack == "valid" else None)


def fam_dims(case: Case, work: Path, cfg: Settings) -> Plan:
    rng = case.rng()
    odd = rng.choice([0, -1, -5, 2**20, 2**31, 2**40, "N", "batch"])
    shape: list[Any] = [1, 2, 4, 4]
    shape[rng.choice([0, 0, 2, 3])] = odd
    try:
        m = random_graph(rng, shape=[1, 2, 4, 4])
    except Exception:  # noqa: BLE001
        m = random_graph(rng)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, v in zip(dims, shape):
        d.Clear()
        if isinstance(v, str):
            d.dim_param = v
        else:
            d.dim_value = v
    for o in m.graph.output:  # output dims unknown (same rank): shape inference says
        for d in o.type.tensor_type.shape.dim:
            d.Clear()
    model = save(m, work / "model.onnx")
    (work / "dims.txt").write_text(f"{shape}\n")
    extra = rng.choice([["--verify"], ["--target", "cpu"], ["--target", "cpu", "--verify"], []])
    out = work / ("out" if "cpu" in extra else "out.onnx")
    return Plan(compile_argv(model, out, *extra), judge=None if "cpu" in extra else judge_output(cfg, work, model, out, None))


def fixture_artifact(cfg: Settings) -> Path:
    """A small cpu artifact with a params file (built once per campaign folder)."""
    with _FIXTURE_LOCK:
        art = cfg.fixtures / "artifact"
        if (art / "manifest.json").exists():
            return art
        cfg.fixtures.mkdir(parents=True, exist_ok=True)
        rng = random.Random("fixture")
        w = _const(rng, "W", [64, 64])
        g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"])], "fx",
                              [_vi("x", [2, 64])], [_vi("y", [2, 64])], initializer=[w])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 8
        save(m, cfg.fixtures / "model.onnx")
        tmp = cfg.fixtures / "artifact.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        p = run(compile_argv(cfg.fixtures / "model.onnx", tmp, "--target", "cpu"), cfg, cfg.fixtures, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"building the fixture artifact failed: {p.stderr.strip()[-500:]}")
        os.replace(tmp, art)
        return art


_FIXTURE_LOCK = threading.Lock()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fam_artifact(case: Case, work: Path, cfg: Settings) -> Plan:
    """A copy of a cpu artifact, tampered with, its hashes updated to match: must be refused."""
    rng = case.rng()
    art = work / "art"
    shutil.copytree(fixture_artifact(cfg), art, symlinks=True)
    man = json.loads((art / "manifest.json").read_text())
    lib, params = art / man["files"]["library"]["path"], art / man["files"]["params"]["path"]
    consistent = False  # (a tamper that leaves a correct, self-checking artifact: see shape_text)
    kind = rng.choice(["no_inputs", "no_outputs", "files_null", "bogus_dtype", "shape_text", "params_shape",
                       "params_dtype", "params_dropped", "params_renamed", "runtime_params", "library_truncated",
                       "library_garbage", "library_symlink_out", "library_dir", "manifest_truncated", "version"])
    if kind in ("no_inputs", "no_outputs"):
        del man[kind[3:]]
    elif kind == "files_null":
        man["files"] = None
    elif kind == "bogus_dtype":
        man["inputs"][0]["dtype"] = rng.choice(["float128", "tensor", 7, None])
    elif kind == "shape_text":
        man["inputs"][0]["shape"] = rng.choice(["2x64", [2, "sixty"], [-2, 64], None])
        # a static dim renamed symbolic still describes a library that checks its own shapes: the
        # manifest is not signed (a tamper that updates hashes can always do this), inputs the
        # library accepts run correctly and others are refused, so exit 0 is right there
        # (null: a shape the manifest does not know, which the schema allows, likewise)
        shape = man["inputs"][0]["shape"]
        consistent = shape is None or (isinstance(shape, list) and all(isinstance(d, str) or d >= 0 for d in shape))
    elif kind.startswith("params_"):
        arrays = dict(np.load(params))
        name = rng.choice(sorted(arrays))
        if kind == "params_shape":
            arrays[name] = arrays[name].reshape(-1)[: arrays[name].size // 2]
        elif kind == "params_dtype":
            arrays[name] = arrays[name].astype(rng.choice([np.float64, np.int32, np.float16]))
        elif kind == "params_dropped":
            del arrays[name]
        else:
            arrays["other"] = arrays.pop(name)
        with open(params, "wb") as f:
            np.savez(f, **arrays)
    elif kind == "runtime_params":
        man["runtime"]["params"] = rng.choice([["nope"], [], None])
    elif kind == "library_truncated":
        data = lib.read_bytes()
        lib.write_bytes(data[: rng.randrange(0, len(data) - 1)])
    elif kind == "library_garbage":
        lib.write_bytes(b"\x7fELF" + random.Random(case.id).randbytes(4096))
    elif kind == "library_symlink_out":
        outside = work / "outside.so"
        shutil.copy(lib, outside)
        lib.unlink()
        os.symlink(outside, lib)
    elif kind == "library_dir":
        lib.unlink()
        lib.mkdir()
    elif kind == "version":
        man["version"] = rng.choice([99, "1", None])
    if kind != "library_dir" and isinstance(man.get("files"), dict):  # the hashes agree with the tampered files
        for entry, path in (("library", lib), ("params", params)):
            if path.is_file():
                man["files"][entry]["sha256"] = _sha256(path)
                man["files"][entry]["bytes"] = path.stat().st_size
    text = json.dumps(man, indent=1)
    if kind == "manifest_truncated":
        text = text[: rng.randrange(len(text))]
    (art / "manifest.json").write_text(text)
    (work / "tamper.txt").write_text(kind + "\n")
    special_inputs(rng, onnx.load(str(cfg.fixtures / "model.onnx")), work / "inputs.npz")
    return Plan(["graphopt-run", str(art), "--inputs", str(work / "inputs.npz"), "-o", str(work / "y.npz")],
                must_refuse=not (kind == "shape_text" and consistent))


def fam_io(case: Case, work: Path, cfg: Settings) -> Plan:
    rng = case.rng()
    model = save(random_graph(rng), work / "model.onnx")
    kind = rng.choice(["readonly_dir", "disk_full", "under_file", "missing_model", "missing_inputs", "missing_config",
                       "missing_artifact", "run_output_under_file", "run_inputs_not_zip", "model_is_dir"])
    (work / "fault.txt").write_text(kind + "\n")
    if kind == "readonly_dir":
        # root ignores permission bits: then a read-only filesystem (EROFS) is the fault
        ro = work / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = (ro if os.geteuid() != 0 else Path("/sys/fs")) / rng.choice(["out.onnx", "outdir/out.onnx"])
        return Plan(compile_argv(model, target))
    if kind == "disk_full":  # a write past RLIMIT_FSIZE fails with EFBIG, as a full disk would fail
        out = work / "out.onnx"
        return Plan(compile_argv(model, out, *rng.choice([[], ["--report", str(work / "r.json")]])),
                    rlimits={resource.RLIMIT_FSIZE: rng.choice([0, 1024, 4096])}, judge=judge_output(cfg, work, model, out, None))
    if kind == "under_file":
        (work / "file").write_text("x")
        return Plan(compile_argv(model, work / "file" / "out.onnx"))
    if kind == "missing_model":
        return Plan(compile_argv(work / "nope.onnx", work / "out.onnx"))
    if kind == "missing_inputs":
        return Plan(compile_argv(model, work / "out.onnx", "--verify", "--inputs", str(work / "nope.npz")))
    if kind == "missing_config":
        return Plan(compile_argv(model, work / "out.onnx", "--config", str(work / "nope.toml")))
    if kind == "model_is_dir":
        return Plan(compile_argv(work, work / "out.onnx"))
    art = fixture_artifact(cfg)
    if kind == "missing_artifact":
        return Plan(["graphopt-run", str(work / "nope")])
    if kind == "run_output_under_file":
        (work / "file").write_text("x")
        return Plan(["graphopt-run", str(art), "-o", str(work / "file" / "y.npz")])
    (work / "in.npz").write_bytes(b"not a zip")
    return Plan(["graphopt-run", str(art), "--inputs", str(work / "in.npz")])


def fam_kill(case: Case, work: Path, cfg: Settings) -> Plan:
    """SIGKILL a compile that would replace an existing output: the old output stays intact (or
    the new one is complete), and no staging folder is left."""
    rng = case.rng()
    model = save(random_graph(rng), work / "model.onnx")
    cpu = rng.random() < 0.4
    outdir = work / "outs"
    outdir.mkdir()
    out = outdir / ("art" if cpu else "out.onnx")
    if cpu:
        out.mkdir()
        (out / "manifest.json").write_text('{"old": true}')
    else:
        out.write_bytes(b"old output")
    before = sorted(p.name for p in outdir.iterdir())
    old = (out / "manifest.json").read_bytes() if cpu else out.read_bytes()
    argv = compile_argv(model, out, *(["--target", "cpu"] if cpu else ["--verify"]))

    def complete() -> bool:
        if cpu:
            return all((out / f).is_file() for f in ("manifest.json", "model.so"))
        res = judge_call(cfg, work, {"check": {"output": str(out)}})
        return "error" not in res and not res.get("output")

    def judge(proc: Proc) -> tuple[str, str] | None:
        now = (out / "manifest.json").read_bytes() if cpu and (out / "manifest.json").exists() else (
            b"" if cpu else out.read_bytes())
        if now != old and not complete():
            return "invalid-output", "the killed compile damaged the old output"
        stages = sorted(set(p.name for p in outdir.iterdir()) - set(before))
        # the next compile into the folder (the user's retry) must leave no stage behind
        again = run(argv, cfg, work)
        kind, detail = classify(again)
        if kind not in ("ok", "clean-error"):
            return kind, f"the compile after the kill: {detail}"
        left = sorted(p.name for p in outdir.iterdir())
        if left != before:
            return "invalid-output", f"after a kill and a retry the output folder holds {left} (was {before})"
        return None if not stages else ("ok", f"stage {stages} left until the next compile removed it")

    return Plan(argv, kill_after=rng.uniform(0.3, 6.0 if cpu else 2.5), judge=judge)


def pass_names(cfg: Settings) -> list[str]:
    """The registered passes, as `graphopt-compile --list-passes` names them (once per folder)."""
    cache = cfg.fixtures / "passes.txt"
    with _FIXTURE_LOCK:
        if not cache.exists():
            cfg.fixtures.mkdir(parents=True, exist_ok=True)
            p = run(["graphopt-compile", "--list-passes"], cfg, cfg.fixtures, timeout=120)
            names = [ln.split()[0] for ln in p.stdout.splitlines() if ln.strip() and not ln.startswith(" ")]
            cache.write_text("\n".join(names) + "\n")
        return cache.read_text().split()


#: passes that change the numbers on purpose (checked for a valid, runnable output, not by --verify)
LOSSY_PASSES = frozenset({"quantize", "prune", "cluster-weights"})


def fam_valid(case: Case, work: Path, cfg: Settings) -> Plan:
    """A random valid graph, inputs with special values; the output must compute what the input
    computes on onnxruntime (NaN and Inf at the same places)."""
    rng = case.rng()
    m = random_graph(rng)
    model = save(m, work / "model.onnx")
    inputs = work / "inputs.npz"
    special_inputs(rng, m, inputs)
    verify = ["--verify", "--inputs", str(inputs)]
    if case.family == "valid-o2":
        out = work / "out.onnx"
        return Plan(compile_argv(model, out, "-O2", *verify), judge=judge_output(cfg, work, model, out, inputs))
    if case.family == "valid-pass":
        names = pass_names(cfg)
        name = names[case.index % len(names)] if names else "dce"
        out = work / "out.onnx"
        if name in LOSSY_PASSES:  # (their outputs differ by design: valid and runnable is what they must stay)
            return Plan(compile_argv(model, out, "--passes", name), judge=judge_output(cfg, work, model, out, None))
        return Plan(compile_argv(model, out, "--passes", name, *verify), judge=judge_output(cfg, work, model, out, inputs))
    art, y = work / "art", work / "y.npz"
    names = [o.name for o in m.graph.output]

    def judge(_: Proc) -> tuple[str, str] | None:
        p = run(["graphopt-run", str(art), "--inputs", str(inputs), "-o", str(y)], cfg, work)
        kind, detail = classify(p)
        if kind != "ok":
            return kind, f"graphopt-run: {detail}"
        res = judge_call(cfg, work, {"reference": str(model), "candidate_outputs": str(y), "inputs": str(inputs),
                                     "output_names": names})
        if "error" in res:
            return "mismatch", res["error"]
        return ("mismatch", res["compare"]) if res.get("compare") else None

    return Plan(compile_argv(model, art, "--target", "cpu", *verify), judge=judge)


MAKERS: dict[str, Callable[[Case, Path, Settings], Plan]] = {
    "truncate": fam_damaged, "bitflip": fam_damaged, "proto": fam_proto, "external": fam_external, "dims": fam_dims,
    "artifact": fam_artifact, "io": fam_io, "kill": fam_kill, "valid-o2": fam_valid, "valid-pass": fam_valid,
    "valid-cpu": fam_valid,
}


# --------------------------------------------------------------------------- the campaign


def shell_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def run_case(case: Case, cfg: Settings, keep: bool = False) -> Outcome:
    work = cfg.out / "cases" / case.slug
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    plan = MAKERS[case.family](case, work, cfg)
    command = shell_line(plan.argv)
    if resource.RLIMIT_FSIZE in plan.rlimits:  # (bash counts 1024-byte blocks)
        command = f"(ulimit -f {plan.rlimits[resource.RLIMIT_FSIZE] // 1024}; {command})"
    proc = run(plan.argv, cfg, work, kill_after=plan.kill_after, rlimits=plan.rlimits)
    if plan.kill_after is not None and proc.returncode == -signal.SIGKILL:
        kind, detail = "ok", f"killed after {plan.kill_after:.1f} s"
    else:
        kind, detail = classify(proc, plan.must_refuse)
    if (kind == "ok" or plan.kill_after is not None) and plan.judge is not None:
        judged = plan.judge(proc)
        if judged is not None:
            kind, detail = judged
    result = Outcome(case.id, case.family, kind, detail, command, round(time.monotonic() - t0, 2))
    if kind != "ok" and kind != "clean-error":
        keep_failure(case, cfg, work, result, proc)
    elif not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def keep_failure(case: Case, cfg: Settings, work: Path, result: Outcome, proc: Proc) -> None:
    dest = cfg.out / "failures" / case.slug
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for p in work.rglob("*"):  # a read-only folder made for the case would block the move
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.move(str(work), dest)
    result.command = result.command.replace(str(work), str(dest))
    (dest / "command.sh").write_text(
        f"# {result.id}: {result.outcome}: {result.detail}\n# regenerate: python {__file__} --out {cfg.out} --case {result.id}\n"
        f"cd {shlex.quote(str(dest))} && PATH={BIN}:$PATH {result.command}\n")
    (dest / "stderr.txt").write_text(proc.stderr)


def read_ledger(path: Path) -> dict[str, Outcome]:
    done: dict[str, Outcome] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
                done[d["id"]] = Outcome(**d)
            except (ValueError, TypeError, KeyError):
                continue  # a line cut by a kill
    return done


def campaign(cases: Iterable[Case], cfg: Settings, jobs: int, progress: bool = True) -> list[Outcome]:
    """Run the cases not in the ledger yet (appending each result as it ends); returns the
    results of all `cases`, earlier ones from the ledger."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    ledger = cfg.out / "ledger.jsonl"
    done = read_ledger(ledger)
    cases = list(cases)
    todo = [c for c in cases if c.id not in done]
    lock = threading.Lock()

    def one(case: Case) -> Outcome:
        try:
            res = run_case(case, cfg)
        except Exception as e:  # noqa: BLE001 - a bug of the fuzzer itself: record it, go on
            res = Outcome(case.id, case.family, "internal-error", f"fuzz tool: {type(e).__name__}: {e}"[:300], "", 0.0)
        with lock:
            with open(ledger, "a", encoding="utf-8") as f:
                f.write(json.dumps(dataclasses.asdict(res)) + "\n")
            done[case.id] = res
            if progress and res.outcome not in ("ok", "clean-error"):
                print(f"{res.id}: {res.outcome}: {res.detail[:160]}", file=sys.stderr, flush=True)
        return res

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        list(ex.map(one, todo))
    return [done[c.id] for c in cases]


def plan_cases(runs: int, seed: int, families: list[str]) -> list[Case]:
    return [Case(families[i % len(families)], seed, i // len(families)) for i in range(runs)]


def summary_line(results: list[Outcome]) -> str:
    counts = Counter(r.outcome for r in results)
    return f"fuzz: {len(results)} runs: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in OUTCOMES)


def family_table(results: list[Outcome]) -> str:
    by: dict[str, Counter] = {}
    for r in results:
        by.setdefault(r.family, Counter())[r.outcome] += 1
    rows = [f"{'family':<11}" + "".join(f"{k:>{len(k) + 2}}" for k in OUTCOMES)]
    for fam in FAMILIES:
        if fam in by:
            rows.append(f"{fam:<11}" + "".join(f"{by[fam].get(k, 0):>{len(k) + 2}}" for k in OUTCOMES))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100, help="cases to run (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all): " + ",".join(FAMILIES))
    ap.add_argument("--jobs", type=int, default=1, help="cases at once")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a command counts as a hang")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit of each command")
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"), help="results folder (ledger, failures)")
    ap.add_argument("--case", help="replay one case id (family:seed:index); its folder is kept")
    ap.add_argument("--judge", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.judge:
        judge_main(ns.judge)
        return 0
    out = ns.out.resolve()
    cfg = Settings(out=out, timeout=ns.timeout, memory_gb=ns.memory_gb, fixtures=out / "fixtures")
    if ns.case:
        try:
            case = Case.parse(ns.case)
        except ValueError as e:
            ap.error(str(e))
        res = run_case(case, cfg, keep=True)
        print(f"{res.id}: {res.outcome}: {res.detail}\n  {res.command}")
        return 0 if res.outcome in ("ok", "clean-error") else 1
    families = [f.strip() for f in ns.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        ap.error(f"unknown families {unknown}; have {','.join(FAMILIES)}")
    results = campaign(plan_cases(ns.runs, ns.seed, families), cfg, ns.jobs)
    print(family_table(results))
    print(summary_line(results))
    return 0 if not any(r.outcome in BAD for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

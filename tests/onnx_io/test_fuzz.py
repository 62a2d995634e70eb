"""Fuzzing the importer: mutated real models load as a model or fail with a GraphoptError.

Never a crash, a hang or another exception. Where a mutant loads, the rest of the front end
must cope with it too: verify, clone, export, and re-import of the export.

Three layers:
- byte mutations (flips, truncations, insertions, deletions, splices from other models, huge
  varints) with hypothesis, in process;
- structure-aware mutations (rewired inputs, duplicate names, broken tensors and attributes,
  escaping external-data locations...) that survive protobuf parsing and reach the importer;
- the byte fuzzer again in a subprocess, so a segfault or abort in protobuf's C code is caught
  and reported with the input that caused it instead of killing pytest.

Run this file as a script (`python tests/onnx_io/test_fuzz.py N SEED CRASHFILE`) for the worker.
"""

from __future__ import annotations

import atexit
import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import GraphoptError

_DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
_NODE_MODELS = [
    "simple/test_sequence_model3",
    "simple/test_strnorm_model_monday_casesensintive_lower",
    "simple/test_gradient_of_add_and_mul",
    "pytorch-operator/test_operator_params",
    "pytorch-operator/test_operator_non_float_params",
    "pytorch-operator/test_operator_repeat_dim_overflow",
    "pytorch-converted/test_Conv2d",
    "pytorch-converted/test_BatchNorm2d_eval",
    "pytorch-converted/test_PReLU_2d",
]


def _rich_model() -> onnx.ModelProto:
    """Hand-made seed with what the shipped models lack: subgraphs, a function, a sparse
    initializer, every attribute kind, value_info, metadata and an external tensor."""
    f32 = TensorProto.FLOAT

    def vi(name: str, shape: list[int | str] | None = None) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, f32, shape)

    then_g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"], name="then_add")], "then", [], [vi("t", [4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="else_neg")], "else", [], [vi("e", [4])])
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "x"], ["acc_out"], name="body_add"), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vi("acc_in", [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vi("acc_out", [4])],
    )
    fn = helper.make_function(
        "my.fns", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"], name="f_add")], [helper.make_opsetid("", 18)],
        attributes=["unused"],
    )
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("sp", f32, [2], [5.0, 6.0]), helper.make_tensor("sp_idx", TensorProto.INT64, [2], [0, 3]), [4]
    )
    ext = TensorProto(name="ext", data_type=f32, dims=[4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "ext.bin"), ("offset", "0"), ("length", "16")):
        ext.external_data.add(key=k, value=v)
    nodes = [
        helper.make_node("If", ["c"], ["r"], name="the_if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "", "r"], ["l"], name="the_loop", body=body),
        helper.make_node("Twice", ["l"], ["tw"], name="call", domain="my.fns"),
        helper.make_node(
            "LeakyRelu", ["tw"], ["lr"], name="leaky", alpha=0.1, doc_string="d",
        ),
        helper.make_node("Add", ["lr", "sp"], ["s1"], name="add_sparse"),
        helper.make_node("Add", ["s1", "ext"], ["y"], name="add_ext"),
        helper.make_node(
            "Custom", ["y"], ["z"], name="attrs", domain="my.custom", i=3, f=1.5, s="text", ints=[1, 2], floats=[0.5], strings=["a", "b"],
            t=helper.make_tensor("tt", TensorProto.INT32, [2], [1, 2]),
        ),
    ]
    g = helper.make_graph(
        nodes,
        "rich",
        [vi("x", ["N"]), helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("trip", TensorProto.INT64, [])],
        [vi("y", [4]), vi("z")],
        initializer=[helper.make_tensor("w", f32, [4], [1.0, 2.0, 3.0, 4.0]), ext],
        value_info=[vi("r", [4]), vi("tw", [4])],
    )
    g.sparse_initializer.append(sparse)
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("my.fns", 1), helper.make_opsetid("my.custom", 1)]
    )
    m.functions.append(fn)
    helper.set_model_props(m, {"author": "fuzz"})
    return m


def load_seeds() -> list[bytes]:
    paths = sorted(glob.glob(os.path.join(_DATA, "light", "*.onnx")))
    paths += [os.path.join(_DATA, p, "model.onnx") for p in _NODE_MODELS]
    seeds = [Path(p).read_bytes() for p in paths]
    seeds.append(_rich_model().SerializeToString())
    return seeds


def make_base_dir() -> str:
    """A folder holding the rich model's external data (and a decoy one level up)."""
    root = tempfile.mkdtemp(prefix="graphopt-fuzz-")
    base = os.path.join(root, "model")
    os.mkdir(base)
    Path(base, "ext.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    Path(root, "outside.bin").write_bytes(b"\x07" * 64)
    return base


# --- the property -------------------------------------------------------------------------------


def exercise(source: bytes | onnx.ModelProto, base_dir: str | None) -> str:
    """Load `source`; where it loads, run the rest of the front end on it. Returns "model" or
    "error"; anything but a GraphoptError propagates (that is the bug the fuzzer looks for)."""
    try:
        m = graphopt.load(source, base_dir=base_dir)
    except GraphoptError as e:
        assert len(str(e).splitlines()) == 1, f"not a one-line message: {str(e)!r}"
        return "error"
    m.verify()
    blob = graphopt.to_onnx(m).SerializeToString()
    c = m.clone()
    c.verify()
    assert graphopt.to_onnx(c).SerializeToString() == blob, "a clone exports differently"
    # what graphopt wrote it must read back, unchanged
    again = graphopt.load(blob, base_dir=base_dir)
    assert graphopt.to_onnx(again).SerializeToString() == blob, "export is not a fixed point"
    for g in m.graphs():
        for v in g.initializers.values():
            try:
                v.const_value.numpy()  # type: ignore[union-attr]
            except GraphoptError as e:  # a corrupt payload is reported when first read
                assert len(str(e).splitlines()) == 1
    return "model"


# --- byte mutations -----------------------------------------------------------------------------

_BIG_VARINTS = [b"\xff\xff\xff\xff\x0f", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x80\x80\x80\x80\x08", b"\x00", b"\x7f"]


def mutate_bytes(data: bytes, ops: list[tuple[int, int, int, bytes]], seeds: list[bytes]) -> bytes:
    """Apply `ops`, each (kind, position, number, blob); positions wrap around the data."""
    buf = bytearray(data)
    for kind, pos, num, blob in ops:
        at = pos % (len(buf) + 1)
        kind %= 7
        if kind == 0 and buf:  # flip bits of one byte
            buf[at % len(buf)] ^= num or 1
        elif kind == 1:  # truncate
            del buf[at:]
        elif kind == 2:  # insert bytes
            buf[at:at] = blob
        elif kind == 3:  # delete a run
            del buf[at : at + num % 64 + 1]
        elif kind == 4:  # overwrite with a huge or tiny varint (length fields, tags, counts)
            v = _BIG_VARINTS[num % len(_BIG_VARINTS)]
            buf[at : at + len(v)] = v
        elif kind == 5:  # splice a chunk of another model in
            other = seeds[num % len(seeds)]
            start = pos % max(1, len(other))
            buf[at:at] = other[start : start + 1 + (num * 7) % 512]
        elif kind == 6 and len(buf) > 1:  # duplicate a chunk (repeated fields, merged messages)
            j = (pos * 31 + num) % len(buf)
            buf[at:at] = buf[j : j + num % 128 + 1]
    return bytes(buf)


def random_ops(rng: random.Random, n: int) -> list[tuple[int, int, int, bytes]]:
    return [(rng.randrange(7), rng.randrange(2**32), rng.randrange(256), rng.randbytes(rng.randrange(17))) for _ in range(n)]


# --- structure-aware mutations ------------------------------------------------------------------


def _graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    out = [g]
    for n in g.node:
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out += _graphs(sg)
    return out


def mutate_proto(m: onnx.ModelProto, rng: random.Random, steps: int) -> onnx.ModelProto:
    """Changes that keep the protobuf valid but break (or bend) the graph."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    for _ in range(steps):
        g = rng.choice(_graphs(m.graph))
        names = [v.name for v in list(g.input) + list(g.output)] + [t.name for t in g.initializer]
        names += [o for n in g.node for o in n.output] + ["", "ghost", "x", "../ext.bin"]
        kind = rng.randrange(17)
        node = rng.choice(g.node) if g.node else None
        if kind == 0 and node is not None and node.input:  # rewire an input (dangling, cycle, outer value)
            node.input[rng.randrange(len(node.input))] = rng.choice(names)
        elif kind == 1 and node is not None and node.output:  # duplicate or drop an output name
            node.output[rng.randrange(len(node.output))] = rng.choice(names)
        elif kind == 2 and g.node:  # remove a node
            del g.node[rng.randrange(len(g.node))]
        elif kind == 3 and node is not None:  # duplicate a node
            g.node.add().CopyFrom(node)
        elif kind == 4 and g.node:  # shuffle node order (the importer sorts)
            nodes = list(g.node)
            rng.shuffle(nodes)
            del g.node[:]
            g.node.extend(nodes)
        elif kind == 5 and g.initializer:  # bend a tensor
            t = rng.choice(g.initializer)
            what = rng.randrange(5)
            if what == 0:
                t.data_type = rng.randrange(0, 40)
            elif what == 1:
                t.dims.append(rng.choice([0, 1, 3, 2**40]))
            elif what == 2 and t.dims:
                t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 7, 2**31])
            elif what == 3:
                t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)] if t.raw_data else b"\x01\x02\x03"
            else:
                t.name = rng.choice(names)
        elif kind == 6 and g.initializer:  # point a tensor at external data, sane or not
            t = rng.choice(g.initializer)
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            loc = rng.choice(["ext.bin", "../outside.bin", "/etc/passwd", "nope.bin", "sub/../ext.bin", "", ".", "ext.bin\x00x"])
            t.external_data.add(key="location", value=loc)
            t.external_data.add(key=rng.choice(["offset", "length", "checksum"]), value=rng.choice(["0", "4", "-1", "99999", "x", "16"]))
        elif kind == 7 and node is not None:  # bend an attribute
            if node.attribute:
                a = rng.choice(node.attribute)
                a.type = rng.choice(list(onnx.AttributeProto.AttributeType.values()))
                if rng.random() < 0.5:
                    a.ClearField(rng.choice(["f", "i", "s", "t", "g", "floats", "ints", "strings", "graphs"]))
                if rng.random() < 0.3:
                    a.ref_attr_name = "r"
            else:
                node.attribute.add(name=rng.choice(["alpha", "axis", ""]))
        elif kind == 8 and node is not None:  # unknown domain or empty op
            node.domain = rng.choice(["com.nowhere", "ai.onnx", "my.fns", "ai.onnx.ml"])
            if rng.random() < 0.2:
                node.op_type = ""
        elif kind == 9 and g.output:  # outputs: rename, repeat
            if rng.random() < 0.5:
                g.output[rng.randrange(len(g.output))].name = rng.choice(names)
            else:
                g.output.add().CopyFrom(rng.choice(g.output))
        elif kind == 10:  # inputs: duplicate, unname, or shadow an initializer
            if g.input and rng.random() < 0.5:
                g.input.add().CopyFrom(rng.choice(g.input))
            else:
                g.input.add(name=rng.choice(names))
        elif kind == 11:  # opsets and IR version
            if rng.random() < 0.5 and m.opset_import:
                del m.opset_import[rng.randrange(len(m.opset_import)) :]
            else:
                m.ir_version = rng.choice([0, 1, 2, 3, 7, 10, 11, 99, 2**62])
        elif kind == 12 and m.functions:  # functions: duplicate, break
            f = rng.choice(m.functions)
            if rng.random() < 0.5:
                m.functions.add().CopyFrom(f)
            elif f.node:
                f.node[0].input.append(rng.choice(["a", "ghost", "b"]))
        elif kind == 13 and g.sparse_initializer:
            sp = g.sparse_initializer[0]
            rng.choice([lambda: sp.dims.append(-1), lambda: sp.indices.int64_data.append(99), lambda: sp.values.ClearField("name")])()
        elif kind == 14 and g.value_info:  # value_info for unknown names / bad types
            vi = rng.choice(g.value_info)
            vi.name = rng.choice(names)
            vi.type.tensor_type.elem_type = rng.randrange(0, 40)
        elif kind == 15 and node is not None:  # a subgraph that reads what its node defines
            sub = helper.make_graph([helper.make_node("Identity", [rng.choice(names) or "q"], ["inner"])], "sub", [], [helper.make_tensor_value_info("inner", 1, None)])
            node.attribute.add().CopyFrom(helper.make_attribute("then_branch" if rng.random() < 0.5 else "body", sub))
        elif kind == 16 and node is not None:  # names with control characters
            node.name = rng.choice(["a\nb", "\x00", "é\r", "x" * 1000])
            node.op_type = rng.choice([node.op_type, "Op\nType", "\t"])
    return m


# --- the worker ---------------------------------------------------------------------------------


def _worker(n: int, rng_seed: int, crash_file: str, base_dir: str) -> int:
    """Fuzz `n` byte mutants; each input is written to `crash_file` first, so if the process
    dies the culprit is on disk. Non-graphopt exceptions are reported and make the exit code 1."""
    seeds = load_seeds()
    rng = random.Random(rng_seed)
    failures = 0
    for i in range(n):
        data = mutate_bytes(rng.choice(seeds), random_ops(rng, rng.randrange(1, 4)), seeds)
        with open(crash_file, "wb") as f:
            f.write(data)
        try:
            exercise(data, base_dir)
        except Exception as e:  # noqa: BLE001 - the worker reports every kind of failure
            failures += 1
            kept = f"{crash_file}.{i}"
            os.replace(crash_file, kept)
            print(f"FAIL #{i}: {type(e).__name__}: {e!r} (input kept in {kept})", flush=True)
    os.unlink(crash_file)
    print(f"done {n} (seed {rng_seed}, {failures} failures)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))


# --- tests --------------------------------------------------------------------------------------

import pytest  # noqa: E402  (the worker exits above without these)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SEEDS = load_seeds()
SEED_PROTOS = [onnx.ModelProto.FromString(s) for s in SEEDS]
BASE_DIR = make_base_dir()
atexit.register(shutil.rmtree, os.path.dirname(BASE_DIR), True)

_ops = st.lists(
    st.tuples(st.integers(0, 6), st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=16)),
    min_size=1,
    max_size=3,  # more mutations rarely survive protobuf parsing
)
# sized so the default run of this file stays under a minute (2 cores)
_fast_bytes = settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
_fast_structure = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
_long_bytes = settings(max_examples=20000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
_long_structure = settings(max_examples=3000, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_seeds_load() -> None:
    # the unmutated seeds are good models, so "error" below really comes from the mutation
    for s in SEEDS:
        assert exercise(s, BASE_DIR) == "model"


def test_mutations_change_outcomes() -> None:
    # the fuzzer is not vacuous: mutants produce both models and errors, at both layers
    rng = random.Random(1)
    small = [s for s in SEEDS if len(s) < 20_000]
    byte_outcomes = {exercise(mutate_bytes(s, random_ops(rng, 1), SEEDS), BASE_DIR) for s in small for _ in range(15)}
    proto_outcomes = {exercise(mutate_proto(onnx.ModelProto.FromString(s), rng, 1), BASE_DIR) for s in small for _ in range(15)}
    assert byte_outcomes == {"model", "error"}
    assert proto_outcomes == {"model", "error"}


@pytest.mark.timeout(300)  # (the whole hypothesis run, on a loaded machine)
@_fast_bytes
@given(seed=st.integers(0, len(SEEDS) - 1), ops=_ops)
def test_fuzz_bytes(seed: int, ops: list[tuple[int, int, int, bytes]]) -> None:
    exercise(mutate_bytes(SEEDS[seed], ops, SEEDS), BASE_DIR)


@pytest.mark.timeout(300)
@_fast_structure
@given(seed=st.integers(0, len(SEEDS) - 1), rseed=st.integers(0, 2**32 - 1), steps=st.integers(1, 4))
def test_fuzz_structure(seed: int, rseed: int, steps: int) -> None:
    m = mutate_proto(SEED_PROTOS[seed], random.Random(rseed), steps)
    exercise(m, BASE_DIR)  # as a ModelProto
    exercise(m.SerializeToString(), BASE_DIR)  # and as bytes


def _run_worker(n: int, rng_seed: int, tmp_path: Path, timeout: float) -> None:
    crash = tmp_path / "last_input.bin"
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(n), str(rng_seed), str(crash), BASE_DIR],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"fuzz worker hung; the input it was on is in {crash}")
    assert proc.returncode == 0, (
        f"fuzz worker died with code {proc.returncode} (negative: killed by that signal); "
        f"its last input is in {crash}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    assert f"done {n}" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.timeout(120)
def test_fuzz_crash_isolated(tmp_path: Path) -> None:
    # protobuf's C decoder runs here; a segfault would end the worker, not pytest
    _run_worker(2000, random.randrange(2**32), tmp_path, timeout=100)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@_long_bytes
@given(seed=st.integers(0, len(SEEDS) - 1), ops=_ops)
def test_fuzz_bytes_long(seed: int, ops: list[tuple[int, int, int, bytes]]) -> None:
    exercise(mutate_bytes(SEEDS[seed], ops, SEEDS), BASE_DIR)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@_long_structure
@given(seed=st.integers(0, len(SEEDS) - 1), rseed=st.integers(0, 2**32 - 1), steps=st.integers(1, 8))
def test_fuzz_structure_long(seed: int, rseed: int, steps: int) -> None:
    exercise(mutate_proto(SEED_PROTOS[seed], random.Random(rseed), steps), BASE_DIR)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_crash_isolated_long(tmp_path: Path) -> None:
    _run_worker(100_000, random.randrange(2**32), tmp_path, timeout=3000)

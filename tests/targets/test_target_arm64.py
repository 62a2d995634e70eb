"""The arm64 target: options, cross-compiled artifacts (AArch64 ELF), execution under qemu-aarch64
compared with onnxruntime on x86, int8 dot-product instructions in the generated assembly, and
meta_schedule tuning through TVM RPC on loopback (slow).

Models are built here. Tests that link need Debian's g++-aarch64-linux-gnu; tests that run need
also qemu-user and the aarch64 runtime (`python tools/arm64_env.py setup`, cached in .cache/arm64);
each skips cleanly with the reason when its piece is absent. The assembly checks need only TVM.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
import graphopt.runtime  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402
from graphopt.target import ArtifactError, get_target  # noqa: E402
from graphopt.targets.arm64 import toolchain as arm64_env  # noqa: E402
from graphopt.targets.arm64.target import Arm64Target, QemuRunner, assembly  # noqa: E402
from paths import ROOT  # noqa: E402

ENV = arm64_env.status()
needs_cxx = pytest.mark.skipif(not ENV.can_build, reason="no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
needs_runner = pytest.mark.skipif(not (ENV.can_build and ENV.can_run),
                                  reason="aarch64 runtime missing: " + "; ".join(ENV.missing()))

EM_AARCH64 = 183


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def _ort(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _conv_net(batch: int | str = "N") -> onnx.ModelProto:
    """conv+BN+relu → pool → strided conv+relu (residual-free) → GAP → Gemm → Softmax."""
    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(8).astype(np.float32),
        "s": rng.random(8).astype(np.float32) + 0.5, "bb": rng.standard_normal(8).astype(np.float32),
        "m": rng.standard_normal(8).astype(np.float32), "v": rng.random(8).astype(np.float32) + 0.5,
        "w2": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2,
        "wd": rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.3,
        "w3": rng.standard_normal((10, 16)).astype(np.float32), "b3": rng.standard_normal(10).astype(np.float32),
    }
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["bn"]),
        h.make_node("Relu", ["bn"], ["r"]),
        h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["p", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        h.make_node("Relu", ["c2"], ["r2"]),
        h.make_node("Conv", ["r2", "wd"], ["dw"], pads=[1, 1, 1, 1], group=16),  # depthwise
        h.make_node("Add", ["dw", "r2"], ["res"]),
        h.make_node("GlobalAveragePool", ["res"], ["gap"]),
        h.make_node("Flatten", ["gap"], ["f"]),
        h.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
        h.make_node("Softmax", ["y"], ["prob"], axis=-1),
    ]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [batch, 3, 16, 16])],
                  [h.make_tensor_value_info("prob", TP.FLOAT, None)], [nh.from_array(a, n) for n, a in arrays.items()])


_NP = {TP.INT8: np.int8, TP.UINT8: np.uint8}


def _int8_matmul(a_type: int = TP.INT8, b_type: int = TP.INT8, shape=(32, 64), n: int = 48, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    bt = _NP[b_type]
    w = rng.integers(np.iinfo(bt).min, np.iinfo(bt).max, (shape[-1], n), endpoint=True).astype(bt)
    return _model([h.make_node("MatMulInteger", ["x", "w"], ["y"])],
                  [h.make_tensor_value_info("x", a_type, list(shape))],
                  [h.make_tensor_value_info("y", TP.INT32, [*shape[:-1], n])], [nh.from_array(w, "w")])


def _int_input(t: int, shape, seed: int = 1) -> np.ndarray:
    dt = _NP[t]
    return np.random.default_rng(seed).integers(np.iinfo(dt).min, np.iinfo(dt).max, shape, endpoint=True).astype(dt)


def _exact_matmul(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    w = nh.to_array(m.graph.initializer[0])
    return (x.astype(np.int64) @ w.astype(np.int64)).astype(np.int32)


# --- options ------------------------------------------------------------------------------------


def test_target_options_and_features() -> None:
    t = get_target("arm64{profile=cortex-a76}")
    assert isinstance(t, Arm64Target)
    feats = t.effective_features(t.tvm_target(1))
    assert feats["neon"] and feats["dotprod"] and not feats["i8mm"]
    # an explicit flag overrides what the core implies, both ways
    off = get_target("arm64{profile=cortex-a76,dotprod=0}")
    assert not off.effective_features(off.tvm_target(1))["dotprod"]
    on = get_target("arm64{mcpu=generic,dotprod=1,i8mm=1}")
    spec = on.llvm_spec(2)
    assert spec["mtriple"] == "aarch64-linux-gnu" and spec["mcpu"] == "generic" and spec["num-cores"] == 2
    assert set(spec["mattr"]) == {"+neon", "+dotprod", "+i8mm"}
    f = on.effective_features(on.tvm_target(1))
    assert f["dotprod"] and f["i8mm"] and not f["sve"]
    v1 = get_target("arm64{profile=neoverse-v1}")
    assert v1.effective_features(v1.tvm_target(1))["sve"]
    assert not get_target("arm64").effective_features(get_target("arm64").tvm_target(1))["dotprod"]  # generic


@pytest.mark.parametrize("spec, msg", [
    ("arm64{profile=cortex-x9}", "unknown profile"),
    ("arm64{dotprod=maybe}", "not 0 or 1"),
    ("arm64{turbo=1}", "unknown option 'turbo'"),
    ("arm64{threads=0}", "at least 1"),
    ("arm64{mcpu=a,mcpu=b}", "given twice"),
    ("arm64{mcpu=a", "one pair of braces"),
    ("cpu{mcpu=a}", "is not a CPU LLVM knows"),
    ("cpu{profile=cortex-a76}", "unknown option 'profile'"),
])
def test_bad_target_options(spec: str, msg: str) -> None:
    with pytest.raises(UsageError, match=re.escape(msg)):
        get_target(spec)


def test_cli_bad_target_option_exits_2(tmp_path) -> None:
    p = tmp_path / "m.onnx"
    onnx.save(_int8_matmul(), p)
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", str(p), "--target", "arm64{bogus=1}", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "unknown option 'bogus'" in r.stderr
    assert not (tmp_path / "out").exists()


# --- int8 dot-product instructions in the generated assembly (TVM only, no cross compiler) --------


def _asm(model: onnx.ModelProto, spec: str) -> tuple[str, str]:
    """Lower, schedule and build `model` for the arm64 target `spec`; the assembly and the
    schedules line (what the compile does, minus the cross link)."""
    from graphopt.passes.fusion.kernel_groups import PlanKernels
    from graphopt.targets.tvm.lower import lowerer as L
    from graphopt.transform import PassContext, optimize

    m = optimize(graphopt.load(model), "-O2")
    PlanKernels().run(m, PassContext())
    t = get_target(spec)
    target = t.tvm_target(1)
    _, mod = L.lower_and_fuse(m, target)
    mod, info = t.schedule(mod, target, graphopt.target.CompileOptions())
    return assembly(t.build(mod, target)), info.default_schedules


def _count(asm: str, word: str) -> int:
    return len(re.findall(rf"\b{word}\b", asm))


@pytest.mark.parametrize("a_type, b_type, shape, spec, instr", [
    (TP.INT8, TP.INT8, (32, 64), "arm64{profile=cortex-a76}", "sdot"),
    (TP.INT8, TP.INT8, (2, 8, 64), "arm64{mcpu=generic,dotprod=1}", "sdot"),  # batched activations
    (TP.UINT8, TP.UINT8, (32, 64), "arm64{profile=neoverse-n1}", "udot"),
    (TP.UINT8, TP.INT8, (32, 64), "arm64{profile=apple-m2}", "usdot"),  # i8mm's mixed-sign dot
    (TP.INT8, TP.UINT8, (12, 64), "arm64{profile=neoverse-v1}", "usdot"),
])
def test_int8_matmul_uses_dot_product_instructions(a_type, b_type, shape, spec, instr) -> None:
    asm, sched = _asm(_int8_matmul(a_type, b_type, shape), spec)
    assert _count(asm, instr) > 0, f"no {instr} in the {spec} assembly"
    assert "int8 dot-product kernels: 1" in sched


@pytest.mark.parametrize("a_type, b_type, spec", [
    (TP.INT8, TP.INT8, "arm64"),                      # generic ARMv8-A: no dotprod
    (TP.INT8, TP.INT8, "arm64{profile=cortex-a76,dotprod=0}"),
    (TP.UINT8, TP.INT8, "arm64{profile=cortex-a76}"),  # mixed signs need i8mm's usdot
])
def test_no_dot_product_without_the_feature(a_type, b_type, spec) -> None:
    asm, sched = _asm(_int8_matmul(a_type, b_type), spec)
    assert not any(_count(asm, w) for w in ("sdot", "udot", "usdot"))
    assert "int8 dot-product" not in sched


def test_dot_product_rule_near_misses() -> None:
    # N not a multiple of 4, and a non-zero zero point (subtracted inside the reduction): default schedules
    asm, sched = _asm(_int8_matmul(n=30), "arm64{profile=cortex-a76}")
    assert _count(asm, "sdot") == 0 and "int8 dot-product" not in sched
    w = np.random.default_rng(0).integers(-128, 127, (64, 16)).astype(np.int8)
    m = _model([h.make_node("MatMulInteger", ["x", "w", "xz"], ["y"])], [h.make_tensor_value_info("x", TP.INT8, [8, 64])],
               [h.make_tensor_value_info("y", TP.INT32, [8, 16])], [nh.from_array(w, "w"), nh.from_array(np.int8(3), "xz")])
    asm, sched = _asm(m, "arm64{profile=cortex-a76}")
    assert "int8 dot-product" not in sched


# --- cross-compiled artifacts -------------------------------------------------------------------


def _elf_machine(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", "not an ELF file"
    return int.from_bytes(head[18:20], "little")


@needs_cxx
def test_artifact_is_aarch64_elf_with_manifest(tmp_path) -> None:
    art = graphopt.compile(_conv_net(), target="arm64{profile=neoverse-n1,asm=1}")
    m = art.manifest
    lib = os.path.join(art.path, m["files"]["library"]["path"])
    assert _elf_machine(lib) == EM_AARCH64
    t = m["target"]
    assert t["name"] == "arm64" and t["triple"] == "aarch64-linux-gnu" and t["profile"] == "neoverse-n1"
    assert t["tvm"]["mtriple"] == "aarch64-linux-gnu" and t["tvm"]["mcpu"] == "neoverse-n1" and "+neon" in t["tvm"]["mattr"]
    assert t["features"]["neon"] and t["features"]["dotprod"] and not t["features"]["sve"]
    assert t["threads"] == 1  # the host's cores mean nothing for the board
    assert m["runtime"]["kind"] == "tvm-relax-vm" and m["runtime"]["params"]
    assert os.path.exists(os.path.join(art.path, "params.npz"))
    asm = open(os.path.join(art.path, "kernels.s"), encoding="utf-8").read()
    assert re.search(r"\bfmla\b", asm), "fp32 kernels should use NEON fused multiply-adds"
    out = art.save(str(tmp_path / "a"))
    assert json.load(open(os.path.join(out, "manifest.json")))["target"]["name"] == "arm64"


@needs_cxx
def test_cross_compiler_missing_is_one_line_error(tmp_path) -> None:
    with pytest.raises(graphopt.GraphoptError, match="cross compiler"):
        graphopt.compile(_int8_matmul(), target="arm64{cxx=no-such-aarch64-g++}")


@needs_cxx
def test_tuning_without_rpc_is_refused(tmp_path) -> None:
    with pytest.raises(graphopt.GraphoptError, match="rpc=HOST:PORT"):
        graphopt.compile(_int8_matmul(), target="arm64", tune=4, tuning_db=str(tmp_path / "db"))


@needs_cxx
def test_runner_missing_runtime_is_artifact_error(tmp_path, monkeypatch) -> None:
    art = graphopt.compile(_int8_matmul(), target="arm64")
    monkeypatch.setenv("GRAPHOPT_ARM64_HOME", str(tmp_path / "empty"))
    if arm64_env.is_aarch64_host():
        pytest.skip("native aarch64: the artifact runs in-process")
    with pytest.raises(ArtifactError, match="setup"):
        graphopt.runtime.load(art.path)


# --- executed under qemu --------------------------------------------------------------------------


@needs_runner
def test_conv_net_runs_under_qemu_like_onnxruntime(tmp_path) -> None:
    m = _conv_net()
    art = graphopt.compile(m, target="arm64{profile=cortex-a76}")
    runner = graphopt.runtime.load(art.save(str(tmp_path / "a")))
    if not arm64_env.is_aarch64_host():
        assert isinstance(runner, QemuRunner)
    for batch in (1, 3):  # the batch axis stays symbolic
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        (y,) = runner.run({"x": x})
        (ref,) = _ort(m, {"x": x})
        assert y.shape == ref.shape
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(UsageError, match="dtype"):
        runner.run({"x": np.zeros((1, 3, 16, 16), np.float64)})
    stats = runner.benchmark({"x": x}, repeat=2)
    assert stats["mean_ms"] > 0


@needs_runner
@pytest.mark.parametrize("a_type, b_type, spec", [
    (TP.INT8, TP.INT8, "arm64{profile=cortex-a76}"),     # sdot executed
    (TP.UINT8, TP.INT8, "arm64{profile=neoverse-v1}"),   # usdot (i8mm) executed
    (TP.INT8, TP.INT8, "arm64"),                          # NEON without dotprod
])
def test_int8_matmul_exact_under_qemu(a_type, b_type, spec) -> None:
    m = _int8_matmul(a_type, b_type, (2, 16, 64), n=32)
    x = _int_input(a_type, (2, 16, 64))
    (y,) = graphopt.compile(m, target=spec).run({"x": x})
    # numpy's exact int32 product: onnxruntime's AVX2 uint8×int8 kernel saturates int16 pair sums
    np.testing.assert_array_equal(y, _exact_matmul(m, x))
    if a_type == b_type:
        np.testing.assert_array_equal(y, _ort(m, {"x": x})[0])


@needs_runner
def test_corrupted_library_is_refused(tmp_path) -> None:
    out = graphopt.compile(_int8_matmul(), target="arm64").save(str(tmp_path / "a"))
    with open(os.path.join(out, "model.so"), "r+b") as f:
        f.seek(200)
        f.write(b"\0\1\2\3")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        graphopt.runtime.load(out)


@needs_runner
def test_cli_compile_verify_and_run(tmp_path) -> None:
    src = tmp_path / "net.onnx"
    onnx.save(_conv_net(2), src)
    out = tmp_path / "art"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", str(src), "--target", "arm64{profile=cortex-a76}", "-o", str(out),
                        "--verify"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "verify: ok" in r.stderr and "x[2x3x16x16]" in r.stderr  # (the verdict names the shapes it ran)
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    r = subprocess.run([sys.executable, "-m", "graphopt.run_cli", str(out), "--inputs", str(tmp_path / "x.npz"),
                        "-o", str(tmp_path / "y.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "y.npz") as y:
        np.testing.assert_allclose(y["prob"], _ort(_conv_net(2), {"x": x})[0], rtol=1e-4, atol=1e-5)


# --- tuning through RPC on loopback ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (ENV.can_build and ENV.can_run and ENV.can_serve_rpc),
                    reason="needs the aarch64 runtime and Python: python tools/arm64_env.py setup --python")
def test_rpc_tuning_on_loopback(tmp_path) -> None:
    m = _conv_net(1)
    db = tmp_path / "db"
    with arm64_env.loopback_rpc("qemu-arm64") as ep:
        art = graphopt.compile(m, target=f"arm64{{profile=cortex-a76,rpc={ep},rpc_key={ep.key}}}", tune=4, tuning_db=str(db))
    tuning = art.manifest["tuning"]
    assert tuning["status"] == "tuned", tuning
    assert tuning["new_records"] >= 1 and tuning["new_records"] > tuning["failed_records"]
    assert tuning["best_ms"]
    assert (db / "database_tuning_record.json").stat().st_size > 0
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(art.run({"x": x})[0], _ort(m, {"x": x})[0], rtol=1e-4, atol=1e-5)
    # a database tuned for aarch64 is not applied to another device's triple
    from graphopt.targets.arm64.tuning import _check_db_target

    with pytest.raises(graphopt.GraphoptError, match="one database per device"):
        _check_db_target(str(db), tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}))


# --- codebook-clustered weights stay compressed in the artifact ------------------------------------


def _clusterable_net():
    """Conv (packed by the default schedules) -> Relu -> GAP -> MatMul -> Relu -> Gemm(transB) with
    a symbolic batch; the three weights hold >= 4096 values, so fold-constants keeps their decode."""
    from graphopt.ir import Builder, DataType, Graph, Model, Shape, TensorType, Value

    rng = np.random.default_rng(0)
    x = Value("x", TensorType(DataType.FLOAT, Shape(("N", 16, 8, 8))))
    g = Graph([x], [], name="clusterable")
    b = Builder(g)
    wc = b.initializer(rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.2, "conv.w")
    wm = b.initializer(rng.standard_normal((32, 128)).astype(np.float32) * 0.2, "mm.w")
    wg = b.initializer(rng.standard_normal((64, 128)).astype(np.float32) * 0.2, "gemm.w")
    bias = b.initializer(rng.standard_normal(64).astype(np.float32), "gemm.b")
    c = b.op.Relu(b.op.Conv(x, wc, pads=[1, 1, 1, 1]))
    m = b.op.Relu(b.op.MatMul(b.op.Flatten(b.op.GlobalAveragePool(c)), wm))
    y = b.op.Gemm(m, wg, bias, transB=1)
    y.type = TensorType(DataType.FLOAT, Shape(("N", 64)))
    y.name = "y"
    g.outputs.append(y)
    return Model(g, ir_version=8, opset_imports={"": 17})


_CLUSTERED: dict = {}


def _clustered_arm64(bits: int, per_channel: bool):
    """(clustered model, cluster-weights stats, its arm64 artifact), compiled once per module."""
    key = (bits, per_channel)
    if key not in _CLUSTERED:
        m = graphopt.optimize(_clusterable_net(), f"cluster-weights{{accuracy-budget=none,bits={bits},min-size=512,per-channel={str(per_channel).lower()}}}")
        _CLUSTERED[key] = (m, m.meta["pass_timings"][-1].stats, graphopt.compile(m, "arm64{profile=cortex-a76}", "-O1"))
    return _CLUSTERED[key]


def _params_bytes(art) -> int:
    return os.path.getsize(os.path.join(art.path, "params.npz"))


@needs_cxx
@pytest.mark.parametrize("bits, per_channel", [(5, False), (3, True)])
def test_clustered_artifact_stores_codebooks(bits: int, per_channel: bool) -> None:
    _, stats, art = _clustered_arm64(bits, per_channel)
    assert stats["tensors-clustered"] == 3
    rt = art.manifest["runtime"]
    assert len(rt["codebooks"]) == 3
    # the conv weight's packing is lifted into the library, run once when loaded
    assert rt["transform"] == "main_transform_params" and rt["packed"] >= 1
    with np.load(os.path.join(art.path, "params.npz")) as z:
        stored = {k: z[k] for k in z}
    for p, e in rt["codebooks"].items():
        assert p not in stored
        assert stored[e["indices"]].dtype == np.uint8 and stored[e["indices"]].shape[0] == bits
        assert (e["axis"] is not None) == per_channel
        assert stored[e["codebook"]].size == (1 << bits) * (e["shape"][e["axis"]] if per_channel else 1)
    assert not any(a.dtype == np.float32 and a.size >= 512 for k, a in stored.items() if not k.endswith(".codebook"))
    assert _elf_machine(os.path.join(art.path, "model.so")) == EM_AARCH64
    fp32 = graphopt.compile(_clusterable_net(), "arm64{profile=cortex-a76}", "-O1")
    assert "codebooks" not in fp32.manifest["runtime"]
    ratio = _params_bytes(fp32) / _params_bytes(art)
    assert ratio > 0.8 * stats["compression"] and ratio > 2.5, (ratio, stats["compression"])


@needs_runner
@pytest.mark.parametrize("bits, per_channel", [(5, False), (3, True)])
def test_clustered_artifact_runs_under_qemu_like_onnxruntime(tmp_path, bits: int, per_channel: bool) -> None:
    clustered, _, art = _clustered_arm64(bits, per_channel)
    runner = graphopt.runtime.load(art.save(str(tmp_path / "a")))
    if not arm64_env.is_aarch64_host():
        assert isinstance(runner, QemuRunner)
    proto = graphopt.to_onnx(clustered)
    for batch in (1, 3):  # the stored weights are decoded and transformed once per runner process
        x = np.random.default_rng(batch).standard_normal((batch, 16, 8, 8)).astype(np.float32)
        (y,) = runner.run({"x": x})
        (ref,) = _ort(proto, {"x": x})
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert runner.benchmark({"x": x}, repeat=2)["mean_ms"] > 0  # --repeat with --transform


def test_runner_built_from_other_source_counts_as_missing(tmp_path, monkeypatch) -> None:
    """A runner without --transform must not be handed a clustered artifact: the stamp records
    the runner source's digest and status() treats another digest as no runner (setup rebuilds)."""
    digest = arm64_env.runner_digest()
    if digest is None:
        pytest.skip("not a source checkout: no runner source to compare with")
    monkeypatch.setenv("GRAPHOPT_ARM64_HOME", str(tmp_path))
    lib = tmp_path / "runtime" / "lib"
    lib.mkdir(parents=True)
    (lib / arm64_env.RUNNER_NAME).write_bytes(b"")
    tvm_v, ffi_v = arm64_env.tvm_versions()
    stamp = tmp_path / "runtime" / "versions.txt"
    for line, ok in (("", False), ("runner=0123456789abcdef\n", False), (f"runner={digest}\n", True)):
        stamp.write_text(f"apache-tvm={tvm_v}\napache-tvm-ffi={ffi_v}\n{line}")
        assert (arm64_env.status().runner is not None) is ok, line


def test_runner_source_ships_as_package_data() -> None:
    """The runner's C++ source and build script live in the package (targets/arm64/runner/, listed
    as package data in pyproject.toml), so an installed graphopt can build the runner: library
    code does not read tools/ at run time."""
    from pathlib import Path

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    src = arm64_env.runner_source()
    pkg = Path(arm64_env.__file__).resolve().parent
    assert src is not None and src.parent == pkg / "runner" and (src.parent / "build.sh").is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "runner/*" in data["graphopt.targets.arm64"]
    assert '"tools"' not in (pkg / "toolchain.py").read_text()  # (it joined root / "tools" / "arm64_runner" before)

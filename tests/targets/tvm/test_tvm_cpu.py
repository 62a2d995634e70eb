"""The cpu target: lowering to Relax per kernel group, artifacts, runtime, CLI.

Models are built here (no .cache files). Every numeric check compares against onnxruntime on the
unmodified model. Skipped cleanly when apache-tvm is not installed.
"""

from __future__ import annotations

import json
import os
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
from graphopt.target import ArtifactError  # noqa: E402


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def _ort(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _cnn(batch: int | str = "N") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = rng.standard_normal(8).astype(np.float32)
    scale, bias = rng.random(8).astype(np.float32) + 0.5, rng.standard_normal(8).astype(np.float32)
    mean, var = rng.standard_normal(8).astype(np.float32), rng.random(8).astype(np.float32) + 0.5
    w2 = rng.standard_normal((10, 8)).astype(np.float32)
    b2 = rng.standard_normal(10).astype(np.float32)
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        h.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["bn"], name="bn"),
        h.make_node("Relu", ["bn"], ["r"], name="relu"),
        h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        h.make_node("GlobalAveragePool", ["p"], ["gap"], name="gap"),
        h.make_node("Flatten", ["gap"], ["f"], name="flat"),
        h.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc"),
        h.make_node("Softmax", ["y"], ["prob"], axis=-1, name="softmax"),
    ]
    inits = [nh.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (scale, "s"), (bias, "bb"), (mean, "m"), (var, "v"), (w2, "w2"), (b2, "b2")]]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [batch, 3, 16, 16])],
                  [h.make_tensor_value_info("prob", TP.FLOAT, None)], inits)


@pytest.fixture(scope="module")
def cnn_artifact():
    m = _cnn()
    return m, graphopt.compile(m, "cpu", "-O2", threads=2)


def test_compile_runs_like_onnxruntime_with_symbolic_batch(cnn_artifact):
    m, art = cnn_artifact
    assert isinstance(art, graphopt.Artifact)
    assert art.manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 3, 16, 16]}]
    for batch in (1, 3):  # one library, two batch sizes
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        (got,) = art.run({"x": x})
        (want,) = _ort(m, {"x": x})
        assert got.shape == want.shape == (batch, 10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_one_kernel_per_plan_kernels_group():
    """Each group plan-kernels chose becomes one primitive Relax function and one PrimFunc."""
    from graphopt.passes.fusion.kernel_groups import kernel_groups
    from graphopt.targets.tvm import build as B
    from graphopt.targets.tvm.lower import lowerer as L

    model = graphopt.optimize(graphopt.load(_cnn(2)), "-O2,plan-kernels")
    groups = kernel_groups(model)
    assert any(len(ns) > 1 for ns in groups.values()), "the test model must have a fused group"
    lowered = L.lower(model)
    assert sorted(lowered.groups) == sorted(groups) and not lowered.inline_groups
    prim = [gv.name_hint for gv in lowered.mod.get_global_vars()
            if isinstance(lowered.mod[gv], tvm.relax.Function) and "Primitive" in (lowered.mod[gv].attrs or {})]
    assert sorted(prim) == sorted(groups)
    fused = L.legalize_and_fuse(lowered.mod, B.host_target(threads=1))
    tir = sorted(gv.name_hint for gv in fused.get_global_vars() if isinstance(fused[gv], tvm.tirx.PrimFunc))
    assert tir == sorted(groups)  # exactly one PrimFunc per group, named after it
    # weights are main's parameters, not constants baked into the library
    assert len(lowered.params) >= 2 and all(a.size > 16 for a in lowered.params.values())


def test_artifact_save_load_and_hash_check(cnn_artifact, tmp_path):
    m, art = cnn_artifact
    out = art.save(str(tmp_path / "art"))
    assert sorted(os.listdir(out)) == ["manifest.json", "model.so", "params.npz", "report.json"]
    man = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert man["target"]["name"] == "cpu" and man["target"]["tvm"]["kind"] == "llvm"
    from graphopt.targets.machine import env_mcpu

    # the host's mcpu, or the one GRAPHOPT_CPU_MCPU forces the default onto; the machine model too
    assert man["target"]["tvm"]["mcpu"] == (env_mcpu() or str(tvm.target.codegen.llvm_get_system_cpu()))
    assert man["target"]["machine"]["mcpu"] == man["target"]["tvm"]["mcpu"]
    assert man["versions"]["tvm"] == tvm.__version__ and len(man["source"]["sha256"]) == 64
    # the weights live beside the library, which stays small
    assert man["files"]["params"]["bytes"] > 0 and man["kernels"]["groups"] >= 3

    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    runner = graphopt.runtime.load(out, threads=1)
    assert runner.threads == 1
    np.testing.assert_allclose(runner.run([x])[0], _ort(m, {"x": x})[0], rtol=1e-4, atol=1e-5)
    stats = runner.benchmark({"x": x}, warmup=1, repeat=5)
    assert stats["runs"] == 5 and 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"]

    # bad inputs: one-line usage errors
    with pytest.raises(graphopt.UsageError, match="no input 'y'"):
        runner.run({"y": x})
    with pytest.raises(graphopt.UsageError, match="shape"):
        runner.run({"x": x[:, :2]})
    with pytest.raises(graphopt.UsageError, match="dtype"):
        runner.run({"x": x.astype(np.float64)})

    # a library that does not match its manifest is refused before it is loaded
    lib = tmp_path / "art" / "model.so"
    data = lib.read_bytes()
    lib.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        graphopt.runtime.load(out)
    (tmp_path / "art" / "params.npz").unlink()
    lib.write_bytes(data)
    with pytest.raises(ArtifactError, match="missing"):
        graphopt.runtime.load(out)
    with pytest.raises(ArtifactError, match="not a graphopt artifact"):
        graphopt.runtime.load(str(tmp_path))


def test_save_refuses_a_foreign_folder(cnn_artifact, tmp_path):
    _, art = cnn_artifact
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(graphopt.UsageError, match="not empty"):
        art.save(str(tmp_path / "other"))
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
    art.save(str(tmp_path / "a"))
    art.save(str(tmp_path / "a"))  # an artifact folder is replaced
    assert sorted(os.listdir(tmp_path)) == ["a", "other"]


def test_shape_deciding_inputs_and_inline_groups():
    """Constant shape/axes/pads/k inputs are specialised; dynamic-batch shape arithmetic
    (Shape→Gather→Unsqueeze→Concat→Reshape) is evaluated at compile time; the results match."""
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        h.make_node("Unsqueeze", ["b", "axes0"], ["b1"]),
        h.make_node("Concat", ["b1", "minus1"], ["shape"], axis=0),
        h.make_node("Reshape", ["x", "shape"], ["flat"]),
        h.make_node("TopK", ["flat", "k"], ["vals", "idx"], axis=-1),
        h.make_node("Pad", ["vals", "pads"], ["padded"], mode="constant"),
        h.make_node("ReduceSum", ["padded", "axes1"], ["sum"], keepdims=1),
        h.make_node("Clip", ["sum", "lo", "hi"], ["y"]),
    ]
    inits = [
        nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array([0], np.int64), "axes0"),
        nh.from_array(np.array([-1], np.int64), "minus1"), nh.from_array(np.array([5], np.int64), "k"),
        nh.from_array(np.array([0, 1, 0, 2], np.int64), "pads"), nh.from_array(np.array([1], np.int64), "axes1"),
        nh.from_array(np.array(-3.0, np.float32), "lo"), nh.from_array(np.array(3.0, np.float32), "hi"),
    ]
    m = _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, ["B", 4, 6])],
               [h.make_tensor_value_info("y", TP.FLOAT, None), h.make_tensor_value_info("idx", TP.INT64, None)], inits)
    art = graphopt.compile(m, "cpu", "-O1", threads=1)
    for batch in (1, 2):
        x = np.random.default_rng(batch).standard_normal((batch, 4, 6)).astype(np.float32)
        got, want = art.run({"x": x}), _ort(m, {"x": x})
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    k = art.manifest["kernels"]
    # the shape arithmetic became part of a kernel (no shape_of/shape_to_tensor at run time);
    # TopK (sorting) is no TIR kernel: its group is emitted inline, with the reason recorded
    assert not any("shape" in why for why in k["inline"].values()), k
    assert k["primitive"] >= 3 and any("topk" in why for why in k["inline"].values()), k


def test_unsupported_operator_is_a_one_line_error():
    m = _model([h.make_node("StringNormalizer", ["t"], ["u"])],
               [h.make_tensor_value_info("t", TP.STRING, [2])],
               [h.make_tensor_value_info("u", TP.STRING, [2])])
    with pytest.raises(graphopt.GraphoptError) as e:
        graphopt.compile(m, "cpu", "-O0")
    assert "\n" not in str(e.value) and ("string" in str(e.value).lower() or "StringNormalizer" in str(e.value))
    g = h.make_graph([h.make_node("Foo", ["x"], ["y"], domain="com.example", name="foo")], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [2])], [h.make_tensor_value_info("y", TP.FLOAT, [2])])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.example", 1)])
    with pytest.raises(graphopt.GraphoptError, match="'foo'.*domain 'com.example' is not supported by the cpu target"):
        graphopt.compile(m, "cpu", "-O0")


def test_unknown_target_and_tuning_without_db():
    m = _cnn(1)
    with pytest.raises(graphopt.UsageError, match="unknown target"):
        graphopt.compile(m, "gpu-of-dreams")
    with pytest.raises(graphopt.GraphoptError, match="tuning-db"):
        graphopt.compile(m, "cpu", tune=4)


def test_import_graphopt_does_not_import_tvm():
    code = "import sys, graphopt, graphopt.runtime, graphopt.target; print('tvm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_compile_verify_and_run(tmp_path):
    from graphopt import cli, run_cli

    src = tmp_path / "m.onnx"
    onnx.save(_cnn(1), src)
    out = tmp_path / "out"
    rc = cli.main([str(src), "--target", "cpu", "-O2", "--threads", "1", "-o", str(out), "--verify", "--quiet",
                   "--report", str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verify"]["ok"] and rep["status"] == "ok" and rep["target"] == "cpu"
    assert json.loads((out / "report.json").read_text())["verify"]["ok"]

    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    rc = run_cli.main([str(out), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")])
    assert rc == 0
    y = np.load(tmp_path / "y.npz")["prob"]
    np.testing.assert_allclose(y, _ort(_cnn(1), {"x": x})[0], rtol=1e-4, atol=1e-5)
    assert run_cli.main([str(out), "--benchmark", "--repeat", "3", "--warmup", "1", "--json"]) == 0

    # a tampered library: exit 2, one line
    lib = out / "model.so"
    lib.write_bytes(lib.read_bytes() + b"x")
    assert run_cli.main([str(out)]) == 2
    # usage errors
    assert cli.main([str(src), "--target", "cpu", "--tune", "8", "-o", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_cli_verify_failure_writes_nothing(tmp_path, monkeypatch):
    from graphopt import cli
    from graphopt.target import Artifact

    src = tmp_path / "m.onnx"
    onnx.save(_cnn(1), src)
    real_run = Artifact.run
    monkeypatch.setattr(Artifact, "run", lambda self, feeds: [a + 1.0 for a in real_run(self, feeds)])
    rc = cli.main([str(src), "--target", "cpu", "-O1", "-o", str(tmp_path / "out"), "--verify", "--quiet"])
    assert rc == 3
    assert not (tmp_path / "out").exists()


def test_gather_with_a_bad_index_stays_in_bounds():
    """The frontend's take uses mode "fast" (reads outside the tensor on a bad index); the cpu
    target clips instead, so a wrong input cannot read foreign memory or crash the process."""
    m = _model([h.make_node("Gather", ["d", "i"], ["y"], axis=0)],
               [h.make_tensor_value_info("d", TP.FLOAT, [4, 3]), h.make_tensor_value_info("i", TP.INT64, [4])],
               [h.make_tensor_value_info("y", TP.FLOAT, [4, 3])])
    art = graphopt.compile(m, "cpu", "-O0", threads=1)
    d = np.arange(12, dtype=np.float32).reshape(4, 3)
    i = np.array([0, -1, 2, 1])
    np.testing.assert_array_equal(art.run({"d": d, "i": i})[0], _ort(m, {"d": d, "i": i})[0])
    out = art.run({"d": d, "i": np.array([0, 1 << 40, -(1 << 40), 3])})[0]
    assert np.isin(out, d).all()


def _npz(art) -> dict[str, np.ndarray]:
    with np.load(os.path.join(art.path, "params.npz"), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_weight_packing_runs_once_at_compile_time(cnn_artifact, monkeypatch):
    """The conv kernel's weight packing is split out of the kernel, lifted out of `main` and run at
    compile time: params.npz holds the packed weight `main` takes (hash and names in the manifest),
    and the outputs equal those of an artifact that packs inside the kernel at every run."""
    from graphopt.targets.cpu import CpuTarget

    m, art = cnn_artifact
    rt = art.manifest["runtime"]
    # the conv's weight, and the classifier's (a symbolic-batch GEMV on the matmul schedule, its
    # weight packed into column panels)
    assert rt["packed"] == 2 and art.report["weights"] == {"packed_at_compile": 2}
    params = _npz(art)
    assert sorted(params) == sorted(rt["params"])
    shapes = [params[n].shape for n in rt["params"]]
    assert (1, 3, 3, 3, 8) in shapes and (8, 3, 3, 3) not in shapes  # [oc/8, ic, kh, kw, 8], not OIHW
    packed = next(params[n] for n in rt["params"] if params[n].ndim == 5)
    w1 = nh.to_array(next(i for i in m.graph.initializer if i.name == "w1"))
    bn = [nh.to_array(next(i for i in m.graph.initializer if i.name == n)) for n in ("s", "v")]
    folded = w1 * (bn[0] / np.sqrt(bn[1] + 1e-5))[:, None, None, None]  # -O2 folds the BatchNormalization
    np.testing.assert_allclose(packed[0].transpose(3, 0, 1, 2), folded, rtol=1e-5, atol=1e-6)
    assert art.manifest["files"]["params"]["sha256"] == graphopt.target.sha256_file(os.path.join(art.path, "params.npz"))

    monkeypatch.setattr(CpuTarget, "param_transform_target", lambda self, target: None)
    inside = graphopt.compile(m, "cpu", "-O2", threads=2)
    assert inside.manifest["runtime"]["packed"] == 0
    assert (8, 3, 3, 3) in [a.shape for a in _npz(inside).values()]
    x = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(art.run({"x": x})[0], inside.run({"x": x})[0], rtol=1e-6, atol=1e-7)


def test_no_packing_kernel_leaves_the_weights_alone():
    """Without a kernel that packs a weight the hoisting does nothing: the weights are saved as given."""
    c = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    m = _model([h.make_node("Add", ["x", "c"], ["a"]), h.make_node("Tanh", ["a"], ["y"])],
               [h.make_tensor_value_info("x", TP.FLOAT, [4, 5])], [h.make_tensor_value_info("y", TP.FLOAT, [4, 5])],
               [nh.from_array(c, "c")])
    art = graphopt.compile(m, "cpu", "-O2", threads=1)
    assert art.manifest["runtime"]["packed"] == 0
    params = _npz(art)
    assert [params[n].shape for n in art.manifest["runtime"]["params"]] == [(4, 5)]
    np.testing.assert_array_equal(next(iter(params.values())), c)
    x = np.ones((4, 5), np.float32)
    np.testing.assert_allclose(art.run({"x": x})[0], np.tanh(x + c), rtol=1e-6)


def test_symbolic_batch_kernels_keep_noalias(monkeypatch):
    """A symbolic batch adds VMShapeLower's `shape_func` to the library; TVM's LLVM codegen emits
    every kernel with the `noalias` flag of the last function it declared (sorted by symbol:
    `shape_func`), so without `restrict_host_funcs` no kernel's pointers were `noalias` and
    ResNet-50's convs ran 2-3x slower than with the batch fixed. Every kernel's compute function
    must keep `noalias` pointers, and the artifact must still run batch 1 and 3 like onnxruntime."""
    import re

    from graphopt.targets import cpu as C
    from graphopt.targets.tvm import build as B

    seen: dict = {}
    orig = C.CpuTarget.build

    def capture(self, mod, target):
        seen["mod"], seen["target"] = mod, target
        return orig(self, mod, target)

    monkeypatch.setattr(C.CpuTarget, "build", capture)
    m = _cnn()
    art = graphopt.compile(m, "cpu", "-O2", threads=2)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        np.testing.assert_allclose(art.run({"x": x})[0], _ort(m, {"x": x})[0], rtol=1e-4, atol=1e-5)
    fin = B.finish_pipeline(seen["target"])(seen["mod"])
    prims = {gv.name_hint: f for gv, f in fin.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert any("shape_func" in n for n in prims), "a symbolic batch lowers shape computations to a shape_func"
    assert all(f.attrs.get("tirx.noalias", False) for f in prims.values())
    ll = B.build(seen["mod"], seen["target"]).mod.imports[0].inspect_source("ll")
    computes = re.findall(r"^define .*@(k\w*_compute_)\((.*)\)", ll, flags=re.M)
    assert computes, "kernels are emitted with a separate compute function"
    for name, params in computes:
        pointers = [p for p in params.split(", ") if p.startswith("ptr")]
        assert pointers and all("noalias" in p for p in pointers), f"{name}: {params}"

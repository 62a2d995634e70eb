"""The cuda target: builds here without a GPU (dlight schedules, CUDA source in the library, PTX
from nvcc for the chosen arch) and runs through graphopt.runtime on a GPU; the run tests skip
cleanly without one (no driver / no device 0).

Models are built here; numbers are compared with onnxruntime on the CPU.
"""

from __future__ import annotations

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
from graphopt.targets.cuda import CudaTarget, gpu_available, nvcc  # noqa: E402

GPU = gpu_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="no NVIDIA GPU (nvidia-smi / tvm.cuda(0).exist)")
needs_nvcc = pytest.mark.skipif(nvcc() is None, reason="nvcc is not installed")


def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def _net() -> onnx.ModelProto:
    """conv+relu → pool → MatMul+bias → LayerNorm-free softmax: Fallback, Reduction and Matmul rules."""
    rng = np.random.default_rng(0)
    arrays = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "b1": rng.standard_normal(8).astype(np.float32),
              "w2": rng.standard_normal((8 * 8 * 8, 64)).astype(np.float32) * 0.05, "b2": rng.standard_normal(64).astype(np.float32)}
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"]),
        h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Flatten", ["p"], ["f"]),
        h.make_node("MatMul", ["f", "w2"], ["mm"]),
        h.make_node("Add", ["mm", "b2"], ["y"]),
        h.make_node("Softmax", ["y"], ["prob"], axis=-1),
    ]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [2, 3, 16, 16])],
                  [h.make_tensor_value_info("prob", TP.FLOAT, None)], [nh.from_array(a, n) for n, a in arrays.items()])


def test_options() -> None:
    assert get_target("cuda").arch == "sm_80"
    assert get_target("cuda{arch=sm_90}").arch == "sm_90"
    assert get_target("cuda{arch=h100}").arch == "sm_90"
    t = get_target("cuda{arch=sm_86}").tvm_target(1)
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == "sm_86" and t.host is not None
    for bad, msg in (("cuda{arch=gfx90a}", "not sm_XX"), ("cuda{fast=1}", "unknown option"), ("cuda{ptx=2}", "not 0 or 1")):
        with pytest.raises(UsageError, match=msg):
            get_target(bad)


@pytest.mark.parametrize("spec, arch", [("cuda", "sm_80"), ("cuda{arch=sm_90}", "sm_90")])
def test_builds_without_gpu(spec: str, arch: str) -> None:
    art = graphopt.compile(_net(), target=spec)
    m = art.manifest
    t = m["target"]
    assert t["name"] == "cuda" and t["device"] == "cuda" and t["arch"] == arch
    assert t["tvm"]["kind"] == "cuda" and t["tvm"]["arch"] == arch and t["tvm"]["host"]["kind"] == "llvm"
    assert m["runtime"]["kind"] == "tvm-relax-vm" and m["runtime"]["params"]
    assert art.report["schedules"]["default"] == "dlight gpu"
    lib = open(os.path.join(art.path, m["files"]["library"]["path"]), "rb").read()
    kernels = set(re.findall(rb'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', lib))
    assert len(kernels) >= 4, kernels  # one CUDA kernel per kernel group (at least), as source in the library
    assert all(k.endswith(b"_kernel") for k in kernels)
    if nvcc() is not None:
        assert t["ptx"] is True
        ptx = open(os.path.join(art.path, "kernels.ptx"), encoding="utf-8").read()
        assert f".target {arch}" in ptx
        entries = set(re.findall(r"\.entry (\w+)\(", ptx))
        assert {k.decode() for k in kernels} <= entries


@needs_nvcc
def test_ptx_check_can_be_skipped() -> None:
    art = graphopt.compile(_net(), target="cuda{ptx=0}")
    assert art.manifest["target"]["ptx"] is False
    assert not os.path.exists(os.path.join(art.path, "kernels.ptx"))


def test_cli_build(tmp_path) -> None:
    src = tmp_path / "net.onnx"
    onnx.save(_net(), src)
    out = tmp_path / "art"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", str(src), "--target", "cuda{arch=sm_90}", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "manifest.json").exists() and (out / "model.so").exists()


@pytest.mark.skipif(GPU, reason="checks the refusal on a machine without a GPU")
def test_no_gpu_refusals(tmp_path) -> None:
    art = graphopt.compile(_net(), target="cuda")
    with pytest.raises(ArtifactError, match="needs an NVIDIA GPU"):
        graphopt.runtime.load(art.path)
    with pytest.raises(graphopt.GraphoptError, match="has none"):
        graphopt.compile(_net(), target="cuda", tune=8, tuning_db=str(tmp_path / "db"))


@needs_gpu
@pytest.mark.parametrize("spec", ["cuda"])
def test_runs_on_gpu_like_onnxruntime(spec: str) -> None:
    m = _net()
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    art = graphopt.compile(m, target=f"cuda{{arch={arch}}}")
    runner = art.runner()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (y,) = runner.run({"x": x})
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert runner.benchmark({"x": x}, repeat=3)["mean_ms"] > 0


def test_cuda_target_is_a_target() -> None:
    assert isinstance(get_target("cuda"), CudaTarget)


# --- codebook-clustered weights stay compressed in the artifact ------------------------------------


def _transposed_net() -> onnx.ModelProto:
    """_net with the MatMul weight stored transposed ([64, 512] -> Transpose): once the weight is
    clustered, the Transpose depends on weights only and is lifted into main_transform_params,
    which runs on the device when the artifact is loaded."""
    rng = np.random.default_rng(0)
    arrays = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "b1": rng.standard_normal(8).astype(np.float32),
              "w2t": rng.standard_normal((64, 8 * 8 * 8)).astype(np.float32) * 0.05, "b2": rng.standard_normal(64).astype(np.float32)}
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["r"]),
        h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Flatten", ["p"], ["f"]),
        h.make_node("Transpose", ["w2t"], ["w2"], perm=[1, 0]),
        h.make_node("MatMul", ["f", "w2"], ["mm"]),
        h.make_node("Add", ["mm", "b2"], ["y"]),
        h.make_node("Softmax", ["y"], ["prob"], axis=-1),
    ]
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [2, 3, 16, 16])],
                  [h.make_tensor_value_info("prob", TP.FLOAT, None)], [nh.from_array(a, n) for n, a in arrays.items()])


def _clustered(net: onnx.ModelProto, bits: int = 4):
    from graphopt.onnx_io import load

    return graphopt.optimize(load(net), f"cluster-weights{{accuracy-budget=none,bits={bits},min-size=512}}")


def _params_bytes(art) -> int:
    return os.path.getsize(os.path.join(art.path, "params.npz"))


@pytest.mark.parametrize("net", [_net, _transposed_net])
def test_clustered_builds_without_gpu(net) -> None:
    clustered = _clustered(net())
    stats = clustered.meta["pass_timings"][-1].stats
    assert stats["tensors-clustered"] == 1
    art = graphopt.compile(clustered, target="cuda{ptx=0}", pipeline="-O1")
    rt = art.manifest["runtime"]
    (entry,) = rt["codebooks"].values()
    with np.load(os.path.join(art.path, "params.npz")) as z:
        stored = {k: z[k] for k in z}
    assert stored[entry["indices"]].dtype == np.uint8 and stored[entry["indices"]].shape[0] == 4
    assert stored[entry["codebook"]].size == 16
    assert sorted(entry["shape"]) == [64, 512]
    assert not any(a.dtype == np.float32 and a.size >= 512 for a in stored.values())
    lib = open(os.path.join(art.path, "model.so"), "rb").read()
    if net is _transposed_net:  # the transpose runs once, on the device, when the artifact is loaded
        assert rt["transform"] == "main_transform_params" and rt["packed"] >= 1
        assert b"main_transform_params" in lib
    else:  # nothing depends on weights alone: main takes the decoded weights as they are
        assert "transform" not in rt and b"main_transform_params" not in lib
    fp32 = graphopt.compile(net(), target="cuda{ptx=0}", pipeline="-O1")
    assert "codebooks" not in fp32.manifest["runtime"]
    ratio = _params_bytes(fp32) / _params_bytes(art)
    assert ratio > 0.8 * stats["compression"] and ratio > 4, (ratio, stats["compression"])


@needs_gpu
@pytest.mark.parametrize("net", [_net, _transposed_net])
def test_clustered_runs_on_gpu_like_onnxruntime(net) -> None:
    clustered = _clustered(net())
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    art = graphopt.compile(clustered, target=f"cuda{{arch={arch}}}", pipeline="-O1")
    assert art.manifest["runtime"]["codebooks"]
    runner = art.runner()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (y,) = runner.run({"x": x})
    proto = graphopt.to_onnx(clustered).SerializeToString()
    ref = ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)

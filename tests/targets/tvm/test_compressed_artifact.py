"""cpu artifacts of codebook-clustered models keep the compressed form.

cluster-weights stores a weight as indices + codebook with a decode chain in the graph; the cpu
target decodes it for the kernels but stores the indices (bit-packed) and the codebook in
params.npz, and graphopt.runtime decodes them (and runs the weight packing) when the artifact
is loaded. Models are built here; outputs are compared with onnxruntime on the clustered ONNX
model. Skipped cleanly without apache-tvm.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

tvm = pytest.importorskip("tvm")

import graphopt  # noqa: E402
import graphopt.runtime  # noqa: E402
from graphopt.ir import Builder, DataType, Graph, Model, Shape, TensorType, Value  # noqa: E402
from graphopt.passes.sharing import codebook as cbk  # noqa: E402
from graphopt.target import ArtifactError  # noqa: E402


def _net(opset: int = 17, ir: int = 8) -> Model:
    """Conv (its weight gets packed by the default schedules) -> Relu -> pooled -> MatMul ->
    Gemm(transB), plus an embedding Gather added to the MatMul output: every reader kind. The
    weights hold >= 4096 values: fold-constants re-expands smaller decodes (within its growth
    allowance), and those are then float weights like any other."""
    rng = np.random.default_rng(0)
    x = Value("x", TensorType(DataType.FLOAT, Shape((2, 16, 12, 12))))
    ids = Value("ids", TensorType(DataType.INT64, Shape((2,))))
    g = Graph([x, ids], [], name="net")
    b = Builder(g)
    wc = b.initializer(rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.2, "conv.w")
    wm = b.initializer(rng.standard_normal((32, 128)).astype(np.float32) * 0.2, "mm.w")
    wg = b.initializer(rng.standard_normal((64, 128)).astype(np.float32) * 0.2, "gemm.w")
    emb = b.initializer(rng.standard_normal((40, 128)).astype(np.float32), "emb")
    bias = b.initializer(rng.standard_normal(64).astype(np.float32), "gemm.b")
    c = b.op.Relu(b.op.Conv(x, wc, pads=[1, 1, 1, 1]))
    p = b.op.Flatten(b.op.GlobalAveragePool(c))
    m = b.op.Add(b.op.MatMul(p, wm), b.op.Gather(emb, ids, axis=0))
    y = b.op.Gemm(b.op.Relu(m), wg, bias, transB=1)
    y.type = TensorType(DataType.FLOAT, Shape((2, 64)))
    y.name = "y"
    g.outputs.append(y)
    return Model(g, ir_version=ir, opset_imports={"": opset})


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((2, 16, 12, 12)).astype(np.float32), "ids": np.array([3, 17], dtype=np.int64)}


def _ort(model: Model, feeds: dict) -> np.ndarray:
    proto = graphopt.to_onnx(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _dir_bytes(path: str, files: tuple[str, ...] = ("params.npz",)) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in files)


@pytest.fixture(scope="module")
def fp32_artifact():
    return graphopt.compile(_net(), "cpu", "-O1")


_BUILT: dict = {}


def _clustered(bits: int, opset: int, ir: int, per_channel: bool):
    """(clustered model, its stats, its cpu artifact), compiled once per module."""
    key = (bits, opset, ir, per_channel)
    if key not in _BUILT:
        m = graphopt.optimize(_net(opset, ir), f"cluster-weights{{accuracy-budget=none,bits={bits},min-size=512,per-channel={str(per_channel).lower()}}}")
        _BUILT[key] = (m, m.meta["pass_timings"][-1].stats, graphopt.compile(m, "cpu", "-O1"))
    return _BUILT[key]


@pytest.mark.parametrize("bits,opset,ir,per_channel", [(5, 17, 8, False), (4, 21, 10, False), (3, 17, 8, True)])
def test_artifact_stores_indices_and_codebooks_and_matches_onnxruntime(fp32_artifact, bits, opset, ir, per_channel):
    clustered, stats, art = _clustered(bits, opset, ir, per_channel)
    assert stats["tensors-clustered"] == 4
    rt = art.manifest["runtime"]
    entries = rt["codebooks"]
    assert len(entries) == 4  # every clustered weight is stored compressed
    with np.load(os.path.join(art.path, "params.npz")) as z:
        stored = {k: z[k] for k in z}
    shapes = {(32, 16, 3, 3), (32, 128), (64, 128), (40, 128)}
    for p, e in entries.items():
        assert p not in stored and stored[e["indices"]].dtype == np.uint8 and stored[e["indices"]].shape[0] == bits
        assert tuple(e["shape"]) in shapes
    assert not any(a.dtype == np.float32 and a.size >= 512 for k, a in stored.items() if not k.endswith(".codebook"))
    # the conv weight's packing runs at load time now: main_transform_params is in the library
    assert rt.get("transform") == "main_transform_params" and rt["packed"] >= 1
    # smaller by about the ONNX ratio (the clustered weights' bytes before / after; the bias and
    # npz headers are the difference)
    ratio = _dir_bytes(fp32_artifact.path) / _dir_bytes(art.path)
    assert ratio > 0.8 * stats["compression"] and ratio > 2.5, (ratio, stats["compression"])
    feeds = _feeds()
    got = graphopt.runtime.load(art.path, threads=1).run(feeds)[0]
    np.testing.assert_allclose(got, _ort(clustered, feeds), rtol=1e-4, atol=1e-4)


def test_fp32_artifact_unchanged(fp32_artifact):
    rt = fp32_artifact.manifest["runtime"]
    assert "codebooks" not in rt and "transform" not in rt
    feeds = _feeds()
    got = graphopt.runtime.load(fp32_artifact.path, threads=1).run(feeds)[0]
    np.testing.assert_allclose(got, _ort(_net(), feeds), rtol=1e-4, atol=1e-4)


def test_tampered_params_are_refused(tmp_path):
    path = _clustered(5, 17, 8, False)[2].save(str(tmp_path / "a"))
    p = os.path.join(path, "params.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z}
    key = next(k for k in arrays if k.endswith(".indices"))
    arrays[key] = arrays[key] ^ np.uint8(1)  # one flipped bit in the stored indices
    np.savez(p, **arrays)
    with pytest.raises(ArtifactError):
        graphopt.runtime.load(path, threads=1)


def test_expand_decodes_gives_the_decoded_weights():
    clustered = graphopt.optimize(_net(), "cluster-weights{accuracy-budget=none,bits=5,min-size=512,per-channel=true}")
    feeds = _feeds()
    want = _ort(clustered, feeds)
    expanded = clustered.clone()
    info = cbk.expand_decodes(expanded)
    assert len(info) == 4
    assert not any(cbk.CODEBOOK_KEY in n.metadata_props for n in expanded.graph)
    assert not any(n.op_type in ("Div", "Mod") for n in expanded.graph)  # the decode chains are gone
    np.testing.assert_allclose(_ort(expanded, feeds), want, rtol=1e-5, atol=1e-5)
    for e in info.values():  # the stored form decodes to the same float array
        np.testing.assert_array_equal(cbk.decode_artifact(e["indices"], e["codebook"], e), e["array"])
    # stored_params: matched by identity or contents; an unmatched param stays as it is
    params = {"a": info[next(iter(info))]["array"].copy(), "b": np.ones(3, np.float32)}
    arrays, entries = cbk.stored_params(info, params)
    assert list(entries) == ["a"] and "b" in arrays and "a" not in arrays
    assert json.loads(json.dumps(entries))  # manifest-serialisable


@pytest.mark.parametrize("spec", ["cpu", "arm64", "cuda"])
def test_every_compiled_target_keeps_the_compressed_form(spec):
    """arm64 and cuda (CpuTarget subclasses whose runners are not the in-process cpu Runner) expand
    the decodes for their kernels and store indices + codebooks too (the builds themselves are in
    test_target_arm64 / test_target_cuda; this needs no cross compiler)."""
    from graphopt.target import get_target

    clustered = graphopt.optimize(_net(), "cluster-weights{accuracy-budget=none,bits=4,min-size=512}")
    expanded = get_target(spec).expand_codebooks(clustered)
    assert len(expanded) == 4
    assert not any(cbk.CODEBOOK_KEY in n.metadata_props for n in clustered.graph)
    params = {f"p{i}": e["array"] for i, e in enumerate(expanded.values())}
    arrays, entries = get_target(spec).stored_params(expanded, params)
    assert sorted(entries) == sorted(params) and all(a.dtype != np.float32 or a.size == 16 for a in arrays.values())


@pytest.mark.parametrize("field,value", [("shape", [7, 7]), ("axis", 9), ("bits", 9), ("indices", "nope"), ("shape", "x")])
def test_tampered_codebook_entries_are_refused(tmp_path, field, value):
    """A codebook entry that does not decode to its weight (manifest edited, hashes untouched: the
    manifest is not hashed) is an ArtifactError, not a numpy error from the decoder."""
    path = _clustered(5, 17, 8, False)[2].save(str(tmp_path / "a"))
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        man = json.load(f)
    entry = next(iter(man["runtime"]["codebooks"].values()))
    entry[field] = value
    with open(mpath, "w") as f:
        json.dump(man, f)
    with pytest.raises(ArtifactError) as e:
        graphopt.runtime.load(path, threads=1)
    assert "\n" not in str(e.value)

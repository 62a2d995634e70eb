"""External data: loaded memory-mapped, saved streamed, written atomically.

The slow test builds a model of more than 2 GB on disk (never in RAM), and checks in a
subprocess that loading and re-saving it keep the peak RSS far below the model's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import ExternalDataError
from graphopt.ir.tensor import ExternalTensor, Tensor
from graphopt.ir.types import DataType


def _mlp(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A small MLP: three 64x64 weights (external-sized), biases, and one tiny tensor."""
    weights = {f"w{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(3)}
    weights.update({f"b{i}": rng.standard_normal(64).astype(np.float32) for i in range(3)})
    weights["tiny"] = np.array([0.5, -0.5], dtype=np.float32)  # under any size threshold
    nodes, cur = [], "x"
    for i in range(3):
        nodes += [
            helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        cur = f"r{i}"
    nodes.append(helper.make_node("ReduceSum", [cur], ["s"], keepdims=0))
    nodes.append(helper.make_node("Mul", ["s", "tiny"], ["y"]))
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), weights


def _save_external(model: onnx.ModelProto, path: Path, threshold: int = 1024) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=threshold)


@pytest.fixture
def ext_model(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    proto, weights = _mlp(np.random.default_rng(0))
    src = tmp_path / "src"
    src.mkdir()
    _save_external(proto, src / "mlp.onnx", threshold=0)  # every tensor external, even "tiny"
    return src / "mlp.onnx", weights


def _run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _external_locations(path: Path) -> dict[str, str]:
    p = onnx.load(str(path), load_external_data=False)
    return {
        t.name: {e.key: e.value for e in t.external_data}["location"]
        for t in p.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }


def test_loads_memory_mapped(ext_model: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, weights = ext_model
    m = graphopt.load(path)
    for name, expected in weights.items():
        t = m.graph.initializers[name].const_value
        assert isinstance(t, ExternalTensor), name
        arr = t.numpy()
        # a view of the file, not a copy in RAM, and read-only
        assert isinstance(arr, np.memmap), name
        assert not arr.flags.writeable
        np.testing.assert_array_equal(arr, expected)
        assert t.dtype == DataType.FLOAT and t.shape == expected.shape


def test_resave_gives_external_data_and_runs_identically(ext_model: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    path, weights = ext_model
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "copy.onnx"
    graphopt.save(graphopt.load(path), out)
    # the three 16 KiB weights go external (default threshold 1 KiB); small tensors are embedded
    locs = _external_locations(out)
    assert set(locs) == {"w0", "w1", "w2"}
    assert set(locs.values()) == {"copy.onnx.data"}
    assert sorted(os.listdir(out_dir)) == ["copy.onnx", "copy.onnx.data"]  # no temp files left
    assert out.stat().st_size < 4096 < (out_dir / "copy.onnx.data").stat().st_size
    onnx.checker.check_model(str(out))
    # values survive, and onnxruntime computes bit-identical results from both files
    m2 = graphopt.load(out)
    for name, expected in weights.items():
        np.testing.assert_array_equal(m2.graph.initializers[name].const_value.numpy(), expected)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    ref = _run_ort(path, x)
    np.testing.assert_array_equal(_run_ort(out, x), ref)
    assert np.abs(ref).sum() > 0  # the check compares something


def test_large_tensors_are_aligned(ext_model: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    path, _ = ext_model
    out = tmp_path / "a.onnx"
    graphopt.save(graphopt.load(path), out)
    p = onnx.load(str(out), load_external_data=False)
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in p.graph.initializer if t.external_data]
    assert offsets and all(o % 4096 == 0 for o in offsets)


def test_save_embedded_when_asked(ext_model: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    path, weights = ext_model
    out = tmp_path / "embedded.onnx"
    graphopt.save(graphopt.load(path), out, external_data=False)
    assert os.listdir(tmp_path / "src") and sorted(p.name for p in tmp_path.iterdir()) == ["embedded.onnx", "src"]
    assert _external_locations(out) == {}
    m = graphopt.load(out.read_bytes())  # stands alone: no folder needed
    np.testing.assert_array_equal(m.graph.initializers["w1"].const_value.numpy(), weights["w1"])


def test_in_memory_model_saved_external(tmp_path: Path) -> None:
    proto, weights = _mlp(np.random.default_rng(2))
    out = tmp_path / "mem.onnx"
    graphopt.save(graphopt.load(proto), out, external_data=True, location="weights.bin", size_threshold=100)
    locs = _external_locations(out)
    assert set(locs) == {"w0", "w1", "w2", "b0", "b1", "b2"} and set(locs.values()) == {"weights.bin"}
    m = graphopt.load(out)
    assert isinstance(m.graph.initializers["b2"].const_value, ExternalTensor)
    np.testing.assert_array_equal(m.graph.initializers["b2"].const_value.numpy(), weights["b2"])


def test_resave_in_place_keeps_loaded_model_readable(ext_model: tuple[Path, dict[str, np.ndarray]]) -> None:
    # saving over the model's own data file replaces the file the loaded tensors point into;
    # they must still read their own bytes (embedded "tiny" as well as the re-externalised weights)
    path, weights = ext_model
    m = graphopt.load(path)
    graphopt.save(m, path, location="mlp.onnx.data")
    for name, expected in weights.items():
        np.testing.assert_array_equal(m.graph.initializers[name].const_value.numpy(), expected, err_msg=name)
    graphopt.save(m, path, location="mlp.onnx.data")  # and once more, from the pinned bytes
    again = graphopt.load(path)
    for name, expected in weights.items():
        np.testing.assert_array_equal(again.graph.initializers[name].const_value.numpy(), expected, err_msg=name)
    assert sorted(os.listdir(path.parent)) == ["mlp.onnx", "mlp.onnx.data"]


class _Exploding(Tensor):
    """A tensor whose payload cannot be produced: makes save fail halfway through."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.dtype = DataType.FLOAT
        self.shape = shape
        self.name = ""
        self.doc_string = ""
        self.metadata_props = {}

    def numpy(self) -> np.ndarray:
        raise RuntimeError("disk on fire")


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("external", [True, False])
def test_failed_save_leaves_existing_files_intact(ext_model: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, external: bool) -> None:
    path, _ = ext_model
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.onnx"
    m = graphopt.load(path)
    graphopt.save(m, out)
    before = _snapshot(out_dir)
    # the last weight fails after the others were written to the (temporary) data file
    m.graph.initializers["w2"].const_value = _Exploding((64, 64))
    with pytest.raises(RuntimeError, match="disk on fire"):
        graphopt.save(m, out, external_data=external)
    assert _snapshot(out_dir) == before  # same files, same bytes, no temp files


def test_failure_after_data_written_keeps_old_pair(
    ext_model: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the data file is complete when writing the model file fails: the old model must not be
    # left pointing into a new data file
    path, weights = ext_model
    out = tmp_path / "pair.onnx"
    graphopt.save(graphopt.load(path), out)
    before = _snapshot(tmp_path)
    other, _ = _mlp(np.random.default_rng(99))
    m_other = graphopt.load(other)
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # 1: data file, 2: model file
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        graphopt.save(m_other, out, external_data=True)
    monkeypatch.undo()
    assert calls["n"] == 2
    assert _snapshot(tmp_path) == before
    np.testing.assert_array_equal(graphopt.load(out).graph.initializers["w0"].const_value.numpy(), weights["w0"])


def test_missing_data_file_after_load_is_reported(ext_model: tuple[Path, dict[str, np.ndarray]]) -> None:
    # the mapping is made on first use; a file deleted in between gives a graphopt error
    path, _ = ext_model
    m = graphopt.load(path)
    os.unlink(str(path) + ".data")
    with pytest.raises(ExternalDataError, match="'w0'") as info:
        m.graph.initializers["w0"].const_value.numpy()
    assert len(str(info.value).splitlines()) == 1


# --- more than 2 GB -----------------------------------------------------------------------------

_N_TENSORS = 18
_TENSOR_BYTES = 128 * 2**20  # 18 x 128 MiB = 2.25 GiB, past protobuf's 2 GiB limit
_CHUNK = 16 * 2**20

_CHILD = textwrap.dedent(
    """
    import json, sys, time

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    import numpy as np
    import graphopt

    src, out = sys.argv[1], sys.argv[2]
    base = status("VmRSS")
    t0 = time.perf_counter()
    m = graphopt.load(src)
    firsts = [float(v.const_value.numpy()[0]) for v in m.graph.initializers.values()]
    t_load = time.perf_counter() - t0
    peak_load = status("VmHWM")
    t0 = time.perf_counter()
    if out != "-":
        graphopt.save(m, out)
    t_save = time.perf_counter() - t0
    print(json.dumps({"base": base, "peak_load": peak_load, "peak": status("VmHWM"),
                      "t_load": t_load, "t_save": t_save, "firsts": firsts}))
    """
)


def _write_big_model(folder: Path) -> tuple[Path, list[str], list[float]]:
    """Write the data file chunk by chunk (never more than one chunk in RAM) and a model
    whose initializers reference it. Returns the model path, per-tensor sha256, first values."""
    data_name = "big.onnx.data"
    hashes: list[str] = []
    firsts: list[float] = []
    inits = []
    with open(folder / data_name, "wb") as f:
        for i in range(_N_TENSORS):
            rng = np.random.default_rng(i)
            h = hashlib.sha256()
            for k in range(_TENSOR_BYTES // _CHUNK):
                chunk = rng.standard_normal(_CHUNK // 4, dtype=np.float32)
                if k == 0:
                    firsts.append(float(chunk[0]))
                b = chunk.tobytes()
                h.update(b)
                f.write(b)
            hashes.append(h.hexdigest())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[_TENSOR_BYTES // 4], data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(i * _TENSOR_BYTES)), ("length", str(_TENSOR_BYTES))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
    nodes, cur = [], "x"
    for i in range(_N_TENSORS):
        nodes.append(helper.make_node("Add", [cur, f"w{i}"], [f"s{i}"]))
        cur = f"s{i}"
    g = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [_TENSOR_BYTES // 4])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [_TENSOR_BYTES // 4])],
        initializer=inits,
    )
    path = folder / "big.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    return path, hashes, firsts


def _hash_saved(path: Path) -> list[str]:
    """sha256 of each saved tensor's bytes, read from the data file in chunks."""
    p = onnx.load(str(path), load_external_data=False)
    out = []
    for t in p.graph.initializer:
        assert t.data_location == TensorProto.EXTERNAL, t.name
        info = {e.key: e.value for e in t.external_data}
        h = hashlib.sha256()
        with open(path.parent / info["location"], "rb") as f:
            f.seek(int(info["offset"]))
            left = int(info["length"])
            while left:
                b = f.read(min(_CHUNK, left))
                assert b, f"{t.name}: data file ends early"
                h.update(b)
                left -= len(b)
        out.append(h.hexdigest())
    return out


def _child(src: Path, out: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), out], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_over_2gb_model_memory_mapped_and_streamed(tmp_path: Path) -> None:
    t_start = time.perf_counter()
    total = _N_TENSORS * _TENSOR_BYTES
    assert total > 2**31
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    try:
        src, hashes, firsts = _write_big_model(src_dir)
        t_written = time.perf_counter()

        # loading alone: the payload is mapped, not read
        r = _child(src, "-")
        assert r["firsts"] == pytest.approx(firsts)
        load_growth = r["peak_load"] - r["base"]
        assert load_growth < 256 * 2**20, f"load grew RSS by {load_growth / 2**20:.0f} MiB"

        # load + save: streamed to the new data file, chunk by chunk
        out = out_dir / "big.onnx"
        r = _child(src, str(out))
        save_growth = r["peak"] - r["base"]
        assert save_growth < total // 4, f"load+save grew RSS by {save_growth / 2**20:.0f} MiB of {total / 2**20:.0f}"
        assert out.stat().st_size < 2**20  # the graph only; the weights are external
        assert sorted(os.listdir(out_dir)) == ["big.onnx", "big.onnx.data"]
        assert _hash_saved(out) == hashes
        t_end = time.perf_counter()
        print(
            f"\n>2GB model ({total / 2**30:.2f} GiB): write {t_written - t_start:.1f}s, "
            f"child load {r['t_load']:.2f}s (RSS +{load_growth / 2**20:.0f} MiB), "
            f"child save {r['t_save']:.1f}s (RSS +{save_growth / 2**20:.0f} MiB), total {t_end - t_start:.1f}s"
        )
    finally:
        # pytest keeps old tmp folders around; 4.5 GB of them must not pile up
        for folder in (src_dir, out_dir):
            for p in folder.iterdir():
                p.unlink()

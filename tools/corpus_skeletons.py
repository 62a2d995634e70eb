"""Corpus skeletons: the exported graphs of .cache/corpus without their weights, small enough to
ship as test data (tests/data/corpus/*.onnx.gz), so the corpus tests run in CI without torch.

    .venv/bin/python tools/corpus_skeletons.py save [--models a,b]    # .cache/corpus -> tests/data/corpus
    .venv/bin/python tools/corpus_skeletons.py check                   # load each, run it on onnxruntime

A skeleton keeps every node, attribute, value_info and opset exactly as the exporter wrote them,
and every initializer that is not float or has at most KEEP_ELEMENTS elements (shape constants,
BatchNorm/LayerNorm parameters of small layers); the larger float initializers lose their data
and keep their dims, dtype and a doc string with their mean, standard deviation and sign
(`skeleton: mean=... std=... nonneg=0|1`). `load(name)` refills them with seeded normal values of
those statistics (absolute values where the original had no negative element, as BatchNorm
variances), so the model runs with activations of the original's scale; the numbers are not the
original's (tests compare a model with its own rewrite, never with stored outputs).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
#: the full exports ($GRAPHOPT_CORPUS_DIR to point elsewhere: a missing folder makes `load` use the
#: skeletons, as on CI)
CORPUS = Path(os.environ.get("GRAPHOPT_CORPUS_DIR") or ROOT / ".cache" / "corpus")
SKELETONS = ROOT / "tests" / "data" / "corpus"
#: float initializers up to this many elements keep their data
KEEP_ELEMENTS = 256
#: the models shipped (bert_base_s128's graph alone is ~1 MB compressed: the rest are smaller)
MODELS = ["mobilenetv2", "resnet18", "resnet50", "efficientnet_b0", "densenet121", "googlenet", "vit_b16",
          "bert_base_s128"]
_STATS = re.compile(r"skeleton: mean=(\S+) std=(\S+) nonneg=([01])")
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def strip(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (a copy) with its large float initializers' data replaced by their statistics."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type not in _FLOATS or n <= KEEP_ELEMENTS:
            continue
        a = numpy_helper.to_array(t).astype(np.float64)
        doc = f"skeleton: mean={a.mean():.6g} std={a.std():.6g} nonneg={int(bool((a >= 0).all()))}"
        dims, dtype, name = list(t.dims), t.data_type, t.name
        t.Clear()
        t.name, t.data_type, t.doc_string = name, dtype, doc
        t.dims.extend(dims)
        # (no data: onnx's checker would refuse the skeleton, `load` must refill it first)
    return out


def refill(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The skeleton `model` with every stripped initializer refilled (in place; returned)."""
    rng = np.random.default_rng(seed)
    for t in model.graph.initializer:
        m = _STATS.fullmatch(t.doc_string or "")
        if m is None:
            continue
        mean, std, nonneg = float(m.group(1)), float(m.group(2)), m.group(3) == "1"
        a = rng.normal(mean, std, size=tuple(t.dims))
        if nonneg:
            a = np.abs(a)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        filled = numpy_helper.from_array(a.astype(dtype), t.name)
        t.CopyFrom(filled)
    return model


def path_of(name: str) -> Path:
    return SKELETONS / f"{name}.onnx.gz"


def load(name: str, seed: int = 0) -> onnx.ModelProto:
    """The corpus model `name`: .cache/corpus's export when it is there, else its shipped skeleton
    with seeded weights (FileNotFoundError when neither is)."""
    full = CORPUS / f"{name}.onnx"
    if full.exists():
        return onnx.load(str(full))
    with gzip.open(path_of(name), "rb") as f:
        return refill(onnx.ModelProto.FromString(f.read()), seed)


def available(name: str) -> bool:
    return (CORPUS / f"{name}.onnx").exists() or path_of(name).exists()


def save(names: list[str]) -> None:
    SKELETONS.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = CORPUS / f"{name}.onnx"
        if not src.exists():
            print(f"{name}: {src} not built (tools/make_corpus.py): skipped", file=sys.stderr)
            continue
        data = strip(onnx.load(str(src))).SerializeToString()
        dst = path_of(name)
        tmp = dst.with_suffix(".tmp")
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
            f.write(data)  # (mtime 0, no file name: the same bytes every time)
        tmp.replace(dst)
        print(f"{name:16} {src.stat().st_size / 2**20:7.1f} MiB -> {dst.stat().st_size / 2**10:7.1f} KiB")


def check(names: list[str]) -> int:
    import onnxruntime as ort

    bad = 0
    for name in names:
        with gzip.open(path_of(name), "rb") as f:
            m = refill(onnx.ModelProto.FromString(f.read()))
        onnx.checker.check_model(m)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {}
        rng = np.random.default_rng(0)
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            if "int" in i.type:  # (token ids; an attention mask of ones, token types 0)
                v = np.ones(shape) if "mask" in i.name else np.zeros(shape) if "type" in i.name else rng.integers(0, 1000, shape)
                feeds[i.name] = v.astype(np.int64)
            else:
                feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        outs = sess.run(None, feeds)
        finite = all(np.isfinite(o).all() for o in outs)
        bad += not finite
        print(f"{name:16} runs: {[o.shape for o in outs]} {'finite' if finite else 'NOT FINITE'}")
    return int(bad > 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["save", "check"])
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    if args.what == "save":
        save(names)
        return 0
    return check(names)


if __name__ == "__main__":
    sys.exit(main())

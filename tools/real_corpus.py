"""A real-model corpus of OCR and streaming-audio kinds: small TRAINED models, end-to-end metrics.

The models of issue 24 (an OCR recognizer with a CTC head on text-line images of any width, a
stateful streaming voice-activity detector, one whose network sits in If branches selected by a
sample-rate input), trained here on data generated offline (numpy only: text lines drawn with a
built-in 5x7 bitmap font, speech-like harmonic audio in noise), so the corpus builds anywhere
without downloads. Build with the tools venv (torch, CPU; minutes on 2 cores, nice 10):

    /work/main/.venv-tools/bin/python tools/real_corpus.py build [--models a,b] [--force]
    .venv/bin/python tools/real_corpus.py report [--evaluate]
    .venv/bin/python tools/real_corpus.py evaluate ocr_crnn out/ocr_int8.onnx [--limit N]

Evaluate from the main venv (numpy + onnxruntime; torch only inside the build functions):

    import sys; sys.path.insert(0, "tools"); import real_corpus as rc
    rc.evaluate("ocr_crnn", model)     # {"cer": .., "line_accuracy": .., "edits", "chars", "n"}
    rc.evaluate("vad_gru", model)      # {"accuracy": .., "flips": .., "decisions": .., "max_prob_diff": ..}
    rc.calibration_path("ocr_crnn")    # a folder of one-line .npz files (widths differ)
    rc.calibration_path("vad_gru")     # .npz: input [n, 512], state [2, n, 64] (batch on axis 1)
    rc.calibration_feeds("vad_if")     # a list of feed dicts (one chunk each), for Python APIs
    rc.calibration_chunks("vad_gru")   # streams as chunk sequences, for calibration_sequences

Models (torch TorchScript exporter, dynamo=False, as the public OCR / VAD models were exported):

    ocr_crnn   CRNN text recognizer, opset 12: input x [N, 3, 32, W] (W dynamic, any width >= 16),
               5 conv-BN-ReLU layers with max pools (H 32 -> 1, W -> W/4), BiLSTM 2x64, Linear,
               Softmax -> probs [N, W/4, 37] (blank + 0-9 + A-Z); greedy CTC decode; metric:
               character error rate (edit distance / reference characters) on 400 test lines.
    vad_gru    streaming VAD, opset 16: input [N, 512] (one 32 ms chunk at 16 kHz), state
               [2, N, 64] in and stateN out (2-layer GRU); conv "STFT" (fixed basis), log
               magnitude, 2 conv layers, GRU over the chunk's frames, Linear, Sigmoid -> [N, 1].
               Metric over 4 test streams of 20 s (625 chunks each, state carried between
               chunks): decision accuracy vs labels, and decision flips vs the fp32 model.
    vad_if     the same kind with an LSTM (state = stacked h, c: [2, N, 64]) and a sample-rate
               input `sr` (int64 scalar): If(sr == 16000) selects the 16 kHz network (512-sample
               chunks), else the 8 kHz one (256 samples); each branch was exported by torch and
               the two composed with onnx.helper, weights as outer-scope initializers (what a
               scripted export writes). Metric: as vad_gru at 16 kHz, plus `accuracy_8k`.

Outputs in .cache/real/ (git-ignored), beside tools/real_models.py's: <name>.onnx, <name>.calib.npz
(ocr_crnn: <name>.calib/ folder), data/<name>.test.npz and entries in manifest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "real"
DATA = CACHE / "data"
MANIFEST = CACHE / "manifest.json"
SEED = 0

CHARSET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # class 0 is the CTC blank
OCR_H = 32
HIDDEN = 64  # VAD recurrent width; state [2, N, HIDDEN]
CHUNK = {16000: 512, 8000: 256}
STREAM_S = 20.0  # test streams: 20 s each (625 chunks at 16 kHz)


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # ocr | stream
    opset: int
    about: str


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("ocr_crnn", "ocr", 12, "CRNN recognizer (conv + BiLSTM + CTC), dynamic width, rendered text lines"),
        Spec("vad_gru", "stream", 16, "streaming VAD, 2-layer GRU state [2, N, 64] in/out, 512-sample chunks"),
        Spec("vad_if", "stream", 16, "VAD with If(sr == 16000) between 16 kHz and 8 kHz LSTM networks"),
    )
}


class CorpusError(RuntimeError):
    """A model or its data is missing or unknown (the message says how to build it)."""


# ============================================================================ data (numpy only)

# 5x7 bitmap font (HD44780 style): 7 rows of 5 bits, most significant bit on the left
_FONT_HEX = {
    "0": "0E 11 13 15 19 11 0E", "1": "04 0C 04 04 04 04 0E", "2": "0E 11 01 02 04 08 1F",
    "3": "1F 02 04 02 01 11 0E", "4": "02 06 0A 12 1F 02 02", "5": "1F 10 1E 01 01 11 0E",
    "6": "06 08 10 1E 11 11 0E", "7": "1F 01 02 04 08 08 08", "8": "0E 11 11 0E 11 11 0E",
    "9": "0E 11 11 0F 01 02 0C", "A": "0E 11 11 11 1F 11 11", "B": "1E 11 11 1E 11 11 1E",
    "C": "0E 11 10 10 10 11 0E", "D": "1C 12 11 11 11 12 1C", "E": "1F 10 10 1E 10 10 1F",
    "F": "1F 10 10 1E 10 10 10", "G": "0E 11 10 17 11 11 0F", "H": "11 11 11 1F 11 11 11",
    "I": "0E 04 04 04 04 04 0E", "J": "07 02 02 02 02 12 0C", "K": "11 12 14 18 14 12 11",
    "L": "10 10 10 10 10 10 1F", "M": "11 1B 15 15 11 11 11", "N": "11 11 19 15 13 11 11",
    "O": "0E 11 11 11 11 11 0E", "P": "1E 11 11 1E 10 10 10", "Q": "0E 11 11 11 15 12 0D",
    "R": "1E 11 11 1E 14 12 11", "S": "0F 10 10 0E 01 01 1E", "T": "1F 04 04 04 04 04 04",
    "U": "11 11 11 11 11 11 0E", "V": "11 11 11 11 11 0A 04", "W": "11 11 11 15 15 15 0A",
    "X": "11 11 0A 04 0A 11 11", "Y": "11 11 11 0A 04 04 04", "Z": "1F 01 02 04 08 10 1F",
}  # fmt: skip
_GLYPHS = {
    ch: np.array([[(int(h, 16) >> (4 - b)) & 1 for b in range(5)] for h in rows.split()], np.float32)
    for ch, rows in _FONT_HEX.items()
}


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of an area (box) resampling: each output pixel averages the input
    interval it covers, so downscaling anti-aliases like a real rasteriser."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0.0, None)
    return (overlap / overlap.sum(1, keepdims=True)).astype(np.float32)


def render_line(text: str, rng: np.random.Generator, height: int = OCR_H) -> np.ndarray:
    """One text line as uint8 RGB [3, height, W]: glyphs drawn at 4 px per font pixel with random
    boldness, italic shear, spacing and margins, area-downscaled to `height` with a random
    horizontal stretch, random ink/paper colours (sometimes light on dark), illumination
    gradient and noise."""
    cell = 4
    gh = 7 * cell
    bold = int(rng.integers(0, 3))
    shear = float(rng.uniform(-0.12, 0.25)) if rng.random() < 0.35 else 0.0
    parts = [np.zeros((gh, int(rng.integers(2, 20))), np.float32)]
    for ch in text:
        g = np.kron(_GLYPHS[ch], np.ones((cell, cell), np.float32))
        if bold:
            g = np.maximum(g, np.pad(g, ((0, 0), (bold, 0)))[:, : g.shape[1]])
        parts.append(g)
        parts.append(np.zeros((gh, int(rng.integers(cell, 3 * cell))), np.float32))
    parts.append(np.zeros((gh, int(rng.integers(2, 20))), np.float32))
    line = np.concatenate(parts, axis=1)
    if shear:
        extra = int(np.ceil(abs(shear) * gh))
        out = np.zeros((gh, line.shape[1] + extra), np.float32)
        for r in range(gh):
            off = int(round(shear * (gh - 1 - r))) + (extra if shear < 0 else 0)
            out[r, off : off + line.shape[1]] = line[r]
        line = out
    top, bottom = int(rng.integers(2, 12)), int(rng.integers(2, 12))
    line = np.pad(line, ((top, bottom), (0, 0)))
    hi_h, hi_w = line.shape
    w = max(16, int(round(hi_w * height / hi_h * rng.uniform(0.75, 1.25))))
    ink = _area_matrix(hi_h, height) @ line @ _area_matrix(hi_w, w).T  # [height, w] in [0, 1]
    paper = rng.uniform(0.55, 1.0, 3)
    fg = paper * rng.uniform(0.0, 0.45, 3)
    if rng.random() < 0.2:  # light text on a dark background
        paper, fg = 1.0 - paper, 1.0 - fg
    img = paper[:, None, None] * (1 - ink) + fg[:, None, None] * ink
    grad = np.linspace(0, 1, w)[None, None, :] * rng.uniform(-0.15, 0.15)
    img = img + grad + rng.normal(0, rng.uniform(0.0, 0.05), img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def random_text(rng: np.random.Generator) -> str:
    n = int(rng.integers(3, 11))
    return "".join(CHARSET[i] for i in rng.integers(0, len(CHARSET), n))


def ocr_input(img: np.ndarray) -> np.ndarray:
    """uint8 [3, H, W] (or [N, 3, H, W]) -> the model's float32 input, scaled to [-1, 1] as
    PaddleOCR's recognizers take it."""
    x = img.astype(np.float32) / 127.5 - 1.0
    return x[None] if x.ndim == 3 else x


def ctc_greedy(probs: np.ndarray) -> list[str]:
    """Greedy CTC decode of [N, T, C] (argmax, merge repeats, drop blanks) -> strings."""
    best = probs.argmax(-1)
    out = []
    for row in best:
        keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
        out.append("".join(CHARSET[i - 1] for i in row[keep]))
    return out


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ---------------------------------------------------------------------------- audio


def _colored_noise(rng: np.random.Generator, n: int, color: str) -> np.ndarray:
    w = rng.standard_normal(n)
    if color == "white":
        return w
    spec = np.fft.rfft(w)
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    spec = spec / (np.sqrt(f) if color == "pink" else f)
    x = np.fft.irfft(spec, n)
    return x / (x.std() + 1e-12)


def _speech(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Voiced, speech-like sound: a gliding f0 (90-280 Hz) with harmonics shaped by two moving
    formants, amplitude-modulated by syllables (3-7 Hz) with short gaps."""
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 280) * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.3, 2.0) * t + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    syl = rng.uniform(3, 7)
    env = np.clip(np.sin(2 * np.pi * syl * t + rng.uniform(0, 6.3)), 0, None) ** 0.6
    env = 0.25 + 0.75 * env
    f1 = rng.uniform(300, 900) * (1 + 0.3 * np.sin(2 * np.pi * syl * t))
    f2 = rng.uniform(900, 2500) * (1 + 0.2 * np.cos(2 * np.pi * syl * 0.7 * t))
    x = np.zeros(n)
    for k in range(1, int(min(3800, sr / 2 - 200) / 90) + 1):
        fk = k * f0
        amp = np.exp(-(((fk - f1) / 200) ** 2)) + 0.6 * np.exp(-(((fk - f2) / 300) ** 2)) + 0.02
        amp = np.where(fk < sr / 2 - 100, amp, 0.0)
        x += amp * np.sin(k * phase)
    x *= env
    return x / (x.std() + 1e-12)


def audio_stream(rng: np.random.Generator, seconds: float, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """A stream of alternating non-speech (0.3-2 s) and speech (0.3-2.5 s) segments over a noise
    floor (white/pink/brown, SNR 0-20 dB), with steady tones and hum as non-speech distractors.
    Returns (float32 samples, per-sample labels 0/1)."""
    n = int(seconds * sr)
    x = np.zeros(n)
    lab = np.zeros(n, np.float32)
    pos, speech = 0, bool(rng.random() < 0.5)
    while pos < n:
        seg = int(rng.uniform(0.3, 2.5 if speech else 2.0) * sr)
        end = min(n, pos + seg)
        if speech:
            x[pos:end] += _speech(rng, end - pos, sr)
            lab[pos:end] = 1
        elif rng.random() < 0.3:  # a steady tone or mains hum: sound, not speech
            tt = np.arange(end - pos) / sr
            f = rng.choice([50.0, 60.0, rng.uniform(400, min(3500, sr / 2 - 200))])
            x[pos:end] += 0.7 * np.sin(2 * np.pi * f * tt + rng.uniform(0, 6.3))
        pos, speech = end, not speech
    snr_db = rng.uniform(0, 20)
    noise = _colored_noise(rng, n, str(rng.choice(["white", "pink", "brown"])))
    x = x + noise * 10 ** (-snr_db / 20)
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.1, 0.9)  # random gain
    return x.astype(np.float32), lab


def chunk_stream(x: np.ndarray, lab: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """[n] -> chunks [k, CHUNK[sr]] and chunk labels (speech in more than half of the chunk)."""
    c = CHUNK[sr]
    k = len(x) // c
    return x[: k * c].reshape(k, c), (lab[: k * c].reshape(k, c).mean(1) > 0.5).astype(np.int64)


# ============================================================================ evaluation API


def _spec(name: str) -> Spec:
    if name not in SPECS:
        raise CorpusError(f"unknown corpus model {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def _need(path: Path) -> Path:
    if not path.exists():
        raise CorpusError(f"{path} is missing: run `/work/main/.venv-tools/bin/python tools/real_corpus.py build`")
    return path


def _manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def list_models() -> list[str]:
    """Names of the built corpus models."""
    man = _manifest()
    return [n for n in SPECS if n in man and (CACHE / f"{n}.onnx").exists()]


def model_path(name: str) -> Path:
    _spec(name)
    return _need(CACHE / f"{name}.onnx")


def reference_metrics(name: str) -> dict[str, Any]:
    _spec(name)
    man = _manifest()
    if name not in man:
        raise CorpusError(f"{name} is not built: run `/work/main/.venv-tools/bin/python tools/real_corpus.py build`")
    return man[name]


def calibration_path(name: str) -> Path:
    """ocr_crnn: folder `.cache/real/ocr_crnn.calib/` of one-line .npz files, `x` [1, 3, 32, W]
    with W differing between files; VADs: `<name>.calib.npz` with `input` [n, chunk] and `state`
    [2, n, 64] (the batch on axis 1, states the fp32 model reached on calibration streams) and,
    for vad_if, `sr` (a scalar)."""
    spec = _spec(name)
    return _need(CACHE / (f"{name}.calib" if spec.kind == "ocr" else f"{name}.calib.npz"))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(_need(path), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def calibration_feeds(name: str, n: int | None = None) -> list[dict[str, np.ndarray]]:
    """The calibration data as a list of feed dicts, one sample each (any width for OCR)."""
    spec = _spec(name)
    out: list[dict[str, np.ndarray]] = []
    if spec.kind == "ocr":
        for f in sorted(calibration_path(name).glob("*.npz"))[:n]:
            out.append(_load_npz(f))
        return out
    z = _load_npz(calibration_path(name))
    k = len(z["input"]) if n is None else min(n, len(z["input"]))
    for i in range(k):
        feed = {"input": z["input"][i : i + 1], "state": z["state"][:, i : i + 1]}
        if "sr" in z:
            feed["sr"] = z["sr"]
        out.append(feed)
    return out


def calibration_chunks(name: str, sr: int = 16000, streams: int = 4, seconds: float = 4.0) -> list[list[dict[str, np.ndarray]]]:
    """VADs: calibration streams (not the test streams) as sequences of chunk feeds without the
    state, for graphopt.calibration.calibration_sequences(model, seqs, feedback={"state": "stateN"})."""
    if _spec(name).kind != "stream":
        raise CorpusError(f"{name} is not a streaming model")
    rng = np.random.default_rng(SEED + 1000 + sr)
    seqs = []
    for _ in range(streams):
        chunks, _ = chunk_stream(*audio_stream(rng, seconds, sr), sr)
        seq = [{"input": c[None]} for c in chunks]
        if name == "vad_if":
            for f in seq:
                f["sr"] = np.array(sr, np.int64)
        seqs.append(seq)
    return seqs


def test_data(name: str) -> dict[str, np.ndarray]:
    """The stored test split: OCR `images` uint8 [3, 32, sum W] with `widths` and `texts`;
    streams `chunks_<sr>` [streams, k, chunk] and `labels_<sr>` [streams, k]."""
    _spec(name)
    return _load_npz(DATA / f"{name}.test.npz")


def _model_bytes(model: Any) -> bytes | str:
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise CorpusError(f"no model file {os.fspath(model)!r}")
        return os.fspath(model)
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    if type(model).__module__.startswith("graphopt"):
        import graphopt

        return graphopt.to_onnx(model).SerializeToString()
    raise TypeError(f"expected a path, bytes, onnx.ModelProto or graphopt Model, not {type(model).__name__}")


def session(model: Any, threads: int = 2, optimize: bool = True) -> Any:
    """An onnxruntime CPU session for a path, bytes, onnx.ModelProto or graphopt Model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(_model_bytes(model), so, providers=["CPUExecutionProvider"])


def _ocr_lines(z: dict[str, np.ndarray], limit: int | None) -> Iterator[tuple[np.ndarray, str]]:
    offs = np.concatenate([[0], np.cumsum(z["widths"])])
    n = len(z["widths"]) if limit is None else min(limit, len(z["widths"]))
    for i in range(n):
        yield z["images"][:, :, offs[i] : offs[i + 1]], str(z["texts"][i])


def _ocr_probs(model: Any, limit: int | None, threads: int) -> list[np.ndarray]:
    sess = session(model, threads)
    in_name = sess.get_inputs()[0].name
    return [sess.run(None, {in_name: ocr_input(img)})[0] for img, _ in _ocr_lines(test_data("ocr_crnn"), limit)]


def run_stream(sess: Any, chunks: np.ndarray, sr: int | None = None) -> np.ndarray:
    """Speech probabilities of one stream [k, chunk], run chunk by chunk with the state carried
    (zeros at the start); the model's inputs decide whether `sr` and `state` are fed."""
    names = {i.name for i in sess.get_inputs()}
    state = np.zeros((2, 1, HIDDEN), np.float32)
    out = np.empty(len(chunks), np.float32)
    for i, c in enumerate(chunks):
        feed: dict[str, np.ndarray] = {"input": c[None]}
        if "state" in names:
            feed["state"] = state
        if "sr" in names:
            feed["sr"] = np.array(sr, np.int64)
        res = sess.run(None, feed)
        out[i] = float(np.asarray(res[0]).reshape(-1)[0])
        if "state" in names:
            state = res[1]
    return out


def _stream_probs(name: str, model: Any, sr: int, limit: int | None, threads: int) -> tuple[np.ndarray, np.ndarray]:
    z = test_data(name)
    sess = session(model, threads)
    chunks, labels = z[f"chunks_{sr}"], z[f"labels_{sr}"]
    k = len(chunks) if limit is None else min(limit, len(chunks))
    probs = np.stack([run_stream(sess, chunks[s], sr) for s in range(k)])
    return probs, labels[:k]


def evaluate(name: str, model: Any = None, *, limit: int | None = None, threads: int = 2) -> dict[str, Any]:
    """Score `model` (path, bytes, onnx.ModelProto or graphopt Model; default: the fp32 model)
    end to end on `name`'s test split with onnxruntime.

    ocr_crnn: {"cer": edits / reference characters, "line_accuracy", "edits", "chars", "n",
    "cosine": mean over lines of the cosine of the probabilities to the fp32 model's,
    "top1_changed": percent of time steps whose argmax class differs from fp32}; each line runs
    alone at its own width (the model's W is dynamic). `limit`: first N lines.
    VADs: {"accuracy": decisions (p > 0.5) equal to the labels, "flips": decisions that differ
    from the fp32 model's, "decisions", "max_prob_diff", "cosine" of all probabilities to fp32's}
    over the test streams run chunk by chunk
    with the state carried; vad_if adds "accuracy_8k" / "flips_8k" with sr=8000 (a model whose
    `sr` was bound to 16000 gets only the 16 kHz figures). `limit`: first N streams.
    """
    spec = _spec(name)
    path = model_path(name)
    model = path if model is None else model
    if spec.kind == "ocr":
        probs = _ocr_probs(model, limit, threads)
        ref = probs if model is path else _ocr_probs(path, limit, threads)
        edits = chars = right = 0
        texts = test_data(name)["texts"][: len(probs)]
        cos, changed, steps = [], 0, 0
        for p, r, text in zip(probs, ref, texts):
            d = edit_distance(ctc_greedy(p)[0], str(text))
            edits, chars, right = edits + d, chars + len(text), right + (d == 0)
            a, b = p.reshape(-1).astype(np.float64), r.reshape(-1).astype(np.float64)
            cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
            changed += int((p.argmax(-1) != r.argmax(-1)).sum())
            steps += int(p.shape[1])
        n = len(probs)
        return {"cer": edits / max(chars, 1), "line_accuracy": right / max(n, 1), "edits": edits, "chars": chars, "n": n,
                "cosine": float(np.mean(cos)), "top1_changed": 100.0 * changed / max(steps, 1)}  # fmt: skip
    out: dict[str, Any] = {}
    names = {i.name for i in session(model, 1).get_inputs()}
    rates = [16000, 8000] if name == "vad_if" and "sr" in names else [16000]
    for sr in rates:
        probs, labels = _stream_probs(name, model, sr, limit, threads)
        ref = _fp32_stream_probs(name, sr, limit, threads)
        dec, ref_dec = probs > 0.5, ref > 0.5
        sfx = "" if sr == 16000 else "_8k"
        out[f"accuracy{sfx}"] = float((dec == labels.astype(bool)).mean())
        out[f"flips{sfx}"] = int((dec != ref_dec).sum())
        out[f"decisions{sfx}"] = int(dec.size)
        out[f"max_prob_diff{sfx}"] = float(np.abs(probs - ref).max())
        a, b = probs.reshape(-1).astype(np.float64), ref.reshape(-1).astype(np.float64)
        out[f"cosine{sfx}"] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return out


_FP32_CACHE: dict[tuple[str, int, int | None], np.ndarray] = {}


def _fp32_stream_probs(name: str, sr: int, limit: int | None, threads: int) -> np.ndarray:
    key = (name, sr, limit)
    if key not in _FP32_CACHE:
        _FP32_CACHE[key] = _stream_probs(name, model_path(name), sr, limit, threads)[0]
    return _FP32_CACHE[key]


def fmt_metrics(m: dict[str, Any]) -> str:
    if "cer" in m:
        s = f"CER {100 * m['cer']:.2f}% ({m['edits']}/{m['chars']}), lines right {100 * m['line_accuracy']:.1f}% (n={m['n']})"
        if m.get("cosine", 1.0) < 1.0 or m.get("top1_changed", 0.0) > 0:
            s += f"; vs fp32: cosine {m['cosine']:.5f}, top1 changed {m['top1_changed']:.2f}%"
        return s
    s = f"accuracy {100 * m['accuracy']:.2f}%, flips vs fp32 {m['flips']}/{m['decisions']}"
    if "accuracy_8k" in m:
        s += f"; 8 kHz accuracy {100 * m['accuracy_8k']:.2f}%, flips {m['flips_8k']}/{m['decisions_8k']}"
    return s


def report(evaluate_now: bool = False) -> str:
    man = _manifest()
    rows = [f"{'model':10} {'size':>9} {'params':>8} {'nodes':>6} {'opset':>5}  fp32 metric (onnxruntime)"]
    for name, spec in SPECS.items():
        path = CACHE / f"{name}.onnx"
        if name not in man or not path.exists():
            rows.append(f"{name:10} {'-':>9} {'-':>8} {'-':>6} {'-':>5}  not built")
            continue
        e = man[name]
        m = evaluate(name) if evaluate_now else e["fp32"]
        rows.append(f"{name:10} {path.stat().st_size / 2**10:7.0f} KiB {e['params']:>8,} {e['nodes']:>6} {spec.opset:>5}  {fmt_metrics(m)}")
    return "\n".join(rows)


# ============================================================================ build (torch)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _record(name: str, entry: dict[str, Any]) -> None:
    man = _manifest()
    man[name] = entry
    tmp = MANIFEST.with_name(MANIFEST.name + ".tmp")
    tmp.write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, MANIFEST)


def _facts(path: Path) -> dict[str, Any]:
    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from control_flow_models import count_nodes

    m = onnx.load(str(path))
    params = int(sum(np.prod(t.dims) for t in m.graph.initializer))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    return {"params": params, "nodes": count_nodes(m.graph), "inputs": inputs, "bytes": path.stat().st_size}


def _export(net: Any, args: tuple[Any, ...], path: Path, in_names: list[str], out_names: list[str],
            dyn: dict[str, dict[int, str]], opset: int) -> None:  # fmt: skip
    import onnx
    import torch

    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        torch.onnx.export(net, args, str(tmp), dynamo=False, opset_version=opset, input_names=in_names,
                          output_names=out_names, dynamic_axes=dyn, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.PRESERVE)  # fmt: skip
    onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- OCR


def _ocr_net() -> Any:
    import torch
    from torch import nn

    def cbr(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(
                *cbr(3, 16), nn.MaxPool2d(2, 2),            # 16 x W/2
                *cbr(16, 32), nn.MaxPool2d(2, 2),           # 8 x W/4
                *cbr(32, 48), *cbr(48, 48), nn.MaxPool2d((2, 1), (2, 1)),  # 4 x W/4
                *cbr(48, 64), nn.MaxPool2d((4, 1), (4, 1)),  # 1 x W/4
            )  # fmt: skip
            self.rnn = nn.LSTM(64, 64, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(128, len(CHARSET) + 1)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            f = self.cnn(x).squeeze(2).permute(0, 2, 1)  # [N, T, 64]
            return self.fc(self.rnn(f)[0])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.logits(x), dim=2)

    return CRNN()


def _ocr_batch(all_imgs: list[np.ndarray], all_texts: list[str], idx: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Lines `idx` of the pool, padded (edge pixels) to the widest, a multiple of 4."""
    texts = [all_texts[i] for i in idx]
    imgs = [all_imgs[i] for i in idx]
    w = max(i.shape[2] for i in imgs)
    w = (w + 3) // 4 * 4
    batch = np.stack([np.pad(i, ((0, 0), (0, 0), (0, w - i.shape[2])), mode="edge") for i in imgs])
    return ocr_input(batch), texts


def build_ocr(name: str = "ocr_crnn", steps: int = 800, pool: int = 3000) -> str:
    import torch

    spec = SPECS[name]
    rng = np.random.default_rng(SEED)
    # test split and calibration folder first: fixed seeds, independent of training
    test_rng = np.random.default_rng(SEED + 1)
    texts = [random_text(test_rng) for _ in range(400)]
    imgs = [render_line(t, test_rng) for t in texts]
    _atomic_savez(DATA / f"{name}.test.npz", images=np.concatenate(imgs, axis=2),
                  widths=np.array([i.shape[2] for i in imgs]), texts=np.array(texts))  # fmt: skip
    cal_rng = np.random.default_rng(SEED + 2)
    cal_dir = CACHE / f"{name}.calib"
    tmp_dir = CACHE / f"{name}.calib.tmp"
    if tmp_dir.exists():
        for f in tmp_dir.iterdir():
            f.unlink()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for i in range(64):
        np.savez(tmp_dir / f"{i:04d}.npz", x=ocr_input(render_line(random_text(cal_rng), cal_rng)))
    if cal_dir.exists():
        for f in cal_dir.iterdir():
            f.unlink()
        cal_dir.rmdir()
    os.replace(tmp_dir, cal_dir)

    t0 = time.perf_counter()
    texts_tr = [random_text(rng) for _ in range(pool)]
    imgs_tr = [render_line(t, rng) for t in texts_tr]
    by_width = np.argsort([i.shape[2] for i in imgs_tr], kind="stable")
    _log(f"      {name} rendered {pool} training lines [{time.perf_counter() - t0:.0f}s]")
    torch.manual_seed(SEED)
    net = _ocr_net()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    t0 = time.perf_counter()
    net.train()
    run = 0.0
    for step in range(steps):
        start = int(rng.integers(0, pool - 32 + 1))  # 32 lines of similar width: little padding
        xb, tb = _ocr_batch(imgs_tr, texts_tr, by_width[start : start + 32])
        x = torch.from_numpy(xb)
        logp = torch.log_softmax(net.logits(x), 2).permute(1, 0, 2)  # [T, N, C]
        targets = torch.tensor([CHARSET.index(c) + 1 for t in tb for c in t])
        tl = torch.tensor([len(t) for t in tb])
        il = torch.full((len(tb),), logp.shape[0], dtype=torch.long)
        loss = ctc(logp, targets, il, tl)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        run = 0.98 * run + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0:
            _log(f"      {name} step {step + 1}/{steps} ctc loss {run:.3f}  [{time.perf_counter() - t0:.0f}s]")
    train_s = time.perf_counter() - t0
    net.eval()
    path = CACHE / f"{name}.onnx"
    _export(net, (torch.from_numpy(ocr_input(imgs[0])),), path, ["x"], ["probs"],
            {"x": {0: "batch", 3: "width"}, "probs": {0: "batch", 1: "steps"}}, spec.opset)  # fmt: skip
    fp32 = evaluate(name)
    _record(name, {**_facts(path), "fp32": fp32, "kind": spec.kind, "about": spec.about, "opset": spec.opset,
                   "train_s": round(train_s, 1), "steps": steps, "torch": torch.__version__})  # fmt: skip
    return f"{name:10} onnxruntime {fmt_metrics(fp32)}  trained in {train_s:.0f}s"


# ---------------------------------------------------------------------------- VAD


def _vad_net(sr: int, cell: str) -> Any:
    import torch
    from torch import nn

    win = 256 if sr == 16000 else 128
    hop = win // 2
    nf = win // 2 + 1
    k = np.arange(win)
    basis = np.concatenate([np.cos(2 * np.pi * np.outer(np.arange(nf), k) / win),
                            -np.sin(2 * np.pi * np.outer(np.arange(nf), k) / win)]) * np.hanning(win)  # fmt: skip

    class VAD(nn.Module):
        """x [N, chunk], state [2, N, 64] -> (speech probability [N, 1], stateN [2, N, 64])."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("basis", torch.from_numpy(basis.astype(np.float32))[:, None, :])
            self.pad = (win - hop) // 2
            self.enc = nn.Sequential(nn.Conv1d(nf, HIDDEN, 3, 1, 1), nn.ReLU(), nn.Conv1d(HIDDEN, HIDDEN, 3, 1, 1), nn.ReLU())
            self.rnn = nn.GRU(HIDDEN, HIDDEN, num_layers=2, batch_first=True) if cell == "gru" else nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
            self.head = nn.Linear(HIDDEN, 1)

        def logmag(self, x: torch.Tensor) -> torch.Tensor:
            """[N, chunk] -> log STFT magnitude [N, nf, frames] (the padding is the chunk's own)."""
            x = nn.functional.pad(x.unsqueeze(1), (self.pad, self.pad), mode="reflect")
            spec = nn.functional.conv1d(x, self.basis, stride=hop)
            re, im = spec[:, :nf], spec[:, nf:]
            return torch.log(torch.sqrt(re * re + im * im) + 1e-3)

        def features(self, x: torch.Tensor) -> torch.Tensor:
            """[N, chunk] -> [N, frames, 64]."""
            return self.enc(self.logmag(x)).permute(0, 2, 1)

        def step(self, f: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if cell == "gru":
                y, h = self.rnn(f, state)
                return y, h
            y, (h, c) = self.rnn(f, (state[0:1], state[1:2]))
            return y, torch.cat([h, c], 0)

        def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y, state_n = self.step(self.features(x), state)
            return torch.sigmoid(self.head(torch.relu(y[:, -1]))), state_n

    return VAD()


def _train_vad(sr: int, cell: str, steps: int, tag: str) -> tuple[Any, float]:
    """Truncated BPTT over 2 s crops of a pool of 48 generated 8 s streams: the fixed STFT
    log-magnitudes are computed once per pool chunk; each step runs the trainable encoder on
    every chunk and the recurrent core over all frames of the crop (equal to running chunk by
    chunk with the state carried)."""
    import torch

    torch.manual_seed(SEED)
    net = _vad_net(sr, cell)
    rng = np.random.default_rng(SEED + sr)
    pool = [chunk_stream(*audio_stream(rng, 8.0, sr), sr) for _ in range(48)]
    with torch.no_grad():
        mags = torch.stack([net.logmag(torch.from_numpy(c)) for c, _ in pool])  # [S, k, nf, frames]
    labels = torch.from_numpy(np.stack([lab for _, lab in pool])).float()  # [S, k]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    bs, crop = 16, int(2.0 * sr) // CHUNK[sr]
    t0 = time.perf_counter()
    run = 0.0
    for step in range(steps):
        si = torch.from_numpy(rng.integers(0, mags.shape[0], bs))
        start = int(rng.integers(0, mags.shape[1] - crop + 1))
        m = mags[si, start : start + crop]  # [B, crop, nf, frames]
        y = labels[si, start : start + crop]
        b, k = m.shape[:2]
        f = net.enc(m.reshape(b * k, *m.shape[2:])).permute(0, 2, 1)  # [B*k, frames, 64]
        fr = f.shape[1]
        out, _ = net.step(f.reshape(b, k * fr, HIDDEN), torch.zeros(2, b, HIDDEN))
        p = net.head(torch.relu(out[:, fr - 1 :: fr])).squeeze(-1)  # the last frame of each chunk
        loss = torch.nn.functional.binary_cross_entropy_with_logits(p, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        run = 0.95 * run + 0.05 * loss.item() if step else loss.item()
        if (step + 1) % 50 == 0:
            _log(f"      {tag} step {step + 1}/{steps} bce {run:.3f}  [{time.perf_counter() - t0:.0f}s]")
    net.eval()
    return net, time.perf_counter() - t0


def _vad_test_and_calib(name: str, rates: list[int]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for sr in rates:
        rng = np.random.default_rng(SEED + 7 + sr)
        cs, ls = zip(*(chunk_stream(*audio_stream(rng, STREAM_S, sr), sr) for _ in range(4)))
        arrays[f"chunks_{sr}"], arrays[f"labels_{sr}"] = np.stack(cs), np.stack(ls)
    _atomic_savez(DATA / f"{name}.test.npz", **arrays)


def _vad_calib(name: str, model_file: Path, sr_input: bool) -> None:
    """256 chunks from calibration streams with the states the fp32 model reached there."""
    sess = session(model_file, 2)
    xs, states = [], []
    for seq in calibration_chunks(name, 16000, streams=4, seconds=4.0):
        state = np.zeros((2, 1, HIDDEN), np.float32)
        for feed in seq[:64]:
            xs.append(feed["input"][0])
            states.append(state[:, 0])
            state = sess.run(None, {**feed, "state": state})[1]
    arrays = {"input": np.stack(xs), "state": np.stack(states, axis=1)}
    if sr_input:
        arrays["sr"] = np.array(16000, np.int64)
    _atomic_savez(CACHE / f"{name}.calib.npz", **arrays)


def _compose_if(m16: Any, m8: Any, opset: int) -> Any:
    """main graph: If(sr == 16000) with the two exported graphs as branches; their initializers
    move to the outer graph (prefixed), their inputs become outer-scope reads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    outer_inits = []

    def branch(m: Any, prefix: str) -> Any:
        g = m.graph
        keep = {i.name for i in g.input} | {"input", "state"}
        ren = {}
        for t in g.initializer:
            ren[t.name] = prefix + t.name
            t2 = onnx.TensorProto()
            t2.CopyFrom(t)
            t2.name = prefix + t.name
            outer_inits.append(t2)
        nodes = []
        for k, n in enumerate(g.node):
            n2 = onnx.NodeProto()
            n2.CopyFrom(n)
            n2.name = prefix + (n.name or f"{n.op_type}_{k}")
            for seq in (n2.input, n2.output):
                for i, v in enumerate(seq):
                    if v and v not in keep:
                        seq[i] = ren.setdefault(v, prefix + v)
            nodes.append(n2)
        outs = [helper.make_tensor_value_info(ren[o.name], o.type.tensor_type.elem_type, None) for o in g.output]
        return helper.make_graph(nodes, prefix.strip("/"), [], outs)

    g16, g8 = branch(m16, "sr16k/"), branch(m8, "sr8k/")
    const = helper.make_node("Constant", [], ["sr_16000"], value=numpy_helper.from_array(np.array(16000, np.int64), "sr_16000"))
    eq = helper.make_node("Equal", ["sr", "sr_16000"], ["is_16k"], name="is_16k")
    iff = helper.make_node("If", ["is_16k"], ["output", "stateN"], then_branch=g16, else_branch=g8, name="sr_select")
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, []),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", HIDDEN])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
               helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", HIDDEN])]
    graph = helper.make_graph([const, eq, iff], "vad_if", inputs, outputs, initializer=outer_inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch+onnx.helper")
    model.ir_version = m16.ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def build_vad(name: str, steps: int = 300) -> str:
    import onnx
    import torch

    spec = SPECS[name]
    rates = [16000, 8000] if name == "vad_if" else [16000]
    cell = "lstm" if name == "vad_if" else "gru"
    _vad_test_and_calib(name, rates)
    path = CACHE / f"{name}.onnx"
    dyn = {"input": {0: "batch", 1: "samples"}, "state": {1: "batch"}, "output": {0: "batch"}, "stateN": {1: "batch"}}
    parts, train_s = {}, 0.0
    for sr in rates:
        net, secs = _train_vad(sr, cell, steps, f"{name}@{sr // 1000}k")
        train_s += secs
        part = path.with_name(f"{name}.{sr}.onnx.part")
        _export(net, (torch.zeros(1, CHUNK[sr]), torch.zeros(2, 1, HIDDEN)), part, ["input", "state"],
                ["output", "stateN"], dyn, spec.opset)  # fmt: skip
        parts[sr] = part
    if name == "vad_if":
        model = _compose_if(onnx.load(str(parts[16000])), onnx.load(str(parts[8000])), spec.opset)
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    else:
        os.replace(parts[16000], path)
    for p in parts.values():
        if p.exists():
            p.unlink()
    _vad_calib(name, path, name == "vad_if")
    _FP32_CACHE.clear()
    fp32 = evaluate(name)
    _record(name, {**_facts(path), "fp32": fp32, "kind": spec.kind, "about": spec.about, "opset": spec.opset,
                   "train_s": round(train_s, 1), "steps": steps, "torch": torch.__version__})  # fmt: skip
    return f"{name:10} onnxruntime {fmt_metrics(fp32)}  trained in {train_s:.0f}s"


def build(names: list[str], force: bool = False) -> int:
    import torch

    try:
        os.nice(10)
    except OSError:
        pass
    torch.set_num_threads(1)  # 2 threads on 2 shared, busy cores: 10x slower (spinning)
    CACHE.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        if not force and name in _manifest() and (CACHE / f"{name}.onnx").exists():
            _log(f"{name:10} kept (built; --force rebuilds)")
            continue
        t = time.perf_counter()
        try:
            msg = build_ocr(name) if SPECS[name].kind == "ocr" else build_vad(name)
            _log(f"{msg}  [{time.perf_counter() - t:.0f}s]")
        except Exception as e:  # noqa: BLE001 - report, build the rest
            failed.append(name)
            _log(f"{name:10} FAILED: {type(e).__name__}: {e}")
            if os.environ.get("REAL_CORPUS_DEBUG"):
                import traceback

                traceback.print_exc()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="generate data, train, export (tools venv with torch)")
    b.add_argument("--models", default=",".join(SPECS), help=f"comma-separated subset of {','.join(SPECS)}")
    b.add_argument("--force", action="store_true", help="rebuild models that are built")
    r = sub.add_parser("report", help="table of the built models and their fp32 figures")
    r.add_argument("--evaluate", action="store_true", help="measure the fp32 figures again")
    e = sub.add_parser("evaluate", help="score an ONNX file end to end on a corpus model's test data")
    e.add_argument("name", help=f"one of {', '.join(SPECS)}")
    e.add_argument("model", help="the .onnx file to score")
    e.add_argument("--limit", type=int, default=None, help="first N test lines / streams")
    e.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            names = [n.strip() for n in args.models.split(",") if n.strip()]
            for n in names:
                _spec(n)
            return build(names, args.force)
        if args.cmd == "evaluate":
            got = evaluate(args.name, args.model, limit=args.limit, threads=args.threads)
            print(f"{args.model}: {fmt_metrics(got)}")
            if args.limit is None:
                print(f"fp32 ({model_path(args.name).name}): {fmt_metrics(reference_metrics(args.name)['fp32'])}")
            return 0
        print(report(args.evaluate))
        return 0
    except CorpusError as e:
        print(f"real_corpus: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Export the fusion benchmark corpus (real-world-shaped models) to .cache/corpus/<name>.onnx.

torch is NOT a graphopt dependency: run this with a separate tools venv, once per machine:

    python3 -m venv .venv-tools
    .venv-tools/bin/pip install torch==2.13.0 onnx onnxscript transformers   # the CPU build;
        # never a bare `torch` (that pulls the multi-GB CUDA build). torchvision is not needed.
    HF_HUB_OFFLINE=1 .venv-tools/bin/python tools/make_corpus.py [--models a,b] [--force]

then benchmark with the main venv: `.venv/bin/python tools/bench_fusion.py`.

Models (random weights, torch.manual_seed(0), eval mode, batch axis dynamic, exported with the
TorchScript exporter, dynamo=False, opset 17 unless named otherwise):

    resnet50          torchvision-layout ResNet-50 (v1.5 bottlenecks), 1x3x224x224
    mobilenetv2       inverted residuals, ReLU6 (Clip)
    efficientnet_b0   MBConv + squeeze-excitation + SiLU (Sigmoid*Mul)
    vit_b16           ViT-B/16 encoder, 12 pre-LN blocks, hand-written attention, GELU (Erf)
    bert_base_s128    transformers.BertModel(BertConfig()), sequence length 128, GELU as Erf
    bert_base_s128_op20  the same at opset 20, where GELU exports as the Gelu op
    resnet18          torchvision-layout ResNet-18, flattening with x.reshape(x.size(0), -1)
    resnet18_noisy, mobilenetv2_noisy
                      the same models exported with the exporter's own optimization off
                      (do_constant_folding=False, training=PRESERVE): BatchNormalization
                      nodes stay, Constant/Shape/Gather/Unsqueeze/Concat chains stay

BatchNorm/LayerNorm statistics and affine parameters are randomised so that folding them is
checked numerically. A model that fails to export is reported and skipped; the exit status is
1 when any failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus_models as cm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, ".cache", "corpus")


def _image(make):
    def build():
        m = make()
        cm.randomize_norms(m)
        return m, (cm.image_input(),), ["input"], ["logits"]

    return build


def _bert(opset: int):
    def build():
        m, args, names = cm.bert_base(128)
        cm.randomize_norms(m)
        return m, args, names, ["last_hidden_state", "pooler_output"]

    return build, opset


# name -> (builder, opset)
MODELS = {
    "resnet50": (_image(cm.ResNet50), 17),
    "mobilenetv2": (_image(cm.MobileNetV2), 17),
    "efficientnet_b0": (_image(cm.EfficientNetB0), 17),
    "vit_b16": (_image(cm.ViT), 17),
    "bert_base_s128": _bert(17),
    "bert_base_s128_op20": _bert(20),
    "resnet18": (_image(cm.ResNet18), 17),
    "resnet18_noisy": (_image(cm.ResNet18), 17),
    "mobilenetv2_noisy": (_image(cm.MobileNetV2), 17),
}

# the pruning corpus: Concat-heavy (DenseNet, Inception, SqueezeNet's Fire) and channel shuffles
MODELS.update({
    "densenet121": (_image(cm.DenseNet121), 17),
    "shufflenetv2": (_image(cm.ShuffleNetV2), 17),
    "googlenet": (_image(cm.GoogLeNet), 17),
    "squeezenet11": (_image(cm.SqueezeNet11), 17),
})


def export(name: str, force: bool) -> str:
    path = os.path.join(OUT, name + ".onnx")
    if os.path.exists(path) and not force:
        return f"{name:20} kept     {os.path.getsize(path) / 2**20:7.1f} MiB (exists; --force re-exports)"
    build, opset = MODELS[name]
    torch.manual_seed(0)
    model, args, in_names, out_names = build()
    model.eval()
    dyn = {n: {0: "batch"} for n in in_names + out_names}
    tmp = path + ".tmp"
    t = time.perf_counter()
    noisy = name.endswith("_noisy")  # the exporter's own graph optimization off
    extra = {"training": torch.onnx.TrainingMode.PRESERVE} if noisy else {}
    with torch.no_grad():
        torch.onnx.export(
            model,
            args,
            tmp,
            dynamo=False,
            opset_version=opset,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dyn,
            do_constant_folding=not noisy,
            external_data=False,
            **extra,
        )
    dt = time.perf_counter() - t
    import onnx

    proto = onnx.load(tmp)
    onnx.checker.check_model(proto)
    os.replace(tmp, path)
    return f"{name:20} exported {os.path.getsize(path) / 2**20:7.1f} MiB  {len(proto.graph.node):5} nodes  opset {opset}  {dt:5.1f}s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    ap.add_argument("--force", action="store_true", help="re-export models that exist")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"torch {torch.__version__} -> {OUT}")
    failed = []
    for name in names:
        try:
            print(export(name, args.force), flush=True)
        except Exception as e:  # noqa: BLE001 - report, export the rest
            failed.append(name)
            print(f"{name:20} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
            if os.environ.get("CORPUS_DEBUG"):
                traceback.print_exc()
            tmp = os.path.join(OUT, name + ".onnx.tmp")
            if os.path.exists(tmp):
                os.remove(tmp)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""graphopt-compile --search / graphopt.search (graphopt.pipeline_search) on a tiny CNN, onnx target.

One search (module fixture, objective size: deterministic) serves the content checks; the
crash, timeout, resume and two-worker checks run their own small studies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

optuna = pytest.importorskip("optuna")  # the `search` extra (in the `test` extra too)

import graphopt  # noqa: E402
from graphopt.accuracy import Budget  # noqa: E402
from graphopt.cli import main as compile_main  # noqa: E402
from graphopt.errors import UsageError  # noqa: E402
from graphopt.pipeline_search import Settings, run_search  # noqa: E402
from graphopt.pipeline_search.space import Space, describe, layer_groups  # noqa: E402
from graphopt.pipeline_search.study import accuracy_loss, dominates, pareto_front, violation  # noqa: E402
from graphopt.pipeline_search.trial import Job, run_trial  # noqa: E402

COMPILE = [sys.executable, "-c", "import sys; from graphopt.cli import main; sys.exit(main())"]


def tiny_cnn(path: str) -> str:
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    inits = [init("w1", 16, 3, 3, 3), init("b1", 16), init("w2", 32, 16, 3, 3), init("b2", 32), init("w3", 32, 32, 3, 3),
             init("b3", 32), init("wf", 10, 32), init("bf", 10)]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("search-data")
    model = tiny_cnn(str(d / "tiny.onnx"))
    rng = np.random.default_rng(1)
    x = rng.random((32, 3, 12, 12), dtype=np.float32)
    np.savez(d / "val.npz", x=x, labels=rng.integers(0, 10, 32))
    np.savez(d / "cal.npz", x=rng.random((16, 3, 12, 12), dtype=np.float32))
    return {"model": model, "val": str(d / "val.npz"), "cal": str(d / "cal.npz"), "dir": d}


def settings(data, directory, **kw) -> Settings:
    base = dict(model=data["model"], eval_data=data["val"], directory=str(directory), calibration=data["cal"],
                objective="size", budget="cosine:0.99999", trials=4, latency_seconds=0.2, trial_timeout=120, quiet=True)
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def searched(data):
    """One finished search: 4 trials, objective size, a budget int8 cannot hold (cosine 0.99999)."""
    return run_search(settings(data, data["dir"] / "s"))


# ------------------------------------------------------------------------------------ the space


class FixedTrial:
    """A stand-in for optuna.Trial: always the choice at `pick`, records what was asked."""

    def __init__(self, pick: int) -> None:
        self.pick, self.asked = pick, []

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return list(choices)[min(self.pick, len(choices) - 1)]


def test_layer_groups_cover_the_weight_layers_in_order(data):
    groups, notes = layer_groups(graphopt.load(data["model"]), "-O2", 3)
    assert [g.index for g in groups] == [0, 1, 2] and notes == []
    names = [n for g in groups for n in g.names]
    assert names.index("c1") < names.index("c2") < names.index("c3") < names.index("logits")
    assert len(layer_groups(graphopt.load(data["model"]), "-O2", 9)[0]) == 4  # no more groups than layers


def test_space_sampling_conditions_and_pipelines(data):
    groups, _ = layer_groups(graphopt.load(data["model"]), "-O2", 2)
    space = Space(groups=groups, calibration="/c.npz")
    off = FixedTrial(0)  # every first choice: prune 0, low-rank 0, int8 off
    p = space.suggest(off)
    assert "prune-scope" not in off.asked and "int8-calib" not in off.asked and "cluster" in off.asked
    assert space.pipeline(p) == "-O2" and describe(p, space) == "fp32 (base pipeline only)"
    on = FixedTrial(1)  # prune 0.1 uniform... int8 on in both groups
    p = space.suggest(on)
    assert "prune-scope" in on.asked and "int8-calib" in on.asked and "cluster" not in on.asked
    spec = space.pipeline(p)
    assert spec.startswith("-O2,prune{ratio=0.1,scope=global,round-to=8,accuracy-budget=none,calibration=/c.npz},low-rank{energy=0.8")
    assert "quantize{scheme=int8,calibration=percentile,speed=rules,data=/c.npz}" in spec and "exclude" not in spec
    p["int8-g1"] = False  # a group off: its layers are listed in exclude
    assert "exclude=" + ":".join(groups[1].names) in space.pipeline(p)
    from graphopt.transform import parse_pipeline

    for q in (p, space.baseline(), space.int8_everywhere(), {**space.baseline(), "cluster": 4, "precision": "fp16"}):
        parse_pipeline(space.pipeline(q))  # every pipeline of the space parses


def ln_matmuls(path: str) -> str:
    """LayerNormalization read by two MatMuls (what quantize's smooth= can fold)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "w1"], ["y1"], name="mm1"),
             helper.make_node("MatMul", ["ln", "w2"], ["y2"], name="mm2")]
    g = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4, 8]) for n in ("y1", "y2")], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_smooth_choice_only_with_int8_and_smoothable_layers(data, tmp_path):
    """int8-smooth is asked when a group is int8 and some layer's input can be smoothed: not on the
    CNN (its one Gemm reads Flatten), on LayerNorm → MatMuls; it reaches quantize's options."""
    from graphopt.transform import parse_pipeline

    groups, _ = layer_groups(graphopt.load(data["model"]), "-O2", 2)
    assert [g.smoothable for g in groups] == [0, 0]
    space = Space(groups=groups)
    t = FixedTrial(1)
    space.suggest(t)
    assert "int8-calib" in t.asked and "int8-smooth" not in t.asked
    assert space.int8_smoothed() is None and "int8-smooth" not in space.int8_everywhere()

    groups, _ = layer_groups(graphopt.load(ln_matmuls(str(tmp_path / "ln.onnx"))), "-O2", 1)
    assert [g.smoothable for g in groups] == [2]
    space = Space(groups=groups, calibration="/c.npz")
    off = FixedTrial(0)
    assert "int8-smooth" not in space.suggest(off) and "int8-smooth" not in off.asked  # int8 off: not asked
    p = space.suggest(FixedTrial(1))
    assert p["int8-smooth"] == 0.5
    spec = space.pipeline(p)
    assert spec.endswith("quantize{scheme=int8,calibration=percentile,speed=rules,data=/c.npz,smooth=0.5}")
    assert describe(p, space).endswith("int8 all (percentile, smooth 0.5)")
    (q,) = [x for x in parse_pipeline(spec) if x.name == "quantize"]
    assert q.smooth == 0.5  # type: ignore[attr-defined]
    assert "smooth" not in space.pipeline(space.int8_everywhere())
    assert space.int8_smoothed() == {**space.int8_everywhere(), "int8-smooth": 0.5}


def encoder_block(path: str, layers: int = 2) -> str:
    """HF-BERT-style post-LN encoder layers (opset 17): q/k/v projections, masked softmax
    attention ((1 - mask) * -10000), output projection, residual + LayerNorm (what -O2 with contrib
    ops fuses into com.microsoft Attention and SkipLayerNormalization)."""
    rng = np.random.default_rng(0)
    S, E, H = 6, 16, 2
    d = E // H
    inits = [numpy_helper.from_array(np.array([1, S, H, d], np.int64), "heads"),
             numpy_helper.from_array(np.array([1, S, E], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"),
             numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.float32(-10000.0), "neg"),
             numpy_helper.from_array(np.float32(np.sqrt(d)), "sqrt_d")]
    nodes = [helper.make_node("Unsqueeze", ["am", "ax12"], ["am4"]), helper.make_node("Sub", ["one", "am4"], ["inv"]),
             helper.make_node("Mul", ["inv", "neg"], ["ext"])]
    x = "x"
    for i in range(layers):
        def w(name: str, *shape: int) -> str:
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), f"{name}{i}"))
            return f"{name}{i}"

        for n in "qkv":
            nodes += [helper.make_node("MatMul", [x, w(f"w{n}", E, E)], [f"{n}l{i}"], name=f"l{i}_{n}"),
                      helper.make_node("Add", [f"{n}l{i}", w(f"b{n}", E)], [f"{n}a{i}"]),
                      helper.make_node("Reshape", [f"{n}a{i}", "heads"], [f"{n}r{i}"])]
        nodes += [helper.make_node("Transpose", [f"qr{i}"], [f"qh{i}"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", [f"kr{i}"], [f"kh{i}"], perm=[0, 2, 3, 1]),
                  helper.make_node("Transpose", [f"vr{i}"], [f"vh{i}"], perm=[0, 2, 1, 3]),
                  helper.make_node("MatMul", [f"qh{i}", f"kh{i}"], [f"s{i}"]),
                  helper.make_node("Div", [f"s{i}", "sqrt_d"], [f"sd{i}"]),
                  helper.make_node("Add", [f"sd{i}", "ext"], [f"sm{i}"]),
                  helper.make_node("Softmax", [f"sm{i}"], [f"p{i}"], axis=-1),
                  helper.make_node("MatMul", [f"p{i}", f"vh{i}"], [f"c{i}"]),
                  helper.make_node("Transpose", [f"c{i}"], [f"ct{i}"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"ct{i}", "flat"], [f"cf{i}"]),
                  helper.make_node("MatMul", [f"cf{i}", w("wo", E, E)], [f"o{i}"], name=f"l{i}_out"),
                  helper.make_node("Add", [f"o{i}", w("bo", E)], [f"ob{i}"]),
                  helper.make_node("Add", [f"ob{i}", x], [f"r{i}"]),
                  helper.make_node("LayerNormalization", [f"r{i}", w("g", E), w("b", E)], [f"h{i}"], axis=-1)]
        x = f"h{i}"
    g = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, E]),
                                         helper.make_tensor_value_info("am", TensorProto.FLOAT, [1, S])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, S, E])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_contrib_ops_choice_on_attention_models_only(data, tmp_path):
    """contrib-ops is offered where the contrib fusions make com.microsoft Attention (not on the
    CNN, whose Conv+Relu would only become FusedConv), asked only with int8 on; its stage runs
    between the structure passes and quantize, and int8 groups then exclude the fused layers."""
    from graphopt.pipeline_search.space import contrib_stage
    from graphopt.transform import parse_pipeline

    cnn = graphopt.load(data["model"])
    assert contrib_stage(graphopt.optimize(cnn, "-O2"), "-O2", 2) == ("", ())
    assert contrib_stage(cnn, "", 2) == ("", ())
    enc = graphopt.load(encoder_block(str(tmp_path / "enc.onnx")))
    groups, _ = layer_groups(enc, "-O2", 2)
    stage, cgroups = contrib_stage(graphopt.optimize(enc, "-O2"), "-O2", len(groups))
    assert "fuse-attention{contrib-ops=true}" in stage and "fuse-conv-activation" not in stage
    assert len(groups) == len(cgroups) == 2
    assert [len(g.layers) for g in groups] == [4, 4] and [len(g.layers) for g in cgroups] == [2, 2]  # q/k/v packed
    fused = graphopt.optimize(enc, "-O2," + stage)
    att = [n.outputs[0].name for n in fused.graph if n.op_type == "Attention"]  # (fused nodes may be unnamed)
    assert len(att) == 2 and att[0] in cgroups[0].names and att[1] in cgroups[1].names

    space = Space(groups=groups, calibration="/c.npz", contrib=stage, contrib_groups=cgroups)
    off = FixedTrial(0)
    space.suggest(off)
    assert "contrib-ops" not in off.asked  # int8 off: not asked
    on = FixedTrial(1)
    p = space.suggest(on)
    assert "contrib-ops" in on.asked and p["contrib-ops"] is True
    p.update({"prune": 0.0, "low-rank": 0.0, "int8-g1": False})
    spec = space.pipeline(p)
    assert spec.startswith("-O2," + stage + ",quantize{")
    assert "exclude=" + ":".join(cgroups[1].names) in spec and groups[1].names[0] not in spec
    assert describe(p, space).startswith("contrib ops + int8 g0")
    assert space.int8_everywhere()["contrib-ops"] is False and space.int8_contrib() == {**space.int8_everywhere(), "contrib-ops": True}
    assert Space(groups=groups).int8_contrib() is None and "contrib-ops" not in Space(groups=groups).int8_everywhere()
    for q in (p, space.int8_contrib()):
        parse_pipeline(space.pipeline(q))
    # the stage is quantize-ready: outputs kept (fp32 stage before int8) against onnxruntime
    from graphopt.check import check_same_outputs

    feeds = {"x": np.random.default_rng(2).standard_normal((1, 6, 16)).astype(np.float32),
             "am": np.array([[1, 1, 1, 1, 0, 0]], np.float32)}
    check_same_outputs(enc, fused, feeds)


def test_prune_rounds_channels_to_the_targets_block(data):
    """Pruned channel counts follow the target's conv block: 8 for onnxruntime and AVX2, 16 for an
    AVX-512 cpu target (48 kept channels made the whole compiled model block by 8)."""
    from graphopt.pipeline_search.study import _channel_multiple

    assert _channel_multiple("cpu{mcpu=haswell}") == 8 and _channel_multiple("cpu{mcpu=znver4}") == 16
    assert _channel_multiple("cpu{mcpu=skylake-avx512}") == 16 and _channel_multiple("cuda") == 8
    point = {"prune": 0.3, "prune-scope": "uniform", "low-rank": 0.0}
    assert "round-to=8," in Space().pipeline(point)
    spec = Space(round_to=16).pipeline(point)
    assert "round-to=16," in spec
    def widths(spec: str) -> list[int]:
        out = graphopt.optimize(graphopt.load(data["model"]), spec)
        return [n.outputs[0].shape[1] for n in out.graph if n.op_type == "Conv" and n.outputs[0].name != "logits"]

    assert any(w % 16 for w in widths(Space().pipeline(point)))  # 32 channels at 0.3 keep 24 by 8s
    assert all(w % 16 == 0 for w in widths(spec))


def test_per_group_prune_ratios(data):
    """prune-scope per-group: a ratio per layer group, carried to prune's layer-ratios; each
    group's layers lose their own share (g0's convs keep their channels, g1's c3 loses half)."""
    from graphopt.ir.query import const_array

    groups, _ = layer_groups(graphopt.load(data["model"]), "-O2", 2)
    space = Space(groups=groups, prune_ratios=(0.0, 0.5, 0.25))
    assert [g.layers for g in groups] == [("c1", "c2"), ("c3", "logits")]
    t = FixedTrial(2)  # prune 0.25, scope per-group, every group 0.25 ...
    p = space.suggest(t)
    assert p["prune-scope"] == "per-group" and {"prune-g0", "prune-g1"} <= set(t.asked)
    p.update({"prune-g0": 0.0, "prune-g1": 0.5, "low-rank": 0.0, "int8-g0": False, "int8-g1": False})
    spec = space.pipeline(p)
    entries = [f"{n}@0" for n in groups[0].layers] + [f"{n}@0.5" for n in groups[1].layers]
    assert "scope=uniform,layer-ratios=" + ":".join(entries) + ",round-to=8" in spec
    assert describe(p, space).startswith("prune g0 0/g1 0.5")
    out = graphopt.optimize(graphopt.load(data["model"]), spec)
    widths = {n.outputs[0].name: const_array(n.inputs[1]).shape[0] for n in out.graph if n.op_type == "Conv"}
    assert widths == {"c1": 16, "c2": 32, "c3": 16}
    assert not Space(groups=groups[:1]).per_group_prune()  # one group: nothing to split


def test_objectives_constraint_and_front():
    b = Budget.parse("top1:1")
    assert violation({"top1": 0.5}, b) < 0 < violation({"top1": 2.0}, b)
    assert violation({"cosine": 0.995}, Budget.parse("cosine:0.99")) < 0
    assert accuracy_loss({"cosine": 0.99}, None) == pytest.approx(0.01)
    assert dominates([1, 1], [1, 2]) and not dominates([1, 1], [1, 1]) and not dominates([0, 2], [1, 1])
    from graphopt.pipeline_search.study import TrialRecord

    def rec(n, objs, feasible=True):
        return TrialRecord(n, "ok", {}, "", "", objectives=objs, feasible=feasible)

    front = pareto_front([rec(0, [1.0, 0.0]), rec(1, [0.5, 0.1]), rec(2, [0.6, 0.2]), rec(3, [0.1, 0.0], feasible=False)])
    assert [t.number for t in front] == [1, 0]  # 2 is dominated by 1; 3 is over budget


def test_reference_standing_ties_and_remeasured_latency():
    from graphopt.pipeline_search import reference_standing
    from graphopt.pipeline_search.study import TrialRecord

    def rec(n, speed, cos, size, confirmed=None):
        return TrialRecord(n, "ok", {}, "", "", speedup=speed, size=size, accuracy={"cosine": cos, "cosine-low": cos - 1e-3},
                           objectives=[1.0 / speed, 1.0 - cos], feasible=True, confirmed_speedup=confirmed)

    # the same model (equal size and accuracy): a tie whatever the latencies say, never "dominated"
    ref = rec(-1, 2.06, 0.99333, 58_000_000)
    twin = rec(1, 1.82, 0.99333, 58_000_000)
    assert reference_standing(ref, [twin]) == {"dominated_by": [], "matched_by": [1]}
    faster_twin = rec(1, 2.5, 0.99333, 58_000_000)
    assert reference_standing(ref, [faster_twin]) == {"dominated_by": [], "matched_by": [1]}
    # more accurate, first figure slower; re-measured in the same end-of-search rounds it is faster
    better = rec(2, 1.9, 0.996, 60_000_000, confirmed=2.2)
    assert reference_standing(ref, [better])["dominated_by"] == []  # the reference was not re-measured
    ref.confirmed_speedup = 2.1
    assert reference_standing(ref, [better]) == {"dominated_by": [2], "matched_by": []}
    ref.confirmed_speedup = 2.3
    assert reference_standing(ref, [better])["dominated_by"] == []
    # objective size: latency figures play no part
    sized = TrialRecord(3, "ok", {}, "", "", speedup=1.0, size=10, accuracy={"cosine": 0.999}, objectives=[0.1, 0.001],
                        feasible=True, confirmed_speedup=9.0)
    small_ref = TrialRecord(-1, "ok", {}, "", "", speedup=1.0, size=20, accuracy={"cosine": 0.998}, objectives=[0.2, 0.002],
                            feasible=True, confirmed_speedup=0.1)
    assert reference_standing(small_ref, [sized], "size")["dominated_by"] == [3]


def test_references_are_remeasured_with_the_front(data, tmp_path):
    res = run_search(settings(data, tmp_path, trials=2, budget="cosine:0.99", objective="latency", references=True))
    assert set(res.references) == {"int8-alone", "prune-alone"}
    doc = json.loads((tmp_path / "pareto.json").read_text())
    for name, ref in doc["references"].items():
        assert ref["state"] == "ok", (name, ref)
        assert ref["confirmed_speedup"] > 0 and "matched_by" in ref and "dominated_by" in ref
        assert (tmp_path / "references" / name / "confirm.json").exists()
    # resumed: the re-measured figures come back from the study, nothing is measured again
    again = run_search(settings(data, tmp_path, trials=2, budget="cosine:0.99", objective="latency", references=True))
    assert {k: r.confirmed_speedup for k, r in again.references.items()} == {k: r["confirmed_speedup"] for k, r in doc["references"].items()}


# ------------------------------------------------------------------------------------ a search


def test_pareto_json_lists_every_trial(searched, data):
    doc = json.loads((data["dir"] / "s" / "pareto.json").read_text())
    assert len(doc["trials"]) == 4 and doc["objective"] == "size" and doc["budget"] == "cosine >= 0.99999"
    t0 = doc["trials"][0]
    assert t0["label"] == "fp32 (base pipeline only)" and t0["pipeline"] == "-O2"  # the enqueued known points first
    assert "int8 all" in doc["trials"][1]["label"]
    for t in doc["trials"]:
        assert t["state"] == "ok", t
        assert t["size"] > 0 and t["speedup"] > 0 and t["latency_ms"] > 0 and set(t["accuracy"]) >= {"cosine", "top1", "accuracy"}
        assert t["feasible"] == (t["accuracy"]["cosine"] >= 0.99999)
    assert doc["best"] in doc["front"] and len(doc["space"]["int8_groups"]) == 3
    assert os.path.exists(data["dir"] / "s" / "pareto.png")


def test_budget_is_respected(searched):
    best = searched.best
    assert best is not None and best.feasible and best.accuracy["cosine"] >= 0.99999
    assert all(t.feasible for t in searched.front)
    # int8 everywhere (trial 1, enqueued) is a third of the size but over the budget: never the best
    int8 = searched.trials[1]
    assert int8.label == "int8 all (minmax)" and int8.feasible is False and int8.size < searched.trials[0].size
    assert best.number != 1 and all(t.feasible for t in searched.trials if t in searched.front)


def test_best_toml_replays_to_identical_bytes(searched, data, tmp_path):
    d = data["dir"] / "s"
    out = tmp_path / "replay.onnx"
    assert compile_main(["--config", str(d / "best.toml"), "-o", str(out), "--quiet"]) == 0
    assert out.read_bytes() == (d / "best.onnx").read_bytes()
    assert "replay: graphopt-compile --config" in (d / "best.toml").read_text()


def test_finished_search_runs_no_more_trials(searched, data):
    start = time.perf_counter()
    again = run_search(settings(data, data["dir"] / "s"))
    assert len(again.trials) == 4 and again.best.number == searched.best.number
    assert time.perf_counter() - start < 60


def test_study_of_another_objective_is_refused(searched, data):
    with pytest.raises(UsageError, match="made with objective 'size'"):
        run_search(settings(data, data["dir"] / "s", objective="latency"))


# ------------------------------------------------------------------------------------ failures


def test_crashing_trial_is_a_failed_trial_not_a_failed_search(data, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_SEARCH_FAULT", "0:crash")
    res = run_search(settings(data, tmp_path, trials=2, budget="cosine:0.99", objective="latency"))
    states = {t.number: t.state for t in res.trials}
    assert states == {0: "crashed", 1: "ok"}
    assert "SIGABRT" in res.trials[0].reason
    doc = json.loads((tmp_path / "pareto.json").read_text())
    assert doc["trials"][0]["state"] == "crashed" and doc["best"] == 1
    # objective latency: the front's fastest are re-measured with longer rounds, the best among them
    assert doc["trials"][1]["confirmed_speedup"] > 0 and (tmp_path / "trials" / "0001" / "confirm.json").exists()
    assert "re-measured" in (tmp_path / "best.toml").read_text()


def test_timeout_kills_the_trial_and_its_process_group(data, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_SEARCH_FAULT", "7:hang")
    (tmp_path / "c.toml").write_text(f'[graphopt]\nmodel = "{data["model"]}"\noutput = "m.onnx"\n')
    job = Job(number=7, config=str(tmp_path / "c.toml"), output=str(tmp_path / "m.onnx"), kind="onnx",
              original=data["model"], eval_data=data["val"], reference=str(tmp_path / "none.npz"),
              result=str(tmp_path / "result.json"))
    start = time.perf_counter()
    o = run_trial(job, timeout=4, log=str(tmp_path / "log.txt"))
    assert o.state == "timeout" and "timed out after 4 s" in o.reason
    assert time.perf_counter() - start < 30


def test_failing_compile_reports_its_error_line(data, tmp_path):
    (tmp_path / "c.toml").write_text(f'[graphopt]\nmodel = "{data["model"]}"\noutput = "m.onnx"\npasses = "no-such-pass"\n')
    job = Job(number=0, config=str(tmp_path / "c.toml"), output=str(tmp_path / "m.onnx"), kind="onnx",
              original=data["model"], eval_data=data["val"], reference=str(tmp_path / "none.npz"),
              result=str(tmp_path / "result.json"))
    o = run_trial(job, timeout=120, log=str(tmp_path / "log.txt"))
    assert o.state == "failed" and o.reason.startswith("exit 2: graphopt-compile: error:") and "no-such-pass" in o.reason


@pytest.mark.slow
def test_timeout_trial_inside_a_search_is_survived(data, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_SEARCH_FAULT", "1:hang")
    res = run_search(settings(data, tmp_path, trials=3, trial_timeout=40))
    assert [t.state for t in res.trials] == ["ok", "timeout", "ok"]


# ------------------------------------------------------------------------------------ CLI, resume, workers


def cli_search(data, directory, *extra) -> list[str]:
    return COMPILE + [data["model"], "--search", "--eval-data", data["val"], "--calibration", data["cal"], "--objective",
                      "size", "--accuracy-budget", "cosine:0.99999", "--search-dir", str(directory), *extra]


def finished(storage: str) -> list:
    study = optuna.load_study(study_name="graphopt-search", storage=storage)
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def test_cli_usage_errors(data, capsys):
    assert compile_main([data["model"], "--search"]) == 2
    assert "--search needs --eval-data" in capsys.readouterr().err
    assert compile_main([data["model"], "--trials", "3", "-o", "x.onnx"]) == 2
    assert "--trials is used by --search; add it" in capsys.readouterr().err
    assert compile_main([data["model"], "--search", "--eval-data", data["val"], "--quantize", "int8"]) == 2
    assert "--quantize cannot be combined with --search" in capsys.readouterr().err
    assert compile_main([data["model"], "--search", "--eval-data", data["val"], "--accuracy-budget", "top5:1"]) == 2
    assert "unknown metric 'top5'" in capsys.readouterr().err


def test_accuracy_drop_budget_on_labels(data, tmp_path, capsys):
    """accuracy-drop:P holds top-1 accuracy on the eval data's labels within P points of the
    original's; the base pipeline drops 0; without labels, and in a pass, it is refused."""
    res = run_search(settings(data, tmp_path / "s", budget="accuracy-drop:0", trials=2))
    base = next(t for t in res.trials if t.label.startswith("fp32"))
    assert base.accuracy["accuracy-drop"] == 0.0 and base.feasible
    for t in res.trials:
        if t.state == "ok":
            assert t.feasible == (t.accuracy["accuracy-drop"] <= 0)
    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, x=np.load(data["val"])["x"])
    with pytest.raises(UsageError, match="has no `labels` array"):
        run_search(settings(data, tmp_path / "n", budget="accuracy-drop:1", eval_data=str(nolabels)))
    assert compile_main([data["model"], "-o", str(tmp_path / "p.onnx"), "--passes",
                         "prune{ratio=0.3,accuracy-budget=accuracy-drop:1}"]) == 2
    assert "accuracy-drop needs labelled evaluation data" in capsys.readouterr().err


def test_missing_optuna_is_one_line(data, tmp_path):
    code = ("import sys; sys.modules['optuna'] = None\nfrom graphopt.cli import main\n"
            f"sys.exit(main([{data['model']!r}, '--search', '--eval-data', {data['val']!r}, '--search-dir', {str(tmp_path)!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == "graphopt-compile: error: --search needs optuna: pip install 'graphopt[search]'"


@pytest.mark.slow
def test_killed_search_resumes(data, tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    p = subprocess.Popen(cli_search(data, tmp_path, "--trials", "5"), stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(1)
        try:
            if len([t for t in finished(storage) if t.state.name == "COMPLETE"]) >= 2:
                break
        except Exception:  # noqa: BLE001 - the study is not created yet
            pass
    os.killpg(p.pid, signal.SIGKILL)  # the worker and its trial's child, mid-study
    p.wait()
    before = {t.number for t in finished(storage)}
    assert len(before) >= 2
    q = subprocess.run(cli_search(data, tmp_path, "--trials", "5"), capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr
    assert f"{len(before)} of 5 trials done" in q.stderr
    study = optuna.load_study(study_name="graphopt-search", storage=storage)
    trials = study.get_trials(deepcopy=False)
    counted_ = [t for t in trials if t.state.is_finished() and t.user_attrs.get("state") not in ("died", None)]
    assert len(counted_) == 5
    assert {t.number for t in trials} >= before and max(t.number for t in trials) >= 5 - 1
    died = [t for t in trials if t.user_attrs.get("state") == "died"]
    assert all("worker (pid" in t.user_attrs["reason"] for t in died)
    assert (tmp_path / "best.toml").exists()


@pytest.mark.slow
def test_two_workers_share_one_study(data, tmp_path):
    storage = f"sqlite:///{tmp_path}/shared.db"
    procs = [subprocess.Popen(cli_search(data, tmp_path / f"w{i}", "--trials", "5", "--search-storage", storage),
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    done = finished(storage)
    assert 5 <= len(done) <= 6  # the last trial may start in both workers at once
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) == 2  # both worked on it
    assert len({t.number for t in done}) == len(done)


@pytest.mark.slow
def test_two_latency_workers_re_measure_one_at_a_time(data, tmp_path):
    """With objective latency both workers end by re-measuring the front: the one that finishes
    first waits for the other's trial, then one re-measures while the other waits, and no trial
    is re-measured twice (each beside the other's load, as a MiniLM search did)."""
    storage = f"sqlite:///{tmp_path}/shared.db"
    code = ("import sys; from graphopt.pipeline_search import Settings, run_search\n"
            f"run_search(Settings(model={data['model']!r}, eval_data={data['val']!r}, directory=sys.argv[1], "
            f"calibration={data['cal']!r}, objective='latency', budget='cosine:0.99999', trials=6, latency_seconds=0.3, "
            f"trial_timeout=120, storage={storage!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"w{i}")], stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    remeasured = [line.split(":")[1].strip() for e in errs for line in e.splitlines() if "re-measured" in line and "trial" in line]
    assert remeasured and len(remeasured) == len(set(remeasured)), errs
    study = optuna.load_study(study_name="graphopt-search", storage=storage)
    assert study.user_attrs.get("confirming") == {}  # the mark is released


def test_repeated_pipeline_is_answered_from_its_twin(searched, data):
    """(After the other checks of the module's search: it adds trials to that study.)"""
    storage = f"sqlite:///{data['dir'] / 's' / 'study.db'}"
    study = optuna.load_study(study_name="graphopt-search", storage=storage)
    study.enqueue_trial(searched.trials[0].params)  # the base pipeline again
    res = run_search(settings(data, data["dir"] / "s", trials=5))
    dup = [t for t in res.trials if t.state == "duplicate"]
    assert len(dup) == 1 and dup[0].reason == "same pipeline as trial 0" and dup[0].number == 4
    assert not (data["dir"] / "s" / "trials" / "0004").exists()  # nothing compiled
    assert len([t for t in res.trials if t.state != "duplicate"]) == 5 and dup[0] not in res.front

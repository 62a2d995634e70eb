"""Pass infrastructure: pipeline syntax, options, registry, instruments, error messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.check import NumericMismatchError, check_same_outputs
from graphopt.errors import UsageError
from graphopt.ir import Model, NumpyTensor
from graphopt.transform import (
    OPT_LEVELS,
    NumericCheckInstrument,
    Pass,
    PassContext,
    PassError,
    PassManager,
    PassResult,
    Rewrite,
    TimingInstrument,
    VerifyInstrument,
    format_pipeline,
    get_pass,
    list_passes,
    parse_pipeline,
    register_pass,
)


@register_pass
@dataclass(frozen=True)
class CountNodes(Pass):
    """Count nodes (test pass; changes nothing)."""

    name: ClassVar[str] = "test-count-nodes"
    ratio: float = 0.5
    round_to: int = 8
    enabled: bool = True
    label: str = "x"
    axes: tuple[int, ...] = ()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(False, {"nodes": len(model.graph)})


@register_pass
@dataclass(frozen=True)
class ScaleWeights(Pass):
    """Multiply the k-th Mul's constant operand by 2 (a deliberately wrong, rule-like pass)."""

    name: ClassVar[str] = "test-scale-weights"
    only: int = 1  # which Mul (1-based) gets broken

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        rewrites = []
        for i, n in enumerate(model.graph.find_nodes("Mul"), start=1):
            if ctx.rewrite_limit is not None and len(rewrites) >= ctx.rewrite_limit:
                break
            w = n.inputs[1]
            assert w is not None and w.const_value is not None
            factor = 2.0 if i == self.only else 1.0
            w.const_value = NumpyTensor(w.const_value.numpy() * np.float32(factor), w.name)
            rewrites.append(Rewrite("scale", [n.name]))
        return PassResult(True, {"scaled": len(rewrites)}, rewrites)


@register_pass
@dataclass(frozen=True)
class Crash(Pass):
    """Raise (test pass)."""

    name: ClassVar[str] = "test-crash"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        raise ZeroDivisionError("boom")


@register_pass
@dataclass(frozen=True)
class Corrupt(Pass):
    """Break an invariant: point a node at a value nobody defines (test pass)."""

    name: ClassVar[str] = "test-corrupt"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        node = next(iter(model.graph))
        node.replace_input_with(0, graphopt.Value("ghost"))
        return PassResult(True)


def _mul_chain(n: int = 3) -> Model:
    nodes, inits = [], []
    prev = "X"
    for i in range(n):
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, [4], np.full(4, 1.5, np.float32)))
        nodes.append(helper.make_node("Mul", [prev, f"w{i}"], [f"m{i}"], name=f"mul{i}"))
        prev = f"m{i}"
    nodes.append(helper.make_node("Relu", [prev], ["Y"], name="relu"))
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    return graphopt.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


# --- pipeline syntax ---------------------------------------------------------------------------


def test_options_are_converted_by_field_type() -> None:
    [p] = parse_pipeline("test-count-nodes{ratio=0.3,round-to=16,enabled=false,label=abc,axes=0:2}")
    assert p == CountNodes(ratio=0.3, round_to=16, enabled=False, label="abc", axes=(0, 2))


def test_spec_round_trips_and_lists_only_changed_options() -> None:
    p = CountNodes(ratio=0.25, axes=(1, 3))
    assert p.spec() == "test-count-nodes{ratio=0.25,axes=1:3}"
    assert parse_pipeline(p.spec()) == [p]
    assert CountNodes().spec() == "test-count-nodes"
    passes = [CountNodes(), CountNodes(enabled=False)]
    assert parse_pipeline(format_pipeline(passes)) == passes


@pytest.mark.parametrize(
    "spec, message",
    [
        ("test-count-nodes{ratio=abc}", "not a valid float"),
        ("test-count-nodes{bogus=1}", "has no option 'bogus'"),
        ("test-count-nodes{ratio}", "is not key=value"),
        ("test-count-nodes{ratio=1,ratio=2}", "given twice"),
        ("test-count-nodez", "did you mean 'test-count-nodes'"),
        ("-O9", "unknown optimisation level"),
        ("test-count-nodes,,dce", "bad pipeline spec"),
    ],
)
def test_bad_specs_give_one_line_usage_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_pipeline(spec)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_opt_levels_are_named_pipelines() -> None:
    assert parse_pipeline("-O0") == []
    for level in OPT_LEVELS:
        passes = parse_pipeline(level)
        assert parse_pipeline(format_pipeline(passes)) == passes
    o1 = [p.name for p in parse_pipeline("-O1")]
    assert o1[:1] == ["fold-constants"] and "dce" in o1
    assert len(parse_pipeline("-O2")) >= len(o1)


def test_disable_is_logged_and_typos_are_errors() -> None:
    log: list[str] = []
    passes = parse_pipeline("test-count-nodes,test-scale-weights", disable=["test-scale-weights"], log=log)
    assert [p.name for p in passes] == ["test-count-nodes"]
    assert log == ["--disable: skipped pass test-scale-weights"]
    with pytest.raises(UsageError, match="has no pass 'test-crash'"):
        parse_pipeline("test-count-nodes", disable=["test-crash"])


# --- registry ----------------------------------------------------------------------------------


def test_registry_lists_passes_and_refuses_name_clashes() -> None:
    assert get_pass("test-count-nodes") is CountNodes
    assert "test-count-nodes" in list_passes()

    @dataclass(frozen=True)
    class Other(Pass):
        """Another pass with a taken name."""

        name: ClassVar[str] = "test-count-nodes"

    with pytest.raises(UsageError, match="pass name clash: 'test-count-nodes'"):
        register_pass(Other)

    @dataclass(frozen=True)
    class Bad(Pass):
        name: ClassVar[str] = "Bad_Name"

    with pytest.raises(UsageError, match="kebab-case"):
        register_pass(Bad)


def test_builtin_passes_have_one_line_docs() -> None:
    for name, cls in list_passes().items():
        assert cls.summary(), f"pass {name} has no docstring"


# --- manager and instruments -------------------------------------------------------------------


def test_errors_name_the_pass_and_the_passes_before_it() -> None:
    m = _mul_chain()
    with pytest.raises(PassError) as e:
        PassManager(parse_pipeline("test-count-nodes,test-crash")).run(m)
    msg = str(e.value)
    assert "pass 'test-crash' crashed: ZeroDivisionError: boom" in msg
    assert "passes before it: test-count-nodes" in msg
    assert "\n" not in msg


def test_verify_instrument_names_the_pass_that_broke_the_ir() -> None:
    m = _mul_chain()
    with pytest.raises(PassError, match="pass 'test-corrupt' left an invalid model: .*dangling"):
        PassManager(parse_pipeline("test-count-nodes,test-corrupt"), [VerifyInstrument()]).run(m)


def test_timing_instrument_records_every_pass() -> None:
    timing = TimingInstrument()
    PassManager(parse_pipeline("test-count-nodes,test-count-nodes{ratio=0.1}"), [timing]).run(_mul_chain())
    assert [r.spec for r in timing.records] == ["test-count-nodes", "test-count-nodes{ratio=0.1}"]
    assert all(r.seconds >= 0 and r.nodes_before == r.nodes_after == 4 for r in timing.records)
    assert timing.records[0].stats == {"nodes": 4}


def test_check_each_pinpoints_the_pass_and_the_rewrite() -> None:
    m = _mul_chain(5)
    with pytest.raises(NumericMismatchError) as e:
        graphopt.optimize(m, "test-count-nodes,test-scale-weights{only=3}", check_each=True)
    msg = str(e.value)
    assert "after pass 'test-scale-weights{only=3}'" in msg
    # bisection over the 5 recorded rewrites finds the third one
    assert "first bad rewrite: scale on [mul2]" in msg
    assert "passes before it: test-count-nodes" in msg


def test_optimize_works_on_a_copy_unless_inplace() -> None:
    m = _mul_chain()
    before = m.graph.initializers["w0"].const_value.numpy().copy()
    out = graphopt.optimize(m, "test-scale-weights{only=1}")
    assert out is not m
    np.testing.assert_array_equal(m.graph.initializers["w0"].const_value.numpy(), before)
    assert not check_same_outputs(m, out).ok
    same = graphopt.optimize(m, "test-scale-weights{only=1}", inplace=True)
    assert same is m
    assert [r.spec for r in same.meta["pass_timings"]] == ["test-scale-weights"]


def test_numeric_check_passes_for_a_harmless_pipeline() -> None:
    m = _mul_chain()
    ins = NumericCheckInstrument()
    PassManager(parse_pipeline("test-count-nodes"), [ins]).run(m)
    assert ins.checked == [("test-count-nodes", 0.0)]


def test_exported_model_of_test_chain_is_valid() -> None:
    onnx.checker.check_model(graphopt.to_onnx(_mul_chain()))

"""The pass author's toolbox: graphopt.ir's constant / opset queries, what a Match carries, the
driver dropping orphaned initializers, and the one onnxruntime session builder and kernel probe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphopt
from graphopt.check import onnxruntime_has_kernel, onnxruntime_session
from graphopt.ir import DataType, Model, const_array, constant_semantics, in_function, is_constant, opset_version
from graphopt.pattern import Match, P, RewritePass, Rule, apply_rules
from graphopt.transform import PassContext


def _model(opsets: dict[str, int], *, ir: int = 10, input_initializer: bool = False, with_function: bool = False) -> Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    c = helper.make_tensor("c", TensorProto.FLOAT, [3], [1.0, 1.0, 1.0])
    nodes = [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Relu", ["m"], ["r"])]
    if with_function:
        nodes.append(helper.make_node("Twice", ["r"], ["y"], domain="local"))
    else:
        nodes.append(helper.make_node("Identity", ["r"], ["y"]))
    inputs = [x] + ([helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])] if input_initializer else [])
    g = helper.make_graph(nodes, "g", inputs, [y], [c])
    imports = [helper.make_opsetid(d, v) for d, v in opsets.items()]
    functions = []
    if with_function:
        imports.append(helper.make_opsetid("local", 1))
        functions.append(helper.make_function("local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                                              [helper.make_opsetid("", 18)]))
    return graphopt.load(helper.make_model(g, opset_imports=imports, ir_version=ir, functions=functions))


def test_opset_version_one_rule() -> None:
    m = _model({"": 13}, with_function=True)
    body = next(iter(m.functions.values())).graph
    assert opset_version(m, m.graph) == 13
    assert opset_version(m, body) == 18 and in_function(body) and not in_function(m.graph)  # the body's own import
    assert opset_version(m, m.graph, "com.microsoft") is None
    assert opset_version(m, m.graph, "com.microsoft", default=1) == 1
    alias = _model({"": 11})
    alias.opset_imports = {"ai.onnx": 11}  # the default domain under its long name
    assert opset_version(alias, alias.graph) == 11 and opset_version(alias, alias.graph, "ai.onnx") == 11
    assert opset_version(None, default=21) == 21


def test_constants_follow_the_ir_version() -> None:
    m = _model({"": 13}, input_initializer=True)  # IR 10: an initializer listed as input is overridable
    c = m.graph.initializers["c"]
    assert not is_constant(c) and const_array(c) is None
    with constant_semantics(m):
        assert not is_constant(c)
    old = _model({"": 13}, ir=3, input_initializer=True)
    c_old = old.graph.initializers["c"]
    assert not is_constant(c_old)  # outside a block: the strict reading
    with constant_semantics(old):  # IR < 4: every initializer is an input, and a constant
        assert is_constant(c_old)
        np.testing.assert_array_equal(const_array(c_old), np.ones(3, np.float32))
    plain = _model({"": 13})
    assert is_constant(plain.graph.initializers["c"])


def _mul_by_one(seen: list[tuple[Match, int | None]] | None = None) -> Rule:
    """Mul(x, 1) -> x; `seen` records each checked match with the opset it reported then."""
    x, one = P.any(), P.const(1.0)

    def check(m: Match) -> bool:
        if seen is not None:
            seen.append((m, m.opset()))
        return True

    return Rule("test-toolbox-mul-one", P.op("Mul", x, one, commutative=True), rewrite=lambda m, b: m[x], check=check)


def test_match_carries_model_options_and_opset() -> None:
    m = _model({"": 13})
    seen: list[tuple[Match, int | None]] = []
    res = apply_rules(m, [_mul_by_one(seen)], options={"contrib_ops": True})
    assert res.stats["test-toolbox-mul-one"] == 1 and len(seen) == 1
    ((mt, opset),) = seen
    assert mt.model is m and mt.options["contrib_ops"] is True and opset == 13
    seen.clear()
    bare = _model({"": 17})
    mul = next(n for n in bare.graph if n.op_type == "Mul")
    alone = _mul_by_one(seen).match(mul)  # outside a pass: no model known, a modern opset assumed
    assert alone is not None and alone.model is None and not alone.options and seen[0][1] is None
    assert alone.function is None


@dataclass(frozen=True)
class _DropOnes(RewritePass):
    name: ClassVar[str] = "test-toolbox-drop-ones"
    rules: ClassVar = (_mul_by_one(),)


def test_rewrite_pass_drops_the_initializers_its_rewrites_orphaned() -> None:
    m = _model({"": 13})
    res = _DropOnes().run(m, PassContext())
    assert res.stats == {"test-toolbox-mul-one": 1, "initializers-removed": 1} and "c" not in m.graph.initializers
    m.verify()
    assert not _DropOnes().run(m, PassContext()).changed  # a second run changes nothing
    # the bare driver keeps them unless asked (dce's business)
    kept = _model({"": 13})
    assert apply_rules(kept, [_mul_by_one()]).stats == {"test-toolbox-mul-one": 1} and "c" in kept.graph.initializers


def test_initializer_still_read_elsewhere_is_kept() -> None:
    m = _model({"": 13})
    relu = next(n for n in m.graph if n.op_type == "Relu")
    c = m.graph.initializers["c"]
    from graphopt.ir import Node, Value

    extra = Node("", "Add", [relu.outputs[0], c], outputs=[Value("z")])
    m.graph.insert_after(relu, extra)
    m.graph.outputs.append(extra.outputs[0])
    res = _DropOnes().run(m, PassContext())
    assert res.changed and "initializers-removed" not in res.stats and "c" in m.graph.initializers


def test_session_builder_outputs_and_kernel_probe() -> None:
    m = _model({"": 13})
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 3}
    sess = onnxruntime_session(m, extra_outputs=["m"], optimize=False)
    assert [o.name for o in sess.get_outputs()] == ["y", "m"]
    y, mid = sess.run(None, feeds)
    np.testing.assert_array_equal(mid, feeds["x"])
    np.testing.assert_array_equal(y, np.maximum(feeds["x"], 0))
    only = onnxruntime_session(onnx.load_from_string(graphopt.to_onnx(m).SerializeToString()), outputs=["r"])
    assert [o.name for o in only.get_outputs()] == ["r"]
    assert onnxruntime_has_kernel("Relu", 13, DataType.FLOAT)
    assert not onnxruntime_has_kernel("NoSuchOp", 13, DataType.FLOAT)
    # rank-1 probes fail for ops whose shape inference wants real ranks; shapes= gives them
    assert onnxruntime_has_kernel("Conv", 13, DataType.FLOAT, num_inputs=2, shapes=((1, 2, 4, 4), (3, 2, 3, 3)),
                                  attributes=(("kernel_shape", (3, 3)),), run=True)
    assert not onnxruntime_has_kernel("Conv", 13, DataType.FLOAT, num_inputs=2, shapes=((1, 2, 4, 4), (3, 5, 3, 3)), run=True)

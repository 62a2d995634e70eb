"""Property tests: random models survive every round trip the IR offers.

- print → parse is structurally equal (and printing again gives the same text);
- export → import is structurally equal, and a second export is byte-identical;
- clone() is equal to the original and independent of it;
- runnable models compute the same outputs in onnxruntime after export/import and print/parse.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

import graphopt  # noqa: E402
from graphopt.ir.compare import assert_equal, structural_diff  # noqa: E402
from graphopt.ir.core import Attr, AttrType  # noqa: E402
from graphopt.ir.parser import parse_model  # noqa: E402
from graphopt.ir.printer import print_model  # noqa: E402
from graphopt.testing import assert_same_outputs, models, rich_models  # noqa: E402

_FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _roundtrip_text(m: graphopt.Model) -> graphopt.Model:
    text = print_model(m)
    back = parse_model(text)
    d = structural_diff(m, back)
    assert d is None, f"{d}\n--- text ---\n{text}"
    assert print_model(back) == text
    return back


@_FAST
@given(rich_models())
def test_rich_models_survive_print_parse(m: graphopt.Model) -> None:
    m.verify()
    _roundtrip_text(m)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rich_models(allow_unnamed=True))
def test_unnamed_values_survive_print_parse(m: graphopt.Model) -> None:
    _roundtrip_text(m)


@_FAST
@given(rich_models())
def test_rich_models_survive_export_import(m: graphopt.Model) -> None:
    proto = graphopt.to_onnx(m)
    m1 = graphopt.load(proto)
    d = structural_diff(m, m1)
    assert d is None, f"{d}\n--- text ---\n{print_model(m)}"
    m2 = graphopt.load(graphopt.to_onnx(m1))
    assert_equal(m1, m2)
    a = graphopt.to_onnx(m1).SerializeToString(deterministic=True)
    b = graphopt.to_onnx(m2).SerializeToString(deterministic=True)
    assert a == b
    # and the imported model prints/parses like any other
    _roundtrip_text(m1)


@_FAST
@given(rich_models())
def test_clone_is_equal_and_independent(m: graphopt.Model) -> None:
    before = print_model(m)
    c = m.clone()
    assert_equal(m, c)
    c.verify()
    # mutate the clone everywhere: names, attributes, metadata, node list, subgraphs, functions
    for n in list(c.all_nodes()):
        n.name = n.name + "_x"
        n.metadata_props["mutated"] = "1"
        n.set_attr(Attr("mutated", AttrType.INT, 1))
        for v in n.outputs:
            v.name = v.name + "_x" if v.name else ""
    for g in c.graphs():
        g.doc_string = "changed"
        for v in g.inputs:
            v.doc_string = "changed"
    c.graph.outputs.clear()
    for f in c.functions.values():
        f.attributes["new"] = None
    c.metadata_props["mutated"] = "1"
    assert print_model(m) == before
    m.verify()
    assert structural_diff(m, c) is not None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_runnable_models_same_outputs_after_round_trips(m: graphopt.Model) -> None:
    m.verify()
    imported = graphopt.load(graphopt.to_onnx(m))
    assert_equal(m, imported)
    parsed = _roundtrip_text(m)
    outs = assert_same_outputs(m, imported)
    assert outs, "a model has at least one output"
    assert_same_outputs(m, parsed)

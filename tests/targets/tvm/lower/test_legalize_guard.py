"""A legalization that raises does not unwind through TVM's LegalizeOps (issue 19 item 7): TVM's
C++ BlockBuilder then printed "BlockBuilder destroyed with remaining blocks!" on stderr, a line
after graphopt's own error (or on a compile that went on by emitting the group inline)."""

from __future__ import annotations

import gc

import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, tirx  # noqa: E402

from graphopt.targets.tvm.lower.legalize import guarded_legalizations, legalize_and_fuse  # noqa: E402

NOISE = "remaining blocks"


def _affine_grid_of_symbolic_size() -> tvm.IRModule:
    """affine_grid's legalization raises ValueError for a symbolic target shape."""
    h = tirx.Var("h", "int64")
    bb = relax.BlockBuilder()
    theta = relax.Var("theta", relax.TensorType([2, 2, 3], "float32"))
    size = relax.Var("s", relax.ShapeType([2, 1, h, 4]))
    with bb.function("main", [theta, size]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.image.affine_grid(theta, relax.ShapeExpr([h, 4]))))
        bb.emit_func_output(y)
    return bb.get()


def test_tvm_alone_prints_the_noise(capfd: pytest.CaptureFixture[str]) -> None:
    """The control: LegalizeOps with the legalization raising inside it."""
    with pytest.raises(Exception, match="requires static target_shape"):
        relax.transform.LegalizeOps()(_affine_grid_of_symbolic_size())
    gc.collect()
    assert NOISE in capfd.readouterr().err


def test_legalize_and_fuse_raises_the_same_error_without_noise(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="affine_grid legalization requires static target_shape"):
        legalize_and_fuse(_affine_grid_of_symbolic_size(), tvm.target.Target({"kind": "llvm"}))
    gc.collect()
    assert NOISE not in capfd.readouterr().err


def test_guard_records_the_failure_and_keeps_the_call() -> None:
    failures: list = []
    legal = guarded_legalizations({}, failures)
    assert "relax.add" in legal and "relax.image.affine_grid" in legal
    mod = relax.transform.LegalizeOps(legal)(_affine_grid_of_symbolic_size())
    assert [name for name, _ in failures] == ["relax.image.affine_grid"]
    assert "affine_grid" in mod.script()  # the call stayed as it was


def test_legalizations_still_apply(capfd: pytest.CaptureFixture[str]) -> None:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([2, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.subtract(relax.op.nn.relu(x), x)))
        bb.emit_func_output(y)
    out = legalize_and_fuse(bb.get(), tvm.target.Target({"kind": "llvm"}))
    prims = [gv.name_hint for gv, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(prims) == 2 and "reinterpret" in out.script()  # graphopt's own subtract legalization

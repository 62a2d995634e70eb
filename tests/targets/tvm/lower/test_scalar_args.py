"""One-element constant arguments of the cpu target's kernels (targets/tvm/lower/scalar_args.py):
immediates when every call passes the same foldable-safe value, by-value scalars otherwise, never
a 0-d buffer parameter (issue 24 item 5: each buffer parameter costs the kernel's packed-API
wrapper a set of checks, and a quantized model has one per scale and zero point). Outputs stay
bit-identical to the buffer form."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import ir as I  # noqa: E402
from tvm.script import relax as R  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from graphopt.targets.tvm.lower.scalar_args import scalar_constants_to_immediates  # noqa: E402


@I.ir_module
class _Mod:
    @T.prim_func(private=True, s_tir=True)
    def affine(a: T.Buffer((64,), "float32"), s: T.Buffer((), "float32"), z: T.Buffer((1,), "float32"),
               o: T.Buffer((64,), "float32")):
        for i in range(64):
            with T.sblock("affine"):
                v = T.axis.remap("S", [i])
                T.reads(a[v], s[()], z[0])
                T.writes(o[v])
                o[v] = a[v] * s[()] + z[0]

    @T.prim_func(private=True, s_tir=True)
    def shift(a: T.Buffer((64,), "float32"), z: T.Buffer((), "float32"), n: T.Buffer((), "int32"),
              o: T.Buffer((64,), "float32")):
        for i in range(64):
            with T.sblock("shift"):
                v = T.axis.remap("S", [i])
                T.reads(a[v], z[()], n[()])
                T.writes(o[v])
                o[v] = (a[v] + z[()]) * T.Cast("float32", n[()])

    @T.prim_func(private=True, s_tir=True)
    def writes_it(a: T.Buffer((64,), "float32"), s: T.Buffer((), "float32"), o: T.Buffer((64,), "float32")):
        for i in range(64):
            with T.sblock("w"):
                v = T.axis.remap("S", [i])
                T.reads(a[v])
                T.writes(o[v], s[()])
                o[v] = a[v]
                s[()] = a[v]

    @R.function
    def main(x: R.Tensor((64,), "float32")):
        cls = _Mod
        with R.dataflow():
            # scale differs between the two calls (by value), bias is 3.0 in both (immediate)
            y1 = R.call_tir(cls.affine, (x, R.const(0.5, "float32"), R.const(np.array([3.0], "float32"))),
                            out_ty=R.Tensor((64,), "float32"))
            y2 = R.call_tir(cls.affine, (y1, R.const(0.25, "float32"), R.const(np.array([3.0], "float32"))),
                            out_ty=R.Tensor((64,), "float32"))
            # a zero float and an int: 0.0 by value (TVM folds x + 0 -> x), 7 an immediate
            y3 = R.call_tir(cls.shift, (y2, R.const(0.0, "float32"), R.const(7, "int32")), out_ty=R.Tensor((64,), "float32"))
            y4 = R.call_tir(cls.writes_it, (y3, R.const(1.5, "float32")), out_ty=R.Tensor((64,), "float32"))
            R.output(y4)
        return y4


def _one_element_buffers(func: tvm.tirx.PrimFunc) -> list[str]:
    out = []
    for p in func.params:
        shape = getattr(p, "shape", None)
        if shape is not None and all(isinstance(d, tvm.tirx.IntImm) and int(d) == 1 for d in shape):
            out.append(str(p.name))
    return out


def _run(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_scalar_constants_become_immediates_or_by_value_scalars() -> None:
    mod = scalar_constants_to_immediates(_Mod)
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    affine, shift = funcs["affine"], funcs["shift"]
    # affine: s differs between its calls -> a float32 scalar parameter; z (3.0 in both) -> gone
    assert [str(p.name) for p in affine.params] == ["a", "s", "o"]
    assert getattr(affine.params[1], "shape", None) is None and str(affine.params[1].ty.dtype) == "float32"
    assert "T.float32(3.0)" in affine.script()
    # shift: 0.0 stays a (by-value) parameter, 7 becomes an immediate
    assert [str(p.name) for p in shift.params] == ["a", "z", "o"] and "7" in shift.script()
    # a parameter the kernel writes is left a buffer
    assert _one_element_buffers(funcs["writes_it"]) == ["s"]
    assert not _one_element_buffers(affine) and not _one_element_buffers(shift)
    main = mod["main"].script()
    assert "T.float32(0.5)" in main and "T.float32(0.25)" in main  # the calls pass their own scale
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    x[:3] = [np.nan, np.inf, -0.0]
    before, after = _run(_Mod, x), _run(mod, x)
    assert np.array_equal(before.view(np.int32), after.view(np.int32))

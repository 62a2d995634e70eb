"""RNN / GRU / LSTM recurrences as one hand-written kernel: a loop over time inside the kernel.

    Y, Y_h[, Y_c] = recurrence(xw [T, B, D*G*H], R [D, H, G*H], bias [D, 2*G*H], h0, c0, P, lens)

`xw` is the input projection X · Wᵀ of every step and direction (one matmul outside, scheduled
like any other); the kernel runs, in parallel over (direction, batch item), the T steps serially:
the recurrent product h · Rᵀ (vectorised over the gate columns), the gates and the state update.
T and B may be symbolic, so one kernel serves every sequence length (unrolling, the static
alternative, needs T known and gives T times the kernels). The kernel is built with TVM's
IRBuilder (`te.extern`), marked scheduled (`tirx.is_scheduled`: the default schedules leave it as
written) and `graphopt.own_kernel` (the lowering keeps it out of fused groups).

Semantics follow ONNX (and onnxruntime): gate order i, o, f, c (LSTM) and z, r, h (GRU); clip
applies to the gate pre-activations; a batch item at or past its sequence length keeps its state
and outputs zeros; reverse directions walk t = T-1 .. 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

OWN_KERNEL_ATTR = "graphopt.own_kernel"

Act = Callable[[Any], Any]
#: an activation as ONNX names it: (name, alpha or None, beta or None)
ActSpec = tuple[str, "float | None", "float | None"]


def act_fn(name: str, alpha: float | None, beta: float | None, dtype: str) -> Act:
    """ONNX RNN activation `name` as a function of one TIR expression (defaults per the spec)."""
    n = name.lower()

    def c(v: float) -> Any:
        return tirx.const(v, dtype)

    if n == "sigmoid":
        return lambda x: tirx.sigmoid(x)
    if n == "tanh":
        return lambda x: tirx.tanh(x)
    if n == "relu":
        return lambda x: tirx.max(x, c(0.0))
    if n == "affine":
        return lambda x: x * c(1.0 if alpha is None else alpha) + c(beta or 0.0)
    if n == "leakyrelu":
        a = 0.01 if alpha is None else alpha
        return lambda x: tirx.Select(x >= c(0.0), x, x * c(a))
    if n == "thresholdedrelu":
        a = 1.0 if alpha is None else alpha
        return lambda x: tirx.Select(x > c(a), x, c(0.0))
    if n == "scaledtanh":
        a, b = (1.0 if alpha is None else alpha), (1.0 if beta is None else beta)
        return lambda x: c(a) * tirx.tanh(x * c(b))
    if n == "hardsigmoid":
        a, b = (0.2 if alpha is None else alpha), (0.5 if beta is None else beta)
        return lambda x: tirx.max(c(0.0), tirx.min(c(1.0), x * c(a) + c(b)))
    if n == "elu":
        a = 1.0 if alpha is None else alpha
        return lambda x: tirx.Select(x > c(0.0), x, c(a) * (tirx.exp(x) - c(1.0)))
    if n == "softsign":
        return lambda x: x / (c(1.0) + tirx.abs(x))
    if n == "softplus":
        return lambda x: tirx.log(c(1.0) + tirx.exp(x))
    raise ValueError(f"activation {name!r}")


def _lanes(n: int) -> int:
    for lanes in (16, 8, 4):
        if n % lanes == 0:
            return lanes
    return 1


def _for_vec(n: int, body: Callable[[Any], None]) -> None:
    """for j in range(n): body(j), the inner part vectorised where a vector width divides n."""
    lanes = _lanes(n)
    if lanes == 1:
        with T.serial(0, n) as j:
            body(j)
        return
    with T.serial(0, n // lanes) as jo:
        with T.vectorized(0, lanes) as ji:
            body(jo * lanes + ji)


def recurrence(op: str, xw: te.Tensor, r: te.Tensor, bias: te.Tensor, h0: te.Tensor | None, c0: te.Tensor | None,
               peep: te.Tensor | None, lens: te.Tensor | None, *, hidden: int, backwards: Sequence[bool],
               acts: Sequence[Sequence[ActSpec]], clip: float | None, input_forget: bool, linear_before_reset: bool
               ) -> list[te.Tensor]:
    """The TE extern computing Y [T, D, B, H], Y_h [D, B, H] (and Y_c for LSTM). `r` is Rᵀ per
    direction [D, H, G*H]; `acts[d]` the direction's activations (f, g[, h])."""
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    steps, batch = xw.shape[0], xw.shape[1]
    dirs, hs, gh = len(backwards), hidden, gates * hidden
    dtype = str(xw.dtype)
    ins = [xw, r, bias] + [e for e in (h0, c0, peep, lens) if e is not None]
    shapes = [(steps, dirs, batch, hs), (dirs, batch, hs)] + ([(dirs, batch, hs)] if op == "LSTM" else [])

    def clipped(x: Any) -> Any:
        return x if clip is None else tirx.max(tirx.const(-clip, dtype), tirx.min(tirx.const(clip, dtype), x))

    def gen(in_bufs: list[Any], out_bufs: list[Any]) -> Any:
        with IRBuilder() as ib:
            bx, br, bb = (T.buffer_proxy(b) for b in in_bufs[:3])
            rest = list(in_bufs[3:])
            bh0 = T.buffer_proxy(rest.pop(0)) if h0 is not None else None
            bc0 = T.buffer_proxy(rest.pop(0)) if c0 is not None else None
            bp = T.buffer_proxy(rest.pop(0)) if peep is not None else None
            bl = T.buffer_proxy(rest.pop(0)) if lens is not None else None
            y, yh = T.buffer_proxy(out_bufs[0]), T.buffer_proxy(out_bufs[1])
            yc = T.buffer_proxy(out_bufs[2]) if op == "LSTM" else None
            zero = tirx.const(0.0, dtype)
            one = tirx.const(1.0, dtype)
            with T.parallel(0, dirs * batch) as p:
                d = p // batch
                b = p % batch
                h = T.buffer_proxy(T.alloc_buffer((hs,), dtype, scope="local"))
                cell = T.buffer_proxy(T.alloc_buffer((hs,), dtype, scope="local"))
                gx = T.buffer_proxy(T.alloc_buffer((gh,), dtype, scope="local"))
                gr = T.buffer_proxy(T.alloc_buffer((gh,), dtype, scope="local"))
                rh = T.buffer_proxy(T.alloc_buffer((hs,), dtype, scope="local")) if op == "GRU" and not linear_before_reset else None

                def init(j: Any) -> None:
                    h[j] = bh0[d, b, j] if bh0 is not None else zero
                    cell[j] = bc0[d, b, j] if bc0 is not None else zero

                _for_vec(hs, init)
                with T.serial(0, steps) as s:
                    # the time index: reverse directions walk backwards (d is static per branch of the select)
                    rev = [i for i, bw in enumerate(backwards) if bw]
                    if not rev:
                        t = s
                    elif len(rev) == dirs:
                        t = steps - 1 - s
                    else:
                        t = tirx.Select(d == rev[0], steps - 1 - s, s)

                    def load(j: Any) -> None:
                        gx[j] = bx[t, b, d * gh + j] + bb[d, j]
                        gr[j] = bb[d, gh + j]

                    _for_vec(gh, load)

                    def matvec(lo: int, hi: int, src: Any) -> None:
                        with T.serial(0, hs) as k:
                            hk = src[k]

                            def mac(j: Any) -> None:
                                gr[lo + j] = gr[lo + j] + hk * br[d, k, lo + j]

                            _for_vec(hi - lo, mac)

                    live = (tirx.Cast("int64", t) < tirx.Cast("int64", bl[b])) if bl is not None else None
                    if op == "GRU" and not linear_before_reset:
                        matvec(0, 2 * hs, h)
                    else:
                        matvec(0, gh, h)
                    # the new state into gx's first H (RNN/GRU) or gx's i/c slots (LSTM), then committed
                    if op == "RNN":
                        def rnn(j: Any) -> None:
                            gx[j] = _select_act(acts, dtype, d, 0, clipped(gx[j] + gr[j]))
                        _for_vec(hs, rnn)
                    elif op == "GRU":
                        def zr(j: Any) -> None:
                            gx[j] = _select_act(acts, dtype, d, 0, clipped(gx[j] + gr[j]))  # z
                            gx[hs + j] = _select_act(acts, dtype, d, 0, clipped(gx[hs + j] + gr[hs + j]))  # r
                        _for_vec(hs, zr)
                        if not linear_before_reset:
                            def reset(j: Any) -> None:
                                assert rh is not None
                                rh[j] = gx[hs + j] * h[j]
                            _for_vec(hs, reset)
                            matvec(2 * hs, gh, rh)

                            def cand(j: Any) -> None:
                                gx[2 * hs + j] = _select_act(acts, dtype, d, 1, clipped(gx[2 * hs + j] + gr[2 * hs + j]))
                        else:
                            def cand(j: Any) -> None:
                                gx[2 * hs + j] = _select_act(acts, dtype, d, 1, clipped(gx[2 * hs + j] + gx[hs + j] * gr[2 * hs + j]))
                        _for_vec(hs, cand)

                        def upd(j: Any) -> None:
                            z = gx[j]
                            gx[j] = (one - z) * gx[2 * hs + j] + z * h[j]
                        _for_vec(hs, upd)
                    else:  # LSTM: i, o, f, c
                        def lstm(j: Any) -> None:
                            cp = cell[j]
                            pi = gx[j] + gr[j] + (bp[d, j] * cp if bp is not None else zero)
                            ig = _select_act(acts, dtype, d, 0, clipped(pi))
                            if input_forget:
                                fg = one - ig
                            else:
                                pf = gx[2 * hs + j] + gr[2 * hs + j] + (bp[d, 2 * hs + j] * cp if bp is not None else zero)
                                fg = _select_act(acts, dtype, d, 0, clipped(pf))
                            cc = _select_act(acts, dtype, d, 1, clipped(gx[3 * hs + j] + gr[3 * hs + j]))
                            gr[3 * hs + j] = fg * cp + ig * cc  # the new cell (gr's slot is read only above)

                        def lstm_h(j: Any) -> None:
                            cn = gr[3 * hs + j]
                            po = gx[hs + j] + gr[hs + j] + (bp[d, hs + j] * cn if bp is not None else zero)
                            og = _select_act(acts, dtype, d, 0, clipped(po))
                            gx[j] = og * _select_act(acts, dtype, d, 2, cn)
                            gx[3 * hs + j] = cn
                        _for_vec(hs, lstm)
                        _for_vec(hs, lstm_h)

                    def commit(j: Any) -> None:
                        if live is None:
                            h[j] = gx[j]
                            y[t, d, b, j] = gx[j]
                            if op == "LSTM":
                                cell[j] = gx[3 * hs + j]
                        else:
                            h[j] = tirx.Select(live, gx[j], h[j])
                            y[t, d, b, j] = tirx.Select(live, gx[j], zero)
                            if op == "LSTM":
                                cell[j] = tirx.Select(live, gx[3 * hs + j], cell[j])

                    _for_vec(hs, commit)

                def final(j: Any) -> None:
                    yh[d, b, j] = h[j]
                    if yc is not None:
                        yc[d, b, j] = cell[j]

                _for_vec(hs, final)
            return ib.get()

    outs = te.extern(shapes, ins, gen, name=f"{op.lower()}_recurrence", dtype=[dtype] * len(shapes))
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def _select_act(acts: Sequence[Sequence[ActSpec]], dtype: str, d: Any, k: int, x: Any) -> Any:
    """Activation k of direction d (a select over directions where they differ)."""
    specs = [a[k] for a in acts]
    out = act_fn(*specs[-1], dtype)(x)
    for i in range(len(specs) - 2, -1, -1):
        if specs[i] != specs[-1]:
            out = tirx.Select(d == i, act_fn(*specs[i], dtype)(x), out)
    return out

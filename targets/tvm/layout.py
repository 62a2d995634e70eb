"""Which kernel groups run on channel-blocked activations (NCHW[b]c), and their Relax form.

The lowering keeps graphopt's kernel groups; this module only decides, per group, whether its
convolutions, pooling and elementwise epilogues read and write blocked tensors
`[N, C/b, H, W, b]` (see `kernels.blocked`) instead of NCHW. Like onnxruntime's NchwcTransformer, a
layout change happens only at group boundaries: a blocked value read by a group that wants NCHW
(a Flatten, a Softmax, a graph output) is converted once by a kernel of its own, and so is an NCHW
value read by a blocked convolution; weights are packed by weight-only functions that the build
hoists out of the model (packed once at compile time).

A group is blocked when every node in it can run blocked and it has a reason to:

- `conv`: 2-D Conv, group 1, constant float weights, C and OC multiples of b;
- `pointwise-plain`: a 1x1 Conv (stride 1, no pads, group 1) with OC < b of a blocked input, C a
  multiple of b: it reads the blocks and writes NCHW (`kernels.blocked.pointwise_to_plain`: a
  detector's 1-channel logit map), and its elementwise epilogue in the group runs on that NCHW
  output in the same kernel; a blocked activation never changes layout for it;
- `stem`: the same with C not a multiple of b (its input stays NCHW, its output is blocked: the
  first conv of a CNN reads an RGB image);
- `depthwise`: group = C = OC, a multiple of b;
- `conv-int8`: ConvInteger of uint8 activations and constant int8 weights (zero point 0), group
  1, C and OC multiples of b, where the machine's int8 dot product takes blocks of b (AVX-512
  VNNI: 16): the int8 network between its first and last blocked conv then holds uint8/int32
  values blocked, its requantize epilogues write 16 contiguous channels, and no conv relayouts
  its input (`kernels.blocked.conv2d_int8_blocked`, `schedules.int8_x86.schedule_int8_conv_blocked`;
  ResNet-50 int8, 1 thread: 46.1 → 33.0 ms); AVX2 on blocks of 8 (vpmaddubsw on 7-bit weights,
  vpmaddwd on int16 for wider ones: `INT8_WEIGHT_S16`), AVX-512 VNNI also on 8 (ymm) where
  `choose_plan` halves the block (a quantized MobileNetV2's 24 channels);
- `depthwise-int8`: a depthwise ConvInteger (group = C = OC, a multiple of b) on the same
  machines: uint8 blocks in, int32 sums per channel (`depthwise_blocked` widening to int32, the
  float depthwise's window schedule), so a quantized MobileNet stays 8-bit through its depthwise
  convs instead of writing float for them;
- `pool`: MaxPool / AveragePool (2-D, one output) and `global-pool`: GlobalAveragePool /
  GlobalMaxPool, when their input is blocked already;
- `resize`: Resize of H and W (nearest or linear, constant scales, no roi: `resize_blocked_ok`)
  when its input is blocked already: a detector's x2 upsampling reads and writes whole channel
  vectors instead of going to NCHW and back around it;
- `concat`: Concat along the channels when every input's channel count is a multiple of b and
  one input is blocked already (a concat of channel blocks);
- `elementwise`: unary elementwise ops (Cast included: int8 groups requantize), and binary ones whose operands are blocked activations of
  the same rank, scalar constants or per-channel constants ([C, 1, 1] / [1, C, 1, 1], read as
  `[1, C/b, 1, 1, b]`) — when at least one activation input is blocked already or the group holds
  a convolution;
- `batchnorm`: inference BatchNormalization with constant statistics, as `x * s + t` with `s` and
  `t` folded at compile time (DenseNet-121, 2 threads: 1.52x -> 1.15x onnxruntime's time, its
  pre-activation BNs after each Concat having kept those groups NCHW).

A blocked 3x3 stride-1 conv may run in Winograd form (`winograd_m`, `kernels.winograd`): its weight
is then packed as `WINOGRAD_WEIGHT`.

Must not block: 1-D/3-D convs, grouped convs other than depthwise, weights computed at run time,
channel counts that are not multiples of b (except the stem's input), values of unknown rank or
channel count, anything else a group does with the channel axis (Softmax, Reshape, Flatten, a
BatchNormalization with statistics computed at run time, constants that vary along other axes,
Concat of partial blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm import relax

from graphopt.ir import Model, Node, Value
from graphopt.passes.pruning.flops import layer_flops

from ..machine import MachineModel
from ..machine import U8S8_WEIGHT_BOUND
from .kernels import blocked as BO
from .kernels import winograd as WO
from .schedules.tiles import exact_tiles, odd_tile

#: channels per block: the machine model's fp32 lanes (`CpuTarget.activation_block`): 8 on AVX2,
#: 16 on AVX-512, as onnxruntime's MLAS NCHWc blocks

PLAIN = "plain"
BLOCKED = "blocked"
CONV_WEIGHT = "conv-weight"
STEM_WEIGHT = "stem-weight"
DW_WEIGHT = "depthwise-weight"
BIAS = "blocked-bias"  # [OC] → [OC/b, b]
CHANNEL = "channel-const"  # a per-channel constant [C, 1, 1] / [1, C, 1, 1] → [1, C/b, 1, 1, b]
WINOGRAD_WEIGHT = "winograd-weight-"  # + m: [OC, C, 3, 3] → kernels.winograd.pack_winograd_weight
INT8_WEIGHT = "int8-conv-weight"  # int8 [OC, C, KH, KW] → kernels.blocked.pack_int8_conv_weight
INT8_STEM_WEIGHT = "int8-stem-weight"  # int8 [OC, C, KH, KW] → kernels.blocked.pack_int8_stem_weight
#: int8 dot products whose ConvInteger kernels run blocked (`conv-int8`): the x86 int8 kernels
#: tensorize the blocked form with vpdpbusd on 16 int32 lanes, and on AVX2 with vpmaddubsw +
#: vpmaddwd (7-bit weights, 4 bytes a lane) or vpmaddwd on int16 (full 8-bit weights, 2 bytes a
#: lane: `INT8_WEIGHT_S16`) on 8 lanes
INT8_BLOCKED_DOTS = {"avx512-vnni": 16, "avx2": 8}
#: suffix of an int8 weight packed with 2 input channels a lane (AVX2, |w| > U8S8_WEIGHT_BOUND)
INT8_WEIGHT_S16 = ":s16"
#: ... and the half block `choose_plan` may take instead (AVX-512 VNNI: vpdpbusd on ymm, AVX512-VL)
INT8_HALF_BLOCK_DOTS = {"avx512-vnni": 8}

#: `winograd_m`'s modes (the cpu target's `winograd=` values)
WINOGRAD_MODES = ("auto", "off", "2", "4")
#: the m of F(m x m, 3 x 3) that `winograd_m`'s mode "auto" picks (0: none; a knob to compare,
#: tools/bench_tvm_cpu.py --schedule-knobs tvm.layout.WINOGRAD_AUTO_M=0)
WINOGRAD_AUTO_M = 2
#: ... with at least this many input and output channels (a guess, not measured: with few channels
#: the transforms' memory traffic outweighs the multiply-adds saved)
WINOGRAD_MIN_CHANNELS = 32
#: F(4x4) only on output maps at least this wide and high; smaller maps take F(2x2)
WINOGRAD_F4_MIN_MAP = 28

_UNARY = frozenset(
    """Relu Clip Sigmoid Tanh LeakyRelu HardSigmoid HardSwish Elu Selu Celu Softplus Softsign Abs Neg
    Exp Log Sqrt Reciprocal Erf Identity Mish Gelu ThresholdedRelu Floor Ceil Round Sin Cos Cast""".split()
)
_BINARY = frozenset("Add Sub Mul Div Max Min Pow Sum Mean".split())  # (Sum/Mean/Max/Min: any arity)
_STANDARD = ("", "ai.onnx")


@dataclass
class LayoutPlan:
    """Roles of the nodes that run blocked (by id), and the block size."""

    block: int
    machine: MachineModel  # its conv tiles decide a flat conv's pixel multiple
    roles: dict[int, str] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # blocked kernel groups, in order
    winograd: dict[int, int] = field(default_factory=dict)  # conv (by id) → m of F(m x m, 3 x 3)
    # convs Winograd would take but for their symbolic maps, kept direct (none since symbolic maps
    # take F(2x2) too; the lowering, manifest and warning still read it)
    winograd_symbolic: list[str] = field(default_factory=list)

    def role(self, node: Node) -> str | None:
        return self.roles.get(id(node))

    def native(self, v: Value) -> str:
        """The layout `v`'s producer writes it in."""
        p = v.producer()
        return BLOCKED if p is not None and id(p) in self.roles and self.roles[id(p)] != "pointwise-plain" else PLAIN

    def wants(self, node: Node, i: int) -> str:
        """The form node `node` reads its input `i` in."""
        role = self.roles.get(id(node))
        if role is None:
            return PLAIN
        if role == "pointwise-plain":
            return BLOCKED if i == 0 else PLAIN  # (its weight and bias: read as they are)
        if role in ("batchnorm", "resize") and i > 0:
            return PLAIN  # (read as constants when the node is converted)
        if role in ("conv-int8", "stem-int8", "depthwise-int8"):  # (zero points: read as constants)
            weight = {"conv-int8": INT8_WEIGHT, "stem-int8": INT8_STEM_WEIGHT, "depthwise-int8": DW_WEIGHT}[role]
            if i == 1 and role != "depthwise-int8" and not _u8s8_exact(self.machine, node.inputs[1]):
                weight += INT8_WEIGHT_S16
            return {0: PLAIN if role == "stem-int8" else BLOCKED, 1: weight}.get(i, PLAIN)
        if role in ("conv", "stem", "depthwise"):
            if i == 0:
                return PLAIN if role == "stem" else BLOCKED
            if i == 1:
                if id(node) in self.winograd:
                    return f"{WINOGRAD_WEIGHT}{self.winograd[id(node)]}"
                return {"conv": CONV_WEIGHT, "stem": STEM_WEIGHT, "depthwise": DW_WEIGHT}[role]
            return BIAS
        v = node.inputs[i]
        if v is not None and _is_scalar_const(v):
            return PLAIN
        if v is not None and _channel_const(v) is not None:
            return CHANNEL
        return BLOCKED


def _u8s8_exact(machine: MachineModel, w: Value) -> bool:
    """Whether u8 x s8 pairs summed in int16 (AVX2's vpmaddubsw) are exact for weight `w`: always
    where the machine's int8 dot has no int16 step (VNNI), else for |w| ≤ U8S8_WEIGHT_BOUND (the
    quantize pass's 7-bit weights on AVX2); wider weights are packed for the int16 kernel."""
    if machine.int8_exact_u8s8:
        return True
    c = _const(w)
    return c is not None and c.size > 0 and int(np.abs(c.astype(np.int64)).max()) <= U8S8_WEIGHT_BOUND


def _const(v: Value) -> np.ndarray | None:
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and p.domain in _STANDARD:
        a = p.attributes.get("value")
        if a is not None:
            return np.asarray(a.value.numpy())
    return None


def _is_scalar_const(v: Value) -> bool:
    c = _const(v)
    return c is not None and c.size == 1


def _channel_const(v: Value) -> int | None:
    """C when `v` is a float32 constant of shape [C, 1, 1] or [1, C, 1, 1] (a folded BatchNorm's
    scale or shift broadcast over an NCHW activation), else None."""
    c = _const(v)
    if c is None or c.dtype != np.float32 or c.ndim not in (3, 4) or c.size < 2:
        return None
    shape = c.shape if c.ndim == 3 else c.shape[1:]
    if c.ndim == 4 and c.shape[0] != 1:
        return None
    return int(shape[0]) if shape[1:] == (1, 1) else None


#: activation types a blocked group may hold: float, and an int8 group's 8-bit values and int32 sums
_FLOAT = (np.float32,)
_ANY = (np.float32, np.uint8, np.int8, np.int32)


def _dims4(v: Value | None, dtypes: tuple[type, ...] = _FLOAT) -> list[Any] | None:
    if v is None or v.shape is None or len(v.shape.dims) != 4 or v.dtype is None:
        return None
    if v.dtype.numpy() not in dtypes or not isinstance(v.shape.dims[1], int):
        return None
    return list(v.shape.dims)


def _auto_pad(n: Node) -> str:
    ap = n.attr("auto_pad", "NOTSET")
    return ap.decode() if isinstance(ap, bytes) else ap


def _auto_pad_ok(n: Node) -> bool:
    return _auto_pad(n) in ("NOTSET", "VALID")


def pads_of(n: Node) -> tuple[int, int, int, int]:
    if _auto_pad(n) == "VALID":
        return (0, 0, 0, 0)
    p = list(n.attr("pads", [0, 0, 0, 0]))
    return (int(p[0]), int(p[1]), int(p[2]), int(p[3]))


def _conv_role(n: Node, b: int, x_blocked: bool) -> str | None:
    if len(n.inputs) < 2 or n.inputs[1] is None or not _auto_pad_ok(n):
        return None
    x, w = _dims4(n.inputs[0]), n.inputs[1]
    y = _dims4(n.outputs[0])
    wc = _const(w)
    if x is None or y is None or wc is None or wc.ndim != 4 or wc.dtype != np.float32:
        return None
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        bias = n.inputs[2]
        if bias.shape is None or len(bias.shape.dims) != 1:
            return None
    oc, cg = int(wc.shape[0]), int(wc.shape[1])
    c = int(x[1])
    g = int(n.attr("group", 1))
    if oc % b:
        pointwise = (wc.shape[2:] == (1, 1) and [int(s) for s in n.attr("strides", [1, 1])] == [1, 1]
                     and pads_of(n) == (0, 0, 0, 0))
        return "pointwise-plain" if pointwise and oc < b and g == 1 and cg == c and c % b == 0 and x_blocked else None
    if g == 1 and cg == c:
        if c % b == 0:
            return "conv"
        return None if x_blocked else "stem"
    if g == c == oc and cg == 1 and c % b == 0:
        return "depthwise"
    return None


def _conv_int8_role(n: Node, b: int, x_blocked: bool = False) -> str | None:
    """`conv-int8` for a 2-D ConvInteger of uint8 activations (constant scalar zero point) and
    constant int8 weights (zero point 0), group 1, explicit pads, C and OC multiples of `b`;
    `stem-int8` for the same with C not a multiple of `b`, an NCHW input, no dilation (the first
    conv of a quantized CNN: its output is blocked); `depthwise-int8` for group = C = OC, a
    multiple of `b`."""
    ins = list(n.inputs) + [None] * 4
    x, y = _dims4(ins[0], (np.uint8,)), _dims4(n.outputs[0], (np.int32,))
    wc = _const(ins[1]) if ins[1] is not None else None
    if x is None or y is None or wc is None or wc.ndim != 4 or wc.dtype != np.int8 or _auto_pad(n) != "NOTSET":
        return None
    zx = _const(ins[2]) if ins[2] is not None else np.zeros((), np.uint8)
    zw = _const(ins[3]) if ins[3] is not None else np.zeros((), np.int8)
    if zx is None or zx.size != 1 or zw is None or np.any(zw != 0):
        return None
    g = int(n.attr("group", 1))
    if g != 1:
        c = int(x[1])
        return "depthwise-int8" if g == c == int(wc.shape[0]) and int(wc.shape[1]) == 1 and c % b == 0 else None
    if int(wc.shape[0]) % b or int(wc.shape[1]) != int(x[1]):
        return None
    if int(x[1]) % b:
        if x_blocked or any(int(d) != 1 for d in n.attr("dilations", [1, 1])):
            return None
        return "stem-int8"
    return "conv-int8"


def _stem_prologue(nodes: list[Node], b: int) -> set[int]:
    """Ids of the group's nodes that only feed an int8 stem's input (a ConvInteger whose C is not a
    multiple of `b`): the quantize of the model's float image, which stays NCHW in front of it."""
    stems = {id(n) for n in nodes if n.op_type == "ConvInteger" and n.inputs and n.inputs[0] is not None
             and n.inputs[0].shape is not None and len(n.inputs[0].shape.dims) == 4
             and isinstance(n.inputs[0].shape.dims[1], int) and n.inputs[0].shape.dims[1] % b}
    out: set[int] = set()
    for n in reversed(nodes):
        if n.op_type not in _UNARY and n.op_type not in _BINARY:
            continue
        uses = [u for v in n.outputs for u in v.uses()]
        if uses and all(id(u) in out or (id(u) in stems and i == 0) for u, i in uses) \
                and not any(v.is_graph_output() for v in n.outputs):
            out.add(id(n))
    return out


def _resize_ok(n: Node) -> bool:
    """Whether Resize `n` can run on channel blocks (`resize.resize_blocked_ok`: nearest or linear
    over H and W only, constant scales, no roi)."""
    from .lower.converters.resize import resize_blocked_ok

    ins = _resize_inputs(n)
    consts = [(_const(v) if v is not None else None) for v in ins]
    if any(c is None and v is not None for c, v in zip(consts, ins)):
        return False  # (run-time roi, scales or sizes)
    roi, scales, sizes = consts
    return resize_blocked_ok(n, len(n.inputs[0].shape.dims) if n.inputs[0] is not None and n.inputs[0].shape is not None else 0,
                             roi, scales, sizes)


def _resize_inputs(n: Node) -> list[Value | None]:
    """Resize's roi, scales and sizes inputs, None where absent (or given as "")."""
    ins = (list(n.inputs[1:4]) + [None] * 3)[:3]
    return [None if v is None or (not v.name and v.producer() is None and not v.is_graph_input()) else v for v in ins]


def _pool_ok(n: Node) -> bool:
    if len(n.outputs) != 1 or not _auto_pad_ok(n) or _dims4(n.outputs[0]) is None:
        return False
    if int(n.attr("storage_order", 0)) != 0:
        return False
    k = n.attr("kernel_shape", None)
    return k is not None and len(k) == 2


def plan_layout(model: Model, groups: list[tuple[str, list[Node]]], block: int, machine: MachineModel,
                winograd: str | None = None) -> LayoutPlan:
    """Decide which of `groups` (kernel groups of the main graph, in topological order) run
    blocked in channel blocks of `block` on `machine` (see module docstring), and which of their
    3x3 convs run in Winograd form (`winograd`: "auto", "off", "2" or "4", see `winograd_m`;
    None: "auto")."""
    mode = "auto" if winograd is None else str(winograd)
    if mode not in WINOGRAD_MODES:
        raise ValueError(f"winograd={mode!r} is not one of {', '.join(WINOGRAD_MODES)}")
    plan = LayoutPlan(block=block, machine=machine)
    blocked: set[int] = set()  # ids of values held blocked
    int8 = block in (INT8_BLOCKED_DOTS.get(machine.int8_dot or ""), INT8_HALF_BLOCK_DOTS.get(machine.int8_dot or ""))
    for k, nodes in groups:
        roles = _group_roles(nodes, blocked, block, int8)
        if roles is None:
            continue
        plan.roles.update(roles)
        plan.groups.append(k)
        for n in nodes:
            m = winograd_m(n, block, mode) if roles.get(id(n)) == "conv" else 0
            if not m and roles.get(id(n)) == "conv" and _symbolic_maps(n) and winograd_m(n, block, mode, static=False):
                # symbolic maps: F(2x2) (their size unknown, F(4x4)'s ragged tiles and 2.25x weights
                # lose on small maps), its tile count an expression (kernels.winograd)
                m = 2
            if m:
                plan.winograd[id(n)] = m
        plain: set[int] = set()  # (a pointwise-plain conv's NCHW output and its epilogue's)
        for n in nodes:
            if roles.get(id(n)) == "pointwise-plain" or (id(n) not in roles and any(
                    v is not None and id(v) in plain for v in n.inputs)):
                plain.update(id(v) for v in n.outputs)
                continue
            for v in n.outputs:
                blocked.add(id(v))
    return plan


#: a machine's full block is kept while it runs at least this share of the conv FLOPs that half
#: the block would run blocked
FULL_BLOCK_SHARE = 0.95


def choose_plan(model: Model, groups: list[tuple[str, list[Node]]], lanes: int, machine: MachineModel,
                winograd: str | None = None) -> LayoutPlan:
    """`plan_layout` with the channel block of the model's blocked groups: `lanes` (one fp32
    vector: 16 on AVX-512), or half of it where channel counts that are multiples of 8 but not of
    16 would leave more than 5 % of the blocked conv FLOPs in NCHW (MobileNetV2's 24 and
    EfficientNet-B0's 40 channels: the NCHW kernels and the layout changes around them cost more
    than 8-lane vectors do; the blocked kernels then use ymm registers, all 32 of them)."""
    full = plan_layout(model, groups, lanes, machine, winograd)
    if lanes < 16 or lanes % 2:
        return full
    half = plan_layout(model, groups, lanes // 2, machine, winograd)

    def blocked_flops(plan: LayoutPlan) -> float:
        return float(sum(layer_flops(n) or 0 for _, nodes in groups for n in nodes
                         if n.op_type == "Conv" and plan.role(n) in ("conv", "stem", "depthwise"))
                     + sum(_int8_conv_flops(n) for _, nodes in groups for n in nodes
                           if plan.role(n) in ("conv-int8", "stem-int8", "depthwise-int8")))

    return full if blocked_flops(full) >= FULL_BLOCK_SHARE * blocked_flops(half) else half


def _int8_conv_flops(n: Node) -> float:
    """2 · output elements · weights per output channel of a ConvInteger (`layer_flops` counts
    float layers only): a quantized MobileNetV2's 24-channel convs weigh in `choose_plan` too."""
    y, w = _dims4(n.outputs[0], (np.int32,)), _const(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] is not None else None
    if y is None or w is None or not all(isinstance(d, int) for d in y[1:]):
        return 0.0
    return 2.0 * float(np.prod(y[1:])) * float(np.prod(w.shape[1:]))


def _group_roles(nodes: list[Node], blocked: set[int], b: int, int8: bool = False) -> dict[int, str] | None:
    if not nodes or any(n.domain not in _STANDARD or n.subgraphs() for n in nodes):
        return None
    inside = {id(v) for n in nodes for v in n.outputs}
    roles: dict[int, str] = {}
    reason = False  # a conv in the group, or a blocked input
    prologue = _stem_prologue(nodes, b) if int8 else set()
    inside -= {id(v) for n in nodes if id(n) in prologue for v in n.outputs}
    plain: set[int] = set()  # values a `pointwise-plain` conv of the group wrote (NCHW), and ops on them
    for n in nodes:
        if id(n) in prologue:
            continue  # (stays NCHW: the quantize of an int8 stem's 3-channel input)
        op = n.op_type
        x = n.inputs[0] if n.inputs else None
        x_blocked = x is not None and (id(x) in blocked or id(x) in inside)
        if any(v is not None and id(v) in plain for v in n.inputs):
            # after a pointwise-plain conv: its elementwise epilogue (Sigmoid) runs on the NCHW
            # output, in the same kernel; anything else there keeps the whole group NCHW
            acts = [v for v in n.inputs if v is not None and not _is_scalar_const(v)]
            if op not in _UNARY and op not in _BINARY or len(n.outputs) != 1 or any(id(v) not in plain for v in acts):
                return None
            plain.add(id(n.outputs[0]))
            continue
        if op == "Conv":
            role = _conv_role(n, b, x_blocked)
            if role is None:
                return None
            reason = True
        elif op == "ConvInteger":
            role = _conv_int8_role(n, b, x_blocked) if int8 else None
            if role is None:
                return None
            reason = True
        elif op in ("MaxPool", "AveragePool"):
            if not x_blocked or not _pool_ok(n):
                return None
            role = "pool"
            reason = True
        elif op == "Resize":
            # a spatial resize (x2 upsampling) of a blocked map: the block axis is untouched
            out = _dims4(n.outputs[0])
            if not x_blocked or out is None or not _resize_ok(n):
                return None
            role = "resize"
            reason = True
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            if not x_blocked or _dims4(n.outputs[0]) is None:
                return None
            role = "global-pool"
            reason = True
        elif op == "Concat":
            # along the channels, of activations whose channel counts are whole blocks: a concat
            # of the channel blocks (axis 1 of [N, C/b, H, W, b])
            dims = [_dims4(v) for v in n.inputs]
            out = _dims4(n.outputs[0])
            if out is None or int(n.attr("axis", 0)) not in (1, -3) or not dims:
                return None
            if not all(isinstance(d, int) for d in out[2:]) and any(u.op_type == "Shape" for u, _ in n.outputs[0].uses()):
                return None  # (a Shape of it would no longer be evaluated while lowering)
            if any(d is None or d[1] % b or _const(v) is not None for d, v in zip(dims, n.inputs)):
                return None
            if not any(id(v) in blocked or id(v) in inside for v in n.inputs):
                return None
            role = "concat"
            reason = True
        elif op == "BatchNormalization":
            # inference BatchNormalization with constant statistics (DenseNet's pre-activation
            # BN after each Concat): a per-channel scale and shift of the blocked activation
            out = _dims4(n.outputs[0])
            if (out is None or x is None or _dims4(x) is None or len(n.outputs) != 1 or len(n.inputs) != 5
                    or int(n.attr("training_mode", 0)) != 0):
                return None
            params = [_const(v) if v is not None else None for v in n.inputs[1:]]
            if any(c is None or c.shape != (out[1],) for c in params):
                return None
            reason = reason or x_blocked
            role = "batchnorm"
        elif op in _UNARY or op in _BINARY:
            if len(n.outputs) != 1:
                return None
            out = _dims4(n.outputs[0], _ANY)
            if out is None or out[1] % b:
                return None
            if op in _UNARY:  # Clip's min/max: scalar constants
                if x is None or any(v is not None and not _is_scalar_const(v) for v in n.inputs[1:]):
                    return None
                acts = [x]
            else:  # (per-channel constants are read as [1, C/b, 1, 1, b])
                acts = [v for v in n.inputs if v is not None and not _is_scalar_const(v)
                        and not (id(v) not in inside and _channel_const(v) == out[1])]
            for v in acts:
                d = _dims4(v, _ANY)
                if d is None or d[1] != out[1] or (id(v) not in inside and _const(v) is not None):
                    return None  # other constants, broadcasts over the channel axis
            if any(id(v) in blocked or id(v) in inside for v in acts):
                reason = True
            role = "elementwise"
        else:
            return None
        if role == "pointwise-plain":
            roles[id(n)] = role
            plain.add(id(n.outputs[0]))
            continue
        y = _dims4(n.outputs[0], _ANY)
        if y is None or y[1] % b:
            return None
        roles[id(n)] = role
        inside.add(id(n.outputs[0]))
    return roles if reason else None




#: convs with at most this many output rows, or input rows (`FLAT_MAX_IH`), run on their flattened
#: pixels whatever their kernel; the others keep their rows (BlockedConv computes their padded input
#: row by row). Single thread, ResNet-50's 3x3 convs vs onnxruntime, rows -> flat: 128 on 28x28
#: 1.066x -> 1.001x, 256 on 14x14 1.062x -> 1.041x, 256 stride 2 from 28x28 1.066x -> 1.013x; but
#: 64 on 56x56 0.994x -> 1.032x, 128 stride 2 from 56x56 1.049x -> 1.079x (a whole padded 56-row
#: input no longer stays in L2 across the tiles, a row's does)
FLAT_MAX_OH = 13
FLAT_MAX_IH = 28


def flat_multiple(n: Node, block: int, machine: MachineModel) -> int:
    """The pixel multiple of blocked conv `n` computed on its flattened output pixels
    (`kernels.blocked.conv2d_blocked_flat`), or 0 (its rows as they are): unpadded 1x1 convs and
    convs with at most FLAT_MAX_OH output rows or FLAT_MAX_IH input rows, static shapes; the
    multiple is the pixels of the tile the output blocks take on `machine` (`schedules.tiles.exact_tiles`,
    else `schedules.tiles.odd_tile`).
    Single thread, same run, ResNet-50's shapes: 1x1 on 7x7 maps 1.19-1.23x onnxruntime's time ->
    1.01-1.02x, on 14x14 1.06-1.09x -> 0.98-1.02x, on 56x56 1.00-1.06x -> 0.97x; 3x3 512 -> 512 on
    7x7 1.19x -> 0.94x (with the weight chunks of `schedules.tiles.conv_tile`)."""
    x, y, w = _dims4(n.inputs[0]), _dims4(n.outputs[0]), _dims4(n.inputs[1])
    if x is None or y is None or w is None or int(n.attr("group", 1)) != 1:
        return 0
    if not all(isinstance(d, int) for d in list(x[2:]) + list(y[2:]) + list(w[2:])):
        return 0
    dilations = [int(d) for d in n.attr("dilations", [1, 1])]
    return flat_px_multiple((int(w[2]), int(w[3])), pads_of(n), dilations, int(y[1]), int(y[2]), block, int(x[2]),
                            machine)


def flat_px_multiple(kernel: tuple[int, int], pads: Any, dilations: Any, out_channels: int, out_rows: int,
                     block: int, in_rows: int, machine: MachineModel) -> int:
    """`flat_multiple` from the shapes of a group-1 conv with static maps."""
    pointwise = tuple(kernel) == (1, 1) and not any(pads) and all(d == 1 for d in dilations)
    if not pointwise and out_rows > FLAT_MAX_OH and in_rows > FLAT_MAX_IH:
        return 0
    ob = out_channels // block
    return next((rt for rt, obt in exact_tiles(machine) if ob % obt == 0), odd_tile(machine, ob)[0])


def _symbolic_maps(n: Node) -> bool:
    x, y = _dims4(n.inputs[0]), _dims4(n.outputs[0])
    return x is not None and y is not None and not all(isinstance(d, int) for d in list(x[2:]) + list(y[2:]))


def winograd_m(n: Node, block: int, mode: str = "auto", static: bool = True) -> int:
    """The m of F(m x m, 3 x 3) blocked conv `n` runs in (`kernels.winograd`), or 0 (direct): 3x3
    kernels, stride 1, no dilation, pads of at most 1, static maps (the batch may be symbolic;
    `static=False`: maps of any size, where `plan_layout` gives convs on symbolic maps F(2x2)),
    at least WINOGRAD_MIN_CHANNELS channels in and out.

    `mode` "auto": F(2x2). Its fp32 error (1-2e-6 of the output's range per conv) is the direct
    conv's. 2 threads, same run, against the direct blocked conv: 3x3 64 on 56x56 0.67x, 128 on
    28x28 0.51x, 256 on 14x14 0.48x, 512 on 7x7 0.73x; ResNet-50 0.991x -> 0.858x onnxruntime's
    time. "4": F(4x4) on output maps of at least WINOGRAD_F4_MIN_MAP rows and columns, F(2x2) on
    smaller ones. F(4x4) kernels run 0.40x (56x56) and 0.32x (28x28) the direct conv's time, but
    their error is about 5x larger (0.5-3e-5); on 14x14 and 7x7 maps F(4x4) gains little or
    loses (0.44x, 0.76x), its ragged tiles waste work and its weights are 2.25x F(2x2)'s, streamed
    from memory in a whole model. ResNet-50, same runs: 0.851x vs 0.883x ("auto"), and F(4x4)
    on every map 0.841x vs 0.859x. "2": F(2x2). "off": none."""
    if mode == "off":
        return 0
    x, y, w = _dims4(n.inputs[0]), _dims4(n.outputs[0]), _dims4(n.inputs[1])
    if x is None or y is None or w is None or int(n.attr("group", 1)) != 1:
        return 0
    if not all(isinstance(d, int) for d in [x[1], y[1]] + list(w)) or static and not all(
            isinstance(d, int) for d in list(x[2:]) + list(y[2:])):
        return 0  # (a symbolic batch is fine; symbolic maps are not: `kernels.winograd` tiles static maps)
    if not static:
        y = [y[0], y[1], 10**6, 10**6]  # (the m it would take on a large map)
    if list(w[2:]) != [3, 3] or any(int(s) != 1 for s in n.attr("strides", [1, 1])):
        return 0
    if any(int(d) != 1 for d in n.attr("dilations", [1, 1])) or any(p > 1 for p in pads_of(n)):
        return 0
    if min(int(x[1]), int(y[1])) < WINOGRAD_MIN_CHANNELS or int(x[1]) % block or int(y[1]) % block:
        return 0
    m = WINOGRAD_AUTO_M if mode == "auto" else int(mode)
    return 2 if m == 4 and min(int(y[2]), int(y[3])) < WINOGRAD_F4_MIN_MAP else m


# --- Relax ----------------------------------------------------------------------------------------


def convert_form(bb: relax.BlockBuilder, e: relax.Expr, v: Value, have: str, want: str, block: int) -> relax.Expr:
    """`e` (the value `v` in form `have`) in form `want`."""
    if have == want:
        return e
    if have == BLOCKED and want == PLAIN:
        return bb.emit_te(BO.from_blocked, e, int(v.shape.dims[1]), primfunc_name_hint="from_blocked")
    if have != PLAIN:
        raise ValueError(f"cannot convert {v.name!r} from {have} to {want}")
    if want == BIAS:  # a weight-only reshape, hoisted with the packing (no index arithmetic in the kernel)
        return bb.emit_te(BO.block_bias, e, block, primfunc_name_hint="block_bias")
    if want == CHANNEL:
        return bb.emit_te(BO.block_channel_const, e, block, primfunc_name_hint="block_channel_const")
    if want in (INT8_WEIGHT, INT8_WEIGHT + INT8_WEIGHT_S16):
        return bb.emit_te(BO.pack_int8_conv_weight, e, block, 2 if want.endswith(INT8_WEIGHT_S16) else 4,
                          primfunc_name_hint="pack_int8_conv_weight")
    if want in (INT8_STEM_WEIGHT, INT8_STEM_WEIGHT + INT8_WEIGHT_S16):
        return bb.emit_te(BO.pack_int8_stem_weight, e, block, 2 if want.endswith(INT8_WEIGHT_S16) else 4,
                          primfunc_name_hint="pack_int8_stem_weight")
    if want.startswith(WINOGRAD_WEIGHT):
        m = int(want[len(WINOGRAD_WEIGHT):])
        return bb.emit_te(WO.pack_winograd_weight, e, block, m, primfunc_name_hint="pack_winograd_weight")
    fn = {BLOCKED: BO.to_blocked, CONV_WEIGHT: BO.pack_conv_weight, STEM_WEIGHT: BO.pack_stem_weight,
          DW_WEIGHT: BO.pack_depthwise_weight}[want]
    return bb.emit_te(fn, e, block, primfunc_name_hint=fn.__name__)


def convert_blocked(bb: relax.BlockBuilder, n: Node, role: str, ins: list[Any], plan: LayoutPlan, generic: Any,
                    winograd: int = 0) -> Any:
    """The Relax form of blocked node `n` (inputs already in the forms `LayoutPlan.wants` names);
    `generic(bb, node, ins)` converts an elementwise node (shape-agnostic); `winograd`: the m of
    a conv planned in Winograd form (`LayoutPlan.winograd`)."""
    block = plan.block
    if role == "elementwise":
        return generic(bb, n, ins)
    x = ins[0]
    strides = [int(s) for s in n.attr("strides", [1, 1])]
    dilations = [int(d) for d in n.attr("dilations", [1, 1])]
    pads = pads_of(n)
    if role in ("conv-int8", "stem-int8", "depthwise-int8"):
        # ConvInteger(x, W, z): the input padded with z, Σ x·W in int32, minus z·ΣW per output channel
        z = int(_const(n.inputs[2]).reshape(())) if len(n.inputs) > 2 and n.inputs[2] is not None else 0
        if role == "depthwise-int8":
            y = bb.emit_te(BO.depthwise_blocked, x, ins[1], strides, pads, dilations, z, "int32",
                           primfunc_name_hint="depthwise_int8_blocked")
        elif role == "stem-int8":
            kw = int(_const(n.inputs[1]).shape[3])
            y = bb.emit_te(BO.conv2d_int8_stem, x, ins[1], kw, strides, pads, z, primfunc_name_hint="conv_int8_stem")
        else:
            y = bb.emit_te(BO.conv2d_int8_blocked, x, ins[1], strides, pads, dilations, z, primfunc_name_hint="conv_int8_blocked")
        if z:
            w = _const(n.inputs[1]).astype(np.int64)
            corr = (z * w.reshape(w.shape[0], -1).sum(axis=1)).astype(np.int32).reshape(1, -1, 1, 1, block)
            y = bb.emit(relax.op.subtract(y, relax.const(corr, "int32")))
        return y
    if role == "pointwise-plain":
        bias = ins[2] if len(ins) > 2 and ins[2] is not None else None
        return bb.emit_te(BO.pointwise_to_plain, x, ins[1], bias, primfunc_name_hint="pointwise_plain")
    if role in ("conv", "stem", "depthwise"):
        flat = flat_multiple(n, block, plan.machine) if role == "conv" else 0
        if role == "conv" and winograd:
            y = bb.emit_te(WO.conv2d_winograd, x, ins[1], pads, winograd, primfunc_name_hint="conv_winograd")
        elif flat:
            y = bb.emit_te(BO.conv2d_blocked_flat, x, ins[1], strides, pads, dilations, flat, primfunc_name_hint="conv_blocked")
        else:
            fn = {"conv": BO.conv2d_blocked, "stem": BO.conv2d_stem, "depthwise": BO.depthwise_blocked}[role]
            y = bb.emit_te(fn, x, ins[1], strides, pads, dilations, primfunc_name_hint=f"{role}_blocked")
        if len(ins) > 2 and ins[2] is not None:
            y = bb.emit_te(BO.add_blocked_bias, y, ins[2], primfunc_name_hint="add_bias")
        return y
    if role == "pool":
        kind = "max" if n.op_type == "MaxPool" else "avg"
        return bb.emit_te(
            BO.pool_blocked, x, kind, [int(k) for k in n.attr("kernel_shape")], strides, pads, dilations,
            bool(n.attr("count_include_pad", 0)), bool(n.attr("ceil_mode", 0)), primfunc_name_hint=f"{kind}pool_blocked",
        )
    if role == "resize":
        from .lower.converters.resize import resize_blocked

        roi, scales, sizes = ((_const(v) if v is not None else None) for v in _resize_inputs(n))
        return resize_blocked(bb, n, x, roi, scales, sizes)
    if role == "concat":
        return bb.emit(relax.op.concat(ins, axis=1))
    if role == "batchnorm":
        # y = (x - mean) / sqrt(var + eps) * scale + bias = x * s + t, s and t folded here
        scale, bias, mean, var = (_const(v).astype(np.float64) for v in n.inputs[1:5])
        s = scale / np.sqrt(var + float(n.attr("epsilon", 1e-5)))
        t = bias - mean * s

        def blocked_const(a: np.ndarray) -> relax.Expr:
            return relax.const(a.astype(np.float32).reshape(1, -1, 1, 1, block))

        return bb.emit(relax.op.add(relax.op.multiply(x, blocked_const(s)), blocked_const(t)))
    if role == "global-pool":
        kind = "max" if n.op_type == "GlobalMaxPool" else "avg"
        return bb.emit_te(BO.global_pool_blocked, x, kind, primfunc_name_hint=f"global_{kind}pool_blocked")
    raise ValueError(f"unknown blocked role {role!r}")

"""The machine model: what the code generator may assume about the CPU it compiles for.

    m = machine_model(target)      # from the TVM target (mcpu, mattr, mtriple, num-cores)
    m.lanes(32)                    # 16 on AVX-512, 8 on AVX2, 4 on NEON
    m.accumulators, m.conv_tiles   # register-tile budget of the micro-kernels
    m.l1d_bytes, m.l2_bytes        # cache budgets of the blocking decisions
    m.int8_dot                     # "avx512-vnni" | "avx-vnni" | "avx2" | "dotprod" | ... | None

Every ISA-dependent decision of the cpu target (channel block, micro-kernel tiles, cache
blocking, Winograd, int8 instruction, the quantize pass's reduce-range) reads this one object.
It is derived from the TVM target alone — LLVM says which features the mcpu and mattr imply,
a table says what LLVM does not (registers, caches, FMA units) — so compiling for
`cpu{mcpu=haswell}` on an AVX-512 host gives exactly the code an AVX2 host gives. The host is
read only to answer "can this machine run that code?" (`host_features`, `missing_features`).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["MachineModel", "machine_model", "host_features", "missing_features", "env_mcpu", "X86_LEVELS", "CACHES"]

#: the x86 mcpus `cpu{mcpu=...}` is tested with, oldest first (LLVM knows many more)
X86_LEVELS = ("haswell", "skylake-avx512", "icelake-server", "sapphirerapids", "znver3", "znver4", "znver5")

#: per core: L1 data, L2, and the L3 share (bytes), FMA units; from the vendors' optimisation
#: manuals. An mcpu not named here takes `_DEFAULT_X86` / `_DEFAULT_ARM`.
CACHES: dict[str, tuple[int, int, int, int]] = {
    "haswell": (32 << 10, 256 << 10, 2560 << 10, 2),
    "broadwell": (32 << 10, 256 << 10, 2560 << 10, 2),
    "skylake": (32 << 10, 256 << 10, 2 << 20, 2),
    "skylake-avx512": (32 << 10, 1 << 20, 1408 << 10, 2),
    "cascadelake": (32 << 10, 1 << 20, 1408 << 10, 2),
    "cooperlake": (32 << 10, 1 << 20, 1408 << 10, 2),
    "icelake-server": (48 << 10, 1280 << 10, 1536 << 10, 2),
    "sapphirerapids": (48 << 10, 2 << 20, 1920 << 10, 2),
    "emeraldrapids": (48 << 10, 2 << 20, 5 << 20, 2),
    "alderlake": (48 << 10, 1280 << 10, 3 << 20, 2),
    "znver2": (32 << 10, 512 << 10, 4 << 20, 2),
    "znver3": (32 << 10, 512 << 10, 4 << 20, 2),
    # Zen 4 executes 512-bit ops on 256-bit units (two passes): one 512-bit FMA per cycle
    "znver4": (32 << 10, 1 << 20, 4 << 20, 1),
    "znver5": (48 << 10, 1 << 20, 4 << 20, 2),
    "cortex-a55": (32 << 10, 128 << 10, 512 << 10, 1),
    "cortex-a72": (32 << 10, 512 << 10, 0, 2),
    "cortex-a76": (64 << 10, 512 << 10, 1 << 20, 2),
    "neoverse-n1": (64 << 10, 1 << 20, 1 << 20, 2),
    "neoverse-v1": (64 << 10, 1 << 20, 1 << 20, 4),
    "apple-m1": (128 << 10, 3 << 20, 0, 4),
    "apple-m2": (128 << 10, 4 << 20, 0, 4),
}
_DEFAULT_X86 = (32 << 10, 512 << 10, 4 << 20, 2)
#: |w| up to which AVX2's vpmaddubsw (u8 x s8 pairs summed in int16) cannot saturate: 2 x 255 x 64
#: < 32767, so weights within it are exact on the u8s8 path; wider ones take vpmaddwd on int16
U8S8_WEIGHT_BOUND = 64

_DEFAULT_ARM = (64 << 10, 512 << 10, 1 << 20, 2)

# LLVM feature names the model records, and how /proc/cpuinfo spells them
_X86_FEATURES = {
    "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi2": "bmi2",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vbmi": "avx512vbmi", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
}
_ARM_FEATURES = {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "sve": "sve", "fullfp16": "asimdhp",
                 "bf16": "bf16"}


@dataclass(frozen=True)
class MachineModel:
    """What the code generator assumes about one CPU (see the module docstring)."""

    arch: str  # "x86_64" | "aarch64" | other LLVM arch names
    mcpu: str
    vector_bits: int  # widest float SIMD register the code may use: 512, 256, 128
    vector_registers: int  # of that width: 16 ymm (AVX2), 32 zmm (AVX-512), 32 NEON
    fma_units: int  # vector FMAs issued per cycle
    l1d_bytes: int
    l2_bytes: int
    l3_bytes: int  # this core's share
    cores: int
    features: frozenset[str] = field(default_factory=frozenset)  # LLVM names (avx512vnni, dotprod, ...)

    def lanes(self, dtype_bits: int = 32) -> int:
        """SIMD lanes for `dtype_bits`-bit elements (fp32: AVX2 8, AVX-512 16, NEON 4)."""
        return max(self.vector_bits // dtype_bits, 1)

    def has(self, feature: str) -> bool:
        return feature in self.features

    #: a core's clock the estimates below assume (a typical server base clock; they only decide
    #: whether a kernel is small, within a factor of two either way)
    ASSUMED_HZ = 2.5e9
    #: bytes per second one core streams from L2/L3 (ditto)
    ASSUMED_CORE_BANDWIDTH = 16e9
    #: a kernel below this many seconds of one core's work runs serially: a parallel launch on
    #: TVM's pool costs a few µs per call (a recurrent step of three 128-wide matmuls: 6.3 µs on
    #: one thread, 16.6 µs on two)
    SERIAL_BELOW_S = 10e-6
    #: a parallel loop whose one launch is under this much of one core's work takes the symbolic
    #: (batch) loops around it into its iterations rather than being launched once per batch item
    #: (`schedules.base.fuse_parallel`): the few µs of each launch are then paid once per call
    LAUNCH_AMORTISED_S = 50e-6

    def core_seconds(self, flops: float, bytes_touched: float) -> float:
        """One core's time for `flops` fp32 FLOPs at peak and `bytes_touched` streamed, whichever
        is longer (a lower bound)."""
        peak = self.lanes(32) * 2 * max(self.fma_units, 1) * self.ASSUMED_HZ
        return max(flops / peak, bytes_touched / self.ASSUMED_CORE_BANDWIDTH)

    def runs_serially(self, flops: float, bytes_touched: float) -> bool:
        """Whether a kernel is too small to split across threads (see SERIAL_BELOW_S)."""
        return self.core_seconds(flops, bytes_touched) < self.SERIAL_BELOW_S

    def serial_limits(self) -> tuple[float, float]:
        """(FLOPs, bytes) below both of which a kernel `runs_serially`: the same rule as bounds a
        kernel whose work is known only at run time can test (a symbolic sequence length)."""
        peak = self.lanes(32) * 2 * max(self.fma_units, 1) * self.ASSUMED_HZ
        return self.SERIAL_BELOW_S * peak, self.SERIAL_BELOW_S * self.ASSUMED_CORE_BANDWIDTH

    @property
    def accumulators(self) -> int:
        """fp32 accumulator vectors a conv/matmul micro-kernel keeps in registers: the rest hold
        the tile's weight vectors and a broadcast. 16 registers: 12 (MLAS's AVX2 NCHWc kernels);
        32: 24 (MLAS's AVX-512 kernels: 6 pixels x 4 filter blocks)."""
        return 12 if self.vector_registers <= 16 else 24

    @property
    def accumulators_wide(self) -> int:
        """... when the weights are memory operands of the FMAs (no weight registers)."""
        return self.accumulators + self.vector_registers // 8

    @property
    def conv_tiles(self) -> tuple[tuple[int, int], ...]:
        """(pixels, output blocks) tiles that fill `accumulators` exactly, in the order they are
        tried: most output blocks first (each broadcast feeds more FMAs), at most 6 blocks."""
        a = self.accumulators
        return tuple((a // ob, ob) for ob in range(6, 1, -1) if a % ob == 0 and a // ob >= 2)

    def odd_tile(self, ob: int) -> tuple[int, int]:
        """(pixels, output blocks) for `ob` output blocks that no `conv_tiles` tile divides: the
        largest divisor of `ob` up to 6 blocks, pixels filling the accumulators (12: 125 → 2 x 5)."""
        d = max(k for k in range(1, 7) if ob % k == 0)
        return self.accumulators // d, d

    @property
    def int8_dot(self) -> str | None:
        """The int8 dot-product instruction the int8 kernels use (None: no int8 kernels)."""
        if self.arch == "x86_64":
            if self.has("avx512vnni") and self.vector_bits >= 512:
                return "avx512-vnni"  # vpdpbusd zmm: u8 x s8, 4-element sums into int32
            if self.has("avxvnni") or self.has("avx512vnni"):
                return "avx-vnni"  # vpdpbusd ymm
            if self.has("avx2"):
                return "avx2"  # vpmaddubsw + vpmaddwd (u8 x s8 saturates in int16) or vpmaddwd on s16
            return None
        if self.arch == "aarch64":
            return "i8mm" if self.has("i8mm") else "dotprod" if self.has("dotprod") else "neon"
        return None

    @property
    def int8_exact_u8s8(self) -> bool:  # (else exact only for |w| <= U8S8_WEIGHT_BOUND)
        """u8 x s8 products accumulate without int16 saturation (VNNI, dotprod): full 8-bit
        weights are exact; AVX2's vpmaddubsw needs 7-bit weights (`reduce-range`)."""
        return self.int8_dot not in ("avx2", None)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = sorted(self.features)
        d["lanes_fp32"] = self.lanes(32)
        d["accumulators"] = self.accumulators
        d["int8_dot"] = self.int8_dot
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "MachineModel":
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        kw["features"] = frozenset(kw.get("features", ()))
        return cls(**kw)


def _arch(triple: str) -> str:
    a = triple.split("-", 1)[0] if triple else platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(a, a)


@functools.lru_cache(maxsize=64)
def _from_spec(kind: str, triple: str, mcpu: str, mattr: tuple[str, ...], cores: int) -> MachineModel:
    import tvm
    from tvm.target import codegen

    arch = _arch(triple)
    spec: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu or "generic"}
    if triple:
        spec["mtriple"] = triple
    if mattr:
        spec["mattr"] = list(mattr)
    names = _X86_FEATURES if arch == "x86_64" else _ARM_FEATURES if arch == "aarch64" else {}
    feats: set[str] = set()
    if kind == "llvm" and names:
        t = tvm.target.Target(spec)
        for f in names:
            try:
                if codegen.target_has_features(f, t):
                    feats.add(f)
            except Exception:  # (LLVM without that backend)
                pass
    if arch == "x86_64":
        bits = 512 if "avx512f" in feats else 256 if ("avx2" in feats or "avx" in feats) else 128
        regs = 32 if bits == 512 else 16
        table = CACHES.get(mcpu, _DEFAULT_X86)
    elif arch == "aarch64":
        bits, regs = 128, 32
        table = CACHES.get(mcpu, _DEFAULT_ARM)
    else:
        bits, regs, table = 128, 16, _DEFAULT_X86
    l1, l2, l3, fma = table
    return MachineModel(arch=arch, mcpu=mcpu or "generic", vector_bits=bits, vector_registers=regs, fma_units=fma,
                        l1d_bytes=l1, l2_bytes=l2, l3_bytes=l3, cores=max(cores, 1), features=frozenset(feats))


def machine_model(target: Any) -> MachineModel:
    """The machine model of a TVM target (`tvm.target.Target` or its JSON dict)."""
    if isinstance(target, dict):
        d = target
        kind = str(d.get("kind", "llvm"))
    else:
        d = dict(target.export())
        kind = str(target.kind.name)
    mattr = tuple(str(x) for x in (d.get("mattr") or ()))
    return _from_spec(kind, str(d.get("mtriple") or ""), str(d.get("mcpu") or ""), mattr, int(d.get("num-cores") or 1))


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str] | None:
    """The LLVM names of the features this machine's CPU has (None where the OS does not say)."""
    arch = _arch("")
    names = _X86_FEATURES if arch == "x86_64" else _ARM_FEATURES if arch == "aarch64" else None
    if names is None:
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return frozenset(llvm for llvm, cpuinfo in names.items() if cpuinfo in flags or llvm in flags)


def missing_features(machine: MachineModel) -> list[str]:
    """The features `machine`'s code may use that this CPU lacks ([] when it can run it, or when
    the OS does not say; a different architecture: ['<arch>'])."""
    if machine.arch != _arch(""):
        return [machine.arch]
    have = host_features()
    if have is None:
        return []
    return sorted(machine.features - have)


def env_mcpu() -> str | None:
    """`GRAPHOPT_CPU_MCPU`: the mcpu the cpu target compiles for when none is given (forces the
    test suite onto another machine model: `GRAPHOPT_CPU_MCPU=haswell pytest`)."""
    return os.environ.get("GRAPHOPT_CPU_MCPU") or None

"""The machine model (graphopt.targets.machine): what it derives from a TVM target, its JSON round
trip, and the refusals built on it (an unknown mcpu; running or verifying code for features this
CPU lacks), whatever the host."""

from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import graphopt  # noqa: E402
import graphopt.runtime  # noqa: E402
from graphopt.cli import main  # noqa: E402
from graphopt.targets.machine import X86_LEVELS, MachineModel, host_features, machine_model, missing_features  # noqa: E402

from paths import EXAMPLES  # noqa: E402

EXAMPLE = str(EXAMPLES / "tiny_cnn.onnx")


def _x86(mcpu: str, **extra) -> MachineModel:
    return machine_model({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": 2, **extra})


@pytest.mark.parametrize("mcpu, lanes, regs, acc, dot, l2", [
    ("haswell", 8, 16, 12, "avx2", 256 << 10),
    ("znver3", 8, 16, 12, "avx2", 512 << 10),
    ("skylake-avx512", 16, 32, 24, "avx2", 1 << 20),  # AVX-512 without VNNI: the AVX2 int8 kernels
    ("icelake-server", 16, 32, 24, "avx512-vnni", 1280 << 10),
    ("alderlake", 8, 16, 12, "avx-vnni", 1280 << 10),
    ("znver4", 16, 32, 24, "avx512-vnni", 1 << 20),
    ("znver5", 16, 32, 24, "avx512-vnni", 1 << 20),
    ("sapphirerapids", 16, 32, 24, "avx512-vnni", 2 << 20),
])
def test_x86_levels(mcpu, lanes, regs, acc, dot, l2):
    m = _x86(mcpu)
    assert (m.arch, m.lanes(32), m.lanes(16), m.vector_registers, m.accumulators, m.int8_dot, m.l2_bytes) == \
        ("x86_64", lanes, 2 * lanes, regs, acc, dot, l2)
    assert m.int8_exact_u8s8 == (dot != "avx2")
    assert all(rt * ob == acc for rt, ob in m.conv_tiles) and m.odd_tile(125) == (acc // 5, 5)


def test_mattr_takes_features_away_and_arm_is_neon():
    m = _x86("znver4", mattr=["-avx512f"])
    assert (m.lanes(32), m.vector_registers, "avx512vnni" in m.features) == (8, 16, False)
    arm = machine_model({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1", "mattr": ["+neon"]})
    assert (arm.arch, arm.lanes(32), arm.vector_registers, arm.int8_dot) == ("aarch64", 4, 32, "dotprod")


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(X86_LEVELS), st.integers(1, 64))
def test_json_round_trip(mcpu, cores):
    m = machine_model({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores})
    assert MachineModel.from_json(m.to_json()) == m and m.cores == cores


def test_missing_features_name_what_this_cpu_lacks():
    have = host_features()
    if have is None:
        pytest.skip("the OS does not say which features this CPU has")
    m = _x86("haswell")
    fake = MachineModel(**{**{k: getattr(m, k) for k in m.__dataclass_fields__}, "features": m.features | {"amx-int8"}})
    assert ("amx-int8" in missing_features(fake)) == ("amx-int8" not in have)
    other = MachineModel(**{**{k: getattr(m, k) for k in m.__dataclass_fields__}, "arch": "riscv64"})
    assert missing_features(other) == ["riscv64"]


def test_unknown_mcpu_is_one_line_and_exit_2(capsys, tmp_path):
    assert main([EXAMPLE, "--target", "cpu{mcpu=pentium9000}", "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a CPU LLVM knows" in err[0] and not (tmp_path / "a").exists()


def test_foreign_machine_compiles_but_verify_and_load_refuse(capsys, tmp_path):
    """An artifact for a CPU with features this one lacks (AMX on Sapphire Rapids) compiles here;
    --verify, which would run it, is refused before compiling, and so is loading it."""
    have = host_features()
    if have is None or "amx-int8" in have:
        pytest.skip("this CPU has AMX (or does not say)")
    assert main([EXAMPLE, "--target", "cpu{mcpu=sapphirerapids}", "-o", str(tmp_path / "v"), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--verify" in err[0] and "amx" in err[0] and not (tmp_path / "v").exists()
    assert main([EXAMPLE, "--target", "cpu{mcpu=sapphirerapids}", "-o", str(tmp_path / "a"), "--quiet"]) == 0
    with pytest.raises(graphopt.target.ArtifactError, match=r"compiled for mcpu=sapphirerapids.*lacks .*amx"):
        graphopt.runtime.load(str(tmp_path / "a"))

"""--list-passes prints whole descriptions; --help-pass NAME lists a pass's options (issue 19 item 7)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest

from graphopt.cli import main
from graphopt.transform import Pass, get_pass, list_passes


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_passes_prints_the_whole_first_paragraph(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "--list-passes")
    assert code == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines()}  # (one line per pass into a pipe)
    assert set(list_passes()) <= set(lines)
    # fuse-attention's paragraph runs over four docstring lines: the listing used to stop after
    # the first ("... into one Attention op (opset ≥ 23;")
    assert lines["fuse-attention"].rstrip().endswith("so that the projections are its direct inputs).")
    assert "Only with contrib-ops=1" in lines["fuse-conv-activation"]


def test_help_pass_lists_every_option_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "--help-pass", "prune")
    assert code == 0 and not err
    assert out.startswith("prune  (graphopt.passes.pruning")
    assert "Structured pruning: remove whole channels" in out
    cls = get_pass("prune")
    for f in cls.option_fields():
        kebab = f.name.replace("_", "-")
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [kebab])
        assert "default" in line, line
    assert any(ln.split()[:4] == ["ratio", "float", "default", "0.3"] for ln in out.splitlines())
    # the option's description: from the docstring's "`ratio` (...)"
    assert "fraction of each group's channels to remove" in out


def test_help_pass_reads_field_comments(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "--help-pass", "quantize")
    assert code == 0
    # the comment after the field in the source
    assert "auto | static | dynamic" in out
    assert any(ln.split()[:4] == ["mode", "str", "default", "auto"] for ln in out.splitlines())


def test_help_pass_of_a_pass_without_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "--help-pass", "cse")
    assert code == 0 and "options: none" in out


def test_help_pass_unknown_name_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, "--help-pass", "prun")
    assert code == 2 and not out
    assert err.strip().splitlines() == ["graphopt-compile: error: unknown pass 'prun' (did you mean 'prune'?); "
                                        "see graphopt-compile --list-passes"]


def test_help_pass_with_list_passes_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "--help-pass", "dce", "--list-passes")
    assert code == 2 and "cannot be combined" in err


@dataclass(frozen=True)
class _Documented(Pass):
    """Do nothing, documented: first paragraph
    over two lines.

    Options: `gamma` (how much gamma; from the docstring).
    """

    name: ClassVar[str] = "t-documented"
    alpha: int = 3  # trailing comment
    #: comment above
    beta: str = "a#b"
    gamma: float = 0.5
    delta: tuple[str, ...] = ("x", "y")
    epsilon: bool = dataclasses.field(default=False)


def test_options_help_sources() -> None:
    assert _Documented.description() == "Do nothing, documented: first paragraph over two lines."
    rows = {r["name"]: r for r in _Documented.options_help()}
    assert list(rows) == ["alpha", "beta", "gamma", "delta", "epsilon"]
    assert rows["alpha"] == {"name": "alpha", "type": "int", "default": "3", "doc": "trailing comment"}
    assert rows["beta"]["doc"] == "comment above" and rows["beta"]["default"] == "a#b"  # ('#' in a string is no comment)
    assert rows["gamma"]["doc"] == "how much gamma; from the docstring"
    assert rows["delta"]["default"] == "x:y" and rows["delta"]["doc"] == ""  # (pipeline syntax for lists)
    assert rows["epsilon"]["default"] == "false"

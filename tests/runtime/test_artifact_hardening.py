"""Hostile artifacts and graphopt-run inputs (issue 25): every one is a one-line GraphoptError
(exit 2), never a KeyError, a TVM error, a SIGBUS or a library loaded from outside the folder.

One cpu artifact of examples/tiny_cnn.onnx is compiled per module; each case tampers a copy of it
and, like an attacker who knows the format, updates the manifest's sha256 and byte counts so that
only the new checks can catch it. Skipped cleanly without apache-tvm.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tvm")

import graphopt  # noqa: E402
import graphopt.runtime  # noqa: E402
from graphopt import run_cli  # noqa: E402
from graphopt.target import Artifact, ArtifactError, sha256_file  # noqa: E402

from paths import EXAMPLES  # noqa: E402

EXAMPLE = EXAMPLES / "tiny_cnn.onnx"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> str:
    return graphopt.compile(str(EXAMPLE), "cpu", "-O2", threads=1).save(str(tmp_path_factory.mktemp("a") / "art"))


def _rehash(path: str) -> None:
    """Update the manifest's sha256 and bytes to the files as they are now (a careful tamperer)."""
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        man = json.load(f)
    files = man.get("files") if isinstance(man, dict) else None
    for entry in (files.values() if isinstance(files, dict) else ()):
        p = os.path.join(path, entry["path"]) if isinstance(entry, dict) and isinstance(entry.get("path"), str) else None
        if p and os.path.isfile(p):
            entry["sha256"], entry["bytes"] = sha256_file(p), os.path.getsize(p)
    with open(mpath, "w") as f:
        json.dump(man, f)


def _tampered(artifact: str, dest: Path, edit: Callable[[str, dict[str, Any]], None]) -> str:
    path = str(dest / "t")
    shutil.copytree(artifact, path)
    mpath = os.path.join(path, "manifest.json")
    with open(mpath) as f:
        man = json.load(f)
    edit(path, man)
    with open(mpath, "w") as f:
        json.dump(man, f)
    _rehash(path)
    return path


def _edit_params(path: str, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    p = os.path.join(path, "params.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(p, **arrays)


def _first(arrays: dict[str, np.ndarray]) -> str:
    return sorted(arrays)[0]


def _set(keys: tuple[Any, ...], value: Any) -> Callable[[str, dict[str, Any]], None]:
    def edit(path: str, man: dict[str, Any]) -> None:
        d = man
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


def _drop(*keys: str) -> Callable[[str, dict[str, Any]], None]:
    def edit(path: str, man: dict[str, Any]) -> None:
        d = man
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
    return edit


TAMPERS: dict[str, tuple[Callable[[str, dict[str, Any]], None], str]] = {
    "no inputs": (_drop("inputs"), "inputs is missing"),
    "no outputs": (_drop("outputs"), "outputs is missing"),
    "files null": (_set(("files",), None), "files is NoneType"),
    "library entry a string": (_set(("files", "library"), "model.so"), "files.library is str"),
    "bogus input dtype": (_set(("inputs", 0, "dtype"), "float99"), "inputs\\[0\\].dtype 'float99' is not a numeric dtype"),
    "object input dtype": (_set(("inputs", 0, "dtype"), "object"), "not a numeric dtype"),
    "output dtype a number": (_set(("outputs", 0, "dtype"), 7), "outputs\\[0\\].dtype is int"),
    "input dtype null": (_set(("inputs", 0, "dtype"), None), "inputs\\[0\\].dtype is NoneType"),
    "shape a string": (_set(("inputs", 0, "shape"), "abc"), "inputs\\[0\\].shape is str"),
    "negative dim": (_set(("inputs", 0, "shape", 1), -3), "inputs\\[0\\].shape\\[1\\]"),
    "runtime null": (_set(("runtime",), None), "runtime is NoneType"),
    "target null": (_set(("target",), None), "target is NoneType"),
    "threads a string": (_set(("target", "threads"), "x"), "target.threads is str"),
    # (the first array the manifest lists, whatever the build named it: p0 raw, w0 packed)
    "params of another shape": (lambda p, m: _edit_params(p, lambda a: a.__setitem__(_first(a), np.zeros((3, 3), a[_first(a)].dtype))),
                                "array '\\w+' is float32\\[3, 3\\], the manifest says float32"),
    "params of another dtype": (lambda p, m: _edit_params(p, lambda a: a.__setitem__(_first(a), a[_first(a)].astype(np.float64))),
                                "array '\\w+' is float64"),
    "a dropped array": (lambda p, m: _edit_params(p, lambda a: a.pop(_first(a))), "array '\\w+' of the manifest is missing"),
    "an extra array": (lambda p, m: _edit_params(p, lambda a: a.__setitem__("zz", np.zeros(2))), "array 'zz' is not in the manifest"),
    "shortened runtime.params": (lambda p, m: m["runtime"]["params"].pop(), "main takes 6 arguments"),
    "runtime.params naming a missing array": (lambda p, m: m["runtime"]["params"].__setitem__(0, "nope"), "no array 'nope'"),
    "params not a zip": (lambda p, m: Path(p, "params.npz").write_bytes(b"hello"), "not a .npz"),
    "params holding a pickle": (lambda p, m: _edit_params(p, lambda a: a.__setitem__("p0", np.array([{}], dtype=object))),
                                "Python objects|numeric dtype"),
    "bogus entry function": (_set(("runtime", "entry"), "nope"), "no function 'nope'"),
    "library path leaving the folder": (_set(("files", "library", "path"), "../x/model.so"), "leaves the artifact folder"),
    "library path the folder": (_set(("files", "library", "path"), "."), "leaves the artifact folder"),
    "a bogus codebook entry": (_set(("runtime", "codebooks"), {"p0": {"indices": 1}}), "runtime.codebooks\\['p0'\\].indices is int"),
    "format version a bool": (_set(("version",), True), "version True is not supported"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_a_tampered_artifact_is_a_one_line_artifact_error(artifact: str, tmp_path: Path, case: str) -> None:
    edit, message = TAMPERS[case]
    path = _tampered(artifact, tmp_path, edit)
    with pytest.raises(ArtifactError, match=message) as e:
        graphopt.runtime.load(path, threads=1)
    assert "\n" not in str(e.value)


def test_manifests_that_are_not_objects_or_too_deep(artifact: str, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    shutil.copytree(artifact, path)
    for text, message in [("[1, 2]", "expected a JSON object"), ("[" * 100000 + "]" * 100000, "unreadable"),
                          ('{"format": "graphopt-artifact", "version": 1}', "target is missing")]:
        Path(path, "manifest.json").write_text(text)
        with pytest.raises(ArtifactError, match=message):
            graphopt.runtime.load(path)


def test_the_untampered_artifact_still_loads_and_runs(artifact: str) -> None:
    man = Artifact(artifact).manifest
    arrays = man["files"]["params"]["arrays"]
    with np.load(os.path.join(artifact, "params.npz")) as z:
        assert {k: {"dtype": str(z[k].dtype), "shape": list(z[k].shape)} for k in z.files} == arrays
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    (y,) = graphopt.runtime.load(artifact, threads=1).run({"input": x})
    assert y.shape == (2, 10) and np.isfinite(y).all()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graphopt.run_cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("keep", [64, 4096, 50_000, -1])
def test_a_truncated_library_is_refused_not_sigbus(artifact: str, tmp_path: Path, keep: int) -> None:
    """Truncated (and its hash updated): mapping it was SIGBUS, no message. Run in a child process."""
    def truncate(path: str, man: dict[str, Any]) -> None:
        lib = Path(path, "model.so")
        data = lib.read_bytes()
        lib.write_bytes(data[:keep])
    path = _tampered(artifact, tmp_path, truncate)
    r = _cli(path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "model.so" in r.stderr
    assert "truncated" in r.stderr or "ELF" in r.stderr


def test_a_library_for_another_machine_is_refused(artifact: str, tmp_path: Path) -> None:
    def retarget(path: str, man: dict[str, Any]) -> None:
        lib = Path(path, "model.so")
        data = bytearray(lib.read_bytes())
        data[18:20] = (183).to_bytes(2, "little")  # e_machine: AArch64
        lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="ELF machine 183"):
        graphopt.runtime.load(_tampered(artifact, tmp_path, retarget))


@pytest.mark.parametrize("name", ["model.so", "params.npz"])
def test_a_file_symlinked_out_of_the_folder_is_refused(artifact: str, tmp_path: Path, name: str) -> None:
    """The same bytes outside the folder (the hash matches): the link alone must refuse it."""
    outside = tmp_path / f"outside-{name}"
    def link(path: str, man: dict[str, Any]) -> None:
        shutil.move(os.path.join(path, name), outside)
        os.symlink(outside, os.path.join(path, name))
    path = _tampered(artifact, tmp_path, link)
    with pytest.raises(ArtifactError, match=f"{name} is a symlink"):
        graphopt.runtime.load(path)


def test_a_symlinked_manifest_is_refused(artifact: str, tmp_path: Path) -> None:
    path = str(tmp_path / "t")
    shutil.copytree(artifact, path)
    shutil.move(os.path.join(path, "manifest.json"), tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", os.path.join(path, "manifest.json"))
    with pytest.raises(ArtifactError, match="not a regular file"):
        graphopt.runtime.load(path)


# --- graphopt-run ------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = run_cli.main(list(args))
    err = capsys.readouterr().err
    return rc, err


def _bad_inputs(tmp_path: Path) -> dict[str, str]:
    files = {"text": tmp_path / "x.txt", "npy": tmp_path / "x.npy", "zip": tmp_path / "x.zip",
             "corrupt": tmp_path / "c.npz", "short": tmp_path / "s.npz"}
    files["text"].write_text("hello")
    np.save(files["npy"], np.zeros((1, 3, 16, 16), np.float32))
    with zipfile.ZipFile(files["zip"], "w") as z:
        z.writestr("a.txt", "hi")
    files["corrupt"].write_bytes(b"PK\x03\x04" + b"\0" * 100)
    # a member whose header promises 2**40 floats: refused from the header, nothing allocated
    header = b"\x93NUMPY\x01\x00" + b"v\x00" + b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 3, 16, 16), }".ljust(118) + b"\n"
    with zipfile.ZipFile(files["short"], "w") as z:
        z.writestr("input.npy", header + b"\0" * 16)
    return {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize("kind", ["text", "npy", "zip", "corrupt", "short"])
def test_run_inputs_that_are_not_an_npz(artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    rc, err = _run(capsys, artifact, "--inputs", _bad_inputs(tmp_path)[kind])
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("graphopt-run: error: --inputs")


def test_run_dim_too_large_is_refused_before_allocating(artifact: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(capsys, artifact, "--dim", f"N={2**40}")
    assert rc == 2 and "over the limit" in err and str(2**40) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["--dim", "X=3"], "no symbolic dim 'X'"),
    (["--dim", "N=\u00b2"], "expected NAME=SIZE"),
    (["--threads", "-1"], "--threads -1"),
    (["--threads", "0"], "--threads 0"),
    (["--benchmark", "--repeat", "0"], "--repeat 0"),
])
def test_run_bad_options(artifact: str, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    rc, err = _run(capsys, artifact, *args)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_run_output_under_a_regular_file(artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("a file")
    for out, message in [(tmp_path / "f" / "y.npz", "is a file"), (tmp_path / "f" / "a" / "y.npz", "is a file"),
                         (tmp_path, "is a folder"), (tmp_path / "missing" / "y.npz", "does not exist")]:
        rc, err = _run(capsys, artifact, "-o", str(out))
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (out, err)
    assert sorted(os.listdir(tmp_path)) == ["f"]  # nothing written
    rc, err = _run(capsys, artifact, "-o", str(tmp_path / "y.npz"), "--dim", "N=2")
    assert rc == 0, err
    with np.load(tmp_path / "y.npz") as z:
        assert z["logits"].shape == (2, 10)


def test_run_output_write_failure_is_exit_2(artifact: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing -o (ENOSPC): exit 2 with the path, no file left."""
    import errno

    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", full)
    rc, err = _run(capsys, artifact, "-o", str(tmp_path / "y.npz"))
    assert rc == 2 and "No space left" in err and str(tmp_path / "y.npz") in err
    assert os.listdir(tmp_path) == []


# --- staging -----------------------------------------------------------------------------------


_KILLED_SAVE = textwrap.dedent("""
    import os, shutil, signal, sys
    from graphopt.target import Artifact
    copy = shutil.copy2
    def copy_then_die(a, b, **k):
        copy(a, b)
        os.kill(os.getpid(), signal.SIGKILL)
    shutil.copy2 = copy_then_die
    Artifact(sys.argv[1]).save(sys.argv[2])
""")


def test_a_killed_save_leaves_the_old_artifact_and_no_stage_after_the_next(artifact: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    dest = str(out / "art")
    Artifact(artifact).save(dest)
    before = {n: sha256_file(os.path.join(dest, n)) for n in os.listdir(dest)}
    r = subprocess.run([sys.executable, "-c", _KILLED_SAVE, artifact, dest], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert any(n.startswith(".graphopt-artifact-") for n in os.listdir(out))  # killed mid-copy
    assert {n: sha256_file(os.path.join(dest, n)) for n in os.listdir(dest)} == before  # old output intact
    graphopt.runtime.load(dest, threads=1)
    Artifact(artifact).save(str(out / "other"))  # the next save into the folder cleans up
    assert sorted(os.listdir(out)) == ["art", "notes.txt", "other"]
    Artifact(artifact).save(dest)  # replacing an artifact: in one step, nothing left beside it
    assert sorted(os.listdir(out)) == ["art", "notes.txt", "other"]
    graphopt.runtime.load(dest, threads=1)


_KILLED_COMPILE = textwrap.dedent("""
    import os, signal, sys
    import graphopt
    from graphopt import target
    write = target.write_manifest
    def write_then_die(folder, manifest):
        write(folder, manifest)
        print(folder, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    target.write_manifest = write_then_die
    import graphopt.targets.cpu as cpu
    cpu.write_manifest = write_then_die
    graphopt.compile(sys.argv[1], "cpu", "-O1", threads=1)
""")


def test_a_killed_compile_leaves_a_temporary_folder_the_next_compile_removes(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", _KILLED_COMPILE, str(EXAMPLE)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = r.stdout.strip()
    assert os.path.basename(left).startswith("graphopt-artifact-") and os.path.isdir(left)
    os.utime(left, (0, 0))  # (older than STALE_SECONDS: folders younger may be about to be locked)
    fresh = tmp_path / "graphopt-artifact-fresh"  # a new one, and one a live process holds, are kept
    fresh.mkdir()
    held = tmp_path / "graphopt-artifact-held"
    held.mkdir()
    os.utime(held, (0, 0))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_SH)\n"
                               "print('ok', flush=True)\ntime.sleep(600)", str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        code = ("import sys, graphopt\nart = graphopt.compile(sys.argv[1], 'cpu', '-O1', threads=1)\n"
                "print(art.path, flush=True)")
        r = subprocess.run([sys.executable, "-c", code, str(EXAMPLE)], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(left) and fresh.is_dir() and held.is_dir()
    finally:
        holder.kill()
        holder.wait()


def test_a_manifest_that_does_not_describe_its_library(artifact: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A static dim renamed symbolic in the manifest: inputs the library refuses are an
    ArtifactError (was the library's ValueError, exit 1); inputs it takes still run."""
    path = _tampered(artifact, tmp_path, _set(("inputs", 0, "shape", 2), "H"))
    runner = graphopt.runtime.load(path, threads=1)
    x = np.zeros((1, 3, 16, 16), np.float32)
    assert runner.run({"input": x})[0].shape == (1, 10)
    with pytest.raises(ArtifactError, match="does not describe this library"):
        runner.run({"input": np.zeros((1, 3, 15, 16), np.float32)})
    rc, err = _run(capsys, path, "--dim", "H=15")
    assert rc == 2 and "does not describe this library" in err and len(err.strip().splitlines()) == 1

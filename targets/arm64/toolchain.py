"""The aarch64 toolchain and runtime that build and run arm64 artifacts on an x86 machine.

    python tools/arm64_env.py setup [--python]     # or: python -m graphopt.targets.arm64.toolchain setup
    env = arm64_env.status()        # what is there, what is missing and how to get it
    cmd = arm64_env.runner_command(threads=2)   # [qemu-aarch64, -L, SYSROOT, ..., graphopt-arm64-run]

Pieces (cached under `.cache/arm64/` of the project, or $GRAPHOPT_ARM64_HOME, so a machine pays once):

- **Cross compiler** (Debian `g++-aarch64-linux-gnu`, or $GRAPHOPT_ARM64_CXX): links the exported
  library of an arm64 artifact, and the runner.
- **Runtime** (`runtime/lib`): `libtvm_runtime.so` and `libtvm_ffi.so` taken from the manylinux
  aarch64 wheels of the *same* apache-tvm / apache-tvm-ffi versions as the compiler on this
  machine (`pip download`), plus `graphopt-arm64-run`, built from `targets/arm64/runner/runner.cc` (package data): it
  loads the library, creates the Relax VM, calls `main` on .npy files and writes the outputs as .npy.
- **Emulator** (Debian `qemu-user`): runs the runner with `-L` pointing at the aarch64 sysroot the
  cross-compiler packages install (`/usr/aarch64-linux-gnu`); no root filesystem needed.
- **Python root** (`setup --python`, only for RPC tuning on loopback): an aarch64 Python 3.11 from
  Debian's arm64 packages (`apt-get download`, unpacked with `dpkg -x`; needs
  `dpkg --add-architecture arm64 && apt-get update` once) with the aarch64 wheels of TVM (runtime
  only: TVM_USE_RUNTIME_LIB=1), tvm-ffi, numpy, psutil and cloudpickle, started through a
  wrapper script (`python/bin/python3`) that execs qemu, so the RPC server's worker processes
  (spawned with sys.executable) run under qemu too.

Nothing here downloads anything unless `setup` is called.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from graphopt.errors import GraphoptError

RUNNER_NAME = "graphopt-arm64-run"
DEFAULT_SYSROOT = "/usr/aarch64-linux-gnu"
#: the Debian (bookworm) Python whose wheels the RPC root takes: tvm-ffi's wheel is per CPython version
PYTHON_VERSION = "3.11"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64", "manylinux_2_17_aarch64")
#: Debian arm64 packages of the Python root (python3.11-minimal and what it loads)
PYTHON_DEBS = ("libc6", "libgcc-s1", "libstdc++6", "python3.11-minimal", "libpython3.11-minimal",
               "libpython3.11-stdlib", "libexpat1", "zlib1g", "libffi8", "libbz2-1.0", "liblzma5",
               "libssl3", "libuuid1")
#: aarch64 wheels the RPC server imports besides TVM
PYTHON_WHEELS = ("numpy", "ml_dtypes", "psutil", "cloudpickle", "typing_extensions")


class Arm64EnvError(GraphoptError):
    """The aarch64 toolchain or runtime is missing or could not be set up."""


def is_aarch64_host() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def project_root() -> Path | None:
    """The source checkout graphopt runs from (editable install), if any."""
    here = Path(__file__).resolve().parents[2]  # targets/arm64/ -> the project root
    return here if (here / "pyproject.toml").exists() else None


def home() -> Path:
    env = os.environ.get("GRAPHOPT_ARM64_HOME")
    if env:
        return Path(env).expanduser().resolve()
    root = project_root()
    return (root / ".cache" / "arm64") if root is not None else Path.home() / ".cache" / "graphopt" / "arm64"


def cross_compiler() -> str | None:
    return shutil.which(os.environ.get("GRAPHOPT_ARM64_CXX", "aarch64-linux-gnu-g++"))


def qemu() -> str | None:
    if is_aarch64_host():
        return None
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def sysroot() -> str:
    return os.environ.get("GRAPHOPT_ARM64_SYSROOT", DEFAULT_SYSROOT)


def runtime_dir() -> Path:
    return home() / "runtime"


def runner_path() -> Path:
    return runtime_dir() / "lib" / RUNNER_NAME


def python_wrapper() -> Path:
    return home() / "python" / "bin" / "python3"


def runner_source() -> Path | None:
    src = Path(__file__).resolve().parent / "runner" / "runner.cc"  # package data (pyproject)
    return src if src.exists() else None


def runner_digest() -> str | None:
    """sha256 (16 hex digits) of the runner's source and build script in this checkout, recorded
    when it is built: a runner built from older source (one without --transform, say) counts as
    missing, so setup rebuilds it. None outside a source checkout (nothing to compare with)."""
    src = runner_source()
    if src is None:
        return None
    build = src.parent / "build.sh"
    return hashlib.sha256(src.read_bytes() + (build.read_bytes() if build.exists() else b"")).hexdigest()[:16]


def tvm_versions() -> tuple[str, str]:
    """The apache-tvm and apache-tvm-ffi versions installed here (the aarch64 runtime must match)."""
    try:
        return importlib.metadata.version("apache-tvm"), importlib.metadata.version("apache-tvm-ffi")
    except importlib.metadata.PackageNotFoundError:
        raise Arm64EnvError("apache-tvm is not installed: pip install 'graphopt[tvm]'") from None


@dataclass
class Status:
    cross_compiler: str | None
    qemu: str | None
    sysroot: str | None
    runner: str | None
    python: str | None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def can_build(self) -> bool:
        return self.cross_compiler is not None

    @property
    def can_run(self) -> bool:
        if self.runner is None:
            return False
        return is_aarch64_host() or (self.qemu is not None and self.sysroot is not None)

    @property
    def can_serve_rpc(self) -> bool:
        return self.python is not None and (is_aarch64_host() or self.qemu is not None)

    def missing(self) -> list[str]:
        """What is missing, each with how to get it."""
        out = []
        if self.cross_compiler is None:
            out.append("aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
        if not is_aarch64_host():
            if self.qemu is None:
                out.append("qemu-aarch64 (apt-get install qemu-user)")
            if self.sysroot is None:
                out.append(f"aarch64 sysroot {sysroot()} (apt-get install g++-aarch64-linux-gnu)")
        if self.runner is None:
            out.append(f"aarch64 TVM runtime and runner in {runtime_dir()} (python tools/arm64_env.py setup)")
        return out


def status() -> Status:
    versions: dict[str, str] = {}
    stamp = runtime_dir() / "versions.txt"
    runner = runner_path()
    runner_ok = runner.exists()
    if runner_ok and stamp.exists():
        versions = dict(line.split("=", 1) for line in stamp.read_text().split() if "=" in line)
        with contextlib.suppress(Arm64EnvError):
            tvm, ffi = tvm_versions()
            # a runtime of another TVM version may not load this compiler's libraries
            runner_ok = versions.get("apache-tvm") == tvm and versions.get("apache-tvm-ffi") == ffi
        digest = runner_digest()
        if digest is not None and versions.get("runner") != digest:
            runner_ok = False  # built from other source than this checkout's
    root = sysroot()
    return Status(
        cross_compiler=cross_compiler(),
        qemu=qemu(),
        sysroot=root if os.path.isdir(root) else None,
        runner=str(runner) if runner_ok else None,
        python=str(python_wrapper()) if python_wrapper().exists() else None,
        versions=versions,
    )


def require_runner() -> Status:
    st = status()
    if not st.can_run:
        raise Arm64EnvError("cannot run arm64 artifacts here; missing: " + "; ".join(st.missing()))
    return st


def runner_command(threads: int = 1) -> list[str]:
    """The command that runs the runner: under qemu on x86, directly on an aarch64 machine."""
    st = require_runner()
    assert st.runner is not None
    if is_aarch64_host():
        return [st.runner]
    assert st.qemu is not None and st.sysroot is not None
    return [st.qemu, "-L", st.sysroot, "-E", f"TVM_NUM_THREADS={int(threads)}", st.runner]


def runner_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["TVM_NUM_THREADS"] = str(int(threads))
    return env


# --- setup ----------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"arm64-env: {msg}", file=sys.stderr, flush=True)


def _pip_download(packages: Sequence[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "-d", str(dest)]
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    proc = subprocess.run([*cmd, *packages], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if "is ignored" not in ln][-3:]
        raise Arm64EnvError(f"pip download {' '.join(packages)} failed: {' / '.join(tail)}")
    out = []
    for pkg in packages:
        name = pkg.split("==")[0].replace("-", "_").lower()
        found = sorted(w for w in dest.glob("*.whl") if w.name.lower().startswith(name + "-"))
        if not found:
            raise Arm64EnvError(f"pip download gave no wheel for {pkg}")
        out.append(found[-1])
    return out


def _extract(wheel: Path, members: dict[str, Path]) -> None:
    """Copy wheel members (name in the wheel → destination path)."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name, dest in members.items():
            if name not in names:
                raise Arm64EnvError(f"{wheel.name} has no {name}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as f:
                shutil.copyfileobj(src, f)


def _extract_tree(wheel: Path, prefix: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = dest / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(target, "wb") as f:
                    shutil.copyfileobj(src, f)


def setup_runtime(force: bool = False) -> Path:
    """Fetch the aarch64 TVM runtime libraries and build the runner (once per machine)."""
    st = status()
    if st.runner is not None and not force:
        _log(f"runtime ready: {st.runner}")
        return Path(st.runner)
    cxx = cross_compiler()
    if cxx is None:
        raise Arm64EnvError("no aarch64 cross compiler: apt-get install g++-aarch64-linux-gnu")
    src = runner_source()
    if src is None:
        raise Arm64EnvError(f"{Path(__file__).parent / 'runner' / 'runner.cc'} not found: reinstall graphopt (it ships as package data)")
    tvm_v, ffi_v = tvm_versions()
    wheels = home() / "wheels"
    _log(f"downloading the aarch64 wheels of apache-tvm {tvm_v} and apache-tvm-ffi {ffi_v} into {wheels}")
    tvm_whl, ffi_whl = _pip_download([f"apache-tvm=={tvm_v}", f"apache-tvm-ffi=={ffi_v}"], wheels)
    stage = Path(tempfile.mkdtemp(prefix=".runtime-", dir=home()))
    try:
        lib = stage / "lib"
        _extract(tvm_whl, {"tvm/lib/libtvm_runtime.so": lib / "libtvm_runtime.so"})
        _extract(ffi_whl, {"tvm_ffi/lib/libtvm_ffi.so": lib / "libtvm_ffi.so"})
        _extract_tree(ffi_whl, "tvm_ffi/include/", stage / "include")
        _log(f"building {RUNNER_NAME} with {cxx}")
        build = src.parent / "build.sh"
        proc = subprocess.run(["sh", str(build), cxx, str(stage / "include"), str(lib), str(lib / RUNNER_NAME)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise Arm64EnvError(f"building the runner failed: {proc.stderr.strip()[-800:]}")
        digest = runner_digest()
        (stage / "versions.txt").write_text(f"apache-tvm={tvm_v}\napache-tvm-ffi={ffi_v}\n"
                                            + (f"runner={digest}\n" if digest else ""))
        old = runtime_dir()
        if old.exists():
            shutil.rmtree(old)
        os.replace(stage, old)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _log(f"runtime ready: {runner_path()}")
    return runner_path()


def setup_python(force: bool = False) -> Path:
    """An aarch64 Python with the TVM runtime, for an RPC server under qemu (see module docstring)."""
    wrapper = python_wrapper()
    if wrapper.exists() and not force:
        _log(f"python ready: {wrapper}")
        return wrapper
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise Arm64EnvError("the aarch64 Python root is made from Debian arm64 packages: needs apt-get and dpkg")
    arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in arches:
        raise Arm64EnvError("Debian's arm64 packages are not enabled: dpkg --add-architecture arm64 && apt-get update")
    base = home() / "python"
    debs = base / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _log("downloading Debian arm64 packages of python3.11")
    proc = subprocess.run(["apt-get", "download", "-q", *[f"{p}:arm64" for p in PYTHON_DEBS]], cwd=debs,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise Arm64EnvError(f"apt-get download failed: {proc.stderr.strip()[-500:]}")
    stage = Path(tempfile.mkdtemp(prefix=".python-", dir=base))
    try:
        root, site = stage / "root", stage / "site"
        for deb in sorted(debs.glob("*_arm64.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        tvm_v, ffi_v = tvm_versions()
        wheels = _pip_download([f"apache-tvm=={tvm_v}", f"apache-tvm-ffi=={ffi_v}", *PYTHON_WHEELS], home() / "wheels")
        site.mkdir()
        for whl in wheels:
            with zipfile.ZipFile(whl) as z:
                # the compiler library (240 MB) is not needed: the server loads the runtime only
                z.extractall(site, [n for n in z.namelist() if not n.endswith("libtvm_compiler.so")])
        final = base
        bin_dir = stage / "bin"
        bin_dir.mkdir()
        q = qemu()
        prefix = "" if is_aarch64_host() else f'"{q}" -L "{final / "root"}" -0 "{final / "bin" / "python3"}" '
        script = (
            "#!/bin/sh\n"
            "# aarch64 Python (Debian arm64 packages) with the TVM runtime; made by graphopt's arm64_env\n"
            f'export PYTHONHOME="{final / "root" / "usr"}" PYTHONPATH="{final / "site"}" TVM_USE_RUNTIME_LIB=1\n'
            f'exec {prefix}"{final / "root" / "usr" / "bin" / "python3.11"}" "$@"\n'
        )
        (bin_dir / "python3").write_text(script)
        (bin_dir / "python3").chmod(0o755)
        for name in ("root", "site", "bin"):
            if (base / name).exists():
                shutil.rmtree(base / name)
            os.replace(stage / name, base / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    check = subprocess.run([str(wrapper), "-c", "import tvm, platform; print(platform.machine(), tvm.__version__)"],
                           capture_output=True, text=True, timeout=600)
    if check.returncode != 0 or "aarch64" not in check.stdout:
        raise Arm64EnvError(f"the aarch64 Python does not start: {check.stderr.strip()[-500:]}")
    _log(f"python ready: {wrapper} ({check.stdout.strip()})")
    return wrapper


# --- RPC on loopback ------------------------------------------------------------------------------


@dataclass
class RpcEndpoint:
    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loopback_rpc(key: str = "arm64", *, timeout: float = 300.0, log: str | None = None) -> Iterator[RpcEndpoint]:
    """A TVM RPC tracker on 127.0.0.1 and one RPC server registered under `key`, the server an
    aarch64 Python under qemu (on an aarch64 machine: native). Both are stopped on exit. The
    server's timings mean nothing under emulation; the plumbing is what this gives."""
    import tvm.rpc

    st = status()
    if not st.can_serve_rpc:
        raise Arm64EnvError(f"no aarch64 Python for an RPC server: python tools/arm64_env.py setup --python (home {home()})")
    assert st.python is not None
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=_free_port(), port_end=65000, silent=True)
    port = _free_port()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [st.python, "-m", "tvm.exec.rpc_server", f"--tracker=127.0.0.1:{tracker.port}", f"--key={key}",
         "--host=127.0.0.1", f"--port={port}", f"--port-end={port + 100}", "--silent",
         # runtime-only TVM lacks the measuring helpers (random_fill_for_measure) RPCRunner calls
         f"--load-library={home() / 'python' / 'site' / 'tvm' / 'lib' / 'libtvm_runtime_extra.so'}"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,  # its own group: stopped as one
    )
    try:
        client = tvm.rpc.connect_tracker("127.0.0.1", tracker.port)
        deadline = time.monotonic() + timeout
        while True:
            queue = client.summary().get("queue_info", {})
            if queue.get(key, {}).get("free", 0) > 0:
                break
            if server.poll() is not None:
                raise Arm64EnvError(f"the aarch64 RPC server exited with {server.returncode}" + (f" (log: {log})" if log else ""))
            if time.monotonic() > deadline:
                raise Arm64EnvError(f"the aarch64 RPC server did not register with the tracker within {timeout:.0f} s")
            time.sleep(1.0)
        yield RpcEndpoint("127.0.0.1", int(tracker.port), key)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, 9)
            server.wait(15)
        tracker.terminate()
        if out is not subprocess.DEVNULL:
            out.close()


# --- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="arm64_env", description="Set up / inspect the aarch64 toolchain and runtime "
                                "that build and run arm64 artifacts (cached in .cache/arm64 or $GRAPHOPT_ARM64_HOME).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="fetch the aarch64 TVM runtime (pip download) and build the runner")
    s.add_argument("--python", action="store_true", help="also make the aarch64 Python root for RPC tuning on loopback")
    s.add_argument("--force", action="store_true", help="redo what is already there")
    sub.add_parser("status", help="print what is there and what is missing")
    args = p.parse_args(argv)
    try:
        if args.cmd == "setup":
            setup_runtime(force=args.force)
            if args.python:
                setup_python(force=args.force)
            return 0
        st = status()
        print(f"home:            {home()}")
        print(f"cross compiler:  {st.cross_compiler or '-'}")
        print(f"qemu:            {st.qemu or ('(native aarch64)' if is_aarch64_host() else '-')}")
        print(f"sysroot:         {st.sysroot or '-'}")
        print(f"runner:          {st.runner or '-'} {st.versions or ''}")
        print(f"python (rpc):    {st.python or '-'}")
        for m in st.missing():
            print(f"missing: {m}")
        return 0 if st.can_build and st.can_run else 1
    except GraphoptError as e:
        print(f"arm64_env: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The machine's measured fp32 FMA peak: the roofline the cpu target's GFLOP/s figures sit under.

    .venv/bin/python tools/peak_flops.py [--threads 1,2] [--isa avx512,avx2] [--seconds 0.5] [--repeat 15]

The profiler's peak line (`graphopt-run --profile`) is arithmetic: cores x FMA units x lanes x 2 x
the nominal clock of /proc/cpuinfo. A boosting CPU runs faster than its nominal clock, so this tool
measures instead: a register-only loop of independent FMA chains per thread (16 zmm, 12 ymm) (no loads or stores:
nothing but the FMA ports and the clock), compiled with gcc for 512-bit (x86-64-v4) or 256-bit
(x86-64-v3) vectors, run on each thread count; the best of --repeat runs (a shared machine's
other jobs only ever slow a run down). Prints the CPU (lscpu's model name, family, model) and, per
ISA and thread count, GFLOP/s and the clock it implies. Needs gcc; an ISA the host cannot run is
skipped with one line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char** argv) {
  long iters = atol(argv[1]);
  float sink = 0;
  double t0 = omp_get_wtime();
  #pragma omp parallel reduction(+:sink)
  {
    VEC a[CHAINS]; VEC b = SET1(1.0000001f), c = SET1(1e-8f);
    for (int i = 0; i < CHAINS; i++) a[i] = SET1((float)i);
    for (long n = 0; n < iters; n++) {
      #pragma GCC unroll 16
      for (int i = 0; i < CHAINS; i++) a[i] = FMA(a[i], b, c);
    }
    float tmp[LANES];
    for (int i = 0; i < CHAINS; i++) { STORE(tmp, a[i]); sink += tmp[0]; }
  }
  double dt = omp_get_wtime() - t0;
  printf("%.6f %d %f\n", dt, omp_get_max_threads(), sink);
  return 0;
}
"""

ISAS = {  # name: (gcc -march, lanes, accumulator chains, macros); chains + 2 constants fit the
    # register file (32 zmm, 16 ymm) and cover FMA latency x ports (4 x 2 in flight)
    "avx512": ("x86-64-v4", 16, 16, "-DVEC=__m512 -DSET1=_mm512_set1_ps -DFMA=_mm512_fmadd_ps -DSTORE=_mm512_storeu_ps -DLANES=16"),
    "avx2": ("x86-64-v3", 8, 12, "-DVEC=__m256 -DSET1=_mm256_set1_ps -DFMA=_mm256_fmadd_ps -DSTORE=_mm256_storeu_ps -DLANES=8"),
}
#: what /proc/cpuinfo must list for each build to run
NEEDS = {"avx512": "avx512f", "avx2": "avx2"}


def cpu_line() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    keys = {"Model name", "CPU family", "Model", "CPU(s)", "CPU max MHz"}
    got = {}
    for line in out.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in keys:
            got[k.strip()] = v.strip()
    return ", ".join(f"{k} {got[k]}" for k in ("Model name", "CPU family", "Model", "CPU(s)", "CPU max MHz") if k in got)


def host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(isa: str, folder: str) -> str:
    march, _, chains, macros = ISAS[isa]
    src = os.path.join(folder, "peak.c")
    with open(src, "w") as f:
        f.write(SOURCE)
    exe = os.path.join(folder, f"peak_{isa}")
    subprocess.run(["gcc", "-O2", f"-march={march}", "-fopenmp", f"-DCHAINS={chains}", *macros.split(), src, "-o", exe], check=True)
    return exe


def measure(exe: str, lanes: int, chains: int, threads: int, seconds: float, repeat: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "true"}

    def run(iters: int) -> float:
        out = subprocess.run([exe, str(iters)], capture_output=True, text=True, check=True, env=env).stdout.split()
        return float(out[0])

    iters = 1_000_000
    while (dt := run(iters)) < seconds / 4:  # calibrate the loop count to ~seconds
        iters *= 4
    iters = max(1, int(iters * seconds / dt))
    best = min(run(iters) for _ in range(repeat))
    return threads * iters * chains * lanes * 2 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--isa", default="avx512,avx2")
    ap.add_argument("--seconds", type=float, default=0.5, help="length of one run")
    ap.add_argument("--repeat", type=int, default=15, help="runs per figure (the best counts)")
    args = ap.parse_args(argv)
    if shutil.which("gcc") is None:
        print("peak_flops: gcc not found (apt-get install gcc)", file=sys.stderr)
        return 2
    print(f"# {cpu_line()}; load {os.getloadavg()[0]:.2f}")
    flags = host_flags()
    with tempfile.TemporaryDirectory() as tmp:
        for isa in args.isa.split(","):
            if isa not in ISAS:
                print(f"peak_flops: unknown ISA {isa!r} (have {', '.join(ISAS)})", file=sys.stderr)
                return 2
            if NEEDS[isa] not in flags:
                print(f"{isa}: skipped, this CPU lacks {NEEDS[isa]}")
                continue
            exe = build(isa, tmp)
            _, lanes, chains, _ = ISAS[isa]
            for t in (int(x) for x in args.threads.split(",")):
                gf = measure(exe, lanes, chains, t, args.seconds, args.repeat)
                # one FMA instruction per cycle per port; the implied clock assumes the core's FMA
                # throughput is 32 fp32 FLOP/cycle (2x256-bit or 1x512-bit FMAs per cycle)
                print(f"{isa:7s} {t} thread{'s' if t > 1 else ' '}  {gf:7.1f} GFLOP/s  ({gf / t:.1f} per core; "
                      f"{gf / t / 32:.2f} GHz at 32 FLOP/cycle)", flush=True)
    print(f"# load after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

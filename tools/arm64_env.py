"""Set up / inspect the aarch64 toolchain and TVM runtime that build and run arm64 artifacts.

    python tools/arm64_env.py setup            # aarch64 TVM runtime (pip download) + runner, once per machine
    python tools/arm64_env.py setup --python   # + an aarch64 Python for RPC tuning on loopback
    python tools/arm64_env.py status

Needs Debian's g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu
qemu-user); `--python` also `dpkg --add-architecture arm64 && apt-get update`. Everything is
cached in .cache/arm64/ ($GRAPHOPT_ARM64_HOME). See graphopt.targets.arm64.toolchain.
"""

import sys

from graphopt.targets.arm64.toolchain import main

if __name__ == "__main__":
    sys.exit(main())

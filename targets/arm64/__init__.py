"""The arm64 (AArch64) target: `target` (Arm64Target: cross-compiles with the cpu target's
pipeline, runs under qemu or on a device over RPC), `toolchain` (the cross compiler, the aarch64
TVM runtime and the runner, set up once per machine; the runner's C++ source and build script
ship as package data in `runner/`), `tuning` (MetaSchedule tuning over TVM RPC)."""

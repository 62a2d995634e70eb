#!/bin/sh
# Build graphopt-arm64-run for aarch64 (called by graphopt.targets.arm64_env.setup_runtime).
#   build.sh CXX INCLUDE_DIR LIB_DIR OUT
# INCLUDE_DIR: tvm_ffi/include of the aarch64 apache-tvm-ffi wheel; LIB_DIR: holds the aarch64
# libtvm_runtime.so and libtvm_ffi.so (the runner finds them beside itself: rpath $ORIGIN).
set -eu
CXX="$1"; INC="$2"; LIB="$3"; OUT="$4"
exec "$CXX" -std=c++17 -O2 -Wall -I "$INC" "$(dirname "$0")/runner.cc" -o "$OUT" \
    -L "$LIB" -ltvm_runtime -ltvm_ffi -Wl,-rpath,'$ORIGIN'

#!/bin/sh
# Builds the emulator library: csrc/cuda's kernel headers as host C++ (scan_kernels.cuh through
# make_host_copy.py: launchers cut, dynamic shared memory as a pointer) against the fakes in fake/.
#   sh tools/scan_emulator/build.sh [csrc/cuda folder] [output .so]
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${1:-$HERE/../../csrc/cuda}
OUT=${2:-$HERE/build/libemu.so}
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d)
cp "$SRC"/*.cuh "$SRC"/*.h "$WORK"/
python3 "$HERE/make_host_copy.py" "$SRC/scan_kernels.cuh" "$WORK/scan_kernels.cuh"
g++ -std=c++20 -O2 -g -shared -fPIC -I "$HERE/fake" -I "$WORK" "$HERE/emu.cpp" -o "$OUT" -lpthread
rc=$?
rm -rf "$WORK"
exit $rc

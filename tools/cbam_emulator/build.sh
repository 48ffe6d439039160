#!/bin/sh
# Builds the CBAM small-path emulator: csrc/cuda/cbam_small.cu's kernels (and the headers they use) as host
# C++ against the fakes in fake/, driven by emu.cpp.
#   sh tools/cbam_emulator/build.sh [csrc/cuda folder] [output .so]
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${1:-$HERE/../../csrc/cuda}
OUT=${2:-$HERE/build/libcbamemu.so}
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d)
python3 "$HERE/make_host_copy.py" "$SRC" "$WORK" || exit 1
g++ -std=c++20 -O2 -g -shared -fPIC -Wno-unknown-pragmas -I "$HERE/fake" -I "$WORK" "$HERE/emu.cpp" -o "$OUT" -lpthread
rc=$?
rm -rf "$WORK"
exit $rc

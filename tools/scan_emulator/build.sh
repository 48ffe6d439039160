#!/bin/sh
# Builds the emulator library: csrc/cuda's kernel headers as host C++ (scan_kernels.cuh through
# make_host_copy.py: launchers cut, dynamic shared memory as a pointer; scan_flat_kernels.cuh through
# make_host_copy.py --launchers: its launchers kept, their <<<>>> launches run on emulated grids) against the
# fakes in fake/. -fno-strict-aliasing: the kernels reinterpret 16-byte loads as fp16 / bf16 pairs, as CUDA allows.
# -fsanitize=alignment (fatal): a float2 / float4 / uint4 access off its CUDA alignment (fake/cuda_runtime.h), in
# shared or global memory, stops the run as the misaligned access faults on the GPU.
#   [EMU_CXXFLAGS=-DEMU_FLAT_ONLY] sh tools/scan_emulator/build.sh [csrc/cuda folder] [output .so]
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=${1:-$HERE/../../csrc/cuda}
OUT=${2:-$HERE/build/libemu.so}
mkdir -p "$(dirname "$OUT")"
WORK=$(mktemp -d)
cp "$SRC"/*.cuh "$SRC"/*.h "$WORK"/
python3 "$HERE/make_host_copy.py" "$SRC/scan_kernels.cuh" "$WORK/scan_kernels.cuh" &&
python3 "$HERE/make_host_copy.py" --launchers "$SRC/scan_flat_kernels.cuh" "$WORK/scan_flat_kernels.cuh" &&
g++ -std=c++20 -O2 -g -fno-strict-aliasing -fsanitize=alignment -fno-sanitize-recover=alignment $EMU_CXXFLAGS -shared -fPIC -I "$HERE/fake" -I "$WORK" "$HERE/emu.cpp" -o "$OUT" -lpthread
rc=$?
rm -rf "$WORK"
exit $rc

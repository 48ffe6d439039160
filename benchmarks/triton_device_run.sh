#!/bin/bash
# One GPU-machine call for the Triton scans: compile the kernels in parallel (fills Triton's disk cache),
# run the GPU tests, then the benchmark. Logs go to $OUT.
# Usage: bash benchmarks/triton_device_run.sh [pytest -k expression] [extra benchmark arguments...]
# BUILD_EXT=1 builds dermomamba_kernels._C in place first (for the CUDA-backend comparison).
set -o pipefail
export PATH="$(dirname "$(python3 -c 'import sys;print(sys.executable)')"):$PATH"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
if [ -n "$BUILD_EXT" ]; then
  start=$(date +%s)
  MAX_JOBS=16 DERMOMAMBA_CUDA_ARCHS=9.0 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1
  echo "build rc $? in $(( $(date +%s) - start )) s"; tail -2 $OUT/build.log
fi
start=$(date +%s)
for i in 0 1 2 3 4 5 6 7; do python3 benchmarks/bench_triton_scan.py --compile-only --shapes $i > $OUT/compile_$i.log 2>&1 & done
wait
echo "parallel compile: $(( $(date +%s) - start )) s"; grep -il error $OUT/compile_*.log
start=$(date +%s)
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -x tests/test_selective_scan_triton.py -m gpu -p no:cacheprovider \
  -k "${1:-not first_stage}" --durations=5 2>&1 | tee $OUT/tests.log | grep -v Warning | tail -14
echo "tests: $(( $(date +%s) - start )) s"
shift
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_triton_scan.py --json $OUT/bench.json "$@" 2>&1 | tee $OUT/bench.log | tail -14
echo "bench: $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# One GPU-machine call that verifies a tree before an issue is resolved: build the extension, run
# the WHOLE test suite (GPU tests included, several workers), then the quick model benchmark.
# Logs land in $OUT. Usage (device tool): run(command="DERMOMAMBA_COMMIT=<sha> bash benchmarks/gpu_verify.sh")
# (the device copy has no .git: the benchmarks stamp their tables with DERMOMAMBA_COMMIT).
#   TEST_ARGS  extra pytest arguments (e.g. -k to narrow)      TEST_TIMEOUT  seconds, default 330
#   BENCH=0    skip the model benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PATH="$(dirname "$(python3 -c 'import sys;print(sys.executable)')"):$PATH"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
stamp() { echo "[gpu_verify $(date -u +%H:%M:%S)] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.log"

# The image's default compiler (/opt/gcc) builds an extension whose C++ exceptions (every
# TORCH_CHECK) crash the process; the system g++ does not (seen 2026-11-27).
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared" CUDAHOSTCXX=/usr/bin/g++
fi
stamp "build"
if ! (time MAX_JOBS=16 DERMOMAMBA_CUDA_ARCHS=9.0 python3 setup.py build_ext --inplace) > "$OUT/build.log" 2>&1; then
  stamp "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1
fi
tail -3 "$OUT/build.log"
python3 -c "import dermomamba_kernels as d; print('extension', d.extension_loaded(), 'cuda', d.compiled_with_cuda())"

stamp "tests"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
timeout "${TEST_TIMEOUT:-330}" python3 -m pytest tests -q -rfE $workers -p no:cacheprovider --durations=15 \
  ${TEST_ARGS:-} > "$OUT/tests.log" 2>&1
echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
tail -25 "$OUT/tests.log"

if [ "${BENCH:-1}" = "1" ]; then
  stamp "model benchmark"
  timeout 120 python3 -m dermomamba.cli benchmark > "$OUT/model_bench.log" 2>&1
  echo "benchmark rc=$?"; tail -30 "$OUT/model_bench.log"
fi
stamp "done"

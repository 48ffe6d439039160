#!/usr/bin/env bash
# One GPU-machine call that verifies a tree before an issue is resolved: build the extension, run
# the WHOLE test suite (GPU tests included, several workers), then the quick model benchmark.
# Logs land in $OUT. Usage (device tool): run(command="DERMOMAMBA_COMMIT=<sha> bash benchmarks/gpu_verify.sh")
# (the device copy has no .git: the benchmarks stamp their tables with DERMOMAMBA_COMMIT).
#   TEST_ARGS  extra pytest arguments (e.g. -k to narrow)      TEST_TIMEOUT  seconds, default 330
#   BENCH=0    skip the model benchmark
#   BENCH_MODEL=1  also run benchmarks/bench_model.py (issue 9: ours vs the published code path; carry
#                  .bench-deps/mamba_ssm-2.3.2.post1 and .bench-deps/prebuilt so that mamba-ssm imports)
#   BENCH_MODEL_ARGS  extra bench_model.py arguments      BENCH_MODEL_TIMEOUT  seconds, default 420
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
if [ "${BENCH_MODEL:-0}" = "1" ]; then
  stamp "whole-network benchmark, ours vs published (bench_model.py)"
  PREBUILT=.bench-deps/prebuilt
  # mamba-ssm's selective_scan_cuda travels gzipped in parts (see benchmarks/gpu_scan.sh, which builds it)
  if ls "$PREBUILT"/selective_scan_cuda*.so.gz.part* >/dev/null 2>&1 && ! ls "$PREBUILT"/selective_scan_cuda*.so >/dev/null 2>&1; then
    so_name=$(basename "$(ls "$PREBUILT"/selective_scan_cuda*.so.gz.part* | head -1)" | sed 's/\.gz\.part.*//')
    cat "$PREBUILT/$so_name".gz.part* | gunzip > "$PREBUILT/$so_name"
  fi
  python3 -c "import sys; sys.path[:0] = ['benchmarks']; import common; print('mamba-ssm:', common.import_mamba_ssm()[1] or 'imports')"
  timeout "${BENCH_MODEL_TIMEOUT:-420}" python3 benchmarks/bench_model.py --json "$OUT/bench_model.json" \
    --markdown "$OUT/bench_model.md" --plot "$OUT/bench_model.png" ${BENCH_MODEL_ARGS:-} > "$OUT/bench_model.log" 2>&1
  echo "bench_model rc=$?"; tail -40 "$OUT/bench_model.log"
fi
stamp "done"

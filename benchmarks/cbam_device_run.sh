#!/bin/bash
# One GPU-machine call for the fused CBAM: fill the Triton / inductor caches in parallel processes,
# run the GPU tests, then the benchmark. Logs go to $OUT. Usage: bash benchmarks/cbam_device_run.sh
set -o pipefail
export PATH="$(dirname "$(python3 -c 'import sys;print(sys.executable)')"):$PATH"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
start=$(date +%s)
for i in 0 1 2 3 4; do
  for d in float32 float16; do python3 benchmarks/bench_cbam.py --warm-only --shapes $i --dtypes $d > /tmp/warm_${i}_$d.log 2>&1 & done
  python3 benchmarks/bench_cbam.py --warm-only --no-compiled --shapes $i --dtypes bfloat16 > /tmp/warm_${i}_bf16.log 2>&1 &
done
wait
echo "parallel warm-up: $(( $(date +%s) - start )) s"; grep -h -B2 -A12 Traceback /tmp/warm_*.log | tee $OUT/warm_errors.log | head -60
start=$(date +%s)
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q tests/test_cbam.py -m gpu -p no:cacheprovider --durations=6 \
  ${PYTEST_ARGS} 2>&1 | tee $OUT/tests.log | tail -40
echo "tests: $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_cbam.py --json $OUT/bench.json --profile --graphs ${BENCH_ARGS} 2>&1 | tee $OUT/bench.log | tail -32
echo "bench: $(( $(date +%s) - start )) s"

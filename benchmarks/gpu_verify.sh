#!/usr/bin/env bash
# The one GPU-machine call that verifies a tree before issues are resolved: build the extension (and
# mamba-ssm's scan, the baseline, in the background), run the WHOLE test suite (GPU tests included,
# several workers), then the benchmarks asked for. Logs land in $OUT.
#
# Usage (device tool), carrying the mamba-ssm sources and any prebuilt .so parts:
#   run(command="DERMOMAMBA_COMMIT=<sha> STEPS='build tests cbam model' bash benchmarks/gpu_verify.sh",
#       carry=[".bench-deps/mamba_ssm-2.3.2.post1", ".bench-deps/prebuilt"])
# (the device copy has no .git: the benchmarks stamp their tables with DERMOMAMBA_COMMIT).
# STEPS (default "build tests quick"), any of:
#   build    our extension (sm_90) + mamba-ssm's selective_scan_cuda in the background when a later step needs it
#   tests    pytest ${TEST_PATHS:-tests} -k "$TEST_SELECT" (TEST_ARGS extra arguments, TEST_TIMEOUT seconds,
#            default 330, TEST_WORKERS pytest-xdist workers, default 8); the mamba-ssm
#            parity file runs in its own step when "parity" is asked for
#   parity   tests/test_mamba_ssm_parity.py with DERMOMAMBA_REQUIRE_MAMBA_SSM=1 (issue 8: fails, not skips,
#            when mamba-ssm does not import)
#   quick    `dermomamba benchmark` (the model's own quick benchmark)
#   cbam     benchmarks/bench_cbam.py with CUDA graphs and the per-kernel profile (issue 5)
#   layers   benchmarks/bench_layers.py, drop-in layers vs mamba-ssm (issue 8)
#   model    benchmarks/bench_model.py, whole network vs the published path (issue 9; BENCH_MODEL_ARGS; MODEL_ENV:
#            VAR=value pairs for its process only, e.g. the opt-in kernels' variables)
#   scan     benchmarks/bench_scan.py and bench_triton_scan.py (issues 3 and 4)
#   scanv3   benchmarks/bench_scan_v3.py: the scan forward kernels vs mamba-ssm (SCANV3_ARGS)
#   ncu      Nsight Compute on each scan kernel form at 192x256 (benchmarks/ncu_scan_case.py; $OUT/ncu.log)
#   sanitize compute-sanitizer memcheck and racecheck on benchmarks/sanitize_cases.py (every CUDA kernel, small)
#   layernorm benchmarks/bench_small_layernorm.py: Triton LayerNorm for few channels vs PyTorch's native (issue 9)
#   profile  benchmarks/profile_step.py: where our training step's GPU time goes (PROFILE_ARGS)
#   profileinf the same for the eval-mode forward, with the graph-recorded kernels (PROFILEINF_ARGS)
#   ratios   benchmarks/compiled_error_ratios.py: reduce-overhead gradients' error against eager's, many draws
#   policies benchmarks/bench_step_policies.py: the step under each memory policy / opt-in kernel (POLICIES_ARGS)
#   dwconv, batchnorm, gatednorm, stagedbwd: bench_depthwise_conv.py, bench_batch_norm.py,
#            bench_gated_layer_norm.py, bench_staged_bwd_variants.py (<STEP>_ARGS)
#   stress   benchmarks/stress_replays.py: repeated staged forwards (chunk_states bit-identical) and compiled
#            CUDA-graph steps against eager (intermittent faults); runs after the tests, on their GPU
#   epoch    benchmarks/bench_epoch.py on every visible GPU count up to 2 (issue 7; EPOCH_ARGS)
#   ddp      the two-GPU torchrun train + resume test of tests/test_cli.py (issue 7; needs two GPUs)
# Each benchmark step has its own timeout (<STEP>_TIMEOUT, seconds).
# The steps that need every GPU ("epoch", "ddp") run first, right after the build.
# TESTS_ON_GPU=<index> (a machine with two GPUs): then "tests" and "parity" run in the background on that
# GPU while the benchmarks run on GPU 0.
# Failures are written to $OUT/failures.log the moment they happen, and pytest runs verbose (one line per
# test as it finishes): a run cut short by the limit never prints pytest's summary. $OUT returns at most
# 8 files: wrap the call as `...; cd $OUT && tar czf logs.tgz --exclude=logs.tgz . && find . -type f ! -name
# logs.tgz -delete`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
STEPS=${STEPS:-"build tests quick"}
export PATH="$(dirname "$(python3 -c 'import sys;print(sys.executable)')"):$PATH"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# One architecture keeps the build short; exported so that tests/test_build.py expects what was built.
export DERMOMAMBA_CUDA_ARCHS=${DERMOMAMBA_CUDA_ARCHS:-9.0}
has() { [[ " $STEPS " == *" $1 "* ]]; }
stamp() { echo "[gpu_verify $(date -u +%H:%M:%S)] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.log"

mamba_pid=
if has build && { has tests || has parity || has layers || has model || has scan || has scanv3; }; then
  bash benchmarks/build_mamba_ssm.sh "$OUT/mamba_build.log" &
  mamba_pid=$!
fi
if has build; then
  # The image's default compiler (/opt/gcc) builds an extension whose C++ exceptions (every
  # TORCH_CHECK) crash the process; the system g++ does not (seen 2026-11-27).
  if [ -x /usr/bin/g++ ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared" CUDAHOSTCXX=/usr/bin/g++
  fi
  stamp "build"
  if ! (time MAX_JOBS=16 python3 setup.py build_ext --inplace) > "$OUT/build.log" 2>&1; then
    stamp "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1
  fi
  tail -3 "$OUT/build.log"
fi
python3 -c "import dermomamba_kernels as d; print('extension', d.extension_loaded(), 'cuda', d.compiled_with_cuda())"
wait_for_mamba() {
  if [ -n "$mamba_pid" ]; then
    stamp "waiting for mamba-ssm"; wait "$mamba_pid"; mamba_pid=; tail -2 "$OUT/mamba_build.log"
    python3 -c "import sys; sys.path[:0] = ['benchmarks']; import common; print('mamba-ssm:', common.import_mamba_ssm()[1] or 'imports')"
  fi
}
# A carried .so is ready at once: the mamba-ssm parity tests can use it. A fresh build (~144 s) runs
# beside the tests instead, which then skip those parity tests.
ls .bench-deps/prebuilt/selective_scan_cuda* >/dev/null 2>&1 && wait_for_mamba

bench() {  # bench <step> <default timeout> <command...>
  local step=$1 limit=$2; shift 2
  local var; var="$(echo "$step" | tr a-z A-Z)_TIMEOUT"
  stamp "benchmark: $step"
  timeout "${!var:-$limit}" "$@" > "$OUT/bench_$step.log" 2>&1
  echo "$step rc=$?"; tail -40 "$OUT/bench_$step.log"
}
# The steps that use every GPU run first, while no test or benchmark holds one of them.
if has epoch; then
  gpus=$(python3 -c "import torch; print(' '.join(str(n) for n in range(1, min(torch.cuda.device_count(), 2) + 1)))")
  bench epoch 480 python3 benchmarks/bench_epoch.py --gpus $gpus --markdown "$OUT/bench_epoch.md" ${EPOCH_ARGS:-}
fi
if has ddp; then
  stamp "two-GPU torchrun test"
  DERMOMAMBA_FAILURE_LOG="$OUT/failures.log" timeout "${DDP_TIMEOUT:-240}" python3 -m pytest tests/test_cli.py -q -rfEs \
    -p no:cacheprovider -k two_gpu > "$OUT/ddp.log" 2>&1
  echo "ddp rc=$?"; tail -5 "$OUT/ddp.log"
fi

# MODEL_ALONE=1: the whole-network benchmark runs right after the build, before any test or other
# benchmark starts, so that nothing else loads the host (its eager columns are host-bound).
model_bench() {
  bench model 420 env ${MODEL_ENV:-} python3 benchmarks/bench_model.py --json "$OUT/bench_model.json" \
    --markdown "$OUT/bench_model.md" --plot "$OUT/bench_model.png" ${BENCH_MODEL_ARGS:-}
}
if has model && [ -n "${MODEL_ALONE:-}" ]; then
  wait_for_mamba
  model_bench
fi
# POLICIES_ALONE=1: likewise the step-policy benchmark (its eager column is host-bound too).
policies_bench() { bench policies 300 python3 benchmarks/bench_step_policies.py ${POLICIES_ARGS:-}; }
has policies && [ -n "${POLICIES_ALONE:-}" ] && policies_bench

run_tests() {
  if has tests; then
    stamp "tests"
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}" || echo "")
    skip_parity=$(has parity && echo "--ignore=tests/test_mamba_ssm_parity.py" || echo "")
    DERMOMAMBA_FAILURE_LOG="$OUT/failures.log" timeout "${TEST_TIMEOUT:-330}" python3 -m pytest ${TEST_PATHS:-tests} \
      -v -rfE $workers -p no:cacheprovider --durations=25 $skip_parity -k "${TEST_SELECT:-}" ${TEST_ARGS:-} \
      > "$OUT/tests.log" 2>&1
    echo "pytest rc=$?"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
    grep -E "^===== " "$OUT/failures.log" 2>/dev/null | head -40
    tail -25 "$OUT/tests.log"
  fi
  wait_for_mamba
  if has parity; then
    stamp "parity with mamba-ssm"
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
    DERMOMAMBA_FAILURE_LOG="$OUT/failures.log" DERMOMAMBA_REQUIRE_MAMBA_SSM=1 timeout "${PARITY_TIMEOUT:-420}" \
      python3 -m pytest tests/test_mamba_ssm_parity.py -q -rfEs $workers -p no:cacheprovider > "$OUT/parity.log" 2>&1
    echo "parity rc=$?"; grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/parity.log" | head -30; tail -3 "$OUT/parity.log"
  fi
  if has stress; then
    stamp "stress"
    for what in scan compiled; do
      timeout "${STRESS_TIMEOUT:-150}" python3 benchmarks/stress_replays.py --what $what \
        --repeats "$([ $what = scan ] && echo 200 || echo 40)" > "$OUT/stress_$what.log" 2>&1
      echo "stress $what rc=$?"; tail -8 "$OUT/stress_$what.log"
    done
  fi
}
tests_pid=
if [ -n "${TESTS_ON_GPU:-}" ] && { has tests || has parity || has stress; }; then
  (export CUDA_VISIBLE_DEVICES=$TESTS_ON_GPU; run_tests > "$OUT/tests_summary.log" 2>&1) &
  tests_pid=$!
  export CUDA_VISIBLE_DEVICES=0
else
  run_tests
fi
wait_for_tests() {
  if [ -n "$tests_pid" ]; then
    stamp "waiting for the tests on GPU $TESTS_ON_GPU"; wait "$tests_pid"; tests_pid=; cat "$OUT/tests_summary.log"
    unset CUDA_VISIBLE_DEVICES
  fi
}

wait_for_mamba
if has ncu; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  # NCU_KERNELS / NCU_LAUNCHES narrow the profile (e.g. to the staged kernel alone) to save device time.
  bench ncu 200 "$NCU" --kernel-name regex:"${NCU_KERNELS:-scan_(lane_)?(fwd|bwd)_(main|split_aggregate)|scan_staged_(fwd|bwd)}" \
    --launch-count "${NCU_LAUNCHES:-14}" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    python3 benchmarks/ncu_scan_case.py
fi
has layernorm && bench layernorm 150 python3 benchmarks/bench_small_layernorm.py
has policies && [ -z "${POLICIES_ALONE:-}" ] && policies_bench
has dwconv && bench dwconv 200 python3 benchmarks/bench_depthwise_conv.py ${DWCONV_ARGS:-}
has batchnorm && bench batchnorm 200 python3 benchmarks/bench_batch_norm.py ${BATCHNORM_ARGS:-}
has gatednorm && bench gatednorm 150 python3 benchmarks/bench_gated_layer_norm.py ${GATEDNORM_ARGS:-}
has stagedbwd && bench stagedbwd 300 python3 benchmarks/bench_staged_bwd_variants.py ${STAGEDBWD_ARGS:-}
has profile && bench profile 150 python3 benchmarks/profile_step.py ${PROFILE_ARGS:---batches 16 --precision fp16}
has profileinf && bench profileinf 120 python3 benchmarks/profile_step.py --inference --graph-kernels \
  ${PROFILEINF_ARGS:---batches 64 --precision fp16}
has ratios && bench ratios 240 python3 benchmarks/compiled_error_ratios.py ${RATIOS_ARGS:-}
has quick && bench quick 120 python3 -m dermomamba.cli benchmark
has layers && bench layers 420 python3 benchmarks/bench_layers.py --baseline mamba --json "$OUT/bench_layers.json" \
  --markdown "$OUT/bench_layers.md" ${BENCH_LAYERS_ARGS:-}
has model && [ -z "${MODEL_ALONE:-}" ] && model_bench
has scan && bench scan 240 bash -c "python3 benchmarks/bench_scan.py && python3 benchmarks/bench_triton_scan.py"
has scanv3 && bench scanv3 400 python3 benchmarks/bench_scan_v3.py --out "$OUT" ${SCANV3_ARGS:-}
if has sanitize; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  # --kernel-name limits the (slow) checking to our kernels; torch's own still run, unchecked.
  # SANITIZE_FILTER narrows it further (a substring of the kernel names, e.g. scan_staged).
  bench sanitize 240 bash -c "for tool in memcheck racecheck; do echo \"== \$tool\"; \
    '$SAN' --tool \$tool --kernel-name kns=${SANITIZE_FILTER:-dermomamba} --error-exitcode 9 --print-limit 20 \
    python3 benchmarks/sanitize_cases.py; echo \"\$tool rc=\$?\"; done"
fi
has cbam && bench cbam 240 python3 benchmarks/bench_cbam.py --json "$OUT/bench_cbam.json" --profile --graphs ${CBAM_ARGS:-}
wait_for_tests
stamp "done"

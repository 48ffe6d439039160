#!/usr/bin/env bash
# Prepares .bench-deps/ (git-ignored) on the development machine: mamba-ssm 2.3.2.post1's source
# package, unpacked, with its package __init__ reduced to the version (the original imports every model
# and kernel family; the benchmarks need only mamba_ssm.ops.selective_scan_interface and
# mamba_ssm.modules.mamba_simple). The GPU machine then builds its selective_scan_cuda
# (benchmarks/build_mamba_ssm.sh, called by gpu_verify.sh); carry
# [".bench-deps/mamba_ssm-2.3.2.post1", ".bench-deps/prebuilt"]. See shared/tools/mamba-ssm-on-device.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=2.3.2.post1
DEPS=.bench-deps
mkdir -p "$DEPS/sdist" "$DEPS/prebuilt"
if [ ! -f "$DEPS/sdist/mamba_ssm-$VERSION.tar.gz" ]; then
  # Its setup.py imports torch; MAMBA_SKIP_CUDA_BUILD keeps pip from compiling anything while it downloads.
  MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip download --no-deps --no-build-isolation --no-binary :all: \
    "mamba-ssm==$VERSION" -d "$DEPS/sdist"
fi
if [ ! -d "$DEPS/mamba_ssm-$VERSION" ]; then
  tar xzf "$DEPS/sdist/mamba_ssm-$VERSION.tar.gz" -C "$DEPS"
fi
echo "__version__ = \"$VERSION\"" > "$DEPS/mamba_ssm-$VERSION/mamba_ssm/__init__.py"
echo "ready: $DEPS/mamba_ssm-$VERSION (prebuilt .so parts, if any, in $DEPS/prebuilt)"

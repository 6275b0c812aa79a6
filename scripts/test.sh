#!/usr/bin/env bash
# The test command of the README: every test of the workspace on a machine with only the Rust
# toolchain and Python with pip. It installs what the tests need that cargo does not (NVRTC
# 13.0 and the CUDA headers, from PyPI wheels, so every kernel is compiled even without a GPU),
# then runs cargo's tests, then the Python package's (scripts/py-test.sh: maturin, NumPy and
# pytest from PyPI; SYMMCOMM_SKIP_PYTHON=1 skips them). GPU tests skip with a message when no
# GPU is present (SYMMCOMM_REQUIRE_GPU=1 makes them fail instead). Arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/nvrtc-env.sh
source scripts/nvrtc-env.sh
export SYMMCOMM_REQUIRE_NVRTC="${SYMMCOMM_REQUIRE_NVRTC:-1}"
export SYMMCOMM_KERNEL_CACHE="${SYMMCOMM_KERNEL_CACHE:-$PWD/.ci-cache/kernels}"
export NCCL_NVLS_ENABLE=0
cargo test --workspace --locked "$@"
if [ "${SYMMCOMM_SKIP_PYTHON:-0}" != 1 ]; then
    ./scripts/py-test.sh
fi

#!/usr/bin/env bash
# The wheel the GPU machine installs (it has Python 3.12 and torch, but no Rust and no network):
# symmcomm built with maturin in release, stripped, abi3 (CPython >= 3.9), into .whl/
# (git-ignored). Carry .whl to the GPU machine and install it there without network:
#
#     python -m pip install --no-index --no-deps --target /tmp/symmcomm-py .whl/symmcomm-*.whl
#     PYTHONPATH=/tmp/symmcomm-py python -m pytest python/tests -x -q
#
# (or unzip the wheel onto PYTHONPATH: it is a zip of the package). Prints the wheel's path
# and size.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/py-env.sh
source scripts/py-env.sh
mkdir -p .whl
rm -f .whl/symmcomm-*.whl
(cd python && maturin build --release --strip --compatibility linux --out ../.whl)
ls -l .whl/symmcomm-*.whl

#!/usr/bin/env bash
# Builds, on a machine with the Rust toolchain, everything scripts/gpu-run.sh runs on the GPU
# machine: the release `symmcomm` binary and the GPU test executables, stripped, into .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/tests
cargo build --release --locked --bin symmcomm
cp target/release/symmcomm .gpu/
for t in $(cargo test --release --locked -p symmcomm --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"] in ("collectives","pdl_hazard","nvrtc_kernels"):
        print(m["executable"])'); do
  cp "$t" ".gpu/tests/$(basename "$t" | sed 's/-[0-9a-f]*$//')"
done
strip .gpu/symmcomm .gpu/tests/* 2>/dev/null || true
du -sh .gpu

#!/usr/bin/env bash
# Builds, on a machine with the Rust toolchain, everything scripts/gpu-run.sh runs on the GPU
# machine: the release `symmcomm` and `tp-decode` (examples/tp-decode) binaries, the GPU test
# executables (stripped) and the run script,
# into $GPU_DIR (default .gpu/; a path outside this checkout works too, e.g. another worktree's).
# GPU_TESTS names the test targets to take (space-separated; symmcomm's, and tp-decode's
# gpu_model: the CUDA model against the CPU model).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${GPU_DIR:-.gpu}"
GPU_TESTS="${GPU_TESTS:-collectives pdl_hazard nvrtc_kernels dp_attention dcp rank_failure resources environment hosts rmsnorm embedding bootstrap_processes gpu_model}"
rm -rf "$DEST" && mkdir -p "$DEST/tests"
cargo build --release --locked --bin symmcomm --bin tp-decode
cp target/release/symmcomm target/release/tp-decode "$DEST/"
cp scripts/gpu-run.sh "$DEST/run.sh"
for t in $(cargo test --release --locked -p symmcomm -p tp-decode --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"] in sys.argv[1].split():
        print(m["executable"])' "$GPU_TESTS"); do
  cp "$t" "$DEST/tests/$(basename "$t" | sed 's/-[0-9a-f]*$//')"
done
strip "$DEST/symmcomm" "$DEST/tp-decode" "$DEST"/tests/* 2>/dev/null || true
du -sh "$DEST"

#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): the GPU tests with SYMMCOMM_REQUIRE_GPU=1, then
# `symmcomm tune` and `symmcomm bench`, decode-sim and the tp-decode example, with a timeout on
# every step and unbuffered logs
# (every line of a launched rank is prefixed with its rank). Binaries come prebuilt in $BIN
# (default .gpu/; scripts/gpu-build.sh, which also copies this script there as run.sh, so
# `bash .gpu-x/run.sh` runs .gpu-x's binaries). Results and logs go to $OUT.
#
# Every step at once takes about 9 minutes on 2 x H200 (tests ~4 with 200 resource cycles, soak
# ~2.2, tune + bench + decode-sim ~2.5; on 4 x H200 tests + check took 3.5 and tune + bench +
# decode-sim 3): more than one device call may run. Split it, most valuable first, into the same
# $OUT (summary.txt is appended to), e.g.
#   STEPS=tune,bench,decode-sim bash .gpu/run.sh; then STEPS=info,tests,check,soak bash .gpu/run.sh
# STEPS=hosts runs check, decode-sim and the all-reduce bench on the GPUs as 2 simulated hosts
# (an even number of GPUs); the `hosts` test executable (tests step) has the GPU tests of groups
# across hosts: TEST_FILTER=cuda_ narrows a run of it to them.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/.."
OUT="${OUT:-/tmp/symmcomm-out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0            # never NVLink multicast on this machine
export SYMMCOMM_REQUIRE_GPU=1
export SYMMCOMM_KERNEL_CACHE="${SYMMCOMM_KERNEL_CACHE:-/tmp/symmcomm-kernels}"
export RUST_BACKTRACE=1
# Create-and-drop cycles of the resources test: 0.16 s each on 2xH200 since the teardown
# threads (commit e318e3e; 0.65 s before), plus a tenth as many warm-up cycles: 1000 (the test's
# own default, RELIABILITY.md's row) take ~3 minutes, so give them a step of their own
# (SYMMCOMM_RESOURCE_CYCLES=1000 TEST_TIMEOUT=300); 200 keep the test step short.
export SYMMCOMM_RESOURCE_CYCLES="${SYMMCOMM_RESOURCE_CYCLES:-200}"
if [[ -x "$HERE/symmcomm" ]]; then BIN="${BIN:-$HERE}"; else BIN="${BIN:-.gpu}"; fi
# Results are named after the machine: h200x<GPUs this run sees> unless MACHINE says otherwise
# (e.g. MACHINE=h200x2 with CUDA_VISIBLE_DEVICES=0,1 on a 4-GPU machine). SYMMCOMM_MACHINE, if
# set, is written into the results' meta (which lent machine ran them).
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  gpus=$(awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES")
else
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
fi
[[ "${gpus:-0}" -gt 0 ]] || gpus=2
MACHINE="${MACHINE:-h200x${gpus}}"
STEPS="${STEPS:-info,tests,check,soak,tune,bench,ar-rmsnorm,decode-sim,tp-decode,python,torch-decode,torch-decode-fused,bench-nccl2289,hosts}"
# At most 8 files come back from the machine: logs are grouped.
# summary.txt (steps, info), tests.log, run.log (check, soak, tune), bench.log (bench,
# decode-sim, tp-decode, torch-decode), python.log, and the JSON results.
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
# cuBLAS for tp-decode and its GPU test: the CUDA toolkit's, else PyTorch's wheels'.
cublas=""
for d in /usr/local/cuda-13.0/targets/x86_64-linux/lib /usr/local/cuda/lib64 \
    /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib \
    /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cublas/lib; do
  if compgen -G "$d/libcublas.so*" > /dev/null; then cublas="$d"; break; fi
done
has() { [[ ",$STEPS," == *",$1,"* ]]; }

if has info; then
  log "info"
  { nvidia-smi topo -m; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv; timeout 60 "$BIN/symmcomm" info; } >> "$OUT/summary.txt" 2>&1
  log "info rc=$?"
fi

if has tests; then
  for t in "$BIN"/tests/*; do
    name=$(basename "$t")
    log "test $name"
    LD_LIBRARY_PATH="${cublas:+$cublas:}${LD_LIBRARY_PATH:-}" timeout "${TEST_TIMEOUT:-240}" \
      stdbuf -oL -eL "$t" --test-threads=1 ${TEST_FILTER:-} >> "$OUT/tests.log" 2>&1
    log "test $name rc=$?"
  done
  grep -E "^test result|FAILED|panicked" "$OUT/tests.log" | tee -a "$OUT/summary.txt"
fi

if has check; then
  # One process per GPU: the cross-process peer mapping of our kernels' memory, every op,
  # dtype, odd size and implementation against the reference.
  log "check"
  timeout "${CHECK_TIMEOUT:-120}" stdbuf -oL -eL "$BIN/symmcomm" check --timeout 30 > "$OUT/check.log.tmp" 2>&1
  log "check rc=$?"
  grep -E "cases run|FAILED" "$OUT/check.log.tmp" | head -20 | tee -a "$OUT/summary.txt"
  cat "$OUT/check.log.tmp" >> "$OUT/run.log"; rm -f "$OUT/check.log.tmp"
fi

if has soak; then
  # One graph of mixed collectives (our kernels, NCCL symmetric, NCCL regular) replayed
  # SOAK_REPLAYS times, one process per GPU, every output checked every 1000 replays.
  log "soak"
  timeout "${SOAK_TIMEOUT:-300}" stdbuf -oL -eL "$BIN/symmcomm" soak --timeout 30 --replays "${SOAK_REPLAYS:-1000000}" > "$OUT/soak.log.tmp" 2>&1
  log "soak rc=$?"
  grep -E "replays in|FAILURE|error" "$OUT/soak.log.tmp" | head -20 | tee -a "$OUT/summary.txt"
  cat "$OUT/soak.log.tmp" >> "$OUT/run.log"; rm -f "$OUT/soak.log.tmp"
fi

if has tune; then
  log "tune"
  # The collectives and the all-reduce + add + RMSNorm (its norm rows); TUNE_ARGS may narrow it.
  timeout "${TUNE_TIMEOUT:-330}" stdbuf -oL -eL "$BIN/symmcomm" tune --out "$OUT/dispatch-$MACHINE.json" \
    ${TUNE_ARGS:---ops all_gather,reduce_scatter,all_reduce,ar_rmsnorm} >> "$OUT/run.log" 2>&1
  log "tune rc=$?"
fi

if has bench; then
  table=()
  [[ -f "$OUT/dispatch-$MACHINE.json" ]] && table=(--table "$OUT/dispatch-$MACHINE.json")
  log "bench ${table[*]}"
  timeout "${BENCH_TIMEOUT:-300}" stdbuf -oL -eL "$BIN/symmcomm" bench "${table[@]}" --json "$OUT/$MACHINE.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  log "bench rc=$?"
  tail -60 "$OUT/bench.log"
fi

if has ar-rmsnorm; then
  # The fused all-reduce + residual add + RMSNorm against unfused and NCCL's path (graphs,
  # bf16, hidden 4096 and 7168, 1-64 tokens, every row checked), in a results file of its own.
  log "bench ar_rmsnorm"
  timeout "${BENCH_TIMEOUT:-300}" stdbuf -oL -eL "$BIN/symmcomm" bench --ops ar_rmsnorm --modes graph --no-limits --json "$OUT/$MACHINE-ar-rmsnorm.json" ${NORM_BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1
  log "bench ar_rmsnorm rc=$?"
  grep -A32 "^ar_rmsnorm " "$OUT/bench.log" | tail -33 | tee -a "$OUT/summary.txt"
fi

if has decode-sim; then
  # The collectives of one DeepSeek-V3 decode step per config, batch and implementation; its
  # decode_step rows replace those of $MACHINE.json (the bench rows stay).
  table=()
  [[ -f "$OUT/dispatch-$MACHINE.json" ]] && table=(--table "$OUT/dispatch-$MACHINE.json")
  log "decode-sim ${table[*]}"
  timeout "${DECODE_SIM_TIMEOUT:-300}" stdbuf -oL -eL "$BIN/symmcomm" decode-sim "${table[@]}" --json "$OUT/$MACHINE.json" ${DECODE_SIM_ARGS:-} >> "$OUT/bench.log" 2>&1
  log "decode-sim rc=$?"
  grep -A40 "communication of one decode step" "$OUT/bench.log" | tee -a "$OUT/summary.txt"
fi

if has tp-decode; then
  # The example engine (examples/tp-decode): one Llama-3.1-8B-shaped decode step per batch size
  # (cuBLAS GEMMs, NVRTC kernels, the two all-reduces of every layer) in one CUDA graph each,
  # auto and fused (all-reduce + add + RMSNorm in one call) against nccl, checked against the
  # unsharded model; first the tiny preset as a smoke
  # test (2 GPUs: its 2 KV heads split no further), then the real one on every GPU, whose
  # engine_step rows replace those of $MACHINE.json.
  table=()
  [[ -f "$OUT/dispatch-$MACHINE.json" ]] && table=(--table "$OUT/dispatch-$MACHINE.json")
  log "tp-decode (cuBLAS from ${cublas:-the default library path}) ${table[*]}"
  LD_LIBRARY_PATH="${cublas:+$cublas:}${LD_LIBRARY_PATH:-}" timeout "${TP_DECODE_TIMEOUT:-120}" \
    stdbuf -oL -eL "$BIN/tp-decode" --preset tiny --world $((gpus < 2 ? 1 : 2)) --batch 1,3 --replays 5 \
    "${table[@]}" >> "$OUT/bench.log" 2>&1
  log "tp-decode tiny rc=$?"
  LD_LIBRARY_PATH="${cublas:+$cublas:}${LD_LIBRARY_PATH:-}" timeout "${TP_DECODE_TIMEOUT:-300}" \
    stdbuf -oL -eL "$BIN/tp-decode" "${table[@]}" --json "$OUT/$MACHINE.json" ${TP_DECODE_ARGS:-} >> "$OUT/bench.log" 2>&1
  log "tp-decode rc=$?"
  grep -A16 "engine step (tp-decode)" "$OUT/bench.log" | tee -a "$OUT/summary.txt"
fi

# The Python package: the wheel scripts/py-build.sh put in .whl/ (carried over), unzipped onto
# PYTHONPATH (no network, no pip install there).
PYSITE=/tmp/symmcomm-py
if has python || has torch-decode || has torch-decode-fused; then
  whl=$(ls "$HERE"/../.whl/symmcomm-*.whl .whl/symmcomm-*.whl 2>/dev/null | head -1)
  rm -rf "$PYSITE" && mkdir -p "$PYSITE"
  if [[ -n "$whl" ]]; then python3 -m zipfile -e "$whl" "$PYSITE"; else log "no wheel in .whl/"; fi
fi

if has python; then
  # Every operation against torch's reference, eager and in torch.cuda.graph (1000 replays),
  # the MemPool scope, torch.compile; one process per GPU (two-process tests need 2 GPUs).
  log "python tests"
  PYTHONPATH="$PYSITE" timeout "${PY_TIMEOUT:-420}" python3 -m pytest python/tests -q -rs \
    ${PY_ARGS:-} > "$OUT/python.log" 2>&1
  log "python tests rc=$?"
  tail -25 "$OUT/python.log" | tee -a "$OUT/summary.txt"
fi

if has torch-decode; then
  # The PyTorch decode side by side: torch.distributed against symmcomm, same tokens, µs per
  # step; its torch_decode_step rows replace those of $MACHINE.json.
  log "torch-decode"
  PYTHONPATH="$PYSITE" SYMMCOMM_COMMIT="${SYMMCOMM_COMMIT:-unknown}" timeout "${TORCH_DECODE_TIMEOUT:-400}" \
    stdbuf -oL -eL python3 examples/torch_tp_decode.py --json "$OUT/$MACHINE.json" \
    --timeout "${TORCH_DECODE_TIMEOUT:-400}" ${TORCH_DECODE_ARGS:-} >> "$OUT/bench.log" 2>&1
  log "torch-decode rc=$?"
  grep -E "^batch|same tokens|wrote" "$OUT/bench.log" | tail -8 | tee -a "$OUT/summary.txt"
fi

if has torch-decode-fused; then
  # The same with symmcomm's all-reduce + add + RMSNorm in one call, fused against unfused
  # (tokens compared between those two), in a results file of its own.
  log "torch-decode --fused"
  PYTHONPATH="$PYSITE" SYMMCOMM_COMMIT="${SYMMCOMM_COMMIT:-unknown}" timeout "${TORCH_DECODE_TIMEOUT:-400}" \
    stdbuf -oL -eL python3 examples/torch_tp_decode.py --fused --json "$OUT/$MACHINE-torch-fused.json" \
    --timeout "${TORCH_DECODE_TIMEOUT:-400}" ${TORCH_DECODE_ARGS:-} >> "$OUT/bench.log" 2>&1
  log "torch-decode --fused rc=$?"
  grep -E "^batch|same tokens|wrote" "$OUT/bench.log" | tail -12 | tee -a "$OUT/summary.txt"
fi

if has bench-nccl2289; then
  # NCCL's own paths again with PyTorch's NCCL 2.28.9, the library the NCCL baselines in
  # BENCHMARKS.md ("Against the NCCL baselines") were measured with.
  lib=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2
  log "bench with $lib"
  SYMMCOMM_NCCL_LIBRARY=$lib timeout "${BENCH_TIMEOUT:-300}" stdbuf -oL -eL "$BIN/symmcomm" bench --impls nccl,nccl_symm --no-limits --json "$OUT/$MACHINE-nccl2.28.9.json" ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1
  log "bench with $lib rc=$?"
fi
if has hosts && [[ "$gpus" -ge 2 && $((gpus % 2)) -eq 0 ]]; then
  # Groups across hosts on one machine: the GPUs as 2 simulated hosts (SYMMCOMM_HOST_ID and
  # NCCL_HOSTID per rank, NCCL's sockets over loopback). check: every op and implementation
  # allowed across hosts, hierarchical included, our kernels refused; decode-sim: DP attention's
  # gathered buffer and the DCP combine on a world across hosts; tune: the table's rows for
  # groups across 2 hosts; bench (with that table): hierarchical against NCCL's own all-reduce
  # (what would let auto pick it), rows in $MACHINE-2hosts.json.
  sim=("$BIN/symmcomm" launch --nproc "$gpus" --simulate-hosts 2 --)
  log "hosts: check on $gpus GPUs as 2 hosts"
  timeout "${CHECK_TIMEOUT:-300}" stdbuf -oL -eL "${sim[@]}" "$BIN/symmcomm" check --timeout 60 > "$OUT/hosts.log.tmp" 2>&1
  log "hosts: check rc=$?"
  grep -E "world:|cases run|FAILED" "$OUT/hosts.log.tmp" | head -20 | tee -a "$OUT/summary.txt"
  log "hosts: decode-sim"
  timeout "${DECODE_SIM_TIMEOUT:-300}" stdbuf -oL -eL "${sim[@]}" "$BIN/symmcomm" decode-sim --timeout 60 --batch 1,32 >> "$OUT/hosts.log.tmp" 2>&1
  log "hosts: decode-sim rc=$?"
  # tune across the 2 hosts: rows for groups across 2 domains, NCCL's faster path per size or
  # the hierarchical all-reduce where it beats both by 3% (what keeps auto at or under the best
  # NCCL path there); the bench then runs with them.
  log "hosts: tune across 2 hosts"
  timeout "${TUNE_TIMEOUT:-330}" stdbuf -oL -eL "${sim[@]}" "$BIN/symmcomm" tune --timeout 60 \
    --ops all_gather,reduce_scatter,all_reduce --impls nccl,nccl_symm,hierarchical \
    --out "$OUT/dispatch-$MACHINE-2hosts.json" >> "$OUT/hosts.log.tmp" 2>&1
  log "hosts: tune rc=$?"
  table=()
  [[ -f "$OUT/dispatch-$MACHINE-2hosts.json" ]] && table=(--table "$OUT/dispatch-$MACHINE-2hosts.json")
  log "hosts: bench all_reduce, hierarchical against NCCL ${table[*]}"
  timeout "${BENCH_TIMEOUT:-300}" stdbuf -oL -eL "${sim[@]}" "$BIN/symmcomm" bench --timeout 60 --ops all_reduce \
    --impls nccl,nccl_symm,auto,hierarchical --no-limits "${table[@]}" --json "$OUT/$MACHINE-2hosts.json" >> "$OUT/hosts.log.tmp" 2>&1
  log "hosts: bench rc=$?"
  grep -A30 "^\[rank 0\] all_reduce  *size" "$OUT/hosts.log.tmp" | tee -a "$OUT/summary.txt"
  cat "$OUT/hosts.log.tmp" >> "$OUT/run.log"; rm -f "$OUT/hosts.log.tmp"
fi
cat "$OUT/summary.txt"

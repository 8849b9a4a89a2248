#!/usr/bin/env bash
# The one command for a GPU machine: every bench mode at HiDream-I1 size (1024 px, bf16), project vs the naive
# stock step, one JSON line per mode in the results file (default bench-results/<date>-<gpu>.jsonl).
#   scripts/gpu_bench.sh [results.jsonl] [extra bench args...]
# Needs ~70 GB of GPU memory for bf16_nogc (the reference's own peak); the other modes fit in 40 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))')"
out="${1:-bench-results/$(date -u +%Y-%m-%d)-${gpu}.jsonl}"
shift || true
mkdir -p "$(dirname "$out")"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# Main run: reference = stock LyCORIS in bypass mode (what this trainer used before the speed-ups).
"$PY" -m trainer_core bench --size full --device cuda --modes bf16_nogc,bf16_gc,sample_cfg,offload_gc,int8_gc \
    --out "$out" "$@"
# The issue's measured starting point used LyCORIS' default (rebuild) forward: one mode against it for the link.
"$PY" -m trainer_core bench --size full --device cuda --modes bf16_nogc --reference-lokr rebuild --out "$out" "$@"
# Optional (BENCH_COMPILE=1): regional torch.compile of the blocks, off by default until measured here.
if [ "${BENCH_COMPILE:-0}" = "1" ]; then
    "$PY" -m trainer_core bench --size full --device cuda --modes bf16_nogc,bf16_gc --compile-blocks --out "$out" "$@"
fi
echo "results: $out"

#!/usr/bin/env bash
# The one command for a GPU machine: every bench mode at HiDream-I1 size (1024 px, bf16), project vs the naive stock
# step (LyCORIS' default forward, as in the GPU starting point), one JSON line per mode in the results file
# (default benchmarks/<date>-<gpu>.jsonl).
#   scripts/gpu_bench.sh [results.jsonl] [extra bench args...]
# Needs ~70 GB of GPU memory for bf16_nogc (the reference's own peak); the other modes fit in 40 GB.
# BENCH_COMPILE=1 adds bf16_nogc with regional torch.compile of the blocks (a minute or two of compile time).
# BENCH_BYPASS=1 adds bf16_nogc against LyCORIS' bypass forward (a stricter reference than the stock default).
# BENCH_BUDGET_S=SECONDS shares a time budget across the runs below (bench --time-budget): past it nothing new
# starts, and every mode still writes its line. Leave the device lease a minute or two more than this.
# BENCH_SCALED=only runs just the 8-bit base modes (fp8-scaled / int8-scaled, about 5 minutes on one H100: for a
# session that measures issue 18 alone); BENCH_SCALED=0 leaves them out. fp8 needs sm89+ (H100/H200, RTX 40xx).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "_"))')"
out="${1:-benchmarks/$(date -u +%Y-%m-%d)-${gpu}.jsonl}"
shift || true
mkdir -p "$(dirname "$out")"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
ends_at=$(( $(date +%s) + ${BENCH_BUDGET_S:-0} ))
bench() {  # the bench command with what is left of BENCH_BUDGET_S, if one was given
    local budget=()
    if [ -n "${BENCH_BUDGET_S:-}" ]; then
        local left=$(( ends_at - $(date +%s) ))
        [ "$left" -gt 0 ] || { echo "time budget spent: skipped bench $*" >&2; return 0; }
        budget=(--time-budget "$left")
    fi
    "$PY" -m trainer_core bench --size full --device cuda "${budget[@]}" "$@"
}
# The 8-bit bases first (the least measured): fp8-scaled with and without checkpointing and streamed, the
# int8-scaled step beside quanto's, and the fp8 CFG sampling step; each against its stock reference, with the
# issue's accuracy bounds in the row's "check".
if [ "${BENCH_SCALED:-1}" != "0" ]; then
    bench --modes fp8_gc,fp8_offload_gc,sample_cfg_fp8,int8s_gc,fp8_nogc --out "$out" "$@"
fi
if [ "${BENCH_SCALED:-1}" = "only" ]; then
    echo "results: $out"
    exit 0
fi
# Every mode; --ablate adds the project step with each speed-up switched off in turn (what each one is worth) and
# the adapter-free stock step (the floor of adapter-side speed-ups) and off-by-default candidates switched on;
# --profile writes where each project step's time goes (JSON "profile" field, torch's table beside the results).
# Ordered by what is least measured, so a run cut short by a device time limit keeps the figures that matter most;
# about 10 minutes on one H100.
bench --ablate --profile "${out%.jsonl}-profile.txt" \
    --modes bf16_nogc,offload_gc,bf16_gc,int8_gc,sample_cfg --out "$out" "$@"
# The quickstart's optimizer (optimi-lion: Triton kernels on a GPU) on the quickstart's checkpointed step.
bench --modes bf16_gc --optimizer optimi-lion --out "$out" "$@"
if [ "${BENCH_COMPILE:-0}" = "1" ]; then
    bench --modes bf16_nogc --compile-blocks --out "$out" "$@"
fi
if [ "${BENCH_BYPASS:-0}" = "1" ]; then
    bench --modes bf16_nogc --reference-lokr bypass --out "$out" "$@"
fi
echo "results: $out"

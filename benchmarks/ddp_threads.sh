#!/bin/bash
# Time per optimizer step of examples/python/train_ddp.py (default model,
# global batch 32 sequences x 2 micro-batches) for ranks x libmasa threads x
# torch intra-op threads on this machine: what README's "Data-parallel
# training" says about threads when ranks share a machine. Not part of the
# test command (a few minutes; wall-clock figures want a quiet machine).
#
#   benchmarks/ddp_threads.sh [OUT]      default OUT: build/ddp_threads.md
#
# REPS (3) runs of STEPS (20) steps per configuration; the table gives the
# median ms/step. Environment: MASA_VENV (~/.cache/libmasa/venv).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/ddp_threads.md}
REPS=${REPS:-3}
STEPS=${STEPS:-20}
TORCHRUN=${MASA_VENV:-$HOME/.cache/libmasa/venv}/bin/torchrun
export MASA_LIBRARY=${MASA_LIBRARY:-$PWD/build/lib/libmasa.so}
cores=$(nproc)
configs=("1 1 1" "1 $cores 1" "1 1 $cores" "2 1 1" "2 $cores 1" "2 1 $cores")
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
{
    echo "train_ddp.py, $cores usable CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')),"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); median of $REPS runs of $STEPS steps"
    echo
    echo "| ranks | libmasa threads per rank | torch threads per rank | ms per step |"
    echo "|---:|---:|---:|---:|"
} > "$tmp"
for cfg in "${configs[@]}"; do
    read -r ranks masa torch <<< "$cfg"
    times=()
    for _ in $(seq "$REPS"); do
        line=$("$TORCHRUN" --standalone --nproc-per-node "$ranks" examples/python/train_ddp.py \
            --steps "$STEPS" --batch $((32 / ranks)) --accum 2 --threads "$masa" \
            --torch-threads "$torch" 2>/dev/null | tail -1)
        times+=("$(sed -n 's/.* \([0-9]*\) ms\/step$/\1/p' <<< "$line")")
    done
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(((REPS + 1) / 2))p")
    echo "| $ranks | $masa | $torch | $median |" | tee -a "$tmp"
done
mkdir -p "$(dirname "$OUT")"
mv "$tmp" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
trap - EXIT
echo "written: $OUT"

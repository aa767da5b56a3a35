#!/bin/bash
# `masa compress` on a synthetic large model: time and peak memory.
# Not part of the test command (it writes 8 GiB and runs for minutes).
#
#   benchmarks/compress_large.sh [WORKDIR]      default WORKDIR: build/large
#
# Environment: LAYERS (32), D_MODEL (4096), KV_DIM (D_MODEL),
# COMPRESS_ARGS ("--remove 0.5"), KEEP=1 keeps the files afterwards.
#
# 1. build/benchmarks/make_synthetic_model writes LAYERS layers of q, k, v, o
#    weights, float32 in nn.Linear layout: 32 x 4 x 4096^2 x 4 bytes = 8 GiB
#    of attention weights (plus as much again for its spool while writing).
# 2. build/programs/masa/masa compress COMPRESS_ARGS IN OUT runs while this
#    script samples /proc/PID/status every 50 ms.
# Peak memory "excluding the mapped input": the tool reads the weights in
# place from a read-only file mapping, whose resident pages are file-backed
# (RssFile): the kernel can drop them at any time and they are the input
# itself. Linux keeps no high-water mark of anonymous memory alone (VmHWM
# counts file pages too), so the script samples RssAnon (the process's
# private anonymous pages: heap, library scratch, outputs) and reports its
# largest sample; a spike shorter than 50 ms could be missed. VmHWM and the
# largest RssFile sample are reported beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${LAYERS:-32}
D_MODEL=${D_MODEL:-4096}
KV_DIM=${KV_DIM:-$D_MODEL}
COMPRESS_ARGS=${COMPRESS_ARGS:---remove 0.5}
WORK=${1:-build/large}
GEN=build/benchmarks/make_synthetic_model
MASA=build/programs/masa/masa
[ -x "$GEN" ] && [ -x "$MASA" ] || { echo "compress_large: run scripts/build.sh first" >&2; exit 1; }
mkdir -p "$WORK"
IN="$WORK/synthetic.safetensors"
OUT="$WORK/synthetic-masa.safetensors"
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -f "$IN" "$OUT" "$OUT.report.md"; }
trap cleanup EXIT

bytes=$(( LAYERS * (2 * D_MODEL * D_MODEL + 2 * KV_DIM * D_MODEL) * 4 ))
need_kb=$(( bytes / 1024 * 2 + 1048576 ))   # input and its spool, 1 GiB spare
free_kb=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
if [ "$free_kb" -lt "$need_kb" ]; then
    echo "compress_large: $WORK has $((free_kb / 1048576)) GiB free, needs $((need_kb / 1048576)) GiB" >&2
    exit 1
fi
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo "== compress_large: $LAYERS layers, d_model $D_MODEL, kv $KV_DIM: $((bytes / 1048576)) MiB of float32 weights"
echo "   CPU: $cpu, $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"

t0=$(date +%s.%N)
"$GEN" "$IN" "$LAYERS" "$D_MODEL" "$KV_DIM" 2>/dev/null
t1=$(date +%s.%N)
echo "   wrote $IN ($(du -m "$IN" | cut -f1) MiB) in $(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }") s"
sync
# Start from a cold page cache for the input, if allowed (root only).
echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true

t0=$(date +%s.%N)
# shellcheck disable=SC2086
"$MASA" compress $COMPRESS_ARGS --quiet "$IN" "$OUT" &
pid=$!
peak_anon=0 peak_file=0 hwm=0
while kill -0 "$pid" 2>/dev/null; do
    while IFS=: read -r key value; do
        v=${value//[!0-9]/}
        case $key in
            RssAnon) [ "${v:-0}" -gt "$peak_anon" ] && peak_anon=$v ;;
            RssFile) [ "${v:-0}" -gt "$peak_file" ] && peak_file=$v ;;
            VmHWM) [ "${v:-0}" -gt "$hwm" ] && hwm=$v ;;
        esac
    done < "/proc/$pid/status" 2>/dev/null || true
    sleep 0.05
done
rc=0
wait "$pid" || rc=$?
t1=$(date +%s.%N)
[ $rc -eq 0 ] || { echo "compress_large: masa compress failed (exit $rc)" >&2; exit 1; }
echo "   masa compress $COMPRESS_ARGS: $(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }") s wall"
echo "   peak RssAnon (sampled, excludes the mapped input): $((peak_anon / 1024)) MiB"
echo "   peak RssFile (sampled, the mapped input's resident pages): $((peak_file / 1024)) MiB"
echo "   VmHWM (anonymous + file, kernel's high-water mark): $((hwm / 1024)) MiB"
echo "   one projection type's weights: $(( LAYERS * D_MODEL * D_MODEL * 4 / 1048576 )) MiB; output $(du -m "$OUT" | cut -f1) MiB"
echo "   load after: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E '^\| (all|[qkvo] \| all)' "$OUT.report.md" | sed 's/^/   /'

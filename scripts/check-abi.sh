#!/bin/sh
# Compares the ABI of a built libmasa with the committed baseline
# abi/libmasa.abi (libabigail). Fails on any incompatible change (abidiff
# bit 8) and on any change other than added functions (bit 4 with removed or
# changed entries). To accept a deliberate, additive change:
#   scripts/update-abi.sh build/lib/libmasa.so && git add abi/libmasa.abi
# usage: check-abi.sh <libmasa.so> [source root]
set -u
lib=$1
root=${2:-$(cd "$(dirname "$0")/.." && pwd)}
report=$(abidiff --headers-dir2 "$root/include/masa" \
                 "$root/abi/libmasa.abi" "$lib")
rc=$?
echo "$report"
if [ $((rc & 3)) -ne 0 ]; then
    echo "check-abi: abidiff failed to compare (exit $rc)"; exit 1
fi
if [ $((rc & 8)) -ne 0 ]; then
    echo "check-abi: INCOMPATIBLE ABI change against abi/libmasa.abi"; exit 1
fi
if [ $((rc & 4)) -ne 0 ]; then
    if echo "$report" | grep -Eq '[1-9][0-9]* (Removed|Changed)'; then
        echo "check-abi: ABI changed (removed or changed entries)"; exit 1
    fi
    echo "check-abi: only additions; run scripts/update-abi.sh to record them"
fi
echo "check-abi: ABI compatible with the baseline"

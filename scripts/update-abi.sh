#!/bin/sh
# Records the ABI of a built libmasa as the new baseline (only for
# deliberate, additive changes; see scripts/check-abi.sh).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
lib=${1:-$root/build/lib/libmasa.so}
abidw --headers-dir "$root/include/masa" --out-file "$root/abi/libmasa.abi" "$lib"
echo "update-abi: wrote abi/libmasa.abi from $lib"

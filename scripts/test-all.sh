#!/bin/bash
# Runs every test: the C suites (Check, via meson test), the Python binding's
# pytest suite (numpy and PyTorch) and its venv suite (PyPI packages), the
# Rust crates' cargo tests, all against
# the library in ./build, the outside consumers (scripts/test-consumers.sh:
# C and cargo projects built against an installed copy through pkg-config),
# and the hardening checks (ASan+UBSan suite, TSan,
# valgrind, a bounded fuzz run; scripts/hardening.sh), then prints one total
# line. MASA_QUICK=1 skips the hardening checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
./scripts/build.sh

echo "== C tests (meson test)"
meson test -C build --print-errorlogs | tee "$LOGS/c.log"

echo "== Python tests (pytest)"
# Debian's interpreter: it has python3-numpy, python3-pytest and python3-torch
# from install-deps.sh.
MASA_LIBRARY="$ROOT/build/lib/libmasa.so" \
    /usr/bin/python3 -m pytest -q bindings/python/tests | tee "$LOGS/py.log"

echo "== Python wheel (pip builds bindings/python with meson-python, ~1 min)"
# Builds the wheel offline from the wheelhouse of install-deps.sh, installs
# it in a fresh venv and trains through masa.torch from outside the checkout
# with no MASA_LIBRARY: the bundled library must be the one loaded.
/usr/bin/python3 -m pytest -q bindings/python/tests_wheel | tee "$LOGS/wheel.log"

echo "== Python venv tests (pytest in the venv of install-deps.sh)"
# bindings/python/tests_venv needs PyPI packages (safetensors, torch 2.x,
# transformers, ...) that only the venv has; MASA_NO_VENV=1 skips it.
VENV=${MASA_VENV:-$HOME/.cache/libmasa/venv}
if [ "${MASA_NO_VENV:-0}" != 1 ]; then
    MASA_LIBRARY="$ROOT/build/lib/libmasa.so" HF_HUB_OFFLINE=1 \
        "$VENV/bin/python" -m pytest -q bindings/python/tests_venv | tee "$LOGS/venv.log"
else
    echo "skipped (MASA_NO_VENV=1)" | tee "$LOGS/venv.log"
fi

echo "== Rust tests (cargo test)"
PATH="$HOME/.cargo/bin:$PATH"
(cd bindings/rust && MASA_LIB_DIR="$ROOT/build/lib" cargo test --offline 2>&1) |
    tee "$LOGS/rust.log"

echo "== Outside consumers (installed library, pkg-config, scratch C and cargo projects)"
./scripts/test-consumers.sh 2>&1 | tee "$LOGS/consumers.log"

if [ "${MASA_QUICK:-0}" != 1 ]; then
    echo "== Hardening (sanitizers, valgrind, fuzzing)"
    ./scripts/hardening.sh
fi

c=$(awk '/^Ok:/{print $2}' "$LOGS/c.log")
py=$(cat "$LOGS/py.log" "$LOGS/wheel.log" "$LOGS/venv.log" | grep -Eo '[0-9]+ passed' |
     awk '{s+=$1} END{print s+0}')
rs=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$LOGS/rust.log" |
     awk '{s+=$4} END{print s+0}')
oc=$(awk '/^test-consumers: [0-9]+ passed/{print $2}' "$LOGS/consumers.log")
echo "== totals: C $c (meson tests), Python $py, Rust $rs, outside consumers $oc"
echo "all: $((c + py + rs + oc)) passed, 0 failed"

#!/bin/sh
# Runs every test: the C suites (Check, via meson test), the Python binding's
# pytest suite (numpy and PyTorch) and the Rust crates' cargo tests, all
# against the library in ./build.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
./scripts/build.sh

echo "== C tests (meson test)"
meson test -C build --print-errorlogs

if [ -d bindings/python/tests ]; then
    echo "== Python tests (pytest)"
    # Debian's interpreter: it has python3-numpy, python3-pytest and
    # python3-torch from install-deps.sh.
    MASA_LIBRARY="$ROOT/build/lib/libmasa.so" \
        /usr/bin/python3 -m pytest -q bindings/python/tests
fi

if [ -f bindings/rust/Cargo.toml ]; then
    echo "== Rust tests (cargo test)"
    PATH="$HOME/.cargo/bin:$PATH"
    (cd bindings/rust && MASA_LIB_DIR="$ROOT/build/lib" cargo test --offline)
fi

#!/bin/sh
# Installs what libmasa needs to build and test, from Debian's packages:
# compiler and meson, BLIS, Check, valgrind, and Python with numpy, pytest and
# PyTorch (Debian's python3-torch) for the Python binding's tests, and the
# fortunes texts and matplotlib for the replication experiment
# (examples/python/replicate.py). Rust comes from the machine's rustup or,
# when there is none, Debian's cargo.
set -eu
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PKGS="build-essential meson ninja-build pkg-config libblis-pthread-dev check
      valgrind python3 python3-numpy python3-pytest python3-torch
      python3-setuptools python3-pip abigail-tools g++ clang
      libclang-rt-14-dev fortunes python3-matplotlib"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
        missing="$missing $p"
done
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
    missing="$missing cargo"
fi
if [ -n "$missing" ]; then
    echo "install-deps: installing$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
echo "install-deps: all dependencies present"

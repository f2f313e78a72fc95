#!/usr/bin/env bash
# Set up deploycomp on a fresh machine: the Fashion-MNIST data package, a virtualenv with
# torch 2.14.1 + torchvision 0.29.1 (the pair that imports together; see README), and the package
# with its dev extras. Idempotent: re-running only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "== installing Debian package dataset-fashion-mnist"
  if ! apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then $SUDO apt-get update -qq; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
echo "== installing torch 2.14.1, torchvision 0.29.1"
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision" || { echo "torch/torchvision do not import" >&2; exit 1; }
echo "== installing deploycomp[dev]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/deploycomp --help >/dev/null
echo "== ready: .venv/bin/deploycomp"

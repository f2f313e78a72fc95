#!/usr/bin/env bash
# Set up deploycomp on a fresh machine: the Fashion-MNIST data package, a virtualenv with
# torch 2.14.1 + torchvision 0.29.1 (the pair that imports together; see README), and the package
# with its dev extras. Idempotent: re-running only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

quiet() {  # run a command, show its output only if it fails
  if ! "$@" >"$LOG" 2>&1; then
    grep -v "^WARNING: Location" "$LOG" | tail -40 >&2
    echo "setup failed: $*" >&2
    exit 1
  fi
}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "== installing Debian package dataset-fashion-mnist"
  apt-cache show dataset-fashion-mnist >/dev/null 2>&1 || quiet $SUDO apt-get update -qq
  quiet env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  quiet "$PY" -m venv .venv
fi
echo "== installing torch 2.14.1, torchvision 0.29.1"
quiet .venv/bin/python -m pip install --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
quiet .venv/bin/python -c "import torch, torchvision"
echo "== installing deploycomp[dev,hf,clip]"
quiet .venv/bin/python -m pip install --disable-pip-version-check -e ".[dev,hf,clip]"
quiet .venv/bin/deploycomp --help
echo "== ready: .venv/bin/deploycomp"

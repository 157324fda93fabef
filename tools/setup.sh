#!/usr/bin/env bash
# Create .venv (once) with the CPU-capable torch that pip finds on this machine, fastai-timm and its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# Ask for torch and torchvision first, by exact version, so that no other package pulls a different build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

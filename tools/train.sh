#!/usr/bin/env bash
# Set up .venv, then train a timm U-Net on the DSB2018 nuclei (or the folder given with --data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1
if [ $# -eq 0 ]; then set -- --data ../shared/data/dsb2018-nuclei --out runs/dsb2018; fi
exec .venv/bin/fastai-timm-train "$@"

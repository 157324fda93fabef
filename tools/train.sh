#!/usr/bin/env bash
# Set up .venv, then train a timm U-Net on the DSB2018 nuclei (or the folder given with --data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1
# One PyTorch thread: on a 2-core machine that also runs other jobs, two threads wait on each other. The
# default run took 22 minutes with two threads and 6 with one, at a load average of about 6.
if [ $# -eq 0 ]; then set -- --data ../shared/data/dsb2018-nuclei --out runs/dsb2018 --overwrite --threads 1; fi
exec .venv/bin/fastai-timm-train "$@"

#!/usr/bin/env bash
# Set up .venv, check that the exported package matches the notebooks, then run the notebook tests and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
.venv/bin/nbdev-export
if ! git diff --quiet -- fastai_timm; then
  echo "fastai_timm/ differs from what the notebooks export: run nbdev-export and commit the result." >&2
  git --no-pager diff --stat -- fastai_timm >&2
  exit 1
fi
.venv/bin/nbdev-test --flags "${NBDEV_FLAGS:-slow}"
.venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# The GPU benchmark (issue 23, item 7) on a machine with torch + CUDA but no network and no model
# packages, from the checkout's root, after `.venv/bin/python benchmarks/gpu/carry.py` filled .gpu/
# here (the pinned wheels and the models' config and tokenizer files, 24 MiB):
#
#   bash benchmarks/gpu/run.sh OUT_DIR [extra bench options]
#
# writes OUT_DIR/results/scale_gpu.json and .md (copy them into benchmarks/results/), in about
# 3 minutes on an H200. Extra options go to `hyperadalora bench scale_gpu` after the registered ones.
set -euo pipefail
out=${1:?usage: run.sh OUT_DIR [options]}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hyperadalora-site .gpu/whl/*.whl
export PYTHONPATH=/tmp/hyperadalora-site:src PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 \
    TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 HYPERADALORA_BENCHMARKS="$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m hyperadalora.cli bench scale_gpu --random-weights .gpu/arch --bases bf16,4bit,4bit_ckpt --budget-s 300 "$@"

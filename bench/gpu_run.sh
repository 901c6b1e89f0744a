#!/usr/bin/env bash
# One device call: GPU tests + the committed benchmark results (see bench/README.md).
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DSV4_HOME=/tmp/dsv4home
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python -c "import torch;print(torch.__version__, torch.cuda.get_device_name())" | tee -a $OUT/gpu.txt
python -m pytest -q -m gpu tests/ 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
python -m dsv4cli.main bench decode --preset flash --layers 4 --synthetic --prompt-len 1024 --steps 32 \
  --json $OUT/decode_flash_4layers.json 2>&1 | tail -40
python -m dsv4cli.main bench prefill --preset flash --layers 4 --synthetic --prompt-len 1024 --runs 3 \
  --json $OUT/prefill_flash_4layers.json 2>&1 | tail -30

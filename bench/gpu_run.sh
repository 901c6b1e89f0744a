#!/usr/bin/env bash
# One device call: GPU tests, decode benchmarks (CUDA graph vs eager kernels vs torch reference), the
# per-kernel profile of a decode step, per-linear bandwidth, the built-in model's perplexity on the
# kernel path. Results land in $OUT (see bench/README.md for what is committed from them).
# SKIP_TESTS, SKIP_KERNEL_BENCH, SKIP_PPL, SKIP_REFERENCE skip parts.
set -o pipefail
export PYTHONUNBUFFERED=1
. bench/dsv4_path.sh  # the source folders importable as dsv4.* without an install
OUT=${OUT:-/tmp/dsv4-gpu-out}; mkdir -p $OUT
DSV4="python3 -m dsv4.cli.main"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a $OUT/gpu.txt
[ -z "${SKIP_TESTS:-}" ] && timeout 300 python3 -m pytest -q -x tests/test_gpu_kernels.py 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
timeout 150 $DSV4 bench decode --preset flash --layers 4 --synthetic --steps 64 --compare eager \
  --json-out $OUT/decode_flash_4layers.json 2>&1 | tail -50
# per layer with the head timed alone, and the 43-layer projection against the whole-model floor (issue #16)
timeout 240 $DSV4 bench decode --preset flash --layers 16 --synthetic --steps 64 \
  --json-out $OUT/decode_flash_16layers.json 2>&1 | grep -E "ms_per|floor|projected|head_embed"
[ -z "${SKIP_REFERENCE:-}" ] && timeout 150 $DSV4 bench decode --preset flash --layers 4 --synthetic --prompt-len 1024 \
  --steps 32 --compare reference --json-out $OUT/decode_flash_4layers_1k_vs_reference.json 2>&1 | grep -E "ms_per|compare_|floor"
timeout 120 $DSV4 bench decode --preset flash --layers 4 --synthetic --prompt-len 8192 --steps 32 \
  --json-out $OUT/decode_flash_4layers_8k.json 2>&1 | grep -E "ms_per|floor|fraction"
timeout 120 python3 bench/profile_decode.py --layers 4 --out $OUT/profile_decode.txt 2>&1 | head -40
[ -n "${PROFILE_LONG:-}" ] && timeout 120 python3 bench/profile_decode.py --layers 4 --prompt-len 8192 --out $OUT/profile_decode_8k.txt 2>&1 | head -40
[ -z "${SKIP_KERNEL_BENCH:-}" ] && timeout 90 $DSV4 bench kernels --preset flash --compare-reference --json-out $OUT/kernels_flash.json 2>&1 | tail -45
if [ -z "${SKIP_PPL:-}" ]; then
  head -c 50000 train/results/heldout_modules.txt > /tmp/held50k.txt
  for b in auto reference; do
    DSV4_KERNELS=$b timeout 60 $DSV4 bench perplexity --model engine/builtin --text /tmp/held50k.txt --precision exact \
      --device cuda --chunk 16 --json-out $OUT/ppl_builtin_kernels_$b.json 2>&1 | grep -E "perplexity|tokens"
  done
fi
[ -z "${SKIP_TESTS:-}" ] && timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -5 | tee -a $OUT/gpu_tests.txt

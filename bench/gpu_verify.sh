#!/usr/bin/env bash
# The device calls of the 2026-12-01 session (issues #14-#18), in two phases that each fit one 10-minute
# call: `bash bench/gpu_verify.sh tests` (every GPU test, decode at 16 layers, MTP on the built-in model)
# and `bash bench/gpu_verify.sh prefill` (long prefills, the simulated rank of a 2-GPU split).
# Logs and JSON results land in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
. bench/dsv4_path.sh
OUT=${OUT:-/tmp/dsv4-gpu-out}; mkdir -p $OUT
D="python3 -m dsv4.cli.main"
if [ "$1" = tests ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
  timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernels.py tests/test_gpu.py tests/test_cache.py \
    tests/test_gpu_speculative.py tests/test_parallel.py tests/test_gpu_prefill.py -k "not flash_dims and not long_prefill" \
    2>&1 | tail -40 | tee $OUT/gpu_tests.txt
  timeout 110 $D bench decode --preset flash --layers 16 --synthetic --steps 64 --json-out $OUT/decode_flash_16layers.json \
    2>&1 | grep -E "ms_per|floor|projected|kernels ran" | tee $OUT/decode16.txt
  timeout 90 $D bench decode --model engine/builtin --device cuda --prompt-len 64 --steps 128 --mtp \
    --json-out $OUT/decode_builtin_mtp.json 2>&1 | grep -E "identical|mtp_|plain|effective|projected" | tee $OUT/mtp.txt
elif [ "$1" = prefill ]; then
  timeout 80 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_prefill.py -k "chunk_attention_kernel or synthetic_flash" \
    tests/test_gpu.py 2>&1 | tail -12 | tee $OUT/gpu_tests_prefill.txt
  timeout 300 python3 bench/prefill_long.py --layers 4 --prompt-lens 8192,32768,131072 --decode-steps 32 \
    --time-limit 90 --json-out $OUT/prefill_long.json 2>&1 | tail -40 | tee $OUT/prefill.txt
  timeout 140 python3 bench/simulate_rank.py --preset flash --layers 16 --rank 0/2 --json-out $OUT/simulate_rank_0of2.json \
    2>&1 | tail -20 | tee $OUT/simulate.txt
fi

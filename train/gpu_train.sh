#!/usr/bin/env bash
# One device call (fits the 10-minute limit): one training stage of the built-in model, then its
# held-out perplexity in exact and faithful mode and on the `dsv4 convert` output (NVFP4 experts,
# FP8 dense). Everything lands in $OUT (the checkpoint as builtin.tar.* parts).
#   stage 1:  bash train/gpu_train.sh
#   stage 2:  STAGE2=1 bash train/gpu_train.sh     (continues from engine/builtin + train/results)
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dsv4-train-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
if [ -n "${STAGE2:-}" ]; then
  rm -rf /tmp/init && cp -r engine/builtin /tmp/init && cp train/results/train_log.json /tmp/init/
  ARGS="--init /tmp/init --steps ${STEPS:-1200} --lr 1e-3 --seed 1 --qat-from 0.5"
else
  ARGS="--steps ${STEPS:-1100}"
fi
python3 -m dsv4.train.run --out /tmp/builtin $ARGS --device cuda 2>&1 | tee $OUT/train.out
cp /tmp/builtin/train_log.json $OUT/
tar -C /tmp -cf /tmp/builtin.tar builtin
split -b 15M /tmp/builtin.tar $OUT/builtin.tar.
dsv4() { timeout 60 python3 -m dsv4.cli.main "$@"; }
for p in exact faithful; do
  dsv4 bench perplexity --model /tmp/builtin --text /tmp/builtin/heldout.txt --precision $p --device cuda \
    --json $OUT/ppl_$p.json
done
dsv4 convert /tmp/builtin /tmp/builtin-nvfp4 --verify
dsv4 bench perplexity --model /tmp/builtin-nvfp4 --text /tmp/builtin/heldout.txt --precision exact --device cuda \
  --json $OUT/ppl_converted.json
ls -la $OUT

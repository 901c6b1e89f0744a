#!/usr/bin/env bash
# One device call: train the built-in model, then measure held-out perplexity in exact and faithful
# mode and on the `dsv4 convert` output (NVFP4 experts / FP8 dense). Results land in $OUT.
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
STEPS=${STEPS:-1100}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python3 -m train.run --out /tmp/builtin --steps "$STEPS" --device cuda 2>&1 | tee $OUT/train.out
cp /tmp/builtin/train_log.json $OUT/
tar -C /tmp -cf /tmp/builtin.tar builtin
split -b 15M /tmp/builtin.tar $OUT/builtin.tar.
dsv4() { timeout 60 python3 -m dsv4cli.main "$@"; }
for p in exact faithful; do
  dsv4 bench perplexity --model /tmp/builtin --text /tmp/builtin/heldout.txt --precision $p --device cuda \
    --json $OUT/ppl_$p.json
done
dsv4 convert /tmp/builtin /tmp/builtin-nvfp4 --verify
dsv4 bench perplexity --model /tmp/builtin-nvfp4 --text /tmp/builtin/heldout.txt --precision exact --device cuda \
  --json $OUT/ppl_converted.json
ls -la $OUT

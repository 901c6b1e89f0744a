#!/usr/bin/env bash
# One device call (under the 10-minute limit) that retrains the built-in model on the issue-#21 data
# (train/data.py: what-does, how-to, which-module, parameters, returns, examples, follow-ups,
# off-topic) from the shipped model (engine/builtin: its weights, tokenizer and curve), trains for a
# wall-time budget (MINUTES, default 6.5, of training loop; data building is ~10 s more), QAT on
# the second half, the MTP layer with it. Then held-out perplexities (exact, faithful, converted),
# each within what is left of DEADLINE (570 s from the start; the device call's limit is 600 s).
#
#   bash train/gpu_train.sh                               # from the repo root, on the GPU machine
#   DEVICE=cpu STEPS=2 SEQ_LEN=256 bash train/gpu_train.sh # the same pipeline, a few steps, on a CPU
#
# $OUT receives exactly 8 files, each under 16 MB:
#   builtin/  config.json generation_config.json model-0000{1,2}-of-00002.safetensors
#             model.safetensors.index.json tokenizer.json tokenizer_config.json   (engine/builtin's layout)
#   train_log.json   (losses, settings, data statistics, GPU, held-out perplexities when measured)
# The model is copied to $OUT as soon as training ends, so a late timeout still returns it.
set -euo pipefail
. bench/dsv4_path.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dsv4-train-out}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/dsv4-train}
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$WORK/gpu.txt"; fi
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"

cp -r engine/builtin "$WORK/init" && cp train/results/train_log.json "$WORK/init/"
if [ -n "${STEPS:-}" ]; then BUDGET="--steps $STEPS"; else BUDGET="--minutes ${MINUTES:-6.5}"; fi
python3 -m dsv4.train.run --out "$WORK/builtin" --init "$WORK/init" $BUDGET --lr "${LR:-1e-3}" --seed 2 \
  --qat-from 0.5 --seq-len "${SEQ_LEN:-2048}" --shard-mb 12 --device "$DEVICE" 2>&1 | tee "$WORK/train.out"

FILES="config.json generation_config.json model.safetensors.index.json tokenizer.json tokenizer_config.json"
mkdir -p "$OUT/builtin"
for f in $FILES "$WORK"/builtin/model-*.safetensors; do cp "$WORK/builtin/$(basename "$f")" "$OUT/builtin/"; done
cp "$WORK/builtin/train_log.json" "$OUT/"
n=$(ls "$OUT/builtin" | wc -l)
big=$(find "$OUT" -type f -size +15M | wc -l)
echo "model files: $n (7 expected), files over 15 MiB: $big"
[ "$n" -eq 7 ] && [ "$big" -eq 0 ]

# held-out perplexity (exact, faithful, and on the `dsv4 convert` output: NVFP4 experts, FP8 dense)
# bounded by what is left of the device call (DEADLINE seconds since the script started, default 570)
dsv4() {
  local left=$(( ${DEADLINE:-570} - SECONDS - 5 )) limit=${PPL_TIMEOUT:-75}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then echo "skipped (time): dsv4 $1 $2"; return 1; fi
  timeout "$limit" python3 -m dsv4.cli.main "$@"
}
for p in exact faithful; do
  dsv4 bench perplexity --model "$WORK/builtin" --text "$WORK/builtin/heldout.txt" --precision $p --device "$DEVICE" \
    --json-out "$WORK/ppl_$p.json" || echo "perplexity $p failed"
done
dsv4 convert "$WORK/builtin" "$WORK/builtin-nvfp4" --verify && \
  dsv4 bench perplexity --model "$WORK/builtin-nvfp4" --text "$WORK/builtin/heldout.txt" --precision exact \
    --device "$DEVICE" --json-out "$WORK/ppl_converted.json" || echo "converted perplexity failed"
python3 - "$WORK" "$OUT/train_log.json" <<'EOF'
import json, sys
from pathlib import Path
work, log_path = Path(sys.argv[1]), Path(sys.argv[2])
log = json.loads(log_path.read_text())
for k in ("exact", "faithful", "converted"):
    f = work / f"ppl_{k}.json"
    if f.exists():
        log.setdefault("heldout_perplexity", {})[k] = json.loads(f.read_text())
if (work / "gpu.txt").exists():
    log["gpu"] = (work / "gpu.txt").read_text().strip()
log_path.write_text(json.dumps(log))
print("held-out perplexity:", {k: round(v.get("perplexity", float("nan")), 3) if isinstance(v, dict) else v
                               for k, v in log.get("heldout_perplexity", {}).items()})
EOF
find "$OUT" -type f -printf '%s %p\n'

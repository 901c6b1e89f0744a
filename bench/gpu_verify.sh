#!/usr/bin/env bash
# Device calls for the GPU checks and figures of issues #15-#18, each phase one call under the 10-minute
# limit (logs and JSON land in $OUT):
#   bash bench/gpu_verify.sh kernels   # tests/test_gpu_kernels.py (every decode kernel, with and without act_quant)
#   bash bench/gpu_verify.sh engine    # the prefill kernels, the engine on CUDA, MTP, parallel, cache GPU tests
#   bash bench/gpu_verify.sh figures   # prefill 8k..1M, bench prefill --profile at 8k, decode at 16 layers, MTP
#   bash bench/gpu_verify.sh prefill   # the prefill GEMM / expert / mHC / pooling / store kernel tests, tile tunes, the 8k profile
#   bash bench/gpu_verify.sh decode    # the decode kernel and engine tests, decode at 16 layers at 1k and 64k, the step with and without the side stream, a 16-layer step's per-kernel trace
#   bash bench/gpu_verify.sh tune      # cold-L2 tunes of the decode GEMVs and routed experts, the graph step with PDL off / on
#   bash bench/gpu_verify.sh attention # decode attention tile sweep, the GEMV and attention kernel tests
#   bash bench/gpu_verify.sh final8c   # the FP8 GEMM tiles with and without TMA, the staged tiles at a 4096-token chunk, decode at 16 layers
#   bash bench/gpu_verify.sh indexer-tune  # the decode indexer's GPU tests, the engine's, the indexer's tile tune
#   bash bench/gpu_verify.sh experts   # the prefill expert / RoPE kernel tests, the expert GEMM tile tune
#   bash bench/gpu_verify.sh prefill-final  # the prefill GPU tests (engine included), RoPE / expert kernel tests, prefill 8k-128k, the 8k profile
#   bash bench/gpu_verify.sh experts-all  # experts + prefill-final in one call: the tune's fastest tile put into TILE first
#   bash bench/gpu_verify.sh experts-min  # the expert tune (TUNE_FEW=1: 4 shapes), the fastest into TILE, the expert and RoPE kernel tests
#   bash bench/gpu_verify.sh mtp       # the MTP GPU tests (batched verify) and GEMV row tests, bench decode --mtp (built-in; 16 synthetic layers at 0.8)
#   bash bench/gpu_verify.sh experts-figures  # expert/RoPE GPU tests, 8k profile, prefill 8k-128k, decode profile of 1- and 2-token steps, kernel-path test
#   bash bench/gpu_verify.sh final     # MTP and RoPE GPU tests, bench decode --mtp at 16 layers, the RoPE rows A/B
#   bash bench/gpu_verify.sh gemv      # the decode GEMV tune, GEMV / sampling / RoPE GPU tests, the merge tune, decode at 16 layers with the tuned GEMV, the expert and mHC tunes
#   bash bench/gpu_verify.sh last      # the mHC (both mixing paths) and decode-attention GPU tests, the 8k prefill profile, decode at 16 layers with and without prefetch_below
#   bash bench/gpu_verify.sh final5    # mHC / RMSNorm, expert (no host sync), prefill engine, decode engine / MTP / cache GPU tests, the prefill's host waits, prefill 8k profiled, 8k-128k
#   bash bench/gpu_verify.sh prefill-ab # prefill 8k under several kernel settings in one process (bench/compare_prefill.py), its host waits
#   bash bench/gpu_verify.sh decode-final  # kernel / engine / MTP GPU tests, decode at 16 layers at 1k and 64k, the per-kernel profile, the 8k prefill profile
#   bash bench/gpu_verify.sh check     # the smallest: the MTP and RoPE GPU tests, the RoPE rows A/B
#   bash bench/gpu_verify.sh tiles     # the prefill attention and expert tile tunes, the winners into TILE and tested, an 8k A/B against the old tiles and with the output's inverse RoPE as a pass of its own, the 8k profile, every kernel's registers / spills
#   bash bench/gpu_verify.sh chunks    # the router / grouped-GEMM GPU tests, an 8k A/B of the chunk router kernels and the one-launch wo_a against before, prefill 8k-128k at chunks of auto / 8k / 16k / 32k tokens
#   bash bench/gpu_verify.sh fp8       # router / grouped / FP8 GEMM / chunk-attention / kernel-path GPU tests, the router, FP8 GEMM, dense GEMM and expert tunes at a 12032-row chunk, prefill 8k-128k at chunks of 6400 and auto
#   bash bench/gpu_verify.sh final8    # the GPU tests of the seventh to ninth sessions' kernels (staged experts, dense entries, TMA tiles), an 8k A/B of each change, the staged tune
#   bash bench/gpu_verify.sh final8b   # prefill 8k-128k at chunks of 6400 and auto, 128k with and without staging / dense entries, the 8k profile both ways, the attention tiles (64 / 128 keys, dense entries or not)
#   bash bench/gpu_verify.sh final8c   # the FP8 GEMM tiles with and without TMA, the staged tiles at a 4096-token chunk, decode at 16 layers
#   bash bench/gpu_verify.sh indexer   # the 64k step with the indexer kernels and their references, decode at 16 layers at 64k, a 64k trace
# Runs from the repository root on the GPU machine, wherever it is called from (no install there:
# bench/dsv4_path.sh puts the source folders on PYTHONPATH as dsv4.*).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
. bench/dsv4_path.sh
OUT=${OUT:-/tmp/dsv4-gpu-out}; mkdir -p "$OUT"
D="python3 -m dsv4.cli.main"
T="python3 -m pytest -q -p no:cacheprovider -m gpu"
case "$1" in
final8)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 80 $T tests/test_gpu_kernels.py -k "router or grouped_linear or grouped_fp8 or tma" 2>&1 | tail -4 \
    | tee "$OUT/gpu_tests_kernels.txt"
  timeout 200 $T tests/test_gpu_prefill.py -k "gemm or kernel_path or chunk_attention or staged or e4m3" 2>&1 | tail -5 \
    | tee "$OUT/gpu_tests_prefill.txt"
  timeout 70 $T tests/test_gpu_prefill.py tests/test_gpu.py -k "long_prefill or not prefill" 2>&1 | tail -4 \
    | tee "$OUT/gpu_tests_engine.txt"
  timeout 170 python3 bench/compare_prefill.py --runs 3 --out "$OUT/compare_prefill.txt" --compare \
    base=0,staged_experts.TILE.on=true,prefill_attention.TILE.dense_entries=true,prefill_linear.TILE_FP8.tma=true,staged_experts.TILE.on=true+prefill_attention.TILE.dense_entries=true+prefill_linear.TILE_FP8.tma=true,prefill_linear.TILE_FP8.one_block=false,DSV4_REFERENCE_OPS=router_scores:router_topk,prefill_linear.TILE_FP8.grouped=false,base=0 \
    2>&1 | tail -11
  TUNE_FEW=1 timeout 60 python3 bench/tune_prefill.py --only staged --out "$OUT/tune_staged.json" 2>&1 | cut -c1-220 ;;
final8b)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 150 python3 bench/prefill_long.py --layers 4 --prompt-lens 8192,32768,131072 --chunk 6400,auto --runs 2 \
    --decode-steps 32 --json-out "$OUT/prefill_long.json" 2>&1 | grep -v "prefill .*tok/s" | tail -7
  timeout 170 python3 bench/compare_prefill.py --runs 2 --prompt-len 131072 --out "$OUT/compare_prefill_128k.txt" \
    --compare base=0,staged_experts.TILE.on=true,prefill_attention.TILE.dense_entries=true 2>&1 | tail -4
  timeout 70 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | grep -E "median|matmul_rate|chunk|%" | head -24
  timeout 70 python3 bench/run_tuned.py --set staged_experts.TILE.on=true -- bench prefill --preset flash --layers 4 \
    --synthetic --prompt-len 8192 --runs 3 --profile --json-out "$OUT/prefill8k_staged.json" 2>&1 \
    | grep -E "median|matmul_rate|chunk|%" | head -24
  TUNE_FEW=1 timeout 100 python3 bench/tune_prefill.py --only attention --out "$OUT/tune_attention.json" 2>&1 | cut -c1-200 ;;
final8c)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  TUNE_FEW=1 timeout 150 python3 bench/tune_prefill.py --only gemm --rows 12032 --out "$OUT/tune_gemm.json" 2>&1 | cut -c1-220
  TUNE_FEW=1 timeout 90 python3 bench/tune_prefill.py --only staged --rows 4096 --out "$OUT/tune_staged_4096.json" 2>&1 | cut -c1-220
  timeout 100 $D bench decode --preset flash --layers 16 --synthetic --prompt-len 1024 --steps 64 \
    --json-out "$OUT/decode16_1024.json" 2>&1 | grep -E "ms_per|floor|projected|per.layer" ;;
fp8)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 170 $T tests/test_gpu_kernels.py tests/test_gpu_prefill.py \
    -k "router or grouped_linear or grouped_fp8 or gemm or kernel_path or chunk_attention" 2>&1 | tail -5 | tee "$OUT/gpu_tests_fp8.txt"
  timeout 150 python3 bench/prefill_long.py --layers 4 --prompt-lens 8192,32768,131072 --chunk 6400,auto --runs 2 \
    --decode-steps 32 --json-out "$OUT/prefill_long.json" 2>&1 | grep -v "prefill .*tok/s" | tail -8
  timeout 50 python3 bench/tune_prefill.py --only router --rows 12032 --out "$OUT/tune_router.json" 2>&1 | cut -c1-200
  TUNE_FEW=1 timeout 100 python3 bench/tune_prefill.py --only gemm --rows 12032 --out "$OUT/tune_gemm.json" 2>&1 | cut -c1-220
  timeout 90 python3 bench/tune_prefill.py --only dense --rows 12032 --out "$OUT/tune_dense.json" 2>&1 | cut -c1-220
  TUNE_FEW=1 timeout 110 python3 bench/tune_prefill.py --only experts --rows 12032 --out "$OUT/tune_experts.json" 2>&1 | cut -c1-220 ;;
chunks)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 120 $T tests/test_gpu_kernels.py -k "router or grouped_linear" 2>&1 | tail -5 | tee "$OUT/gpu_tests_router.txt"
  timeout 170 python3 bench/compare_prefill.py --runs 5 --out "$OUT/compare_router.txt" \
    --compare base=0,DSV4_REFERENCE_OPS=router_scores:router_topk,prefill_linear.TILE_FP8.grouped=false,base=0,DSV4_REFERENCE_OPS=router_scores:router_topk+prefill_linear.TILE_FP8.grouped=false 2>&1 | tail -8
  timeout 290 python3 bench/prefill_long.py --layers 4 --prompt-lens 8192,32768,131072 --chunk auto,8192,16384,32768 \
    --runs 2 --decode-steps 0 --json-out "$OUT/prefill_chunks.json" 2>&1 | grep -v "prefill .*tok/s" | tail -14 ;;
kernels)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 560 $T tests/test_gpu_kernels.py 2>&1 | tail -30 | tee "$OUT/gpu_tests_kernels.txt" ;;
engine)
  timeout 560 $T tests/test_gpu_prefill.py tests/test_gpu.py tests/test_gpu_speculative.py tests/test_cache.py \
    tests/test_parallel.py tests/test_bench_prefill.py -k "not long_prefill" 2>&1 | tail -30 | tee "$OUT/gpu_tests_engine.txt" ;;
figures)
  timeout 200 python3 bench/prefill_long.py --layers 4 --prompt-lens 8192,32768,131072,1048576 --time-limit 60 \
    --decode-steps 32 --json-out "$OUT/prefill_long.json" 2>&1 | grep -v "prefill .*tok/s" | tail -12
  timeout 60 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | tail -30
  timeout 80 $D bench decode --preset flash --layers 16 --synthetic --steps 64 --json-out "$OUT/decode16.json" \
    2>&1 | grep -E "ms_per|floor|projected|kernels ran"
  timeout 90 $D bench decode --model engine/builtin --device cuda --prompt-len 64 --steps 128 --mtp \
    --json-out "$OUT/decode_builtin_mtp.json" 2>&1 | grep -E "identical|mtp_|plain|effective|projected" ;;
prefill)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 150 $T tests/test_gpu_prefill.py tests/test_gpu_kernels.py -k "gemm or experts or mhc or compress_windows or store_entry" 2>&1 | tail -15 \
    | tee "$OUT/gpu_tests_prefill.txt"
  timeout 120 python3 bench/tune_prefill.py --only gemm --out "$OUT/tune_gemm.json" 2>&1 | cut -c1-260 | tail -40
  timeout 150 python3 bench/tune_prefill.py --only experts --out "$OUT/tune_experts.json" 2>&1 | cut -c1-260 | tail -12
  timeout 90 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | tail -25 ;;
decode)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 150 $T tests/test_gpu_kernels.py 2>&1 | tail -4 | tee "$OUT/gpu_tests_kernels.txt"
  timeout 100 python3 bench/profile_decode.py --layers 16 --prompt-len 1024 \
    --compare DSV4_OVERLAP=0,DSV4_OVERLAP=1,DSV4_OVERLAP=moe,DSV4_OVERLAP=compressor,DSV4_OVERLAP=0,DSV4_OVERLAP=1,DSV4_PDL=0+DSV4_OVERLAP=0 \
    --out "$OUT/compare_overlap.txt" 2>&1 | grep -v Warn | tail -11
  timeout 100 $D bench decode --preset flash --layers 16 --synthetic --prompt-len 1024 --steps 64 \
    --json-out "$OUT/decode16_1024.json" 2>&1 | grep -E "ms_per|floor|projected|per.layer"
  timeout 90 $T tests/test_gpu.py tests/test_gpu_speculative.py 2>&1 | tail -4 | tee "$OUT/gpu_tests_engine.txt"
  timeout 120 $D bench decode --preset flash --layers 16 --synthetic --prompt-len 65536 --steps 64 \
    --json-out "$OUT/decode16_65536.json" 2>&1 | grep -E "ms_per|floor|projected|per.layer"
  timeout 80 python3 bench/profile_decode.py --layers 16 --prompt-len 1024 --trace --out "$OUT/trace16.txt" \
    2>&1 | grep -v Warn | head -70 ;;
tune)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 200 python3 bench/tune_kernels.py --only gemv --out "$OUT/tune_gemv.json" 2>&1 | grep BEST
  timeout 150 python3 bench/tune_kernels.py --only experts --out "$OUT/tune_experts.json" 2>&1 | grep BEST
  timeout 120 python3 bench/profile_decode.py --layers 16 --prompt-len 1024 --compare DSV4_PDL=0,DSV4_PDL=1,DSV4_PDL=0,DSV4_PDL=1 \
    --out "$OUT/compare_pdl.txt" 2>&1 | grep -v Warn | tail -6 ;;
attention)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 240 python3 bench/tune_kernels.py --only attention --out "$OUT/tune_attention.json" 2>&1 | grep BEST
  timeout 200 $T tests/test_gpu_kernels.py -k "gemv or grouped or attention" 2>&1 | tail -4 | tee "$OUT/gpu_tests_gemv.txt" ;;
indexer-tune)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 100 $T tests/test_gpu_kernels.py -k "indexer or side_stream or decode_attention or store_entry" 2>&1 | tail -4 \
    | tee "$OUT/gpu_tests_indexer.txt"
  timeout 120 $T tests/test_gpu.py tests/test_gpu_speculative.py 2>&1 | tail -4 | tee "$OUT/gpu_tests_engine.txt"
  timeout 200 python3 bench/tune_kernels.py --only indexer --out "$OUT/tune_indexer.json" 2>&1 | grep -E "BEST|quant|skipped" ;;
experts)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 150 $T tests/test_gpu_prefill.py tests/test_gpu_kernels.py -k "experts or rope" 2>&1 | tail -6 \
    | tee "$OUT/gpu_tests_experts.txt"
  timeout 240 python3 bench/tune_prefill.py --only experts --out "$OUT/tune_experts.json" 2>&1 | cut -c1-300 | tail -12 ;;
prefill-final)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 200 $T tests/test_gpu_prefill.py -k "not long_prefill" 2>&1 | tail -6 | tee "$OUT/gpu_tests_prefill.txt"
  timeout 100 $T tests/test_gpu_kernels.py -k "rope or experts" 2>&1 | tail -4 | tee "$OUT/gpu_tests_rope_experts.txt"
  timeout 150 python3 bench/prefill_long.py --layers 4 --prompt-lens 8192,32768,131072 --time-limit 60 \
    --json-out "$OUT/prefill_long.json" 2>&1 | grep -v "prefill .*tok/s" | tail -11
  timeout 80 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | tail -26 ;;
experts-all)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 95 python3 bench/tune_prefill.py --only experts --out "$OUT/tune_experts.json" 2>&1 | cut -c1-300 | tail -12
  python3 bench/pick_tile.py "$OUT/tune_experts.json" kernels/triton/prefill_experts.py | tee "$OUT/chosen_tile.txt"
  timeout 90 $T tests/test_gpu_prefill.py -k "experts or kernel_path_matches" 2>&1 | tail -5 | tee "$OUT/gpu_tests_prefill.txt"
  timeout 25 $T tests/test_gpu_kernels.py -k "rope or experts" 2>&1 | tail -4 | tee "$OUT/gpu_tests_rope_experts.txt"
  timeout 45 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | tail -26 ;;
experts-min)
  TUNE_FEW=1 timeout 70 python3 bench/tune_prefill.py --only experts --out "$OUT/tune_experts.json" 2>&1 | cut -c1-300 | tail -6
  python3 bench/pick_tile.py "$OUT/tune_experts.json" kernels/triton/prefill_experts.py | tee "$OUT/chosen_tile.txt"
  timeout 60 $T tests/test_gpu_prefill.py tests/test_gpu_kernels.py -k "experts or rope" 2>&1 | tail -5 \
    | tee "$OUT/gpu_tests_experts.txt" ;;
mtp)
  timeout 200 $T tests/test_gpu_speculative.py tests/test_gpu_kernels.py -k "speculative or gemv or verify or builtin or sampled" \
    -s 2>&1 | grep -E "passed|failed|Error|assert|identical|ms_per|tokens_per" | tail -30 | tee "$OUT/gpu_tests_mtp.txt"
  timeout 100 $D bench decode --model engine/builtin --device cuda --prompt-len 64 --steps 128 --mtp \
    --json-out "$OUT/decode_builtin_mtp.json" 2>&1 | grep -E "identical|mtp_|plain|effective|projected|verify"
  timeout 150 $D bench decode --preset flash --layers 16 --synthetic --steps 64 --mtp --mtp-acceptance 0.8 \
    --json-out "$OUT/decode16_mtp.json" 2>&1 | grep -E "ms_per|floor|identical|mtp_|plain|effective|projected|verify" ;;
experts-figures)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 150 $T tests/test_gpu_prefill.py tests/test_gpu_kernels.py -k "experts or rope" 2>&1 | tail -5 \
    | tee "$OUT/gpu_tests_experts.txt"
  timeout 70 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | tail -24
  timeout 130 python3 bench/prefill_long.py --layers 4 --prompt-lens 8192,32768,131072 --time-limit 60 \
    --json-out "$OUT/prefill_long.json" 2>&1 | grep -v "prefill .*tok/s" | tail -11
  for n in 1 2; do timeout 50 python3 bench/profile_decode.py --layers 16 --prompt-len 1024 --tokens $n \
    --out "$OUT/profile_decode_tokens$n.txt" 2>&1 | head -3; done
  timeout 80 $T tests/test_gpu_prefill.py -k "kernel_path_matches" 2>&1 | tail -3 | tee "$OUT/gpu_tests_kernel_path.txt" ;;
final)
  nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
  timeout 110 $T tests/test_gpu_speculative.py tests/test_gpu_kernels.py -k "speculative or rope" 2>&1 | tail -4 \
    | tee "$OUT/gpu_tests_final.txt"
  timeout 80 $D bench decode --preset flash --layers 16 --synthetic --steps 48 --mtp --mtp-acceptance 0.8 \
    --json-out "$OUT/decode16_mtp.json" 2>&1 | grep -E "ms_per_token|layer_floor_ratio|identical|mtp_|plain|effective|projected_tok|verify"
  timeout 20 python3 bench/rope_rows.py 2>&1 | tee "$OUT/rope_rows.txt" ;;
gemv)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  timeout 170 python3 bench/tune_kernels.py --only gemv --out "$OUT/tune_gemv.json" 2>&1 | grep -E "TOTAL|rror" | head -14
  timeout 90 $T tests/test_gpu_kernels.py tests/test_gpu_speculative.py \
    -k "sampled or gemv or grouped_linear or rope" 2>&1 | tail -8 \
    | tee "$OUT/gpu_tests_gemv.txt"
  timeout 30 python3 bench/tune_kernels.py --only merge --out "$OUT/tune_merge.json" 2>&1 | cut -c1-200 | tail -11
  timeout 90 python3 bench/run_tuned.py --gemv "$OUT/tune_gemv.json" --merge "$OUT/tune_merge.json" -- \
    bench decode --preset flash --layers 16 --synthetic --steps 64 --json-out "$OUT/decode16_tuned.json" 2>&1 \
    | grep -E "settings|ms_per|floor|per.layer"
  timeout 70 python3 bench/tune_kernels.py --only experts --out "$OUT/tune_experts.json" 2>&1 | grep -E "BEST|rror" | head -8
  timeout 40 python3 bench/tune_prefill.py --only mhc --out "$OUT/tune_mhc.json" 2>&1 | cut -c1-220 | tail -12 ;;
final5)
  nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
  timeout 40 $T tests/test_gpu_kernels.py -k "mhc or rms_norm" 2>&1 | tail -3 | tee "$OUT/gpu_tests_mhc.txt"
  timeout 130 $T tests/test_gpu_prefill.py -k "grouped_experts or kernel_path" 2>&1 | tail -4 | tee "$OUT/gpu_tests_prefill.txt"
  timeout 80 $T tests/test_gpu.py tests/test_gpu_speculative.py tests/test_cache.py 2>&1 | tail -3 | tee "$OUT/gpu_tests_engine.txt"
  timeout 50 python3 bench/sync_points.py --layers 4 --prompt-len 8192 2>&1 | grep -v Warn | tail -8 | tee "$OUT/sync_points.txt"
  timeout 60 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | grep -E "median_s|matmul_rate|%" | head -14
  timeout 140 python3 bench/prefill_long.py --layers 4 --prompt-lens 8192,32768,131072 --time-limit 60 \
    --json-out "$OUT/prefill_long.json" 2>&1 | grep -v "prefill .*tok/s" | tail -8 ;;
tiles)
  nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
  TUNE_FEW=1 timeout 170 python3 bench/tune_prefill.py --only attention --out "$OUT/tune_attention.json" 2>&1 \
    | cut -c1-200
  TUNE_FEW=1 timeout 150 python3 bench/tune_prefill.py --only experts --out "$OUT/tune_experts.json" 2>&1 | cut -c1-260
  python3 bench/pick_tile.py "$OUT/tune_attention.json" kernels/triton/prefill_attention.py | tee "$OUT/chosen.txt"
  python3 bench/pick_tile.py "$OUT/tune_experts.json" kernels/triton/prefill_experts.py | tee -a "$OUT/chosen.txt"
  timeout 120 $T tests/test_gpu_prefill.py -k "chunk_attention or grouped_experts" 2>&1 | tail -4 \
    | tee "$OUT/gpu_tests_tiles.txt"
  OLD=prefill_attention.TILE.keys=64+prefill_attention.TILE.stages_bf16=1+prefill_experts.TILE.m=64
  OLD=$OLD+prefill_experts.TILE.n=128+prefill_experts.TILE.k=32+prefill_experts.TILE.stages=4+prefill_experts.TILE.warps=8
  timeout 110 python3 bench/compare_prefill.py --layers 4 --prompt-len 8192 --runs 3 --out "$OUT/compare_prefill.txt" \
    --compare "new=1,$OLD,prefill_attention.TILE.rope_out=false,new=2" 2>&1 | grep -v Warn
  timeout 60 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | grep -E "median_s|matmul_rate|%" | head -14
  timeout 100 python3 bench/kernel_registers.py --layers 4 --prompt-len 4096 --steps 4 2>&1 | grep -v Warn \
    > "$OUT/kernel_registers.txt"; head -30 "$OUT/kernel_registers.txt" ;;
prefill-ab)
  nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
  timeout 300 python3 bench/compare_prefill.py --layers 4 --prompt-len 8192 --runs 3 --out "$OUT/compare_prefill.txt" \
    --compare base=0,prefill_experts.TILE.m=128,prefill_experts.TILE.stages=3,mhc.TILE.splits=8,base=1 2>&1 | grep -v Warn
  timeout 60 python3 bench/sync_points.py --layers 4 --prompt-len 8192 2>&1 | grep -v Warn | tail -6 ;;
decode-final)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  timeout 200 $T tests/test_gpu_kernels.py tests/test_gpu.py tests/test_gpu_speculative.py 2>&1 | tail -8 \
    | tee "$OUT/gpu_tests_decode.txt"
  timeout 80 $D bench decode --preset flash --layers 16 --synthetic --steps 64 --json-out "$OUT/decode16_1024.json" \
    2>&1 | grep -E "ms_per|floor|per.layer"
  timeout 110 $D bench decode --preset flash --layers 16 --synthetic --prompt-len 65536 --steps 64 \
    --json-out "$OUT/decode16_65536.json" 2>&1 | grep -E "ms_per|floor|per.layer"
  timeout 60 python3 bench/profile_decode.py --layers 16 --prompt-len 1024 --out "$OUT/profile_decode.txt" 2>&1 | head -3
  timeout 70 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | tail -22 ;;
last)
  nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
  timeout 50 $T tests/test_gpu_kernels.py -k "mhc or decode_attention" 2>&1 | tail -12 | tee "$OUT/gpu_tests_last.txt"
  timeout 60 $D bench prefill --preset flash --layers 4 --synthetic --prompt-len 8192 --runs 3 --profile \
    --json-out "$OUT/prefill8k.json" 2>&1 | tail -22
  timeout 60 $D bench decode --preset flash --layers 16 --synthetic --steps 64 --json-out "$OUT/decode16.json" 2>&1 \
    | grep -E "ms_per_token|ms_per_layer|layer_floor_ratio"
  timeout 60 python3 bench/run_tuned.py --set linear.GEMV.prefetch_below=12582912 -- bench decode --preset flash \
    --layers 16 --synthetic --steps 64 --json-out "$OUT/decode16_prefetch_small.json" 2>&1 \
    | grep -E "settings|ms_per_token|ms_per_layer|layer_floor_ratio" ;;
check)
  nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
  timeout 110 $T tests/test_gpu_speculative.py tests/test_gpu_kernels.py -k "speculative or rope" 2>&1 | tail -4 \
    | tee "$OUT/gpu_tests_check.txt"
  timeout 20 python3 bench/rope_rows.py 2>&1 | tee "$OUT/rope_rows.txt" ;;
indexer)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout 150 python3 bench/profile_decode.py --layers 16 --prompt-len 65536 \
    --compare DSV4_REFERENCE_OPS=indexer_select_decode:indexer_quant,DSV4_REFERENCE_OPS=indexer_quant,DSV4_REFERENCE_OPS=,DSV4_REFERENCE_OPS=indexer_select_decode:indexer_quant,DSV4_REFERENCE_OPS= \
    --out "$OUT/compare_indexer.txt" 2>&1 | grep -v Warn | tail -7
  timeout 120 $D bench decode --preset flash --layers 16 --synthetic --prompt-len 65536 --steps 64 \
    --json-out "$OUT/decode16_65536.json" 2>&1 | grep -E "ms_per|floor|projected|per.layer"
  timeout 100 python3 bench/profile_decode.py --layers 16 --prompt-len 65536 --trace --out "$OUT/trace16_64k.txt" \
    2>&1 | grep -v Warn | head -60 ;;
*)
  echo "usage: bash bench/gpu_verify.sh kernels|engine|figures|prefill|decode|tune|attention|indexer-tune|indexer|experts|experts-min|experts-all|prefill-final|mtp|experts-figures|final|check" >&2; exit 2 ;;
esac

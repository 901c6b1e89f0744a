"""One rank's decode step of a run over several GPUs, measured alone on one GPU (issue #18).

    . bench/dsv4_path.sh   # without an install
    python3 bench/simulate_rank.py --preset flash --layers 16 --rank 0/2 [--prompt-len 512] [--steps 64]
        [--allreduce-us 12] [--json-out FILE]

Rank r of R holds its share of a synthetic model (half the experts, heads and vocabulary for 0/2),
runs the CUDA-graph decode step with the collectives as no-ops, and is timed against the bandwidth
floor of the bytes it reads; the step is projected to the preset's layers and the collectives added
as count x --allreduce-us (engine/runtime/parallel/simulate.py). On an H200: about 1-2 minutes for
16 Flash layers (mostly synthetic weights and Triton compilation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flash", choices=("flash", "pro"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rank", default="0/2", help="r/R: rank r of R")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--precision", default="faithful", choices=("faithful", "exact"))
    ap.add_argument("--allreduce-us", type=float, default=12.0,
                    help="assumed latency of one all-reduce of a token's d float32 values (replace by a measured one)")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    try:
        rank, ranks = (int(x) for x in a.rank.split("/"))
        assert 0 <= rank < ranks
    except (ValueError, AssertionError):
        print(f"--rank {a.rank!r}: use r/R with 0 <= r < R, e.g. 0/2", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("simulate_rank needs a CUDA GPU", file=sys.stderr)
        return 2
    from dsv4.engine.runtime.parallel.simulate import simulate_rank
    from dsv4.engine.tools.bench import environment

    t0 = time.time()
    r = simulate_rank(a.preset, a.layers, rank, ranks, "cuda", a.precision, a.prompt_len, a.steps, a.allreduce_us,
                      progress=lambda m: print(f"[{time.time() - t0:6.1f}s] {m}", file=sys.stderr, flush=True))
    r["environment"] = environment("cuda")
    r["environment"]["command"] = " ".join(["python3"] + sys.argv)
    r.pop("kernels", None)
    for k in ("ms_per_token", "floor_ms", "floor_ratio", "ms_per_layer", "layer_floor_ms", "head_embed_s",
              "projected_rank_ms", "projected_rank_floor_ms", "projected_rank_floor_ratio", "predicted_ms_per_token",
              "weight_bytes_per_token", "kv_bytes_per_token", "peak_device_bytes"):
        print(f"{k}: {r[k]:.4g}" if isinstance(r[k], float) else f"{k}: {r[k]}")
    print(f"collectives: {r['collectives']} (assumed {a.allreduce_us} us each)")
    print(f"wall: {time.time() - t0:.0f} s")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(r, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

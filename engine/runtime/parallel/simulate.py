"""One rank's decode step measured alone on one GPU, to predict a run over several before it exists.

Rank r of R gets exactly its share of a synthetic model (layout.py: its experts, heads / output groups,
shared-expert rows and vocabulary rows, everything else whole), made in the published stored formats
on the device, and runs the ordinary decode step (CUDA graph) with the collectives replaced by
no-ops (comm.NoCollectives): the router still picks among ALL experts, so on average k/R of the k
chosen are this rank's and the others cost nothing, as in the real run.

The prediction for the real run adds what the no-ops leave out: per step 2 x layers all-reduces of
one token's d float32 values and one all-gather of the logits (counts and sizes are reported; the
latency per collective is an input, ``allreduce_us``, to be replaced by a measured figure), and the
command channel (rank 0 -> workers, one store round trip).
"""

from __future__ import annotations

import math
import zlib

import torch

from dsv4.engine.checkpoint.shapes import tensor_shapes
from dsv4.engine.model.config import DSV4Config
from dsv4.engine.model.model import Model
from dsv4.engine.model.weights import build_weights
from dsv4.engine.tools.synthetic import stored_random
from dsv4.kernels.formats import FP8_BLOCK

from .comm import NoCollectives
from .layout import SKIP, local_config, pick, plan_shares

CHANNEL_US = 100.0  # one c10d store round trip per decode step (rank 0 -> workers), on one host


def rank_synthetic_stored(cfg: DSV4Config, share, device, seed: int = 0, mtp: bool = False) -> dict:
    """Rank ``share``'s slices of every tensor of ``cfg`` (with the MTP layer when ``mtp``), random, in
    the published stored formats (FP8 e4m3 + ue8m0 128x128 block scales, MXFP4 experts, BF16/F32
    small tensors), made on ``device``. Each tensor comes from its own seed (``seed`` and its name)
    and is cut to this rank's slice after it is made, so the R ranks' parts are one model's: together
    they hold what one rank (R = 1) holds, and a run over R ranks computes what one process does.
    Other ranks' experts are not made at all."""
    g, gcpu = torch.Generator(device=device), torch.Generator()
    out = {}
    for name, (kind, shape) in tensor_shapes(cfg, mtp=mtp).items():
        want = pick(share, cfg, name)
        if want == SKIP:
            continue
        s = (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)
        g.manual_seed(s)
        gcpu.manual_seed(s)
        parts = stored_random(cfg, name, kind, shape, device, g, gcpu)
        if want is not None:
            parts = {k: _cut(v, want, scale=k != name) for k, v in parts.items()}
        out.update(parts)
    return out


def _cut(t: torch.Tensor, want: tuple, scale: bool) -> torch.Tensor:
    """A stored tensor's part for the logical slice ``want`` = (dim, start, stop): the rows / columns
    themselves, or (``scale``) the FP8 128x128 block scales that cover them (layout.plan_shares puts
    the splits of FP8 linears on block boundaries; the split tensors are FP8 or plain)."""
    dim, a, b = want
    if scale:
        a, b = a // FP8_BLOCK, math.ceil(b / FP8_BLOCK)
    return t.narrow(dim, a, b - a).clone()


def rank_model(cfg: DSV4Config, rank: int, ranks: int, device="cuda", precision: str = "faithful") -> Model:
    """Rank ``rank`` of ``ranks``'s part of ``cfg``, synthetic, with no-op collectives."""
    share = plan_shares(cfg, ranks)[rank]
    w = build_weights(rank_synthetic_stored(cfg, share, device), device)
    return Model(local_config(cfg, share), w, precision, device, comm=NoCollectives(cfg.vocab_size))


def simulate_rank(preset: str = "flash", layers: int = 16, rank: int = 0, ranks: int = 2, device="cuda",
                  precision: str = "faithful", prompt_len: int = 512, steps: int = 64,
                  allreduce_us: float = 12.0, progress=None, warmup: int = 3, cuda_graph: bool | None = None) -> dict:
    """Time rank ``rank`` of ``ranks``'s decode step alone (engine/tools/bench.bench_decode on its
    part, ``warmup`` untimed steps first; cuda_graph as bench_decode's: None the CUDA graph, False the
    eager per-token forward) and predict the full model's step over ``ranks`` GPUs. -> bench_decode's fields plus
    "measured_bandwidth_bytes_per_s", "floor_ms" (this part's bytes per step / bandwidth),
    "floor_ratio", "ms_per_layer", and the projection to the preset's layers: "projected_rank_ms"
    (head/embedding + per-layer x layers), "projected_rank_floor_ms", "collectives" (per step:
    count and bytes of all-reduces and all-gather) and "predicted_ms_per_token" (projected_rank_ms
    + collectives x allreduce_us + the command channel)."""
    from dsv4.engine.tools.bench import bench_decode, measure_bandwidth

    if progress:
        progress(f"making rank {rank}/{ranks}'s part of {layers} {preset} layers on {device}")
    full = DSV4Config.preset(preset)
    cfg = full.layer_range(0, layers)
    model = rank_model(cfg, rank, ranks, device, precision)
    r = bench_decode(model, prompt_len, steps, warmup, cuda_graph=cuda_graph, progress=progress)
    bw = measure_bandwidth(device)
    n, N = cfg.num_hidden_layers, full.num_hidden_layers
    step_bytes = r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
    layer_bytes = r["layer_weight_bytes_per_token"] + r["kv_bytes_per_token"]
    per_layer_s = (r["median_s"] - r["head_embed_s"]) / n
    projected = r["head_embed_s"] + per_layer_s * N
    projected_floor = (r["head_embed_bytes_per_token"] + layer_bytes / n * N) / bw
    count = 2 * N + 1  # all-reduce after attention and after the MoE in every layer, one logits all-gather
    r.update({
        "rank": rank, "ranks": ranks, "preset": preset, "measured_bandwidth_bytes_per_s": bw,
        "floor_ms": step_bytes / bw * 1000, "floor_ratio": r["median_s"] / (step_bytes / bw),
        "ms_per_layer": per_layer_s * 1000, "layer_floor_ms": layer_bytes / n / bw * 1000,
        "projected_rank_ms": projected * 1000, "projected_rank_floor_ms": projected_floor * 1000,
        "projected_rank_floor_ratio": projected / projected_floor,
        "collectives": {"all_reduce_per_step": 2 * N, "all_reduce_bytes": 4 * full.hidden_size,
                        "all_gather_per_step": 1, "all_gather_bytes_per_rank": 4 * math.ceil(full.vocab_size / ranks)},
        "assumed_collective_us": allreduce_us, "assumed_channel_us": CHANNEL_US,
        "predicted_ms_per_token": projected * 1000 + (count * allreduce_us + CHANNEL_US) / 1000,
        "note": (f"PROJECTED from {n} of {N} layers (per-layer time x {N} + head/embedding); collectives are "
                 "no-ops here, their cost is added as count x assumed latency: replace assumed_collective_us "
                 "by a measured NCCL all-reduce of all_reduce_bytes on the target GPUs"),
    })
    return r

"""Time tile-shape alternatives of the prefill kernels at V4-Flash dimensions on a GPU.

python3 bench/tune_prefill.py [--only attention|gemm|experts] [--out FILE]
attention: kernels.chunk_attention on faithful-mode inputs (bf16 queries, FP8 + BF16 entries) for a
3328-query chunk at 8k context, SWA / HCA / CSA (top-512), as TFLOP/s of its QK and PV dots.
Each alternative: one warm-up launch (compiles), then the median of 5 timed launches (CUDA events).
The chosen shapes live in kernels/triton/prefill_*.TILE.
"""

from __future__ import annotations

import argparse
import json

import torch

from dsv4.cache import EntryFormat, EntryStore
from dsv4.kernels.reference.entries import write_entries
from dsv4.kernels.triton import prefill_attention as pa


def event_time(fn, runs: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1000)
    return sorted(ts)[len(ts) // 2]


def attention_case(attn: str, S: int = 3328, start: int = 4864, H: int = 64, D: int = 512, W: int = 128,
                   K: int = 512):
    """-> (args of chunk_attention, keys seen per query summed over the chunk)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    ratio = {"swa": 0, "hca": 128, "csa": 4}[attn]
    q = torch.randn(S, H, D, device=dev, generator=g).to(torch.bfloat16)
    kv = torch.randn(S, D, device=dev, generator=g).to(torch.bfloat16).float()
    ring = torch.randn(W, D, device=dev, generator=g).to(torch.bfloat16).float()
    pos = torch.arange(start, start + S, device=dev)
    ring_pos = (start - 1) - torch.remainder(start - 1 - torch.arange(W, device=dev), W)
    keys = S * min(W, 128)
    ent = rows = sel = None
    if ratio:
        n = (start + S) // ratio
        ent = EntryStore(n, EntryFormat(D, 64, "kv"), dev).tensors
        rows = torch.randperm(n, device=dev, generator=g)
        write_entries(ent, rows, torch.randn(n, D, device=dev, generator=g))
        if attn == "csa":
            sel = torch.stack([torch.randperm((start + i + 1) // ratio, device=dev, generator=g)[:K]
                               for i in range(S)])
            keys += S * K
        else:
            keys += sum((start + i + 1) // ratio for i in range(S))
    sink = torch.randn(H, device=dev, generator=g)
    return (q, pos, ring, ring_pos, kv, W, ent, rows, ratio, sel, sink, D ** -0.5), keys * H * D * 4


def tune_attention() -> list[dict]:
    out = []
    base = dict(pa.TILE)
    alternatives = [dict(heads_bf16=h, keys=t, warps=w, stages_bf16=st)
                    for h, t, w, st in [(32, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2), (64, 64, 8, 1), (64, 32, 4, 2),
                                        (32, 64, 4, 2), (32, 64, 8, 3), (64, 64, 4, 1), (64, 128, 8, 1)]]
    for attn in ("csa", "hca", "swa"):
        args, flops = attention_case(attn)
        ref = None
        for alt in alternatives:
            pa.TILE.update(base)
            pa.TILE.update(alt)
            try:
                y = pa.chunk_attention_triton(*args)
                ref = y if ref is None else ref
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                t = event_time(lambda: pa.chunk_attention_triton(*args))
                row = {"attn": attn, **alt, "ms": t * 1000, "tflops": flops / t / 1e12, "max_rel_diff": err}
            except Exception as e:  # out of shared memory / registers for this shape
                row = {"attn": attn, **alt, "error": f"{type(e).__name__}: {str(e)[:120]}"}
            print(json.dumps(row), flush=True)
            out.append(row)
    pa.TILE.update(base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("attention",), default="attention")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    res = tune_attention()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()

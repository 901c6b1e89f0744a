"""Time tile-shape alternatives of the prefill kernels at V4-Flash dimensions on a GPU.

python3 bench/tune_prefill.py [--only attention|gemm|dense|experts|staged|mhc|router] [--rows N] [--out FILE]
attention: kernels.chunk_attention on faithful-mode inputs (bf16 queries, FP8 + BF16 entries) for a
3328-query chunk at 8k context, SWA / HCA / CSA (top-512), as TFLOP/s of its QK and PV dots; each
tile shape with and without the entries widened once into dense rows (prefill_attention.TILE["dense_entries"]).
gemm: the FP8 x FP8 prefill GEMM (faithful activations, act_quant) on V4-Flash shapes, 3328 rows; each
tile shape with pointer loads and through TMA descriptors (prefill_linear.TILE_FP8["tma"]).
dense: the GEMM of the BF16 weights (compressors' wkv / wgate, the router gate, the indexer's
weights_proj) on float32 rows (three bf16 parts a step), kernels/triton/prefill_linear.TILE, 6400 rows.
experts: the grouped MXFP4 expert GEMM (256 experts, top-6, a 6400-token chunk), faithful activations,
tile shapes (the dots swapped, W . x^T: the widened weight as the register operand).
staged: the same experts through FP8 staging (kernels/triton/staged_experts.TILE), a 12032-token chunk,
after the grouped GEMM's time (its first row) and against its result.
mhc: mHC pre's mixing partials (3xTF32 dots) for a 6400-row chunk of float32 streams (n = 4, d = 4096:
420 MB read), tile shapes.
router: a chunk's router (6400 rows of float32 x, 256 experts, d = 4096, top-6): the gate product +
sqrt(softplus) (the GEMM's tiles: dense) and the top-k's rows per program (kernels/triton/router.TILE),
each against its torch reference's time (op "... reference").
--rows: the chunk's rows for all but attention (default: 3328 for gemm, 12032 for staged, 6400 for the rest).
Each alternative: one warm-up launch (compiles), then the median of 5 timed launches (CUDA events).
The chosen shapes live in kernels/triton/prefill_*.TILE, staged_experts.TILE and mhc.TILE.
"""

from __future__ import annotations

import argparse
import json
import os

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


def _alternatives(table: dict, alts: list[dict], run, label: dict, flops: float, oracle=None,
                  timed=None) -> list[dict]:
    """Each alternative's time (of ``timed()`` if given, else of ``run()``); max_rel_diff of ``run()``:
    against the torch reference ``oracle()`` if given, else against the first alternative that ran."""
    base, out = dict(table), []
    ref = oracle() if oracle is not None else None
    for alt in alts:
        table.update(base)
        table.update(alt)
        try:
            y = run()
            ref = y if ref is None else ref
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            t = event_time(timed or run)
            row = {**label, **alt, "ms": t * 1000, "tflops": flops / t / 1e12, "max_rel_diff": err}
        except Exception as e:  # out of shared memory / registers for this shape
            row = {**label, **alt, "error": f"{type(e).__name__}: {str(e)[:120]}"}
        print(json.dumps(row), flush=True)
        out.append(row)
    table.update(base)
    return out


def tune_attention() -> list[dict]:
    # 64-key tiles at one stage (the committed choice) spill 1.3 KB a thread on sm_90 (ptxas, Triton 3.6),
    # 16-key tiles at two or three stages nothing, yet on an H100 (2026-12-07, sixth session) the 64-key
    # tiles stayed fastest in sum: CSA 4.94 ms against 6.1-7.2 for 16 / 32 keys (h100_tune_prefill_attention.json).
    # 128-key tiles (sm_90, Triton 3.6, dense entries): 20 instructions a key against 25 at 64 keys, a 1448-byte stack;
    # each alternative runs with and without dense entries (TILE["dense_entries"], their widening pass timed in)
    alternatives = [dict(heads_bf16=h, keys=t, warps=w, stages_bf16=st, dense_entries=de)
                    for h, t, w, st in [(64, 64, 8, 1), (64, 128, 8, 1), (64, 16, 8, 3), (64, 32, 8, 2), (64, 16, 8, 1),
                                        (64, 32, 8, 3), (64, 16, 4, 2), (64, 16, 8, 2)] for de in (False, True)]
    if os.environ.get("TUNE_FEW"):
        alternatives = alternatives[:4]
    out = []
    for attn in ("csa", "hca", "swa"):
        args, flops = attention_case(attn)
        out += _alternatives(pa.TILE, alternatives, lambda args=args: pa.chunk_attention_triton(*args),
                             {"attn": attn}, flops)
    return out


def tune_gemm(M: int = 3328) -> list[dict]:
    from dsv4.kernels import quant
    from dsv4.kernels.reference.linear import QWeight, linear_reference
    from dsv4.kernels.triton import prefill_linear as pl

    # each shape with pointer loads and through TMA descriptors (TILE_FP8["tma"]); 64 x 128 tiles of one
    # warp group leave room for two programs an SM (one's promotion beside the other's tensor-core work)
    alts = [dict(m=m, n=n, warps=w, stages=st, group=gr, tma=tma) for m, n, w, st, gr in
            [(128, 128, 8, 4, 8), (64, 128, 4, 3, 8), (128, 128, 8, 3, 8), (128, 64, 4, 5, 8), (64, 128, 4, 5, 8),
             (128, 128, 4, 4, 8), (128, 256, 8, 3, 8), (256, 128, 8, 3, 8), (128, 128, 8, 3, 1), (64, 256, 8, 4, 8)]
            for tma in (False, True)]
    if os.environ.get("TUNE_FEW"):
        alts = alts[:4]
    out = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, N, K in [("wq_b", 32768, 1024), ("wo_b", 4096, 8192), ("wq_a", 1024, 4096), ("shared w1+w3", 4096, 4096)]:
        w = QWeight("fp8", *quant.quant_fp8_block(torch.randn(N, K, device="cuda", generator=g) / K ** 0.5))
        x = torch.randn(M, K, device="cuda", generator=g)
        out += _alternatives(pl.TILE_FP8, alts, lambda: pl.gemm(x, w, act_quant=True),
                             {"op": name, "M": M, "N": N, "K": K}, 2 * M * N * K,
                             oracle=lambda: linear_reference(x, w, act_quant=True))
    return out


def tune_dense(M: int = 6400) -> list[dict]:
    from dsv4.kernels.reference.linear import QWeight, linear_reference
    from dsv4.kernels.triton import prefill_linear as pl

    alts = [dict(m=m, n=n, k=bk, warps=w, stages=st) for m, n, bk, w, st in
            [(64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3), (128, 256, 32, 8, 3),
             (64, 128, 32, 4, 4), (128, 64, 64, 4, 3), (256, 128, 32, 8, 3)]]
    if os.environ.get("TUNE_FEW"):
        alts = alts[:4]
    out = []
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(M, 4096, device="cuda", generator=g)
    for name, N in [("csa compressor wkv", 1024), ("indexer compressor wkv", 256), ("router gate", 256),
                    ("weights_proj", 64)]:
        w = QWeight("dense", (torch.randn(N, 4096, device="cuda", generator=g) / 64).bfloat16())
        out += _alternatives(pl.TILE, alts, lambda: pl.gemm(x, w), {"op": name, "M": M, "N": N, "K": 4096},
                             2 * 3 * M * N * 4096, oracle=lambda: linear_reference(x, w))
    return out


def _expert_case(S: int, E: int, k: int, inter: int, d: int) -> tuple:
    """-> (x [S, d], ids [S, k], routing weights, an MXFP4 ExpertSet of E experts: w1 / w3 [inter, d], w2)."""
    from dsv4.kernels import quant
    from dsv4.kernels.reference.linear import QWeight
    from dsv4.kernels.reference.moe import ExpertSet

    g = torch.Generator(device="cuda").manual_seed(2)

    def one(N, K):
        return QWeight("mxfp4", *quant.quant_mxfp4(torch.randn(N, K, device="cuda", generator=g) / K ** 0.5))
    es = ExpertSet([one(inter, d) for _ in range(E)], [one(inter, d) for _ in range(E)],
                   [one(d, inter) for _ in range(E)])
    x = torch.randn(S, d, device="cuda", generator=g)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(S)])
    return x, ids, torch.rand(S, k, device="cuda", generator=g), es


def tune_experts(S: int = 6400, E: int = 256, k: int = 6, inter: int = 2048, d: int = 4096) -> list[dict]:
    """S: the chunk's tokens (6400: the default chunk before 2026-12-08; --rows 12032: the default now)."""
    from dsv4.kernels.triton import prefill_experts as pe

    x, ids, wts, es = _expert_case(S, E, k, inter, d)
    # the committed tile first, then tile shapes that trade the pairs a widened weight tile serves against
    # padding (about 150 pairs an expert at 6400 tokens). (Measured and dropped, H100 2026-12-07 sixth
    # session: full tiles of 128 pairs with each expert's remainder in tiles of 32, 12.85 ms against
    # 12.60 for the committed tile; in git history.)
    # 128 pairs x 64 rows on one warp group (4 warps): each widened value serves 128 pairs, two programs
    # an SM (8 warps would widen the same 64 rows in both warp groups); h then leaves unquantised and
    # takes a pass of its own (its 128-slices span two programs)
    alts = [dict(m=m, n=n, k=bk, warps=w, stages=st, swap=True, asm=True, words=False)
            for m, n, bk, w, st in
            [(64, 128, 32, 8, 4), (128, 64, 32, 4, 4), (128, 128, 32, 8, 4), (128, 64, 32, 4, 3), (64, 128, 64, 8, 3),
             (32, 128, 32, 8, 4), (64, 128, 32, 8, 5), (64, 128, 32, 4, 4)]]
    if os.environ.get("TUNE_FEW"):
        alts = alts[:4]
    return _alternatives(pe.TILE, alts, lambda: pe.grouped_experts(x, ids, wts, es, 10.0, act_quant=True),
                         {"op": "experts mxfp4", "S": S, "E": E, "topk": k}, 2 * 3 * S * k * inter * d)


def tune_staged(S: int = 12032, E: int = 256, k: int = 6, inter: int = 2048, d: int = 4096) -> list[dict]:
    """The faithful MXFP4 experts of an S-token chunk through FP8 staging (kernels/triton/staged_experts.py)
    under tile settings, after the grouped GEMM (the first row, ``on`` false: the path it would replace;
    max_rel_diff is against it). The staging pass is in each time."""
    from dsv4.kernels.triton import prefill_experts as pe, staged_experts as st

    x, ids, wts, es = _expert_case(S, E, k, inter, d)
    if not st.stageable(es):  # the "staged" rows would time the grouped GEMM again
        raise SystemExit("tune_prefill.py: the tune's experts do not stage exactly")
    alts = [dict(on=False)] + [dict(on=True, min_rows=0, m=m, warps=w, stages=sg, programs=p, group=gr)
                               for m, w, sg, p, gr in [(64, 8, 4, 1, 8), (64, 8, 4, 1, 1), (64, 8, 4, 1, 64),
                                                       (64, 8, 3, 1, 8), (64, 8, 5, 1, 8), (64, 8, 4, 2, 8)]]
    # (sm_90, Triton 3.6: 128-pair tiles and 4 warps spill in the up kernel; 32-pair tiles leave wgmma)
    if os.environ.get("TUNE_FEW"):
        alts = alts[:4]
    return _alternatives(st.TILE, alts, lambda: pe.grouped_experts(x, ids, wts, es, 10.0, act_quant=True),
                         {"op": "staged experts mxfp4", "S": S, "E": E, "topk": k}, 2 * 3 * S * k * inter * d)


def tune_mhc(S: int = 6400, n: int = 4, d: int = 4096) -> list[dict]:
    """Times kernels.triton.mhc.chunk_partials on a chunk of float32 streams (the engine's: 420 MB
    read); max_rel_diff: mhc_pre's post and comb against the reference's. The first alternative is
    mhc.TILE as committed; 32-row tiles take mma.sync dots on sm_90, 64 rows and more the warp-group
    ones (the 32 x 128 tile of 2026-12-07 spilled: 255 registers and a stack)."""
    from dsv4.kernels.reference.mhc import mhc_pre
    from dsv4.kernels.triton import mhc as tm

    g = torch.Generator(device="cuda").manual_seed(3)
    streams = torch.randn(S, n, d, device="cuda", generator=g)
    fn = torch.randn((2 + n) * n, n * d, device="cuda", generator=g) * 0.02
    base = torch.randn((2 + n) * n, device="cuda", generator=g) * 0.5
    scale = 1 + 0.1 * torch.randn(3, device="cuda", generator=g)
    args = (streams, fn, base, scale, 20, 1e-6, 1e-6)

    def post_comb(out):
        return torch.cat([out[1].reshape(S, -1), out[2].reshape(S, -1)], 1)
    alts = [dict()] + [dict(rows=r, k=k, splits=sp, warps=w, stages=st) for r, k, sp, w, st in
                       [(32, 64, 8, 4, 3), (64, 64, 8, 8, 3), (64, 32, 8, 4, 4), (128, 32, 8, 8, 3), (128, 64, 8, 8, 3),
                        (64, 64, 4, 8, 3), (128, 32, 4, 8, 4), (64, 32, 16, 4, 4)]]
    return _alternatives(tm.TILE, alts, lambda: post_comb(tm.mhc_pre_triton(*args)),
                         {"op": "mhc chunk partials", "S": S, "n": n, "d": d}, 2 * S * n * d * (2 + n) * n,
                         oracle=lambda: post_comb(mhc_pre(*args)),
                         timed=lambda: tm.chunk_partials(streams.reshape(S, n * d), fn))


def tune_router(S: int = 6400, E: int = 256, d: int = 4096, k: int = 6) -> list[dict]:
    from dsv4.kernels.reference import moe as ref
    from dsv4.kernels.triton import router as tr

    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(S, d, device="cuda", generator=g)
    gate = (torch.randn(E, d, device="cuda", generator=g) / d ** 0.5).bfloat16()
    bias = torch.randn(E, device="cuda", generator=g) * 0.1
    label = {"S": S, "E": E, "d": d}
    scores = ref.router_scores(x, gate)
    out = []
    for op, fn in [("scores reference", lambda: ref.router_scores(x, gate)),
                   ("topk reference", lambda: ref.router_topk(scores, bias, k, 2.5))]:
        out.append({"op": op, **label, "ms": event_time(fn) * 1000})
        print(json.dumps(out[-1]), flush=True)
    out += _alternatives(tr.TILE, [{}], lambda: tr.router_scores_triton(x, gate), {"op": "scores", **label},
                         2 * 3 * S * E * d, oracle=lambda: scores)
    pick = [dict(pick_rows=r, pick_warps=w) for r, w in [(16, 4), (8, 4), (32, 4), (32, 8), (64, 8), (4, 2)]]
    out += _alternatives(tr.TILE, pick, lambda: tr.router_topk_triton(scores, bias, k, 2.5)[0], {"op": "topk", **label},
                         1.0, oracle=lambda: ref.router_topk(scores, bias, k, 2.5)[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("attention", "gemm", "dense", "experts", "staged", "mhc", "router"),
                    default="attention")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=None, help="chunk rows (all but attention)")
    a = ap.parse_args()
    if a.rows is not None and (a.rows < 1 or a.only == "attention"):
        ap.error("--rows: a positive count, for gemm / dense / experts / staged / mhc / router")
    if not torch.cuda.is_available():
        raise SystemExit("tune_prefill.py: needs a CUDA device")
    fn = {"attention": tune_attention, "gemm": tune_gemm, "dense": tune_dense, "experts": tune_experts,
          "staged": tune_staged, "mhc": tune_mhc, "router": tune_router}[a.only]
    res = fn() if a.rows is None else fn(a.rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": res}, f, indent=1)


if __name__ == "__main__":
    main()

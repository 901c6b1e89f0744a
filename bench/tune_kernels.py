"""Time tile-shape alternatives of the decode kernels at V4-Flash dimensions on a GPU.

python3 bench/tune_kernels.py [--only experts|gemv|attention|merge|indexer] [--out FILE]
Each alternative is launched 20 times inside a CUDA graph (no host launch cost in the figure);
prints microseconds per launch and the bytes/s of the weights it reads. The chosen shapes live in
kernels/triton/moe.py CONFIG, kernels/triton/linear.py GEMV and kernels/triton/attention.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys

import torch
import triton

from dsv4.kernels.triton import moe as tm
from dsv4.kernels.triton.fp4dot import quant3
from dsv4.kernels.reference.linear import QWeight
from dsv4.kernels.reference.moe import ExpertSet


def graph_time(fn, n: int = 20) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of n calls."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000 / n)
    return sorted(times)[2]


def experts(fmt: str, E: int, inter: int, d: int) -> ExpertSet:
    dev, gen = "cuda", torch.Generator(device="cuda").manual_seed(0)

    def one(N, K):
        if fmt == "mxfp4":
            data = torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8, generator=gen)
            return QWeight("mxfp4", data, torch.randint(119, 123, (N, K // 32), device=dev, dtype=torch.uint8,
                                                        generator=gen))
        data = (torch.randn(N, K, device=dev, generator=gen) * 0.5).to(torch.float8_e4m3fn)
        return QWeight("fp8", data, torch.randint(118, 124, (N // 128, K // 128), device=dev, dtype=torch.uint8,
                                                  generator=gen))
    return ExpertSet([one(inter, d) for _ in range(E)], [one(inter, d) for _ in range(E)],
                     [one(d, inter) for _ in range(E)])


def tune_experts(fmt: str, E: int, k: int, rows, block_ks, warps, mode: int = 0) -> list[dict]:
    """Time _experts_up / _experts_down at Flash sizes for each tile shape, a new set of k of the E
    experts per call (weights cold in L2, as in decode); mode as in moe.py."""
    inter, d = 2048, 4096
    es = experts(fmt, E, inter, d)
    x = torch.randn(1, d, device="cuda")
    ids = torch.randperm(E, device="cuda")[:k]
    wts = torch.rand(k, device="cuda")
    tm.routed_experts_triton(x, ids[None], wts[None], es, 10.0)  # builds the tables
    t = es.tables
    code = t["fmt"]
    h = torch.randn(k, inter, device="cuda")
    xq, xs = quant3(x)
    hq, hs = quant3(h)
    y = torch.empty(1, d, device="cuda")
    one = es.w1[0].nbytes()
    out = []
    part, cnt = tm._split_buffers(k, 1, d, min(rows), x.device)
    sets = torch.randperm(E, device="cuda")[:E // k * k].view(-1, k)  # a new set per call: weights cold in L2
    nxt = itertools.count()
    for kind, r, bk, nw in itertools.product(("up", "down"), rows, block_ks, warps):
        if code < 4 and bk != 128:
            continue
        opts = {"FMT": code, "BLOCK_N": r, "BLOCK_K": bk, "MODE": mode, "QX": False, "PDL": False, "num_warps": nw}
        if kind == "up":
            fn = lambda o=opts, r=r: tm._experts_up[(triton.cdiv(inter, r), k)](  # noqa: E731
                x, xq, xs, sets[next(nxt) % len(sets)], t["w1"][0], t["w1"][1], t["w3"][0], t["w3"][1], t["w1"][2],
                t["w3"][2], h, inter, d, 10.0, **o)
            nbytes = 2 * k * one
        else:
            fn = lambda o=opts, r=r: tm._experts_down[(triton.cdiv(d, r), k)](  # noqa: E731
                h, hq, hs, sets[next(nxt) % len(sets)], wts, t["w2"][0], t["w2"][1], t["w2"][2], y, part, cnt, d, inter,
                K_SEL=k, **o)
            nbytes = k * one
        s = graph_time(fn)
        out.append({"kernel": f"experts_{kind}", "format": fmt, "mode": mode, "experts": k, "rows": r,
                    "block_k": bk, "warps": nw, "us": s * 1e6, "GB_per_s": nbytes / s / 1e9})
        print(json.dumps(out[-1]))
    quant = graph_time(lambda: quant3(x))
    out.append({"kernel": "quant3", "K": d, "us": quant * 1e6})
    print(json.dumps(out[-1]))
    return out


# GEMV settings compared by tune_gemv (each updates linear.GEMV; the rest stays at its defaults)
GEMV_ALTERNATIVES = [{}, {"prefetch": 1}, {"prefetch": 2}, {"prefetch": 1, "fp8_block_k": 256, "warps": 8},
                     {"programs": 8 * 132}]


def tune_gemv(alternatives=None, out: list | None = None) -> list[dict]:
    """Time the decode GEMVs on the V4-Flash faithful shapes (act_quant, one row) with weights cold in
    L2: each timed call reads the next of enough weight copies to exceed 256 MB, as a decode step
    reads each layer's weights once; for each setting of linear.GEMV in ``alternatives`` (default
    GEMV_ALTERNATIVES), with its largest error against the reference (x max|reference|). Rows are
    appended to ``out`` as they come (main writes them even when a timeout stops the run)."""
    from dsv4.kernels.reference.linear import grouped_linear_reference, linear_reference
    from dsv4.kernels.triton import linear as tl_
    gen = torch.Generator(device="cuda").manual_seed(0)
    fp8 = {"wq_a+wkv": (1536, 4096, None), "wq_b": (32768, 1024, None), "wo_a": (8192, 4096, 1024),
           "wo_b": (4096, 8192, None), "shared_w1+w3": (4096, 4096, None), "shared_w2": (4096, 2048, None),
           "indexer_wq_b": (8192, 1024, None)}
    dense = {"compressor+": (1024, 4096), "router": (256, 4096)}
    out = [] if out is None else out
    keep = dict(tl_.GEMV)

    def timed(name, N, K, ws, x, R, alt):
        tl_.GEMV.clear()
        tl_.GEMV.update(keep, **alt)
        w0 = ws[0]
        got = tl_.gemv(x, w0, rows_per_group=R, act_quant=True)
        if R is None:
            ref = linear_reference(x, w0, act_quant=True)
        else:  # the grouped projection: group g's rows read slice g of x
            ref = grouped_linear_reference(x.view(x.shape[0], N // R, K), w0, act_quant=True)
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        it = iter(range(10 ** 9))
        n = len(ws)
        fn = (lambda: tl_.gemv(x, ws[next(it) % n], rows_per_group=R, act_quant=True))
        t = graph_time(fn, n=max(n, 8))
        out.append({"weight": name, "N": N, "K": K, **alt, "us": t * 1e6, "GB_per_s": w0.nbytes() / t / 1e9,
                    "max_rel_err": err})
        print(json.dumps(out[-1]), flush=True)

    try:
        for name, (N, K, R) in fp8.items():
            copies = max(2, -(-(256 << 20) // (N * K)))
            ws = [QWeight("fp8", (torch.randn(N, K, device="cuda", generator=gen) * 0.3).to(torch.float8_e4m3fn),
                          torch.randint(118, 124, (N // 128, K // 128), device="cuda", dtype=torch.uint8,
                                        generator=gen))
                  for _ in range(copies)]
            x = torch.randn(1, K * (N // R if R else 1), device="cuda", generator=gen)
            for alt in alternatives or GEMV_ALTERNATIVES:
                timed(name, N, K, ws, x, R, alt)
            del ws
        for name, (N, K) in dense.items():
            copies = max(2, -(-(256 << 20) // (2 * N * K)))
            ws = [QWeight("dense", torch.randn(N, K, device="cuda", generator=gen).to(torch.bfloat16), None)
                  for _ in range(copies)]
            x = torch.randn(1, K, device="cuda", generator=gen)
            for alt in alternatives or GEMV_ALTERNATIVES:
                timed(name, N, K, ws, x, None, alt)
            del ws
    finally:
        tl_.GEMV.clear()
        tl_.GEMV.update(keep)
    total = {}
    for r in out:
        key = json.dumps({k: v for k, v in r.items() if k not in ("weight", "N", "K", "us", "GB_per_s", "max_rel_err")})
        total[key] = total.get(key, 0.0) + r["us"]
    for key, us in sorted(total.items(), key=lambda kv: kv[1]):
        print(f"TOTAL {us:8.1f} us  {key}")
    return out


def tune_attention(T: int, settings=None) -> list[dict]:
    """Time kernels.decode_attention (both launches) at Flash sizes: 64 heads of 512 channels (448
    FP8 + 64 BF16 RoPE), a 128-slot ring and T selected entries, for each tile setting of
    attention.ATTENTION (keys per program, channels per score chunk, output channels per program,
    warps); with each one's error against the reference."""
    from dsv4.cache.pools import EntryStore
    from dsv4.cache.schema import EntryFormat
    from dsv4.kernels.reference.attention import decode_attention
    from dsv4.kernels.reference.entries import write_entries
    from dsv4.kernels.triton import attention as ta
    H, D, W = 64, 512, 128
    ring, pool = (EntryStore(n, EntryFormat(D, 64, "kv"), "cuda").tensors for n in (W, max(T, 1)))
    write_entries(ring, slice(None), torch.randn(W, D, device="cuda"))
    write_entries(pool, slice(None), torch.randn(max(T, 1), D, device="cuda"))
    q, sink = torch.randn(H, D, device="cuda"), torch.randn(H, device="cuda")
    pos = torch.tensor([5000], device="cuda")
    rows, ok = torch.randperm(max(T, 1), device="cuda")[:T], torch.ones(T, dtype=torch.bool, device="cuda")
    ent = (pool, rows, ok) if T else (None, None, None)
    ref = decode_attention(q, ring, pos, *ent, sink, D ** -0.5)
    fn = lambda: ta.decode_attention_triton(q, ring, pos, *ent, sink, D ** -0.5)  # noqa: E731
    keep, out = dict(ta.ATTENTION), []
    try:
        if settings is None:
            settings = [dict(keys=k, chunk=c, values=v, warps=w)
                        for k, c, v, w in itertools.product((16, 32), (32, 64), (64, 128, 256), (4, 8))]
        for setting in settings:
            ta.ATTENTION.clear()
            ta.ATTENTION.update(keep, **setting)
            try:
                err = ((fn() - ref).abs().max() / ref.abs().max()).item()
            except triton.runtime.errors.OutOfResources as e:  # a tile too large for the SM
                print(f"skipped {setting}: {e}")
                continue
            out.append({"kernel": "decode_attention", "entries": T, **{k: ta.ATTENTION[k] for k in keep},
                        "us": graph_time(fn) * 1e6, "rel_err": err})
            print(json.dumps(out[-1]))
    finally:
        ta.ATTENTION.clear()
        ta.ATTENTION.update(keep)
    return out


def tune_indexer() -> list[dict]:
    """Time kernels.indexer_select_decode (scores, radix select, sort: every launch) for Flash's
    indexer (64 heads x 128, FP4 keys, top 512) at 64k and 1M tokens of context (16400 / 262144 CSA
    entries), for each setting of decode_indexer.SCORE (entries per program, warps) and then of
    SELECT (codes per radix-pass program, warps, the sort's warps); each result checked against the
    reference's rows. Also kernels.indexer_quant for one token's 64 heads against its reference."""
    from dsv4.cache.pools import EntryStore
    from dsv4.cache.schema import EntryFormat
    from dsv4.kernels import quant
    from dsv4.kernels.reference.entries import write_entries
    from dsv4.kernels.reference.indexer import indexer_select_decode
    from dsv4.kernels.triton import decode_indexer as tdi, indexer_quant as tiq
    H, Di, k, out = 64, 128, 512, []
    x = torch.randn(1, H, Di, device="cuda")
    for name, fn in (("indexer_quant", lambda: tiq.indexer_quant_triton(x)),
                     ("indexer_quant reference", lambda: quant.indexer_quant_dequant(x))):
        out.append({"kernel": name, "rows": H, "us": graph_time(fn) * 1e6})
        print(json.dumps(out[-1]))
    keep_score, keep_select = dict(tdi.SCORE), dict(tdi.SELECT)
    for n in (16400, 262144):
        store = EntryStore(n + 7, EntryFormat(Di, 0, "fp4"), "cuda").tensors
        rows = torch.randperm(n + 7, device="cuda")[:n]
        write_entries(store, rows, torch.randn(n, Di, device="cuda"))
        q = quant.fp4_quant_dequant(torch.randn(H, Di, device="cuda"))
        w = torch.randn(H, device="cuda") * H ** -0.5
        ok = torch.ones(n, dtype=torch.bool, device="cuda")
        ref = indexer_select_decode(q, w, store, rows, ok, k)[0]
        fn = lambda: tdi.indexer_select_decode_triton(q, w, store, rows, ok, k)  # noqa: E731
        sweeps = [("SCORE", dict(entries=e, warps=wp)) for e, wp in itertools.product((32, 64, 128), (4, 8))]
        sweeps += [("SELECT", dict(entries=e, warps=wp, sort_warps=sw))
                   for e, wp, sw in itertools.product((1024, 2048, 4096), (4, 8), (4, 8))]
        try:
            for table, setting in sweeps:  # one table varied at a time, the other at its default
                tdi.SCORE.update(keep_score)
                tdi.SELECT.update(keep_select)
                getattr(tdi, table).update(setting)
                try:
                    same = torch.equal(fn()[0], ref)
                except triton.runtime.errors.OutOfResources as e:
                    print(f"skipped {table} {setting}: {e}")
                    continue
                out.append({"kernel": "indexer_select_decode", "n": n, "table": table, **setting,
                            "us": graph_time(fn) * 1e6, "same_rows": same})
                print(json.dumps(out[-1]))
        finally:
            tdi.SCORE.update(keep_score)
            tdi.SELECT.update(keep_select)
    for n in (16400, 262144):
        for table in ("SCORE", "SELECT"):
            rs = [r for r in out if r.get("n") == n and r.get("table") == table and r["same_rows"]]
            if rs:
                print("BEST", json.dumps(min(rs, key=lambda r: r["us"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", choices=("experts", "attention", "merge", "gemv", "indexer"), default=None)
    a = ap.parse_args()
    if a.only == "gemv":  # a long sweep: what ran is written even when a timeout (SIGTERM) stops it
        res = []
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
        try:
            tune_gemv(out=res)
        finally:
            if a.out:
                with open(a.out, "w") as f:
                    json.dump({"all": res, "card": torch.cuda.get_device_name()}, f, indent=1)
        return
    if a.only in ("attention", "merge", "indexer"):
        if a.only == "indexer":
            res = tune_indexer()
        elif a.only == "merge":  # the merge launch's channels per program, the rest as committed
            res = [r for T in (512, 16) for r in tune_attention(T, [dict(merge=m) for m in (512, 256, 128, 64)])]
        else:
            res = [r for T in (512, 256, 16) for r in tune_attention(T)]
            total = {}
            for r in res:
                key = (r["keys"], r["chunk"], r["values"], r["warps"])
                total[key] = total.get(key, 0.0) + r["us"]
            for key, us in sorted(total.items(), key=lambda kv: kv[1])[:5]:
                print("BEST keys/chunk/values/warps", key, f"{us:.1f} us summed over 512, 256, 16 entries")
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"all": res, "card": torch.cuda.get_device_name()}, f, indent=1)
        return
    res = tune_experts("mxfp4", 256, 6, (16,), (512,), (4,), mode=0)  # float decode on the CUDA cores
    res += tune_experts("mxfp4", 256, 6, (16, 32), (512, 1024), (4, 8), mode=2)  # dp4a

    best = {}
    for r in res:
        if "mode" not in r:
            continue
        key = (r["kernel"], r["format"], r["mode"], r["experts"])  # the fastest per kernel
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for r in best.values():
        print("BEST", json.dumps(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"all": res, "best": list(best.values()), "card": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()

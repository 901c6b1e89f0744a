"""Checks of the Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set
before triton is imported, so tests/test_kernels_interpreted.py runs this file as a subprocess).

Same bounds as the GPU tests (tests/test_gpu_kernels.py): 1e-5 x max|reference| per kernel; the
kernel path registered for the CPU must match the reference path over decode steps."""

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from dsv4.kernels import dispatch, quant, register  # noqa: E402
from dsv4.kernels.reference.linear import QWeight, grouped_linear_reference, linear_reference  # noqa: E402
from dsv4.kernels.reference.mhc import mhc_post, mhc_pre  # noqa: E402
from dsv4.kernels.reference.moe import swiglu  # noqa: E402
from dsv4.kernels.reference.norm import rms_norm  # noqa: E402
from dsv4.kernels.reference.rope import apply_rope, rms_norm_rope, rope_cos_sin, rope_inv_freq  # noqa: E402
from dsv4.kernels.triton import elementwise as te, linear as tlin, mhc as tm, moe as tmoe  # noqa: E402
from dsv4.kernels.triton import attention as tatt, compress as tcomp  # noqa: E402
from dsv4.kernels.reference.compress import compress_decode  # noqa: E402
from dsv4.kernels.triton import router as trt  # noqa: E402
from dsv4.kernels.reference.moe import hash_route, router_scores, router_topk  # noqa: E402
from dsv4.kernels.reference.attention import decode_attention  # noqa: E402
from dsv4.kernels.reference.entries import entry_rows, store_entry  # noqa: E402
from dsv4.kernels.reference.moe import routed_experts  # noqa: E402
from kernel_cases import (FORMATS, expert_set, index_select_case, indexer_quant_mismatch,  # noqa: E402
                          staged_values, store)

g = torch.Generator().manual_seed(0)
BOUND = 1e-5


def close(name, got, ref):
    err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert got.shape == ref.shape and err <= BOUND, f"{name}: relative error {err:.2e} (shape {tuple(got.shape)})"
    print(f"ok {name} {err:.1e}")


def gemv_checks():
    # more output tiles than the grid's y axis holds: one clear error before any launch
    try:
        tlin.gemv(torch.zeros(1, 1), QWeight("dense", torch.zeros(65536 * 32 + 1, 1)))
    except ValueError as e:
        assert "pass the grid's 65535" in str(e), e
    else:
        raise AssertionError("gemv launched a grid past 65535 tiles")
    print("ok gemv refuses a grid past 65535 tiles")
    for N, K, M in [(262, 64, 1), (300, 384, 3), (96, 256, 2)]:
        w = torch.randn(N, K, generator=g) / K ** 0.5
        x = torch.randn(M, K, generator=g)
        q, s = quant.quant_fp8_block(w)
        ws = {"fp8": QWeight("fp8", q, s), "fp8-f32": QWeight("fp8", q, quant.ue8m0_to_float(s.view(torch.uint8))),
              "bf16": QWeight("dense", w.bfloat16()), "f32": QWeight("dense", w),
              "mxfp4": QWeight("mxfp4", *quant.quant_mxfp4(w)), "nvfp4": QWeight("nvfp4", *quant.quant_nvfp4(w))}
        for fmt, W in ws.items():
            close(f"gemv {fmt} {N}x{K} M={M}", tlin.gemv(x, W), linear_reference(x, W))
            # faithful mode: x's 128-slices through e4m3 in the kernel (a short last slice at K=64)
            xq = x * torch.logspace(-3, 3, K)  # a wide range, so the per-slice scales differ
            ref = linear_reference(xq, W, act_quant=True)
            assert fmt in ("bf16", "f32") or not torch.allclose(ref, linear_reference(xq, W), rtol=1e-4), fmt
            close(f"gemv act_quant {fmt} {N}x{K} M={M}", tlin.gemv(xq, W, act_quant=True), ref)
    # the prefetching loops (next step's weights in flight; 2: the first tile before the PDL wait), with
    # several K steps per program and a ragged last split: 4 programs over 3 row tiles
    N, K, M = 96, 640, 2
    w, x = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(M, K, generator=g) * torch.logspace(-2, 2, K)
    ws = {"fp8": QWeight("fp8", *quant.quant_fp8_block(w)), "bf16": QWeight("dense", w.bfloat16()),
          "mxfp4": QWeight("mxfp4", *quant.quant_mxfp4(w)), "nvfp4": QWeight("nvfp4", *quant.quant_nvfp4(w))}
    keep = dict(tlin.GEMV)
    try:
        for prefetch, programs in [(2, 4), (1, 1)]:
            tlin.GEMV.update(prefetch=prefetch, programs=programs, fp8_block_k=128, fp8_short_block_k=128,
                             dense_block_k=64)
            for fmt, W in ws.items():
                close(f"gemv prefetch={prefetch} programs={programs} {fmt} act_quant {N}x{K} M={M}",
                      tlin.gemv(x, W, act_quant=True), linear_reference(x, W, act_quant=True))
    finally:
        tlin.GEMV.clear()
        tlin.GEMV.update(keep)
    for G, R, Kg, S in [(2, 16, 192, 3), (3, 24, 256, 1), (3, 48, 384, 2)]:
        W = QWeight("fp8", *quant.quant_fp8_block(torch.randn(G * R, Kg, generator=g)))
        og = torch.randn(S, G, Kg, generator=g)
        close(f"grouped {G}x{R}x{Kg}", tlin.grouped_linear_triton(og, W), grouped_linear_reference(og, W))
        close(f"grouped act_quant {G}x{R}x{Kg}", tlin.grouped_linear_triton(og, W, act_quant=True),
              grouped_linear_reference(og, W, act_quant=True))


def router_checks():
    for E, d, k in [(256, 4096, 6), (8, 64, 3), (6, 48, 2)]:
        x = torch.randn(1, d, generator=g)
        gate = (torch.randn(E, d, generator=g) / d ** 0.5).bfloat16()
        s_ref = router_scores(x, gate)
        close(f"router_scores E={E} d={d}", trt.router_scores_triton(x, gate), s_ref)
        bias = torch.randn(E, generator=g) * 0.1
        bias[1] = bias[0] + s_ref[0, 0] - s_ref[0, 1]  # a tie between experts 0 and 1: 0 must win
        tid, tok = torch.randint(0, E, (50, k), generator=g, dtype=torch.int32), torch.tensor([17])
        for what, got, ref in [("topk", trt.router_topk_triton(s_ref, bias, k, 2.5), router_topk(s_ref, bias, k, 2.5)),
                               ("hash", trt.hash_route_triton(s_ref, tid, tok, 1.5), hash_route(s_ref, tid, tok, 1.5))]:
            assert torch.equal(got[1], ref[1]), f"router {what} E={E}: ids {got[1].tolist()} vs {ref[1].tolist()}"
            close(f"router {what} weights E={E} k={k}", got[0], ref[0])
    # several rows: past 16 the gate through the prefill GEMM (float32 rows in three bf16 parts, bf16
    # rows as they are), up to 16 the GEMV; the top-k 16 rows per program with a ragged last block
    for E, d, k, S in [(256, 512, 6, 37), (8, 64, 3, 20), (72, 96, 6, 5), (200, 64, 4, 17)]:
        gate = (torch.randn(E, d, generator=g) / d ** 0.5).bfloat16()
        for dt in (torch.float32, torch.bfloat16):
            x = (torch.randn(S, d, generator=g) * 3).to(dt)
            close(f"router_scores chunk S={S} E={E} d={d} {dt}", trt.router_scores_triton(x, gate), router_scores(x, gate))
        s = router_scores(torch.randn(S, d, generator=g), gate)
        bias = (torch.randn(E, generator=g) * 100).round() / 1024  # exact sums below
        bias[3] = bias[2]
        s[:, 2:4] = s.max() + 1  # experts 2 and 3 tie at the top of every row: 2 first, then 3
        tie = min(5, S - 1)
        s[tie] = 0.25 - bias  # a row where every expert ties: ids 0..k-1
        got, ref = trt.router_topk_triton(s, bias, k, 2.5), router_topk(s, bias, k, 2.5)
        assert torch.equal(got[1], ref[1]), f"router topk chunk E={E}: ids differ in rows " \
            f"{(got[1] != ref[1]).any(1).nonzero().flatten().tolist()}"
        assert got[1][:, :2].tolist() == [[2, 3]] * tie + [[0, 1]] + [[2, 3]] * (S - tie - 1), got[1][:, :2].tolist()
        close(f"router topk chunk weights S={S} E={E} k={k}", got[0], ref[0])


def experts_checks():
    for fmt in FORMATS:
        for E, inter, d, k in [(6, 96, 256, 3), (5, 64, 160, 2)]:
            es = expert_set(fmt, E, inter, d, g)
            x = torch.randn(1, d, generator=g) * 4
            ids = torch.randperm(E, generator=g)[:k].view(1, k)
            wts = torch.rand(1, k, generator=g)
            close(f"routed experts {fmt} E={E} {inter}x{d} k={k}", tmoe.routed_experts_triton(x, ids, wts, es, 7.0),
                  routed_experts(x, ids, wts, es, 7.0))
            close(f"routed experts act_quant {fmt} E={E} {inter}x{d} k={k}",
                  tmoe.routed_experts_triton(x, ids, wts, es, 7.0, act_quant=True),
                  routed_experts(x, ids, wts, es, 7.0, act_quant=True))


def attention_checks():
    # store_entry writes the same bytes as the reference quantiser (values on rounding ties included)
    for kind, D, r in [("kv", 512, 64), ("kv", 96, 32), ("fp4", 128, 0), ("fp4", 64, 0), ("f32", 80, 16)]:
        for trial in range(3):
            x = torch.randn(1, D, generator=g) * 10 ** (trial - 1)
            if trial == 2:  # exact ties of the e2m1 / fp8 grids and an all-zero group
                x[0, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75] * 4) * 4
                x[0, 32:64] = 0
            a, b = store(kind, 5, D, r), store(kind, 5, D, r)
            row = torch.tensor([3])
            store_entry(x, a, row)
            tatt.store_entry_triton(x, b, row)
            same = all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                                   b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)
            assert same, f"store_entry {kind} D={D} trial {trial}: bytes differ"
        print(f"ok store_entry {kind} D={D} (bytes equal)")
        x = torch.randn(4, D, generator=g) * torch.logspace(-2, 2, 4)[:, None]  # a chunk's rows at once
        a, b = store(kind, 9, D, r), store(kind, 9, D, r)
        rows = torch.tensor([8, 0, 5, 2])
        store_entry(x, a, rows)
        tatt.store_entry_triton(x, b, rows)
        assert all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                               b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)
        print(f"ok store_entry {kind} D={D} 4 rows (bytes equal)")
    # decode attention over ring + entries in their storage formats
    for kind, H, D, r, W, T, pos in [("kv", 64, 512, 64, 128, 40, 300), ("kv", 6, 128, 64, 16, 9, 5),
                                     ("f32", 4, 96, 32, 16, 0, 40), ("f32", 20, 80, 16, 32, 70, 77)]:
        ring, pool = store(kind, W, D, r), store(kind, 100, D, r)
        for i in range(W):
            store_entry(torch.randn(1, D, generator=g), ring, torch.tensor([i]))
        for i in range(100):
            store_entry(torch.randn(1, D, generator=g), pool, torch.tensor([i]))
        q = torch.randn(H, D, generator=g)
        rows = torch.randperm(100, generator=g)[:T]
        ok = torch.rand(T, generator=g) < 0.7
        sink = torch.randn(H, generator=g)
        p = torch.tensor([pos])
        ent = (pool, rows, ok) if T else (None, None, None)
        ref = decode_attention(q, ring, p, *ent, sink, D ** -0.5)
        close(f"decode_attention {kind} H={H} D={D} W={W} T={T} pos={pos}",
              tatt.decode_attention_triton(q, ring, p, *ent, sink, D ** -0.5), ref)
        if kind == "kv":  # bf16 queries (faithful mode's) take one product: the bits of their float32 form's three
            qb = q.bfloat16()
            got = tatt.decode_attention_triton(qb, ring, p, *ent, sink, D ** -0.5)
            assert torch.equal(got, tatt.decode_attention_triton(qb.float(), ring, p, *ent, sink, D ** -0.5))
            close(f"decode_attention bf16 q {kind} H={H} D={D}", got, decode_attention(qb.float(), ring, p, *ent, sink,
                                                                                        D ** -0.5))
        keep = tatt.ATTENTION["merge"]
        tatt.ATTENTION["merge"] = 32  # the merge launch with several channel blocks per head
        try:
            close(f"decode_attention merge=32 {kind} H={H} D={D}", tatt.decode_attention_triton(q, ring, p, *ent, sink,
                                                                                             D ** -0.5), ref)
        finally:
            tatt.ATTENTION["merge"] = keep


def indexer_checks():
    """The decode indexer (scores over keys in their stored format, radix top-k): the same entries in
    the same order as the reference, ties included; the select program's steps made small so the
    entries take several of them."""
    from dsv4.kernels.reference.indexer import indexer_select_decode
    from dsv4.kernels.triton import decode_indexer as tdi

    tdi.SELECT["entries"] = 32  # several programs per radix pass, ties across them
    for kind, H, Di, n, k, vis in [("fp4", 4, 64, 150, 16, 120), ("fp4", 3, 32, 90, 8, 5), ("f32", 5, 48, 77, 12, 77),
                                   ("f32", 2, 16, 40, 39, 40), ("fp4", 4, 64, 100, 40, 30)]:  # last: hidden ties span programs
        args = index_select_case(kind, H, Di, n, k, vis, g)
        got, ref = tdi.indexer_select_decode_triton(*args), indexer_select_decode(*args)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), \
            f"indexer_select_decode {kind} n={n} k={k}: {got[0].tolist()} vs {ref[0].tolist()}"
        print(f"ok indexer_select_decode {kind} H={H} Di={Di} n={n} k={k} visible={vis} (equal)")
    # the select alone on hand-made codes: runs of equal codes across programs, hidden entries (the code
    # of -inf) and both signs; exactly k slots taken (a wrong tie count would take more)
    neg_inf = tdi.NEG_INF_CODE.value
    for n, k in [(200, 50), (333, 100), (97, 96)]:
        codes = torch.randint(-3, 4, (n,), generator=g, dtype=torch.int32) * 1000
        codes[torch.rand(n, generator=g) < 0.2] = neg_inf
        rows = torch.randperm(n + 5, generator=g)[:n]
        work = torch.zeros(tdi.WORK, dtype=torch.int32)
        got_rows, got_ok = tdi.select_top_codes(codes, rows, k, work)
        order = torch.sort(codes.long(), descending=True, stable=True).indices[:k]
        assert torch.equal(got_rows, rows[order]) and torch.equal(got_ok, codes[order] != neg_inf), (n, k)
        taken = work[tdi.COUNTER.value].item()
        assert taken == k, f"select took {taken} slots for k={k}"
        print(f"ok select_top_codes n={n} k={k} (equal, {k} slots)")
    from dsv4.kernels.triton import indexer_quant as tiq

    for shape, dtype in [((1, 64, 128), torch.float32), ((70, 3, 64), torch.bfloat16), ((5, 32), torch.float32)]:
        x = torch.randn(shape, generator=g).to(dtype) * 3
        assert tiq.indexer_quant_supported(x)
        got = tiq.indexer_quant_triton(x)
        assert got.shape == x.shape and got.dtype == x.dtype
        problem = indexer_quant_mismatch(got, x)
        assert problem is None, problem
        print(f"ok indexer_quant {tuple(shape)} {dtype} (equal but for borderline roundings)")


def compress_windows_checks():
    """A chunk's window pooling: HCA and CSA, with and without the previous window's series a."""
    from dsv4.kernels.reference.compress import compress_windows

    for ratio, D, nw, overlap, prev in [(4, 96, 5, True, True), (4, 96, 3, True, False), (8, 40, 4, False, False),
                                        (128, 64, 2, False, False), (6, 48, 3, True, True)]:
        width = 2 * D if overlap else D
        c = torch.randn(nw * ratio, width, generator=g)
        z = torch.randn(nw * ratio, width, generator=g) * 3
        pa = (torch.randn(ratio, D, generator=g), torch.randn(ratio, D, generator=g)) if prev else None
        assert tcomp.compress_windows_supported(c, z, ratio, overlap, pa)
        got, got_last = tcomp.compress_windows_triton(c, z, ratio, overlap, pa)
        ref, ref_last = compress_windows(c, z, ratio, overlap, pa)
        close(f"compress_windows ratio={ratio} D={D} windows={nw} overlap={overlap} prev={prev}", got, ref)
        assert (got_last is None) == (ref_last is None)
        if ref_last is not None:
            assert all(torch.equal(a, b) for a, b in zip(got_last, ref_last))


def compress_checks():
    """One token's compressor step: the entry and the state it leaves (tail, series a)."""
    compress_windows_checks()
    for ratio, D, overlap, rd in [(4, 512, True, 64), (128, 96, False, 32), (4, 64, True, 16), (8, 80, False, 16)]:
        W = 2 * D if overlap else D
        for pos in (0, 2, ratio - 1, 3 * ratio - 1, 5 * ratio + 1):
            state = [torch.randn(ratio - 1, W, generator=g), torch.randn(ratio - 1, W, generator=g)]
            if overlap:
                state += [torch.randn(ratio, D, generator=g), torch.randn(ratio, D, generator=g)]
            c, z = torch.randn(1, W, generator=g), torch.randn(1, W, generator=g)
            ape, nw = torch.randn(ratio, W, generator=g) * 0.1, torch.randn(D, generator=g)
            ang = torch.randn(1, rd // 2, generator=g)
            ref_state, got_state = [t.clone() for t in state], [t.clone() for t in state]
            args = lambda st: (c, z, st[0], st[1], ape, st[2] if overlap else None, st[3] if overlap else None,  # noqa: E731
                               nw, ang.cos(), ang.sin(), torch.tensor([pos]), 1e-6)
            ref = compress_decode(*args(ref_state))
            got = tcomp.compress_decode_triton(*args(got_state))
            close(f"compress_decode ratio={ratio} D={D} overlap={overlap} pos={pos}", got, ref)
            for a, b in zip(got_state, ref_state):
                assert torch.equal(a, b), f"compress_decode state differs (ratio={ratio}, pos={pos})"


def elementwise_checks():
    for S, n, d in [(1, 4, 512), (3, 4, 48), (2, 2, 96), (40, 4, 320), (17, 2, 96)]:  # the last two: chunk rows
        st = torch.randn(S, n, d, generator=g)
        fn = torch.randn((2 + n) * n, n * d, generator=g) * 0.02
        base, scale = torch.randn((2 + n) * n, generator=g) * 0.5, 1 + 0.1 * torch.randn(3, generator=g)
        ref = mhc_pre(st, fn, base, scale, 20, 1e-6, 1e-6)
        for part, a, b in zip(("x", "post", "comb"), tm.mhc_pre_triton(st, fn, base, scale, 20, 1e-6, 1e-6), ref):
            close(f"mhc_pre {part} {S}x{n}x{d}", a, b)
        out = torch.randn(S, d, generator=g)
        close(f"mhc_post {S}x{n}x{d}", tm.mhc_post_triton(out, st, ref[1], ref[2]), mhc_post(out, st, ref[1], ref[2]))
    # bf16 chunk rows (widened to float32 for the 3xTF32 dots); a ragged last K range
    for S, n, d in [(40, 4, 300), (17, 2, 96)]:
        st = torch.randn(S, n, d, generator=g).bfloat16()
        fn = torch.randn((2 + n) * n, n * d, generator=g) * 0.02
        base, scale = torch.randn((2 + n) * n, generator=g) * 0.5, 1 + 0.1 * torch.randn(3, generator=g)
        x, post, comb = tm.mhc_pre_triton(st, fn, base, scale, 20, 1e-6, 1e-6)
        ref = mhc_pre(st, fn, base, scale, 20, 1e-6, 1e-6)
        close(f"mhc_pre post {S}x{n}x{d} bf16", post, ref[1])
        close(f"mhc_pre comb {S}x{n}x{d} bf16", comb, ref[2])
        # x: float32 sums rounded once to bf16 (the interpreter's cast truncates: one ulp), plus the
        # float32 summation order (BOUND x max|ref|, as the GPU test: a sum that cancels to ~1e-5
        # of the largest differs by more than one ulp of itself)
        xr = ref[0].float()
        assert x.dtype == torch.bfloat16 and ((x.float() - xr).abs() <= 2 ** -7 * xr.abs() + BOUND * xr.abs().max()).all()
        print(f"ok mhc_pre x {S}x{n}x{d} bf16 (within one bf16 ulp)")
    for shape in [(3, 100), (2, 2, 96)]:
        x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
        close(f"rms_norm {shape}", tm.rms_norm_triton(x, w, 1e-6), rms_norm(x, w, 1e-6))
        close(f"rms_norm {shape} no weight", tm.rms_norm_triton(x, None, 1e-6), rms_norm(x, None, 1e-6))
    for shape, rd in [((3, 4, 96), 32), ((2, 64), 16), ((37, 5, 64), 16), ((43, 30, 32), 16)]:  # 1290 rows: several per program
        x, ang = torch.randn(*shape, generator=g), torch.randn(shape[0], rd // 2, generator=g)
        for inv in (False, True):
            close(f"rope {shape} inverse={inv}", te.apply_rope_triton(x, ang.cos(), ang.sin(), inv),
                  apply_rope(x, ang.cos(), ang.sin(), inv))
        for w in (None, torch.randn(shape[-1], generator=g)):
            close(f"rms_norm_rope {shape} weight={w is not None}",
                  te.rms_norm_rope_triton(x * 5, w, 1e-6, ang.cos(), ang.sin()),
                  rms_norm_rope(x * 5, w, 1e-6, ang.cos(), ang.sin()))
    a, b = torch.randn(3, 300, generator=g) * 8, torch.randn(3, 300, generator=g) * 8
    close("swiglu", te.swiglu_triton(a, b, 10.0), swiglu(a, b, 10.0))
    inv = rope_inv_freq(64, 10000.0)
    for ratio in (1, 4, 128):
        p = torch.tensor([0, 5, 130, 70001])
        for got, ref in zip(te.rope_cos_sin_triton(p, inv, ratio), rope_cos_sin(p, inv, ratio)):
            close(f"rope_cos_sin ratio={ratio}", got, ref)
    # a step's entry rows: unallocated blocks (-1) map to row 0; the partial window's entry is not ok
    table = torch.tensor([3, 0, 7, -1, -1], dtype=torch.int32)
    for ratio, cap, pos in [(4, 160, 95), (128, 5, 300), (4, 160, 0), (8, 80, 79)]:
        got = te.entry_rows_triton(torch.tensor([pos]), table, ratio, 128 // ratio, cap)
        ref = entry_rows(torch.tensor([pos]), table, ratio, 128 // ratio, cap)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), f"entry_rows ratio={ratio} pos={pos}"
        assert ref[2].sum().item() == min(cap, (pos + 1) // ratio)
    print("ok entry_rows (equal)")


def engine_check():
    """The kernel path (registered for the CPU here) against the reference path, both modes: the
    ordinary one-token forward in exact mode, the static decode step (the one captured in a CUDA
    graph on a GPU) in both. A 38-token prompt (through the references, to keep the interpreter's
    time down), then 4 kernel-path steps (a CSA window closes at the second)."""
    from dsv4.engine.runtime.decode import DecodeRunner
    from dsv4.engine.model.model import Model
    from dsv4.engine.runtime.session import Session
    from dsv4.engine.tools.synthetic import random_tensors, tiny_configs

    from dsv4.kernels import register_triton_kernels

    register_triton_kernels("cpu")  # every GPU kernel, run here by Triton's interpreter
    cfg = tiny_configs()["swa-csa-hca"]
    tensors = random_tensors(cfg, 1)
    ids = torch.randint(0, cfg.vocab_size, (42,), generator=torch.Generator().manual_seed(4))

    def run(model, backend, static):
        s = Session(model, 64, cuda_graph=False)
        with dispatch.use_backend("reference"):
            out = [s.prefill(ids[:38])]
        with dispatch.use_backend(backend):
            runner = DecodeRunner(model, s.cache.handles(s.slot), graph=False)
            for t in ids[38:].tolist():
                if not static:
                    out.append(s.step(t))
                    continue
                s.cache.prepare(s.slot, 1)
                out.append(runner.step(t, s.seq_len))
                s.cache.commit(s.slot, 1)
            return torch.stack(out)

    for mode, bound, paths in (("exact", 1e-4, (False, True)), ("faithful", 5e-3, (True,))):
        model = Model.from_state_dict(cfg, tensors, mode=mode)
        ref = run(model, "reference", False)
        for static in paths:
            fast = run(model, "auto", static)
            err = (fast - ref).abs().max().item() / ref.abs().max().item()
            ran = dispatch.report()
            ops = ("linear", "mhc_pre", "decode_attention", "routed_experts", "indexer_select_decode")
            ops += ("indexer_quant",) if mode == "faithful" else ()
            assert not static or all("triton" in ran[op] for op in ops), ran
            what = "static decode step" if static else "decode"
            assert err <= bound, f"{mode}: kernel path ({what}) vs reference path over 4 steps: {err:.2e}"
            print(f"ok engine kernel path, {mode}, {what} {err:.1e}")


def _chunk_case(kind, H, D, r, W, S, start, ratio, csa, K=6, n_store=None, rope=False):
    """chunk_attention: the Triton kernel against the reference (window ring + chunk keys, HCA or CSA
    entries in their storage format at scattered rows), positions from ``start``; rope: with the
    output's inverse RoPE over its last r channels (out_rope)."""
    from dsv4.kernels.reference.chunk_attention import chunk_attention
    from dsv4.kernels.reference.entries import write_entries
    from dsv4.kernels.triton.prefill_attention import chunk_attention_triton

    n = (start + S) // ratio if ratio else 0
    n = min(n, n_store) if n_store else n  # positions near 2^31: the first n_store entries only
    q, kv, sink = torch.randn(S, H, D, generator=g), torch.randn(S, D, generator=g), torch.randn(H, generator=g)
    pos = torch.arange(start, start + S)
    ring = torch.randn(W, D, generator=g)
    rp = (start - 1) - torch.remainder(start - 1 - torch.arange(W), W)
    rp = torch.where(rp >= 0, rp, -1)
    ent = rows = sel = None
    if ratio:
        ent = store(kind, n + 7, D, r)
        rows = torch.randperm(n + 7, generator=g)[:n]
        write_entries(ent, rows, torch.randn(n, D, generator=g))
        if csa:
            sel = torch.full((S, K), -1, dtype=torch.long)
            for i in range(S):
                pick = torch.randperm(min(n, (start + i + 1) // ratio), generator=g)[:K]
                sel[i, :len(pick)] = pick
    args = (q, pos, ring, rp, kv, W, ent, rows, ratio, sel, sink, D ** -0.5)
    kw = {}
    if rope:
        ang = torch.rand(S, r // 2, generator=g) * 6.3
        kw = {"out_rope": (ang.cos(), ang.sin())}
    got = chunk_attention_triton(*args, **kw)
    close(f"chunk_attention {kind} H={H} D={D} W={W} S={S} start={start} ratio={ratio} csa={csa} rope={rope}",
          got, chunk_attention(*args, **kw))
    return got


def _dense_entries_checks(pa):
    """TILE["dense_entries"]: the FP8 store's entries widened once into dense rows equal read_entries
    (exactly: e4m3 x 2^s and the BF16 channels are float32 values), and the attention through them
    equals the attention reading the store (the same keys, so bit for bit) and the reference."""
    from dsv4.kernels.reference.entries import read_entries, write_entries
    ent = store("kv", 40, 128, 64)
    rows = torch.randperm(40, generator=g)[:29]
    write_entries(ent, rows, torch.randn(29, 128, generator=g) * torch.exp2(torch.randint(-12, 12, (29, 1), generator=g)))
    dense = pa.dense_entries(ent["fp8"].view(torch.uint8), ent["bf16"], ent["scales"], rows, 128,
                             ent["fp8"].shape[1], "kv", torch.float32)
    assert torch.equal(dense, read_entries(ent, rows).float()), "dense_entries != read_entries"
    cases = [("kv", 6, 128, 64, 16, 33, 50, 4, True), ("kv", 2, 80, 16, 16, 21, 300, 128, False),
             ("kv", 20, 128, 64, 8, 5, 40, 4, True)]
    keep = pa.TILE["dense_entries"]
    try:
        outs = {}
        state = g.get_state()
        for on in (False, True):  # the same random cases both ways
            pa.TILE["dense_entries"] = on
            g.set_state(state)
            outs[on] = [_chunk_case(*case, rope=case[2] == 128) for case in cases]
            outs[on].append(_chunk_case("kv", 4, 128, 64, 8, 6, (1 << 31) - 3, 4, True, n_store=9))
        assert all(torch.equal(a, b) for a, b in zip(outs[False], outs[True])), "dense entries changed the output"
    finally:
        pa.TILE["dense_entries"] = keep
    print("ok dense_entries (exact rows; attention through them)")


def prefill_checks():
    """The prefill kernels: chunk attention (window, HCA, CSA, SWA-only; positions past 2^31), entry
    rows of block ids past 2^31 / rows, and the prefill kernel path against the reference path."""
    for case in [("f32", 4, 96, 32, 16, 40, 0, 4, False), ("kv", 6, 128, 64, 16, 33, 50, 4, True),
                 ("kv", 2, 80, 16, 16, 21, 300, 128, False), ("f32", 4, 96, 32, 16, 9, 5, 0, False),
                 ("kv", 20, 128, 64, 8, 5, 40, 4, True)]:
        _chunk_case(*case)
    _chunk_case("kv", 4, 128, 64, 8, 6, (1 << 31) - 3, 4, True, n_store=9)
    from dsv4.kernels.triton import prefill_attention as pa
    for fused in (True, False):  # the inverse RoPE in the epilogue, or as a pass after the kernel
        keep = pa.TILE["rope_out"]
        pa.TILE["rope_out"] = fused
        try:
            _chunk_case("kv", 6, 128, 64, 16, 33, 50, 4, True, rope=True)
            _chunk_case("f32", 4, 96, 32, 16, 9, 5, 0, False, rope=True)
            _chunk_case("kv", 2, 80, 16, 16, 21, 300, 128, False, rope=True)
        finally:
            pa.TILE["rope_out"] = keep
    _dense_entries_checks(pa)
    from dsv4.kernels.reference.indexer import indexer_scores
    from dsv4.kernels.triton.prefill_indexer import indexer_scores_triton
    for S, H, Di, T in [(5, 2, 64, 70), (70, 3, 32, 9), (1, 64, 128, 130)]:
        q, k, wt = torch.randn(S, H, Di, generator=g), torch.randn(T, Di, generator=g), torch.randn(S, H, generator=g)
        close(f"indexer_scores S={S} H={H} Di={Di} T={T}", indexer_scores_triton(q, k, wt), indexer_scores(q, k, wt))
    _chunk_case("f32", 4, 64, 16, 8, 6, (1 << 31) - 3, 128, False, n_store=5)
    big = (1 << 31) // 32 + 5  # a block whose rows start past 2^31 (ratio 4: 32 entries per block)
    table = torch.tensor([3, big, 7], dtype=torch.int32)
    for pos in (40, 95):
        got = te.entry_rows_triton(torch.tensor([pos]), table, 4, 32, 96)
        ref = entry_rows(torch.tensor([pos]), table, 4, 32, 96)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)) and ref[1].max().item() > 1 << 31, pos
    print("ok entry_rows past 2^31 (equal)")
    gemm_checks()
    grouped_experts_checks()
    staged_experts_checks()
    prefill_engine_check()


def grouped_experts_checks():
    """The routed experts of a chunk as a grouped GEMM (pairs sorted by expert, FP4 widened in
    registers, SwiGLU and routing weight fused), float32 and bf16 rows."""
    from dsv4.kernels.triton import prefill_experts as pe

    keep = dict(pe.TILE)
    for tile, cases in [({}, [(6, 96, 128, 3, 20), (5, 64, 192, 2, 33), (4, 256, 128, 2, 17)]),
                        # block scales read as 32-bit words: one word per 32-column step, or 4 words'
                        # bytes unpacked per 128-column step (d = 128, I = 256; I = 96 stays on bytes)
                        (dict(words=True), [(4, 256, 128, 2, 17)]),
                        (dict(words=True, k=128), [(6, 96, 128, 3, 20), (4, 256, 128, 2, 17)])]:
        pe.TILE.update(keep, **tile)
        try:
            _grouped_expert_cases(pe, cases, str(tile or ""))
        finally:
            pe.TILE.update(keep)


def staged_experts_checks():
    """Faithful MXFP4 experts through FP8 staging (kernels/triton/staged_experts.py): the staged bytes
    give the MX weights exactly down to 14 binades below a block's largest scale (w1 and w3 with their
    rows interleaved, each block its own exponent); the chunk's result against the reference with one group of experts
    and with several (the buffer budget), every block and x slice at its own exponent, an expert
    without pairs (not staged); a set that does not stage exactly takes the grouped GEMM instead."""
    from dsv4.kernels.triton import prefill_experts as pe, staged_experts as st

    es = expert_set("mxfp4", 2, 256, 384, g)
    for w in (es.w1[1], es.w3[1]):  # one base per block, then the extremes each weight's block may hold
        w.scale.view(torch.uint8)[:, 4:8], w.scale.view(torch.uint8)[128:, :4] = 120, 126
    sc = es.w1[1].scale.view(torch.uint8)
    sc[5, 5], sc[129, 7], sc[201, 0] = 134, 106, 140  # blocks 14 binades wide (all groups hold values)
    es.w3[1].scale.view(torch.uint8)[:128, :4] = 128  # w3's block (0, 0) far above w1's: its own exponent
    es.w3[1].scale.view(torch.uint8)[2, 1] = 139
    sc[200, 10] = 99  # with group 10 of row 200 all zero: its scale may lie further below
    es.w1[1].data.view(torch.uint8)[200, 160:176] = 0
    es.w2[0].scale.view(torch.uint8)[:128, :4] = 117
    es.w2[0].scale.view(torch.uint8)[3, 2] = 131
    assert st.stageable(es)
    tab, cnt = pe._tables(es, "cpu"), torch.ones(2, dtype=torch.int64)
    q, r = torch.empty(2, 512, 384, dtype=torch.uint8), torch.empty(2, 2, 3, 2, dtype=torch.uint8)
    st._stage[(2, 2, 3)](tab["w1"], tab["sw1"], tab["w3"], tab["sw3"], cnt, q, r, 0, 256, 384, PAIR=True)
    for e in range(2):  # rows 2i: w1's row i, 2i + 1: w3's, each block with its own exponent
        assert torch.equal(staged_values(q[e, 0::2], r[e, ..., 0]), es.w1[e].dequant()), f"w1 {e}"
        assert torch.equal(staged_values(q[e, 1::2], r[e, ..., 1]), es.w3[e].dequant()), f"w3 {e}"
    q, r = torch.empty(2, 384, 256, dtype=torch.uint8), torch.empty(2, 3, 2, dtype=torch.uint8)
    st._stage[(2, 3, 2)](tab["w2"], tab["sw2"], tab["w2"], tab["sw2"], cnt, q, r, 0, 384, 256, PAIR=False)
    for e in range(2):
        assert torch.equal(staged_values(q[e], r[e]), es.w2[e].dequant()), f"w2 {e}"
    sc[129, 7] = 105
    es.tables.clear()
    assert not st.stageable(es)  # 15 binades below its block's largest
    print("ok staged FP4 -> FP8 weights (exact; w1 and w3 rows interleaved, each its own exponents)")
    for trial in range(8):  # the check kernel (stageable on the device) against the torch reference
        es = expert_set("mxfp4", 2, 256, 256, g)
        w = (es.w1 + es.w3 + es.w2)[trial % 6]
        w.scale.view(torch.uint8)[trial * 17 % 256, trial % 8] -= 11 + trial  # 11..18 binades down
        if trial % 4 == 3:
            w.data.view(torch.uint8)[trial * 17 % 256, trial % 8 * 16:(trial % 8 + 1) * 16] = 0
        assert st.stageable(es) == (not any(bool(st._inexact(v)) for v in es.w1 + es.w3 + es.w2)), trial
    print("ok stageable's check kernel == its torch reference")
    keep = dict(st.TILE)
    st.TILE.update(on=True, min_rows=0)
    try:
        # (group: tiles that run their column blocks together; 3 and 2 leave a short last run of tiles)
        for budget, group, (E, inter, d, k, S) in [(1 << 30, 8, (6, 128, 256, 3, 40)),
                                                   (3 * 2 * 128 * 256, 3, (7, 128, 256, 2, 33)),
                                                   (2 * 256 * 128, 1, (4, 256, 128, 2, 17)),
                                                   (1 << 30, 2, (3, 384, 384, 2, 20)), (1 << 30, 3, (5, 384, 384, 2, 99))]:
            st.TILE.update(budget=budget, group=group)
            es = expert_set("mxfp4", E, inter, d, g)
            for w in es.w1 + es.w3 + es.w2:  # each 128 x 128 block's scales up by its own 0-3 binades
                N, K = w.shape
                up = torch.randint(0, 4, (N // 128, 1, K // 128, 1), generator=g, dtype=torch.uint8)
                w.scale.view(torch.uint8).add_(up.expand(-1, 128, -1, 4).reshape(N, K // 32))
            # and x's 128-slices by their own powers of two (distinct exponents per slice)
            x = torch.randn(S, d, generator=g) * torch.randint(-3, 4, (S, d // 128), generator=g).float().exp2() \
                .repeat_interleave(128, 1)
            ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(S)])  # expert E-1: no pairs
            wts = torch.rand(S, k, generator=g)
            assert st.staged_supported(x, es, True) and not st.staged_supported(x, es, False)
            close(f"staged experts E={E} {inter}x{d} k={k} S={S} groups of {min(E, budget // (2 * inter * d))}"
                  f" tile runs of {group}",
                  pe.routed_experts_triton(x, ids, wts, es, 7.0, act_quant=True),
                  routed_experts(x, ids, wts, es, 7.0, act_quant=True))
        es = expert_set("mxfp4", 3, 128, 256, g)
        es.w2[2].scale.view(torch.uint8)[7, 2] -= 15  # a used group 15 binades below its block's largest
        assert not st.stageable(es)
        x, ids = torch.randn(20, 256, generator=g), torch.randint(0, 3, (20, 2), generator=g)
        wts = torch.rand(20, 2, generator=g)
        close("staged experts, a set that does not stage: the grouped GEMM",
              pe.routed_experts_triton(x, ids, wts, es, 7.0, act_quant=True),
              routed_experts(x, ids, wts, es, 7.0, act_quant=True))
    finally:
        st.TILE.update(keep)


def _grouped_expert_cases(pe, cases, label):
    for fmt in ("mxfp4", "nvfp4"):
        for E, inter, d, k, S in cases:
            es = expert_set(fmt, E, inter, d, g)
            x = torch.randn(S, d, generator=g) * 4
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(S)])
            wts = torch.rand(S, k, generator=g)
            assert pe.routed_experts_supported(x, ids, wts, es, 7.0)
            close(f"grouped experts {fmt} E={E} {inter}x{d} k={k} S={S} {label}",
                  pe.routed_experts_triton(x, ids, wts, es, 7.0), routed_experts(x, ids, wts, es, 7.0))
            close(f"grouped experts act_quant {fmt} E={E} {inter}x{d} k={k} S={S} {label}",
                  pe.routed_experts_triton(x, ids, wts, es, 7.0, act_quant=True),
                  routed_experts(x, ids, wts, es, 7.0, act_quant=True))


def gemm_checks():
    """The prefill GEMM (rows past the GEMVs' MAX_ROWS): FP8 (ue8m0 and float32 scales) and BF16
    weights, float32 and bf16 rows, ragged shapes; the grouped projection."""
    from dsv4.kernels.triton import prefill_linear as tpl

    for M, N, K in [(40, 200, 192), (17, 130, 300)]:
        w = torch.randn(N, K, generator=g) / K ** 0.5
        q, s = quant.quant_fp8_block(w)
        ws = {"fp8": QWeight("fp8", q, s), "fp8-f32": QWeight("fp8", q, quant.ue8m0_to_float(s.view(torch.uint8))),
              "bf16": QWeight("dense", w.bfloat16())}
        for fmt, W in ws.items():
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(M, K, generator=g).to(dt)
                assert tpl.linear_supported(x, W)
                got, ref = tpl.linear_triton(x, W), linear_reference(x.float(), W)
                if dt == torch.float32:
                    close(f"gemm {fmt} {M}x{N}x{K} float32", got, ref)
                    xq = x * torch.logspace(-3, 3, K)
                    close(f"gemm act_quant {fmt} {M}x{N}x{K} float32", tpl.linear_triton(xq, W, act_quant=True),
                          linear_reference(xq, W, act_quant=True))
                else:  # float32 accumulation, then the output to bf16 (the interpreter's cast truncates: 1 ulp)
                    assert got.dtype == dt and ((got.float() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-6).all()
                    print(f"ok gemm {fmt} {M}x{N}x{K} bf16 (within one bf16 ulp)")
    for tma in (False, True):  # tiles through pointer loads, then through TMA descriptors
        _fp8_gemm_checks(tpl, tma)
    W = QWeight("fp8", *quant.quant_fp8_block(torch.randn(2 * 128, 96, generator=g)))
    og = torch.randn(20, 2, 96, generator=g)
    assert tpl.grouped_linear_supported(og, W)
    close("grouped gemm 2x128x96 S=20", tpl.grouped_linear_triton(og, W), grouped_linear_reference(og, W))
    close("grouped gemm act_quant 2x128x96 S=20", tpl.grouped_linear_triton(og, W, act_quant=True),
          grouped_linear_reference(og, W, act_quant=True))


def _fp8_gemm_checks(tpl, tma: bool):
    """The FP8 x FP8 GEMM (faithful rows before an FP8 weight), tiles through pointer loads or (tma)
    through TMA descriptors, which zero-fill past the shapes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    made = []
    keep, keep_desc = dict(tpl.TILE_FP8), tpl._descriptor
    tpl._descriptor = lambda t, rows: made.append(rows) or keep_desc(t, rows)
    try:
        tpl.TILE_FP8.update(tma=tma, m=32)
        # K = 192 (16-byte rows, not whole 128-blocks: the last block's columns past K read as 0)
        q, s = quant.quant_fp8_block(torch.randn(200, 192, generator=g) / 14)
        x = torch.randn(40, 192, generator=g) * torch.logspace(-3, 3, 192)
        close(f"gemm fp8 x fp8 40x200x192 tma={tma}", tpl.linear_triton(x, QWeight("fp8", q, s), act_quant=True),
              linear_reference(x, QWeight("fp8", q, s), act_quant=True))
        # K a multiple of 128 (no column masks), tiles of 64 / 128 columns (one weight scale per K block)
        # and 256 (a scale per column): ragged rows and columns
        q, s = quant.quant_fp8_block(torch.randn(300, 256, generator=g) / 16)
        x = torch.randn(40, 256, generator=g) * torch.logspace(-3, 3, 256)
        for n in (64, 128, 256):
            tpl.TILE_FP8.update(n=n)
            for name, W in [("ue8m0", QWeight("fp8", q, s)), ("f32", QWeight("fp8", q, quant.ue8m0_to_float(s.view(torch.uint8))))]:
                close(f"gemm fp8 x fp8 40x300x256 {n}-column tiles {name} tma={tma}",
                      tpl.linear_triton(x, W, act_quant=True), linear_reference(x, W, act_quant=True))
        # Kg a multiple of 128: faithful mode runs every group in one quantisation pass and one launch
        # (ue8m0 and float32 block scales; each group's inputs over a wide range, so the slices' scales
        # differ). R = 256 rows a group (two scale rows: a wrong group offset into the scales shows), at
        # 64- and 128-column tiles, with the one-FMA promotion and without
        for R, n, one_block in [(128, 128, True), (256, 64, True), (256, 128, False)]:
            tpl.TILE_FP8.update(n=n, one_block=one_block)
            q, s = quant.quant_fp8_block(torch.randn(3 * R, 256, generator=g))
            og = torch.randn(21, 3, 256, generator=g) * torch.logspace(-3, 3, 256)
            for name, W in [("ue8m0", QWeight("fp8", q, s)),
                            ("f32", QWeight("fp8", q, quant.ue8m0_to_float(s.view(torch.uint8))))]:
                close(f"grouped gemm act_quant one launch 3x{R}x256 S=21 n={n} one_block={one_block} {name} tma={tma}",
                      tpl.grouped_linear_triton(og, W, act_quant=True), grouped_linear_reference(og, W, act_quant=True))
    finally:
        tpl.TILE_FP8.update(keep)
        tpl._descriptor = keep_desc
    assert bool(made) == tma and isinstance(keep_desc(torch.zeros(4, 128, dtype=torch.uint8), 4), TensorDescriptor)


def prefill_engine_check():
    """Prefill through the prefill kernels (registered for the CPU here) against the reference path,
    both modes: 140 tokens of the tiny SWA/CSA/HCA model in two chunks (CSA entries past index_topk,
    an HCA entry, the ring wrapped; the window pooling and the entry and window stores through their
    kernels), every token's logits and the cache after it."""
    from dsv4.engine.model.model import Model
    from dsv4.engine.runtime.session import Session
    from dsv4.engine.tools.synthetic import random_tensors, tiny_configs
    from dsv4.kernels.triton import KERNELS

    for op in PREFILL_OPS:
        register(op, "triton", KERNELS[op][0], device="cpu", supports=KERNELS[op][1])
    cfg = tiny_configs()["swa-csa-hca"]
    tensors = random_tensors(cfg, 2)
    ids = torch.randint(0, cfg.vocab_size, (140,), generator=torch.Generator().manual_seed(6))
    for mode, bound in (("exact", 1e-4), ("faithful", 5e-3)):
        model = Model.from_state_dict(cfg, tensors, mode=mode)
        out, caches = [], []
        for backend in ("reference", "auto"):
            s = Session(model, 256, cuda_graph=False, prefill_chunk=70)
            dispatch.reset_report()
            with dispatch.use_backend(backend):
                out.append(s.prefill(ids, last_only=False))
            caches.append([h.read_entries() for h in s.cache.handles(s.slot) if h.layer.ratio])
        ran = dispatch.report()
        assert all("triton" in ran[op] for op in PREFILL_OPS), ran
        err = (out[1] - out[0]).abs().max().item() / out[0].abs().max().item()
        assert err <= bound, f"{mode}: prefill kernel path vs reference path {err:.2e}"
        for a, b in zip(*caches):
            assert (a - b).abs().max().item() <= bound * max(b.abs().max().item(), 1e-30), f"{mode}: cache entries"
        print(f"ok prefill kernel path, {mode} {err:.1e}")


PREFILL_OPS = ("chunk_attention", "indexer_scores", "compress_windows", "store_entry")


if __name__ == "__main__":
    for name in sys.argv[1:] or ("gemv", "elementwise", "engine"):
        globals()[f"{name}_checks" if name != "engine" else "engine_check"]()

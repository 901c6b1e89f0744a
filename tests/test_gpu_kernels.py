"""GPU kernels against their torch references (marked gpu; skipped without CUDA).

Error bounds: every kernel decodes the stored format exactly and accumulates in float32, so it
differs from the reference (dequantise, then a float32 matmul; or the op's torch code) only in
summation order: bound 1e-5 x max|reference| for float32 outputs (GEMVs, grouped projection, routed
experts, mHC pre/post incl. 20 Sinkhorn iterations, RMSNorm, RoPE, SwiGLU, decode attention over
FP8/BF16 or float32 entries). Quantising stores (FP8 KV entries, FP4 indexer keys) must write the
reference's bytes exactly. The captured CUDA graph replays the eager static step's kernels: 1e-6. End to end (exact mode, float32), logits of the kernel
path and the reference path agree to 1e-3 x max|logit| over 256 decode steps (argmax >= 95%:
indexer near-ties can flip a selection)."""

import pytest
import torch

from dsv4 import kernels
from dsv4.kernels import quant
from dsv4.kernels.dispatch import implementation, use_backend
from dsv4.kernels.reference.linear import grouped_linear_reference, linear_reference
from kernel_cases import FORMATS, expert_set, index_select_case, indexer_quant_mismatch, store, weight

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def kernels_really_ran():
    """Each op a test calls through dispatch must have run its Triton kernel at least once: a test
    that silently fell back to the reference would compare the reference with itself."""
    from dsv4.kernels import dispatch
    from dsv4.kernels.triton import KERNELS

    dispatch.reset_report()
    yield
    missed = {op: n for op, n in dispatch.report().items() if op in KERNELS and "triton" not in n}
    assert not missed, f"ran only the reference: {missed}"


@pytest.mark.parametrize("fmt", ["fp8", "fp8-f32", "mxfp4", "nvfp4", "bf16", "f32"])
@pytest.mark.parametrize("N,K", [(1024, 4096), (4096, 2048), (262, 96), (300, 384)])
@pytest.mark.parametrize("M", [1, 6])
@pytest.mark.parametrize("aq", [False, True])
def test_gemv_matches_reference(fmt, N, K, M, aq):
    """aq: faithful mode's e4m3 activations, quantised inside the kernel."""
    g = torch.Generator().manual_seed(N * 7 + K + M)
    if fmt in ("mxfp4", "nvfp4") and K % 32:
        pytest.skip("FP4 formats need K divisible by 32")
    w = weight(fmt, N, K, g).to("cuda")
    x = torch.randn(M, K, generator=g).cuda()
    fn = implementation("linear", "cuda")
    assert fn is not linear_reference
    got, ref = fn(x, w, act_quant=aq), linear_reference(x, w, act_quant=aq)
    assert got.shape == ref.shape == (M, N)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("G,R,Kg,S", [(8, 1024, 4096, 1), (2, 16, 192, 3), (3, 24, 256, 2), (8, 1024, 4096, 300),
                                      (2, 256, 192, 40)])
@pytest.mark.parametrize("aq", [False, True])
def test_grouped_linear_matches_reference(G, R, Kg, S, aq):
    g = torch.Generator().manual_seed(G + R + Kg)
    w = weight("fp8", G * R, Kg, g).to("cuda")
    og = torch.randn(S, G, Kg, generator=g).cuda()
    got, ref = kernels.grouped_linear(og, w, act_quant=aq), grouped_linear_reference(og, w, act_quant=aq)
    assert got.shape == ref.shape == (S, G * R)
    # past MAX_ROWS rows faithful mode multiplies on the FP8 tensor cores, which add a 128-block's
    # products at reduced precision (tests/test_gpu_prefill.py's FP8_MMA_BOUND)
    bound = 2e-3 if aq and S > 16 else 1e-5
    assert (got - ref).abs().max().item() <= bound * ref.abs().max().item()


def test_grouped_fp8_gemm_one_launch_equals_a_launch_per_group():
    """wo_a's groups in one FP8 GEMM launch give the bits of one launch per group, and the one-FMA
    promotion (a tile inside one weight block) the bits of the per-column scales (powers of two)."""
    from dsv4.kernels.triton import prefill_linear as pl

    g = torch.Generator().manual_seed(5)
    w = weight("fp8", 8 * 256, 512, g).to("cuda")
    og = (torch.randn(700, 8, 512, generator=g) * torch.logspace(-2, 2, 512)).cuda()
    keep = dict(pl.TILE_FP8)
    try:
        pl.TILE_FP8.update(grouped=True, one_block=True)
        one = pl.grouped_gemm(og, w, act_quant=True)
        pl.TILE_FP8.update(grouped=False)
        per_group = pl.grouped_gemm(og, w, act_quant=True)
        pl.TILE_FP8.update(grouped=True, one_block=False)
        per_column = pl.grouped_gemm(og, w, act_quant=True)
    finally:
        pl.TILE_FP8.update(keep)
    assert torch.equal(one, per_group) and torch.equal(one, per_column)


@pytest.mark.parametrize("M,N,K,groups", [(700, 1024, 4096, 1), (300, 384, 192, 1), (700, 8 * 256, 8 * 512, 8)])
def test_fp8_gemm_tma_tiles_equal_pointer_loads(M, N, K, groups):
    """The FP8 GEMM with its tiles read through TMA descriptors (zero-filled past the shapes: K = 192
    ends inside a 128-block) gives the bits of pointer loads; the descriptors were made."""
    from dsv4.kernels.triton import prefill_linear as pl

    g = torch.Generator().manual_seed(M + K)
    w = weight("fp8", N, K // groups, g).to("cuda")
    x = (torch.randn(M, K, generator=g) * torch.logspace(-2, 2, K)).cuda()
    keep, made = dict(pl.TILE_FP8), []
    real = pl._descriptor
    try:
        pl._descriptor = lambda t, rows: made.append(rows) or real(t, rows)
        outs = []
        for tma in (False, True):
            pl.TILE_FP8.update(tma=tma)
            outs.append(pl.gemm_fp8(x, w, groups=groups))
    finally:
        pl.TILE_FP8.update(keep)
        pl._descriptor = real
    assert made and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("M", [1, 2, 16])
def test_gemv_rows_are_independent(M):
    """The GEMV computes each row of x from that row alone: a row's result is the same bits whether
    it runs alone or with others (so a multi-token step gives each token the single-token value),
    on the Flash wo_b shape (split-K, faithful activations)."""
    g = torch.Generator().manual_seed(M)
    w = weight("fp8", 4096, 8192, g).to("cuda")
    x = torch.randn(M, 8192, generator=g).cuda()
    fn = implementation("linear", "cuda")
    both = fn(x, w, act_quant=True)
    for m in range(M):
        assert torch.equal(fn(x[m:m + 1], w, act_quant=True)[0], both[m])
    ref = linear_reference(x, w, act_quant=True)
    assert (both - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("S,n,d,dtype", [(1, 4, 4096, torch.float32), (5, 4, 4096, torch.float32),
                                         (3, 4, 64, torch.float32), (2, 2, 96, torch.float32),
                                         (700, 4, 4096, torch.float32), (33, 2, 96, torch.float32),
                                         (700, 4, 4096, torch.bfloat16), (33, 2, 96, torch.bfloat16),
                                         (6400, 4, 4096, torch.float32)])  # a whole prefill chunk
def test_mhc_pre_and_post_match_reference(S, n, d, dtype):
    """float32 streams (the engine's) and bf16 ones, a few rows and past MAX_ROWS (the tiled 3xTF32
    mixing); bf16 x and new streams are float32 results rounded once: within one bf16 ulp."""
    from dsv4.kernels.reference.mhc import mhc_post as post_ref, mhc_pre as pre_ref

    def near(a, b):
        tol = 1e-5 * b.abs().max().item()
        if a.dtype == torch.bfloat16:
            a, b = a.float(), b.float()
            return a.shape == b.shape and bool(((a - b).abs() <= 2 ** -7 * b.abs() + tol).all())
        return a.shape == b.shape and (a - b).abs().max().item() <= tol

    g = torch.Generator().manual_seed(S * 100 + d)
    st = torch.randn(S, n, d, generator=g).to(dtype).cuda()
    fn = (torch.randn((2 + n) * n, n * d, generator=g) * 0.02).cuda()
    base = (torch.randn((2 + n) * n, generator=g) * 0.5).cuda()
    scale = (1 + 0.1 * torch.randn(3, generator=g)).cuda()
    assert implementation("mhc_pre", "cuda") is not pre_ref
    got, ref = kernels.mhc_pre(st, fn, base, scale, 20, 1e-6, 1e-6), pre_ref(st, fn, base, scale, 20, 1e-6, 1e-6)
    for a, b in zip(got, ref):  # x, post, comb (Sinkhorn amplifies rounding a little)
        assert near(a, b)
    out = torch.randn(S, d, generator=g).to(dtype).cuda()
    assert near(kernels.mhc_post(out, st, ref[1], ref[2]), post_ref(out.float(), st.float(), ref[1], ref[2]))


@pytest.mark.parametrize("shape", [(1, 4096), (7, 1024), (3, 2, 96), (1, 16384)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_matches_reference(shape, weighted):
    from dsv4.kernels.reference.norm import rms_norm as ref_fn

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).cuda()
    w = torch.randn(shape[-1], generator=g).cuda() if weighted else None
    assert implementation("rms_norm", "cuda") is not ref_fn
    a, b = kernels.rms_norm(x, w, 1e-6), ref_fn(x, w, 1e-6)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("shape,rd", [((1, 64, 512), 64), ((3, 4, 96), 32), ((2, 512), 64), ((5, 2, 80), 16),
                                      ((999, 64, 512), 64), ((777, 64, 128), 64)])  # prefill: query heads, indexer
@pytest.mark.parametrize("inverse", [False, True])
def test_apply_rope_matches_reference(shape, rd, inverse):
    from dsv4.kernels.reference.rope import apply_rope as ref_fn

    g = torch.Generator().manual_seed(sum(shape) + rd)
    x = torch.randn(*shape, generator=g).cuda()
    ang = torch.randn(shape[0], rd // 2, generator=g).cuda() * 3
    assert implementation("apply_rope", "cuda") is not ref_fn
    a, b = kernels.apply_rope(x, ang.cos(), ang.sin(), inverse), ref_fn(x, ang.cos(), ang.sin(), inverse)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_swiglu_matches_reference():
    from dsv4.kernels.reference.moe import swiglu as ref_fn

    g = torch.Generator().manual_seed(11)
    a, b = (torch.randn(3, 2048, generator=g) * 8).cuda(), (torch.randn(3, 2048, generator=g) * 8).cuda()
    assert implementation("swiglu", "cuda") is not ref_fn
    assert (kernels.swiglu(a, b, 10.0) - ref_fn(a, b, 10.0)).abs().max().item() <= 1e-5 * ref_fn(a, b, 10.0).abs().max().item()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("E,inter,d,k", [(16, 2048, 4096, 6), (5, 96, 256, 2)])
@pytest.mark.parametrize("aq", [False, True])
def test_routed_experts_match_reference(fmt, E, inter, d, k, aq):
    from dsv4.kernels.reference.moe import routed_experts as ref_fn

    g = torch.Generator().manual_seed(E + inter + k)
    es = expert_set(fmt, E, inter, d, g, "cuda")
    x = (torch.randn(1, d, generator=g) * 4).cuda()
    ids = torch.randperm(E, generator=g)[:k].view(1, k).cuda()
    wts = torch.rand(1, k, generator=g).cuda()
    assert implementation("routed_experts", "cuda") is not ref_fn
    a, b = kernels.routed_experts(x, ids, wts, es, 7.0, act_quant=aq), ref_fn(x, ids, wts, es, 7.0, act_quant=aq)
    assert a.shape == b.shape == (1, d)
    err = (a - b).abs() / b.abs().max()
    if not aq:
        assert err.max().item() <= 1e-5
    else:  # h is quantised inside: a float32 rounding apart can put an h value across an e4m3
        assert err.max().item() <= 5e-3  # midpoint (rare), moving the row by ~1e-3; interpreter: 1e-5


def _bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("kind,D,r", [("kv", 512, 64), ("kv", 128, 64), ("fp4", 128, 0), ("f32", 512, 64)])
def test_store_entry_writes_the_reference_bytes(kind, D, r):
    """Quantisation must match bit for bit (a different FP8/FP4 rounding would change the model)."""
    from dsv4.kernels.reference.entries import store_entry as ref_fn

    g = torch.Generator().manual_seed(D + len(kind))
    assert implementation("store_entry", "cuda") is not ref_fn
    for scale in (1e-3, 1.0, 300.0):
        x = (torch.randn(1, D, generator=g) * scale).cuda()
        a, b = store(kind, 9, D, r, "cuda"), store(kind, 9, D, r, "cuda")
        row = torch.tensor([7], device="cuda")
        ref_fn(x, a, row)
        kernels.store_entry(x, b, row)
        for k in a:
            assert torch.equal(_bytes(a[k]), _bytes(b[k])), (k, scale)
    x = (torch.randn(5, D, generator=g) * torch.logspace(-3, 2, 5)[:, None]).cuda()  # a chunk's rows
    a, b = store(kind, 9, D, r, "cuda"), store(kind, 9, D, r, "cuda")
    rows = torch.tensor([8, 0, 3, 6, 1], device="cuda")
    ref_fn(x, a, rows)
    kernels.store_entry(x, b, rows)
    for k in a:
        assert torch.equal(_bytes(a[k]), _bytes(b[k])), (k, "rows")


@pytest.mark.parametrize("kind,H,D,W,T,pos", [("kv", 64, 512, 128, 512, 5000), ("kv", 64, 512, 128, 9, 1100),
                                              ("kv", 64, 512, 128, 0, 60), ("f32", 4, 96, 128, 70, 300)])
def test_decode_attention_matches_reference(kind, H, D, W, T, pos):
    from dsv4.kernels.reference.attention import decode_attention as ref_fn
    from dsv4.kernels.reference.entries import write_entries

    g = torch.Generator().manual_seed(H + T + pos)
    r = 64 if D == 512 else 32
    ring, pool = store(kind, W, D, r, "cuda"), store(kind, 600, D, r, "cuda")
    write_entries(ring, slice(None), torch.randn(W, D, generator=g).cuda())
    write_entries(pool, slice(None), torch.randn(600, D, generator=g).cuda())
    q = torch.randn(H, D, generator=g).cuda()
    rows = torch.randperm(600, generator=g)[:T].cuda()
    ok = (torch.rand(T, generator=g) < 0.8).cuda()
    sink = torch.randn(H, generator=g).cuda()
    p = torch.tensor([pos], device="cuda")
    ent = (pool, rows, ok) if T else (None, None, None)
    assert implementation("decode_attention", "cuda") is not ref_fn
    a, b = kernels.decode_attention(q, ring, p, *ent, sink, D ** -0.5), ref_fn(q, ring, p, *ent, sink, D ** -0.5)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    if kind == "kv":  # faithful mode's bf16 queries: one bf16 product, the bits of the float32 form's three parts
        qb = q.bfloat16()
        assert torch.equal(kernels.decode_attention(qb, ring, p, *ent, sink, D ** -0.5),
                           kernels.decode_attention(qb.float(), ring, p, *ent, sink, D ** -0.5))


@pytest.mark.parametrize("kind,H,Di,n,k,visible", [("fp4", 64, 128, 16400, 512, 16000), ("fp4", 64, 128, 4100, 512, 300),
                                                     ("fp4", 64, 128, 262144, 512, 262144), ("f32", 3, 64, 700, 16, 650),
                                                     ("fp4", 64, 128, 16400, 2500, 1000)])
def test_indexer_select_decode_chooses_the_reference_entries(kind, H, Di, n, k, visible):
    """Flash's indexer at 64k and 1M tokens of context (16k / 256k CSA entries, top 512), with fewer
    visible entries than k, and exact mode's float32 keys: the same pool rows in the same order. The
    last case takes 1500 hidden entries (ties), from several programs of the radix passes."""
    from dsv4.kernels.reference.indexer import indexer_select_decode as ref_fn

    args = index_select_case(kind, H, Di, n, k, visible, torch.Generator().manual_seed(n + k), "cuda")
    assert implementation("indexer_select_decode", "cuda") is not ref_fn
    (rows, ok), (ref_rows, ref_ok) = kernels.indexer_select_decode(*args), ref_fn(*args)
    assert torch.equal(rows, ref_rows) and torch.equal(ok, ref_ok)
    assert ok.sum().item() == min(k, visible)


@pytest.mark.parametrize("shape,dtype", [((1, 64, 128), torch.float32), ((1, 64, 128), torch.bfloat16),
                                         ((6400, 64, 128), torch.bfloat16), ((33, 64), torch.float32)])
def test_indexer_quant_matches_reference(shape, dtype):
    """Faithful mode's indexer query path (Hadamard, FP4 round trip) in one launch: a decode token's
    64 heads and a prefill chunk's; equal to the reference but for borderline roundings."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 2).to(dtype)
    assert implementation("indexer_quant", "cuda") is not quant.indexer_quant_dequant
    got = kernels.indexer_quant(x.cuda())
    assert got.shape == x.shape and got.dtype == x.dtype
    problem = indexer_quant_mismatch(got, x)
    assert problem is None, problem


@pytest.mark.parametrize("ratio,D,overlap", [(4, 512, True), (128, 512, False), (4, 128, True)])
def test_compress_decode_matches_reference(ratio, D, overlap):
    from dsv4.kernels.reference.compress import compress_decode as ref_fn

    g = torch.Generator().manual_seed(ratio + D)
    W = 2 * D if overlap else D
    assert implementation("compress_decode", "cuda") is not ref_fn
    for pos in (1, ratio - 1, 7 * ratio - 1, 9 * ratio + 2):
        st = [torch.randn(ratio - 1, W, generator=g), torch.randn(ratio - 1, W, generator=g)]
        st += [torch.randn(ratio, D, generator=g), torch.randn(ratio, D, generator=g)] if overlap else [None, None]
        st = [t.cuda() if t is not None else None for t in st]
        c, z, ape = (torch.randn(r, W, generator=g).cuda() for r in (1, 1, ratio))
        nw, ang = torch.randn(D, generator=g).cuda(), torch.randn(1, 32, generator=g).cuda()
        a_st, b_st = [t.clone() if t is not None else None for t in st], [t.clone() if t is not None else None for t in st]
        p = torch.tensor([pos], device="cuda")
        a = kernels.compress_decode(c, z, a_st[0], a_st[1], ape, a_st[2], a_st[3], nw, ang.cos(), ang.sin(), p, 1e-6)
        b = ref_fn(c, z, b_st[0], b_st[1], ape, b_st[2], b_st[3], nw, ang.cos(), ang.sin(), p, 1e-6)
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
        for x, y in zip(a_st, b_st):
            assert x is None or torch.equal(x, y)


@pytest.mark.parametrize("ratio,D,overlap,prev", [(4, 512, True, True), (4, 512, True, False), (128, 512, False, False),
                                                 (4, 128, True, True)])
def test_compress_windows_matches_reference(ratio, D, overlap, prev):
    """A prefill chunk's window pooling (1600 tokens)."""
    from dsv4.kernels.reference.compress import compress_windows as ref_fn

    g = torch.Generator().manual_seed(ratio + D + prev)
    W = 2 * D if overlap else D
    n = 1600 // ratio * ratio
    c, z = torch.randn(n, W, generator=g).cuda(), (3 * torch.randn(n, W, generator=g)).cuda()
    pa = (torch.randn(ratio, D, generator=g).cuda(), torch.randn(ratio, D, generator=g).cuda()) if prev else None
    assert implementation("compress_windows", "cuda") is not ref_fn
    (a, a_last), (b, b_last) = kernels.compress_windows(c, z, ratio, overlap, pa), ref_fn(c, z, ratio, overlap, pa)
    assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    assert (a_last is None) == (b_last is None) and (a_last is None or all(map(torch.equal, a_last, b_last)))


@pytest.mark.parametrize("E,d,k", [(256, 4096, 6), (8, 64, 3)])
def test_router_kernels_match_reference(E, d, k):
    from dsv4.kernels.reference.moe import hash_route, router_scores, router_topk

    g = torch.Generator().manual_seed(E + d)
    x = torch.randn(1, d, generator=g).cuda()
    gate = (torch.randn(E, d, generator=g) / d ** 0.5).bfloat16().cuda()
    a, b = kernels.router_scores(x, gate), router_scores(x, gate)
    assert implementation("router_scores", "cuda") is not router_scores
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    bias = (torch.randn(E, generator=g) * 0.1).cuda()
    wa, ia = kernels.router_topk(b, bias, k, 2.5)
    wb, ib = router_topk(b, bias, k, 2.5)
    assert torch.equal(ia, ib) and (wa - wb).abs().max().item() <= 1e-5 * wb.abs().max().item()
    tid = torch.randint(0, E, (99, k), generator=g, dtype=torch.int32).cuda()
    tok = torch.tensor([42], device="cuda")
    wa, ia = kernels.hash_route(b, tid, tok, 1.5)
    wb, ib = hash_route(b, tid, tok, 1.5)
    assert torch.equal(ia, ib) and (wa - wb).abs().max().item() <= 1e-5 * wb.abs().max().item()


@pytest.mark.parametrize("S,dtype", [(3000, torch.float32), (40, torch.bfloat16), (5, torch.float32)])
def test_router_chunk_kernels_match_reference(S, dtype):
    """A prefill chunk's router: the gate through the prefill GEMM (float32 rows in three bf16 parts;
    up to 16 rows the GEMV), sqrt(softplus), and the row-block top-k with ties to the lower expert id."""
    from dsv4.kernels.reference.moe import router_scores, router_topk

    E, d, k = 256, 4096, 6
    g = torch.Generator().manual_seed(S)
    x = (torch.randn(S, d, generator=g) * 2).to(dtype).cuda()
    gate = (torch.randn(E, d, generator=g) / d ** 0.5).bfloat16().cuda()
    a, b = kernels.router_scores(x, gate), router_scores(x, gate)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    bias = ((torch.randn(E, generator=g) * 100).round() / 1024).cuda()
    bias[3] = bias[2]
    b[:, 2:4] = b.max() + 1  # a tie at the top of every row: 2 before 3
    wa, ia = kernels.router_topk(b, bias, k, 2.5)
    wb, ib = router_topk(b, bias, k, 2.5)
    from dsv4.kernels.dispatch import choose

    assert choose("router_scores", "cuda", (x, gate)).name == "triton"
    assert choose("router_topk", "cuda", (b, bias, k, 2.5)).name == "triton"
    assert torch.equal(ia, ib) and (ia[:, :2] == torch.tensor([2, 3], device="cuda")).all()
    assert (wa - wb).abs().max().item() <= 1e-5 * wb.abs().max().item()


def _graph_vs_eager(model, vocab, steps):
    """Logits of the captured-graph decode and of the same static step launched eagerly."""
    from dsv4.engine.runtime.decode import DecodeRunner
    from dsv4.engine.runtime.session import Session

    ids = torch.randint(0, vocab, (40 + steps,), generator=torch.Generator().manual_seed(6)).tolist()
    outs = []
    for graph in (True, False):
        s = Session(model, 64 + steps, cuda_graph=False)
        s.prefill(ids[:40])
        r = DecodeRunner(model, s.cache.handles(s.slot), graph=graph)
        steps_out = []
        for t in ids[40:]:
            s.cache.prepare(s.slot, 1)
            steps_out.append(r.step(t, s.seq_len))
            s.cache.commit(s.slot, 1)
        outs.append(torch.stack(steps_out).cpu())
    return outs


def test_cuda_graph_replay_equals_eager_static_step(tiny_cfg, tiny_tensors):
    from dsv4.engine.model.model import Model

    model = Model.from_state_dict(tiny_cfg, tiny_tensors, mode="faithful", device="cuda")
    g, e = _graph_vs_eager(model, tiny_cfg.vocab_size, 200)
    assert (g - e).abs().max().item() <= 1e-6 * e.abs().max().item()


def _decode_logits(model, ids, backend):
    from dsv4.engine.runtime.session import Session

    with use_backend(backend):
        s = Session(model, 512)
        out = [s.prefill(ids[:44])]
        out += [s.step(int(t)) for t in ids[44:]]
    return torch.stack(out).float().cpu()


def _compare_paths(model, vocab):
    ids = torch.randint(0, vocab, (300,), generator=torch.Generator().manual_seed(4))  # 44 + 256 steps
    ref, fast = _decode_logits(model, ids, "reference"), _decode_logits(model, ids, "auto")
    assert (fast - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_kernel_path_matches_reference_path_tiny(tiny_cfg, tiny_tensors):
    from dsv4.engine.model.model import Model

    _compare_paths(Model.from_state_dict(tiny_cfg, tiny_tensors, mode="exact", device="cuda"), tiny_cfg.vocab_size)


def test_kernel_path_matches_reference_path_flash_dims():
    from dsv4.engine.tools.synthetic import synthetic_stored
    from dsv4.engine.model.config import DSV4Config
    from dsv4.engine.model.model import Model

    full = DSV4Config.flash()
    cfg = full.layer_range(2, 4)
    model = Model.from_state_dict(cfg, synthetic_stored(cfg, "cuda"), mode="exact", device="cuda")
    _compare_paths(model, cfg.vocab_size)


def test_step_tables_match_reference():
    """rope_cos_sin at a window start (float32, 1e-5 absolute: angles up to ~1e5 rad) and the step's
    entry rows (equal) on the device, against their references."""
    from dsv4.kernels.reference.entries import entry_rows as rows_ref
    from dsv4.kernels.reference.rope import rope_cos_sin as cs_ref, rope_inv_freq

    assert implementation("entry_rows", "cuda") is not rows_ref
    assert implementation("rope_cos_sin", "cuda") is not cs_ref
    inv = rope_inv_freq(64, 10000.0).cuda()
    p = torch.tensor([0, 7, 4095, 123457], device="cuda")
    for ratio in (1, 4, 128):
        for a, b in zip(kernels.rope_cos_sin(p, inv, ratio), cs_ref(p, inv, ratio)):
            assert (a - b).abs().max().item() <= 1e-5
    table = torch.tensor([5, 2, -1, 9], dtype=torch.int32, device="cuda")
    for ratio, pos in [(4, 100), (4, 3), (128, 511), (128, 0)]:
        got = kernels.entry_rows(torch.tensor([pos], device="cuda"), table, ratio, 128 // ratio, 4 * 128 // ratio)
        ref = rows_ref(torch.tensor([pos], device="cuda"), table, ratio, 128 // ratio, 4 * 128 // ratio)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("shape,rd", [((1, 64, 512), 64), ((1, 512), 64), ((3, 4, 96), 32), ((999, 512), 64)])
def test_rms_norm_rope_matches_reference(shape, rd):
    from dsv4.kernels.reference.rope import rms_norm_rope as ref_fn

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3).cuda()
    ang = (torch.randn(shape[0], rd // 2, generator=g) * 3).cuda()
    assert implementation("rms_norm_rope", "cuda") is not ref_fn
    for w in (None, torch.randn(shape[-1], generator=g).cuda()):
        a, b = kernels.rms_norm_rope(x, w, 1e-6, ang.cos(), ang.sin()), ref_fn(x, w, 1e-6, ang.cos(), ang.sin())
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("graph", [False, True])
def test_side_stream_changes_nothing(monkeypatch, graph):
    """The MoE's shared expert and a compressed layer's compressors on the side stream
    (kernels/streams.py; layers 2-3: CSA and HCA): the same logits, bit for bit, as all on one
    stream, over static decode steps eager and captured. The steps cross an HCA window's close
    (position 127) and the cache holds more entries than the indexer's top-k, so the indexer reads
    keys the side stream stored."""
    from dsv4.engine.model.config import DSV4Config
    from dsv4.engine.model.model import Model
    from dsv4.engine.runtime.decode import DecodeRunner
    from dsv4.engine.runtime.session import Session
    from dsv4.engine.tools.synthetic import synthetic_stored
    from dsv4.kernels import streams

    cfg = DSV4Config.flash().layer_range(2, 4)
    model = Model.from_state_dict(cfg, synthetic_stored(cfg, "cuda"), mode="faithful", device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (140,), generator=torch.Generator().manual_seed(5)).tolist()
    forked, side = [], streams.side

    def recording(x, site):
        st = side(x, site)
        if st is not None:
            forked.append(site)
        return st

    monkeypatch.setattr(streams, "side", recording)

    def run(overlap: str) -> torch.Tensor:
        monkeypatch.setenv("DSV4_OVERLAP", overlap)
        s = Session(model, 4096, cuda_graph=False)
        assert s.cache.entry_capacity(4) > cfg.index_topk
        out = [s.prefill(ids[:100])]
        r = DecodeRunner(model, s.cache.handles(s.slot), graph=graph)
        for t in ids[100:]:
            s.cache.prepare(s.slot, 1)
            out.append(r.step(t, s.seq_len))
            s.cache.commit(s.slot, 1)
        return torch.stack(out).float().cpu()

    on = run("1")
    assert {"moe", "compressor"} <= set(forked), forked
    forked.clear()
    off = run("0")
    assert not forked
    assert torch.equal(on, off)

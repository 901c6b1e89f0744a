"""The prefill kernels on the GPU (#15; marked gpu, skipped without CUDA).

Bounds: float32 inputs are multiplied at float32 accuracy (3xTF32) and differ from the references
only in summation order: 2e-5 x max|reference|. bf16 queries use bf16 tensor-core dots (keys exact
in bf16 when stored as FP8 + BF16; the probabilities are rounded to bf16 before P.V): 2e-2.
End to end on a 2-layer Flash-dimension model (layers 2-3: one CSA layer with the indexer past its
top-k, one HCA layer), float32: the kernel path and the reference path agree to 1e-3 x max|logit|
(exact) / 8e-2 (faithful: a rounding difference can move a value across an e4m3 / FP8 / FP4 boundary)
on the prefill's last logits, the cache after the prefill, then 64 decode steps (argmax >= 95%)."""

import pytest
import torch

from dsv4.kernels.dispatch import implementation, report, reset_report, use_backend
from dsv4.kernels.reference.chunk_attention import chunk_attention
from dsv4.kernels.reference.entries import write_entries
from dsv4.kernels.reference.indexer import indexer_scores
from kernel_cases import e4m3_rows, staged_values, store

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()


@pytest.mark.parametrize("kind", ["kv", "f32"])
@pytest.mark.parametrize("attn", ["swa", "hca", "csa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "out_rope"])
def test_chunk_attention_kernel_matches_reference(kind, attn, dtype, rope):
    """rope: the output's inverse RoPE (the engine's call) in the kernel's epilogue."""
    g = torch.Generator().manual_seed(3)
    S, H, D, W, start, K = 300, 64, 512, 128, 5000, 512
    ratio = {"swa": 0, "hca": 128, "csa": 4}[attn]
    n = (start + S) // ratio if ratio else 0
    q = torch.randn(S, H, D, generator=g).to("cuda", dtype)
    kv, ring, sink = torch.randn(S, D, generator=g), torch.randn(W, D, generator=g), torch.randn(H, generator=g)
    pos = torch.arange(start, start + S)
    ring_pos = (start - 1) - torch.remainder(start - 1 - torch.arange(W), W)
    ent = rows = sel = None
    if ratio:
        ent = store(kind, n + 100, D, 64)
        rows = torch.randperm(n + 100, generator=g)[:n]
        write_entries(ent, rows, torch.randn(n, D, generator=g))
        ent = {k: v.cuda() for k, v in ent.items()}
        if attn == "csa":
            sel = torch.stack([torch.randperm((start + i + 1) // ratio, generator=g)[:K] for i in range(S)])
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    args = (q, pos.cuda(), ring.cuda(), ring_pos.cuda(), kv.cuda(), W, ent, cuda(rows), ratio, cuda(sel),
            sink.cuda(), D ** -0.5)
    ang = torch.rand(S, 32, generator=g) * 6.3
    kw = {"out_rope": (ang.cos().cuda(), ang.sin().cuda())} if rope else {}
    fn = implementation("chunk_attention", "cuda")
    assert fn is not chunk_attention
    got, ref = fn(*args, **kw), chunk_attention(*args, **kw)
    assert _rel(got, ref) <= (2e-5 if dtype == torch.float32 else 2e-2)
    if kind == "kv" and ratio:  # the entries widened once into dense rows: the same keys, the same output
        from dsv4.kernels.triton import prefill_attention as pa
        keep = pa.TILE["dense_entries"]
        pa.TILE["dense_entries"] = not keep
        try:
            assert torch.equal(fn(*args, **kw), got)
        finally:
            pa.TILE["dense_entries"] = keep


@pytest.mark.parametrize("S,T", [(1024, 4096), (37, 300)])
def test_indexer_scores_kernel_matches_reference(S, T):
    g = torch.Generator().manual_seed(S + T)
    q, k = torch.randn(S, 64, 128, generator=g).cuda(), torch.randn(T, 128, generator=g).cuda()
    w = torch.randn(S, 64, generator=g).cuda()
    fn = implementation("indexer_scores", "cuda")
    assert fn is not indexer_scores
    assert _rel(fn(q, k, w), indexer_scores(q, k, w)) <= 2e-5


FP8_MMA_BOUND = 2e-3  # x max|ref|; measured on the H200: see bench/results/h200_tune_prefill_gemm.json


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("dtype,aq", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_prefill_gemm_matches_reference(fmt, dtype, aq):
    """aq: faithful mode's e4m3 activations. Before an FP8 weight they multiply on the FP8 tensor
    cores: exact products, but Hopper's FP8 MMA adds each 128-block's products at reduced precision
    before the float32 promotion (as in DeepSeek's own FP8 GEMMs), hence its looser bound; before a
    BF16 weight (no quantisation) the float32 bound."""
    from dsv4.kernels.reference.linear import linear_reference
    from kernel_cases import weight

    g = torch.Generator().manual_seed(7)
    w = weight(fmt, 4096, 4096, g).to("cuda")
    x = torch.randn(1000, 4096, generator=g).to("cuda", dtype)
    got, ref = implementation("linear", "cuda")(x, w, act_quant=aq), linear_reference(x.float(), w, act_quant=aq)
    assert got.dtype == dtype
    assert _rel(got, ref) <= (FP8_MMA_BOUND if aq and fmt == "fp8" else 2e-5 if dtype == torch.float32 else 2 ** -8)


@pytest.fixture(params=[False, True], ids=["f32-widen", "ptx-widen"])
def widen(request):
    """Both FP4 widenings of the expert kernel (prefill_experts.TILE["asm"]), whichever is the default."""
    from dsv4.kernels.triton import prefill_experts as pe

    keep = pe.TILE["asm"]
    pe.TILE["asm"] = request.param
    yield request.param
    pe.TILE["asm"] = keep


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("aq", [False, True])
def test_grouped_experts_match_reference(fmt, aq, widen):
    """Flash expert dimensions (2048 x 4096), 8 experts, 600 tokens x 4 slots."""
    from dsv4.kernels.reference.moe import routed_experts
    from kernel_cases import expert_set

    g = torch.Generator().manual_seed(8)
    es = expert_set(fmt, 8, 2048, 4096, g, device="cuda")
    x = torch.randn(600, 4096, generator=g).cuda()
    ids = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(600)]).cuda()
    wts = torch.rand(600, 4, generator=g).cuda()
    got = implementation("routed_experts", "cuda")(x, ids, wts, es, 10.0, act_quant=aq)
    ref = routed_experts(x, ids, wts, es, 10.0, act_quant=aq)
    assert es.tables["prefill"]["one_mul"] == (fmt == "mxfp4")  # every scale byte <= 128: one multiply
    _close_but_flips(got, ref, 2e-5, aq)


def test_grouped_experts_no_host_sync():
    """A chunk's routed experts queue their launches without waiting for the GPU (a sync per MoE layer
    left the GPU idle while the host caught up): none once the expert tables exist."""
    from kernel_cases import expert_set

    g = torch.Generator().manual_seed(9)
    es = expert_set("mxfp4", 8, 256, 512, g, device="cuda")
    x = torch.randn(300, 512, generator=g).cuda()
    ids = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(300)]).cuda()
    wts = torch.rand(300, 4, generator=g).cuda()
    # the first call builds the tables (reads the scales' largest byte once)
    _second_call_no_sync(implementation("routed_experts", "cuda"), x, ids, wts, es, 10.0, act_quant=True)


def _second_call_no_sync(fn, *args, **kwargs):
    """fn(*args, **kwargs) once, then again with any host sync an error."""
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_grouped_experts_extreme_block_scales(widen):
    """MXFP4 scale bytes past 128 (block scales of 4 and more: the PTX widening's two-multiply form)
    and 1 (weights near 2^-126), against the reference's float32 dequantisation."""
    from dsv4.kernels.reference.moe import routed_experts
    from kernel_cases import expert_set

    g = torch.Generator().manual_seed(9)
    es = expert_set("mxfp4", 4, 256, 512, g, device="cuda")
    for w in (es.w1[0], es.w3[0], es.w2[1]):
        w.scale.view(torch.uint8).add_(14)  # x 2^14
    es.w3[2].scale.view(torch.uint8)[:, :3] = 1
    x = torch.randn(600, 512, generator=g).cuda() / 64
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(600)]).cuda()
    wts = torch.rand(600, 2, generator=g).cuda()
    got = implementation("routed_experts", "cuda")(x, ids, wts, es, 1e9)
    ref = routed_experts(x, ids, wts, es, 1e9)
    assert es.tables["prefill"]["one_mul"] is False
    assert max(int(w.scale.view(torch.uint8).max()) for w in es.w1 + es.w3 + es.w2) > 128
    assert _rel(got, ref) <= 2e-5


def test_e4m3_rounding_on_the_gpu_is_the_float32_rounding():
    """actquant.to_e4m3 (the staged experts' h): the hardware conversion (the GPU path) gives the values of the float32
    arithmetic rounding (the interpreter path) and of torch's conversion, over every e4m3 value, the
    midpoints between neighbours (ties to even) and quarter points, both signs, rows at 2^-20..2^30."""
    from staged_rounding import rounded_both

    e = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = e[torch.isfinite(e) & (e > 0)].unique()
    pts = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, grid[:-1] + (grid[1:] - grid[:-1]) / 4, torch.tensor([0.0])])
    base = torch.cat([pts, -pts])
    base = torch.cat([torch.tensor([448.0]), base, torch.full((2048 - 1 - base.numel(),), 3.0)])
    rows = torch.stack([base * 2.0 ** k for k in (-20, -3, 0, 5, 30)]).cuda()
    a, b = (t.view(torch.float8_e4m3fn).float() for t in rounded_both(rows))  # values: -0 == 0
    ref = base.to(torch.float8_e4m3fn).float().cuda().expand_as(b)
    assert torch.equal(a, ref) and torch.equal(b, ref)


@pytest.fixture
def staged_on():
    """staged_experts.TILE on for any chunk size (restored after)."""
    from dsv4.kernels.triton import staged_experts as st

    keep = dict(st.TILE)
    st.TILE.update(on=True, min_rows=0)
    yield st
    st.TILE.update(keep)


def _flash_experts(seed, E=8, S=600, k=4, I=2048, D=4096, spread=False):
    """spread: each weight's 128-row blocks 2^0 / 2^1 / 2^2 apart and w3 twice w1 (the MX bytes moved), so
    a block or a weight promoted by another's exponent shows."""
    from kernel_cases import expert_set

    g = torch.Generator().manual_seed(seed)
    es = expert_set("mxfp4", E, I, D, g, device="cuda")
    if spread:
        for name, ws in (("w1", es.w1), ("w3", es.w3), ("w2", es.w2)):
            for w in ws:
                b = w.scale.view(torch.uint8)
                b += ((torch.arange(b.shape[0], device=b.device) // 128) % 3 + (name == "w3"))[:, None].to(torch.uint8)
    x = torch.randn(S, D, generator=g).cuda()
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(S)]).cuda()  # expert E-1: no pairs
    return es, x, ids, torch.rand(S, k, generator=g).cuda()


def test_staged_experts_match_reference(staged_on):
    """Faithful MXFP4 experts through FP8 staging, Flash dimensions (2048 x 4096), 8 experts, 600 tokens
    x 4 slots: FP8 tensor-core sums (FP8_MMA_BOUND), h through e4m3 (a value near a midpoint may flip);
    the same bits with the experts staged in groups of 3 (a smaller buffer) as all at once."""
    from dsv4.kernels.reference.moe import routed_experts

    es, x, ids, wts = _flash_experts(10)
    fn = implementation("routed_experts", "cuda")
    assert staged_on.staged_supported(x, es, True)
    got = fn(x, ids, wts, es, 10.0, act_quant=True)
    _close_but_flips(got, routed_experts(x, ids, wts, es, 10.0, act_quant=True), FP8_MMA_BOUND, True)
    staged_on.TILE["budget"] = 3 * 2 * 2048 * 4096
    assert torch.equal(fn(x, ids, wts, es, 10.0, act_quant=True), got)


class _Launch:
    """Stands in for a Triton kernel's ``kernel[grid](...)`` launch: calls ``fn`` with the arguments."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls += 1
            self.fn(*args)
        return run


def _per_pair(es, ids, fn):
    """fn(pair rows, expert) -> [rows, N] float64 for each expert's pairs, at the pairs' places [S * k, N]."""
    flat, out = ids.reshape(-1), None
    for e in range(len(es)):
        at = (flat == e).nonzero().flatten()
        if len(at):
            y = fn(at, e)
            out = y.new_zeros(flat.numel(), y.shape[1]) if out is None else out
            out[at] = y
    return out


def staged_down_case(st, E=8, S=600, k=4, I=2048, D=4096, bound=FP8_MMA_BOUND):
    """The staged down GEMM alone, on h given as e4m3 + exponents (the up kernel replaced by a copy of
    it in the schedule's order): every output row within ``bound`` x max|ref| of float64 sums over the
    dequantised w2 (no rounding of h in between, so no row may flip)."""
    from dsv4.kernels.triton.actquant import quantise_rows_fp8

    es, x, ids, wts = _flash_experts(13, E, S, k, I, D, spread=True)
    hq, he = quantise_rows_fp8(torch.randn(S * k, I, device=x.device) * torch.logspace(-2, 1, I, device=x.device))
    up = _Launch(lambda xq, xe, order, *a: (a[7].copy_(hq[order].view(a[7].dtype)), a[8].copy_(he[order])))
    keep = st._up8
    st._up8 = up
    try:
        got = implementation("routed_experts", "cuda")(x, ids, wts, es, 10.0, act_quant=True)
    finally:
        st._up8 = keep
    h = e4m3_rows(hq, he)
    y = _per_pair(es, ids, lambda at, e: h[at] @ es.w2[e].dequant().double().T)
    ref = (y.view(S, k, D) * wts.double()[..., None]).sum(1)
    assert up.calls >= 1 and _rel(got, ref) <= bound


def staged_up_case(st, E=8, S=600, k=4, I=2048, D=4096, bound=FP8_MMA_BOUND):
    """The staged up GEMM's h (captured where the down kernel reads it) against float64
    swiglu(w1 x, w3 x) of the faithful x: each value within two e4m3 steps of the reference's (its
    rounding, or a rounding on the other side of a midpoint or of a slice's power of two) plus the
    FP8 sums' bound."""
    from dsv4.kernels.quant import act_quant_dequant

    es, x, ids, wts = _flash_experts(14, E, S, k, I, D, spread=True)
    seen = {}
    down = _Launch(lambda hq, he, order, *a: seen.update(hq=hq.clone(), he=he.clone(), order=order.clone()))
    keep = st._down8
    st._down8 = down
    try:
        implementation("routed_experts", "cuda")(x, ids, wts, es, 10.0, act_quant=True)
    finally:
        st._down8 = keep
    xq = act_quant_dequant(x).double()

    def swiglu(at, e):
        t = xq[at // k]
        g = (t @ es.w1[e].dequant().double().T).clamp(max=10.0)
        u = (t @ es.w3[e].dequant().double().T).clamp(-10.0, 10.0)
        return g * torch.sigmoid(g) * u
    ref = _per_pair(es, ids, swiglu)
    hk = torch.empty_like(ref)
    hk[seen["order"]] = e4m3_rows(seen["hq"], seen["he"])
    # one e4m3 step of each reference value at its slice's scale (2^-9 of the scale below the normals)
    scale = (ref.view(-1, I // 128, 128).abs().amax(-1) / 448).log2().ceil().exp2().repeat_interleave(128, 1)
    step = (ref.abs() / scale).log2().floor().clamp(min=-6).sub(3).exp2() * scale
    assert down.calls >= 1 and bool(((hk - ref).abs() <= 2 * step + bound * ref.abs().max()).all())


def test_staged_down_kernel_matches_float64_on_given_h(staged_on):
    staged_down_case(staged_on)


def test_staged_up_kernel_h_is_the_rounded_swiglu(staged_on):
    staged_up_case(staged_on)


def test_staged_weights_are_the_mx_weights(staged_on):
    """The staging kernel on the GPU (its float32 -> e4m3 conversion the hardware's): staged bytes times
    the block exponents give the MXFP4 weights bit for bit, w2 with a block 14 binades wide, w1 and w3
    as a pair (rows interleaved, each block its own exponent)."""
    from dsv4.kernels.triton import prefill_experts as pe

    es, *_ = _flash_experts(11, E=2, S=1)
    sc = es.w2[1].scale.view(torch.uint8)
    sc[:128, :4] = 120
    sc[7, 2], sc[100, 1] = 134, 120  # the block's largest, and a group 14 below it
    es.w3[0].scale.view(torch.uint8)[5, 1] = es.w3[0].scale.view(torch.uint8)[:128, :4].max() + 3
    assert staged_on.stageable(es)
    tab, cnt = pe._tables(es, "cuda"), torch.ones(2, dtype=torch.int64, device="cuda")
    q = torch.empty(2, 4096, 2048, dtype=torch.uint8, device="cuda")
    r = torch.empty(2, 32, 16, dtype=torch.uint8, device="cuda")
    staged_on._stage[(2, 32, 16)](tab["w2"], tab["sw2"], tab["w2"], tab["sw2"], cnt, q, r, 0, 4096, 2048, PAIR=False,
                                  num_warps=4)
    for e in range(2):
        assert torch.equal(staged_values(q[e], r[e]), es.w2[e].dequant())
    q = torch.empty(2, 4096, 4096, dtype=torch.uint8, device="cuda")
    r = torch.empty(2, 16, 32, 2, dtype=torch.uint8, device="cuda")
    staged_on._stage[(2, 16, 32)](tab["w1"], tab["sw1"], tab["w3"], tab["sw3"], cnt, q, r, 0, 2048, 4096, PAIR=True,
                                  num_warps=4)
    for e in range(2):  # rows 2i: w1's row i, 2i + 1: w3's, each with its own block exponents
        assert torch.equal(staged_values(q[e, 0::2], r[e, ..., 0]), es.w1[e].dequant())
        assert torch.equal(staged_values(q[e, 1::2], r[e, ..., 1]), es.w3[e].dequant())
    es.w2[0].scale.view(torch.uint8)[300, 5] -= 20  # a group 20 binades down: stageable's kernel says no
    es.tables.clear()
    assert not staged_on.stageable(es)


def test_staged_experts_no_host_sync(staged_on):
    es, x, ids, wts = _flash_experts(12, E=4, S=300, k=2)
    # the first call builds the tables and makes the stageable check (one read back)
    _second_call_no_sync(implementation("routed_experts", "cuda"), x, ids, wts, es, 10.0, act_quant=True)


def _close_but_flips(got, ref, bound, quantised):
    """|got - ref| <= bound x max|ref|. With quantised activations computed inside the op (the
    experts' h), an h value within a float32 rounding of an e4m3 midpoint rounds differently in the
    two (the kernel's tensor-core sums and torch's differ in the last bits), which moves its token's
    whole output row by about one e4m3 step of one h value: then most rows (at least half) must
    still meet the bound and none may move by more than 2e-2 (H200, 600 tokens x 4 experts: 10% of
    the rows moved, by at most 7.3e-3; the interpreter test, tests/interpreted_kernels.py, holds the
    kernel to 1e-5 on its cases)."""
    err = (got.float() - ref.float()).abs() / ref.float().abs().max()
    if not quantised:
        assert err.max().item() <= bound
    else:
        rows = err.reshape(err.shape[0], -1).amax(-1)
        moved = (rows > bound).float().mean().item()
        assert moved <= 0.5 and rows.max().item() <= 2e-2, (moved, rows.max().item())


def _run(model, ids, prompt, backend, chunk):
    from dsv4.engine.runtime.session import Session

    with use_backend(backend):
        s = Session(model, ids.numel(), prefill_chunk=chunk)
        out = [s.prefill(ids[:prompt])]
        hs = s.cache.handles(s.slot)
        cache = [h.read_entries() for h in hs if h.layer.ratio] + [h.read_window()[0] for h in hs]
        out += [s.step(int(t)) for t in ids[prompt:]]
    return torch.stack(out).float().cpu(), [c.cpu() for c in cache]


@pytest.mark.parametrize("mode,bound,steps_bound,agreement", [("exact", 1e-3, 1e-3, 0.95),
                                                              ("faithful", 8e-2, 0.5, 0.8)])
def test_prefill_kernel_path_matches_reference_flash_dims(mode, bound, steps_bound, agreement):
    """2600-token prompt in chunks of 1000 (CSA: 650 entries > index_topk 512, so the streaming
    indexer selects; HCA: 20 entries), then 64 decode steps, each path from its own cache.
    Faithful mode quantises every FP8 / FP4 linear's input to e4m3 (a step of 6-12%): where the two
    paths' sums differ in the last bits (the GPU's bf16 P.V in prefill attention, the FP8 tensor
    cores' 128-block sums), a value near an e4m3 midpoint rounds apart, and the FP8 KV / FP4 indexer
    formats carry it on. On random Flash-dimension weights that amplifies through the layers (H200,
    2026-12-01: prefill logits 5.6% of max|logit|, second layer's window 5.4% mean, the caches then
    decode apart: 64 steps 36% of max|logit|, greedy agreement 89%; the previous bf16-dot GEMM gave
    57% / 83%; the reference's own top-2 logit gap goes down to 0.005). So faithful mode holds the
    prefill, the cache and the first greedy token to the bound and the decode steps only loosely;
    the per-kernel tests hold the faithful arithmetic itself tightly, and exact mode (1e-3) the rest."""
    from dsv4.engine.model.config import DSV4Config
    from dsv4.engine.model.model import Model
    from dsv4.engine.tools.synthetic import synthetic_stored

    cfg = DSV4Config.flash().layer_range(2, 4)
    model = Model.from_state_dict(cfg, synthetic_stored(cfg, "cuda"), mode=mode, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (2664,), generator=torch.Generator().manual_seed(9))
    ref, ref_cache = _run(model, ids, 2600, "reference", 1000)
    reset_report()
    fast, fast_cache = _run(model, ids, 2600, "auto", 1000)
    ran = report()
    assert all("triton" in ran[op] for op in ("chunk_attention", "indexer_scores", "linear", "grouped_linear",
                                              "routed_experts")), ran
    e = _rel(fast[0], ref[0])
    assert e <= bound, f"prefill logits {e:.3g}"
    for a, b in zip(fast_cache, ref_cache):
        e = ((a - b).abs().mean() / b.abs().mean()).item()
        assert e <= bound, f"cache after prefill {e:.3g}"
    e = _rel(fast, ref)
    assert e <= steps_bound, f"decode steps {e:.3g}"
    assert fast[0].argmax() == ref[0].argmax(), "greedy token after the prefill"
    agree = (fast.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= agreement, f"greedy agreement {agree:.3f}"


def test_prefill_kernel_path_with_staged_experts_matches_reference(staged_on, monkeypatch):
    """The faithful check above with the routed experts of every chunk through FP8 staging (the
    synthetic Flash experts stage exactly); the staged path must have run."""
    calls = []
    real = staged_on.staged_experts
    monkeypatch.setattr(staged_on, "staged_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    test_prefill_kernel_path_matches_reference_flash_dims("faithful", 8e-2, 0.5, 0.8)
    assert calls


def test_long_prefill_memory_stays_bounded():
    """A 65536-token prompt (default chunk): device memory beyond the weights and the cache stays
    under 8 GiB (the issue's bound), and a decode step follows."""
    from dsv4.engine.model.config import DSV4Config
    from dsv4.engine.model.model import Model
    from dsv4.engine.runtime.session import Session
    from dsv4.engine.tools.synthetic import synthetic_stored

    cfg = DSV4Config.flash().layer_range(2, 4)
    model = Model.from_state_dict(cfg, synthetic_stored(cfg, "cuda"), mode="faithful", device="cuda")
    P = 65536
    s = Session(model, P + 1)
    ids = torch.randint(0, cfg.vocab_size, (P + 1,), generator=torch.Generator().manual_seed(2))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    done = []
    logits = s.prefill(ids[:P], progress=lambda d, t: done.append(d))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    print(f"\n65536-token prefill: {len(done)} chunks, peak {extra / 2**30:.2f} GiB beyond weights + cache")
    assert done[-1] == P and len(done) >= 2 and extra < 8 * 2 ** 30
    assert torch.isfinite(logits).all() and torch.isfinite(s.step(int(ids[P]))).all()

"""One attention layer (SWA, CSA or HCA) over the slot's cache.

``attention`` runs a chunk of S new tokens at host-known positions; ``decode_attention`` runs one
token whose position is a device tensor, over fixed-size views of the cache (the whole window ring,
the slot's whole entry capacity) under masks, so that it can be captured in a CUDA graph. Both
compute the same values.
"""

from __future__ import annotations

import torch

from dsv4 import kernels
from dsv4.kernels import quant, streams
from dsv4.kernels import dispatch
from dsv4.kernels.reference import indexer as _indexer_ref
from dsv4.kernels.reference.indexer import topk_entries, topk_merge

from .compressor import compress_decode, compress_step
from .context import LayerContext


def _project(x, w, p, cfg, cos, sin, kv_quant, faithful):
    """-> qr [S, q_lora] (the indexer's input), q [S, H, D] and this chunk's KV entries kv [S, D]
    (kv through the KV entry format when ``kv_quant``). faithful: the FP8 linears quantise their
    inputs (kernels.linear act_quant) and the queries are rounded to bf16, as DeepSeek's own
    inference feeds its attention kernels, so the prefill's attention runs on bf16 tensor-core
    dots; prefill and decode round the queries alike. (The GPU prefill kernel also rounds the
    attention probabilities to bf16 for P.V, as flash attention does; the references and the decode
    kernel keep them in float32: kernels/triton/prefill_attention.py.)
    wq_a and wkv run as one GEMV where the decode step stacked them (w[p + ".wq_a+wkv"])."""
    S = x.shape[0]
    H, D, rd, eps = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.rms_norm_eps
    if p + ".wq_a+wkv" in w:
        qa, kva = kernels.linear(x, w[p + ".wq_a+wkv"], act_quant=faithful).split(
            [w[p + ".wq_a"].shape[0], w[p + ".wkv"].shape[0]], -1)
    else:
        qa, kva = kernels.linear(x, w[p + ".wq_a"], act_quant=faithful), kernels.linear(x, w[p + ".wkv"],
                                                                                         act_quant=faithful)
    qr = kernels.rms_norm(qa, w[p + ".q_norm.weight"], eps)
    q = kernels.linear(qr, w[p + ".wq_b"], act_quant=faithful).view(S, H, D)
    q = kernels.rms_norm_rope(q, None, eps, cos, sin, torch.bfloat16 if faithful else None)
    kv = kernels.rms_norm_rope(kva, w[p + ".kv_norm.weight"], eps, cos, sin)
    if kv_quant:
        kv = quant.kv_quant_dequant(kv, rd)
    return qr, q, kv


def _attend(q, keys, visible, w, p, cfg, cos, sin, faithful) -> torch.Tensor:
    """Sink attention of q [S, H, D] over keys [T, D] where visible [S, T]; inverse RoPE; wo_a, wo_b."""
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill(~visible, float("-inf"))
    o = kernels.sparse_mqa_attention(q, keys, bias, w[p + ".attn_sink"], cfg.head_dim ** -0.5)  # [S, H, D]
    return _out(o, w, p, cfg, cos, sin, faithful)


def _out(o, w, p, cfg, cos, sin, faithful, rotated: bool = False) -> torch.Tensor:
    """Attention output o [S, H, D] -> inverse RoPE (unless ``rotated``: done with the attention) ->
    wo_a (grouped) -> wo_b -> [S, d]."""
    if not rotated:
        o = kernels.apply_rope(o, cos, sin, inverse=True)
    y = kernels.grouped_linear(o.reshape(o.shape[0], cfg.o_groups, -1), w[p + ".wo_a"], act_quant=faithful)
    return kernels.linear(y, w[p + ".wo_b"], act_quant=faithful)


def _entry_quantiser(faithful: bool, rd: int):
    return (lambda e: quant.kv_quant_dequant(e, rd)) if faithful else (lambda e: e)


def attention(x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """A chunk: x [S, d] normed input at positions ctx.positions [S], the first being ctx.start (a host
    int, so no device sync). -> [S, d].

    Over the paged cache (a handle with ``entry_store``) the attention and the indexer run key tile by
    key tile (kernels.chunk_attention, a streaming top-k): memory bounded whatever the context. Other
    handles (training's whole sequence) take ``_attention_dense``, whose score matrices train/ reads."""
    w, p, spec, cfg, handle, positions, rope, start = (ctx.w, ctx.prefix + ".attn", ctx.spec, ctx.cfg, ctx.handle,
                                                      ctx.positions, ctx.rope, ctx.start)
    faithful = ctx.faithful
    cos, sin = rope.cos_sin(positions, spec.yarn)
    qr, q, kv = _project(x, w, p, cfg, cos, sin, faithful, faithful)
    if not hasattr(handle, "entry_store"):
        return _attention_dense(x, qr, q, kv, ctx, cos, sin)
    ring, ring_pos = handle.read_window()
    handle.write_window(kv, start)
    entries = rows = select = None
    m = spec.ratio
    if m:
        n = compress_step(x, w, p + ".compressor", handle, start, m, spec.attn == "csa", rope, cfg.rms_norm_eps,
                          _entry_quantiser(faithful, cfg.qk_rope_head_dim), append=handle.append_entries)
        entries, rows = handle.entry_store(), handle.entry_rows(0, n)
        if spec.attn == "csa":
            iq = _index_quantiser(faithful)
            compress_step(x, w, p + ".indexer.compressor", handle, start, m, True, rope, cfg.rms_norm_eps, iq,
                          name="idx", append=handle.append_index_keys)
            if n > cfg.index_topk:  # else every visible entry is among the top-k
                select = _indexer_topk_tiles(x, qr, w, p + ".indexer", cfg, handle, rows, positions, m,
                                             rope.cos_sin(positions, yarn=True), iq, faithful)
    o = kernels.chunk_attention(q, positions, ring, ring_pos, kv, cfg.sliding_window, entries, rows, m, select,
                                w[p + ".attn_sink"], cfg.head_dim ** -0.5, out_rope=(cos, sin))
    return _out(o, w, p, cfg, cos, sin, faithful, rotated=True)


def _attention_dense(x, qr, q, kv, ctx: LayerContext, cos, sin) -> torch.Tensor:
    """The chunk attention with the whole [S, keys] visibility and indexer score matrices (training:
    train/trainer.Capture observes sparse_mqa_attention and indexer_topk). Same values as the tiled path."""
    w, p, spec, cfg, handle, positions, rope, start = (ctx.w, ctx.prefix + ".attn", ctx.spec, ctx.cfg, ctx.handle,
                                                      ctx.positions, ctx.rope, ctx.start)
    faithful = ctx.faithful
    # sliding window: ring (before this chunk) + this chunk; key k visible to t iff t-W < k <= t
    ring, ring_pos = handle.read_window()
    keys = torch.cat([ring.to(kv.dtype), kv], 0)
    kpos = torch.cat([ring_pos, positions], 0)
    t = positions[:, None]
    visible = (kpos[None, :] >= 0) & (kpos[None, :] <= t) & (kpos[None, :] > t - cfg.sliding_window)
    handle.write_window(kv, start)

    if spec.ratio:
        m = spec.ratio
        n = compress_step(x, w, p + ".compressor", handle, start, m, spec.attn == "csa", rope, cfg.rms_norm_eps,
                          _entry_quantiser(faithful, cfg.qk_rope_head_dim), append=handle.append_entries)
        entries = handle.read_entries(n).to(kv.dtype)  # [n, D]
        ent_vis = (torch.arange(n, device=x.device)[None, :] + 1) * m <= t + 1  # [S, n]
        if spec.attn == "csa":
            iq = _index_quantiser(faithful)
            compress_step(x, w, p + ".indexer.compressor", handle, start, m, True, rope, cfg.rms_norm_eps, iq,
                          name="idx", append=handle.append_index_keys)
            ent_vis = ent_vis & _indexer_select(x, qr, w, p + ".indexer", cfg, handle.read_index_keys(n), cos_sin=
                                                rope.cos_sin(positions, yarn=True), iq=iq, visible=ent_vis,
                                                faithful=faithful)
        keys = torch.cat([keys, entries], 0)
        visible = torch.cat([visible, ent_vis], 1)
    return _attend(q, keys, visible, w, p, cfg, cos, sin, faithful)


def decode_attention(x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """S tokens of a static step, x: [S, d], at the consecutive device positions ctx.positions [S]
    (ctx.rope is the step's StepRope). -> [S, d].

    Entries are quantised once, by the store (kernels.store_entry), and attention reads the cache
    in its storage formats (kernels.decode_attention). The projections run for all S rows at once
    (each weight read once); the cache reads and writes go token by token, so that token i sees the
    cache exactly as a one-token step at its position would (token i's ring row would overwrite a
    row token i-1 still sees). Token i's compressors (one-row GEMVs, as a one-token step runs them)
    run on the side stream: token 0's beside the projections, token i's beside token i-1's indexer
    and attention (they write only entries token i-1 cannot see yet), after ctx.before_token(i),
    which is called before token i >= 1 writes anything; token i's ring row waits for both."""
    w, p, spec, cfg, handle, rope = ctx.w, ctx.prefix + ".attn", ctx.spec, ctx.cfg, ctx.handle, ctx.rope
    faithful, S, eps = ctx.faithful, x.shape[0], cfg.rms_norm_eps
    side = streams.side(x, "compressor")

    def writes(i: int):
        """Token i's cache writes other than its ring row: the hook, then its compressors."""
        r = rope.token(i)
        if i and ctx.before_token is not None:
            ctx.before_token(i)
        if spec.ratio:
            _compress_decode(x[i:i + 1], w, p, spec, handle, r, eps, faithful)

    cos, sin = rope.at_pos(spec.yarn)
    if spec.ratio:
        _entry_rows(handle, rope.token(0), spec.ratio)  # on this stream, before the side stream reads them
    _, join = streams.beside(side, lambda: writes(0)) if spec.ratio else (None, lambda: None)
    qr, q, kv = _project(x, w, p, cfg, cos, sin, False, faithful)  # kv is quantised by its store
    select = spec.attn == "csa" and handle.entry_capacity() > cfg.index_topk  # else every closed window is in the top-k
    if select:
        q_i, weights = _indexer_query(x, qr, w, p + ".indexer", cfg, rope.at_pos(True), _index_quantiser(faithful),
                                      faithful)
    ring, W = handle.ring_store(), cfg.sliding_window
    out = []
    for i in range(S):
        r = rope.token(i)
        if i:
            join()  # token i's hook and compressors are done: its ring row may be overwritten
        kernels.store_entry(kv[i:i + 1], ring, r.once(("ring", W), lambda: torch.remainder(r.pos, W)))
        if not i:
            join()
        if i + 1 < S:
            _, join = streams.beside(side, lambda: writes(i + 1))
        store = rows = ok = None
        if spec.ratio:
            store, rows, ok = handle.entry_store(), *_entry_rows(handle, r, spec.ratio)[1:]
        if select:  # attention reads only the selected entries
            rows, ok = kernels.indexer_select_decode(q_i[i], weights[i], handle.index_store(), rows, ok,
                                                     cfg.index_topk)
        out.append(kernels.decode_attention(q[i], ring, r.pos, store, rows, ok, w[p + ".attn_sink"],
                                            cfg.head_dim ** -0.5))
    return _out(out[0][None] if S == 1 else torch.stack(out), w, p, cfg, cos, sin, faithful)


def _entry_rows(handle, r, m: int):
    """(row of the entry being written, rows of all entries, which of them have closed) for the
    token of StepRope r: the same for every layer of ratio m in the step (one block table per
    slot), so made once (one launch)."""
    return r.once(("entries", m), lambda: kernels.entry_rows(
        r.pos, handle.block_row(), m, handle.layer.entries_per_block, handle.entry_capacity()))


def _compress_decode(x, w, p, spec, handle, r, eps, faithful) -> None:
    """decode_attention's compressors for one token (x [1, d], StepRope r): the entry (and, CSA,
    the indexer key) of the window holding its position, stored at its entry row once the window
    closes (engine/model/compressor.compress_decode)."""
    m, pos = spec.ratio, r.pos
    cz = _compressor_inputs(x, w, p, spec)
    row = _entry_rows(handle, r, m)[0]
    store = handle.entry_store()
    compress_decode(x, w, p + ".compressor", handle, pos, m, spec.attn == "csa", r, eps, lambda e: e,
                    store=lambda v: kernels.store_entry(v, store, row), cz=cz[:2])
    if spec.attn == "csa":
        istore = handle.index_store()
        compress_decode(x, w, p + ".indexer.compressor", handle, pos, m, True, r, eps,
                        quant.hadamard_transform if faithful else (lambda e: e), name="idx",
                        store=lambda v: kernels.store_entry(v, istore, row), cz=cz[2:])


def stacked_linears(p: str, spec) -> dict[str, list[str]]:
    """Linears of the attention at p that read the same input, by the name the decode step gives
    their stacked weight (engine/weights.fuse_rows): wq_a + wkv, and the compressor's wkv + wgate
    followed by the indexer compressor's (CSA)."""
    groups = {p + ".wq_a+wkv": [p + ".wq_a", p + ".wkv"]}
    if spec.ratio:
        names = [p + ".compressor.wkv", p + ".compressor.wgate"]
        if spec.attn == "csa":
            names += [p + ".indexer.compressor.wkv", p + ".indexer.compressor.wgate"]
        groups[p + ".compressor+"] = names
    return groups


def _compressor_inputs(x, w, p, spec) -> tuple:
    """(c, z) of the compressor, then of the indexer's where it has one, from one GEMV when the
    decode step stacked their weights (w[p + ".compressor+"]); else () and each computes its own."""
    if p + ".compressor+" not in w:
        return ()
    names = stacked_linears(p, spec)[p + ".compressor+"]
    return kernels.linear(x.float(), w[p + ".compressor+"]).split([w[n].shape[0] for n in names], -1)


def _index_quantiser(faithful: bool):
    return kernels.indexer_quant if faithful else (lambda e: e)


def _indexer_query(x, qr, w, p, cfg, cos_sin, iq, faithful) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning Indexer queries [S, Hi, Di] (rotated, and quantised by iq) and head weights [S, Hi]
    float32 (scaled by Di^-1/2 Hi^-1/2)."""
    S = x.shape[0]
    Hi, Di = cfg.index_n_heads, cfg.index_head_dim
    q = kernels.apply_rope(kernels.linear(qr, w[p + ".wq_b"], act_quant=faithful).view(S, Hi, Di), *cos_sin)
    weights = kernels.linear(x, w[p + ".weights_proj"]).float() * (Di ** -0.5 * Hi ** -0.5)
    return iq(q), weights


def _indexer_scores(x, qr, w, p, cfg, keys, cos_sin, iq, faithful) -> torch.Tensor:
    """Lightning Indexer scores [S, T] of each query against the stored keys [T, Di]."""
    q, weights = _indexer_query(x, qr, w, p, cfg, cos_sin, iq, faithful)
    return kernels.indexer_scores(q, keys, weights)


# Lightning Indexer tiles: [queries, entries] score tiles of about this many float32 (times the indexer
# heads when the scores run through the reference, which materialises [queries, heads, entries]).
SCORE_TILE = 1 << 26


def _score_tiles(S: int, heads: int, device: torch.device) -> tuple[int, int]:
    """(queries, entries) per indexer score tile."""
    fused = dispatch.mode() != "reference" and \
        dispatch.implementation("indexer_scores", device.type) is not _indexer_ref.indexer_scores
    budget = SCORE_TILE if fused else SCORE_TILE // heads
    qt = min(S, 1024)
    return qt, max(256, budget // qt)


def _indexer_topk_tiles(x, qr, w, p, cfg, handle, rows, positions, ratio, cos_sin, iq, faithful) -> torch.Tensor:
    """Lightning Indexer top-k per query, streamed over entry tiles: [S, index_topk] int64 entry indices
    (score descending, ties to the lower index; -1 where fewer entries are visible). Keys are read
    from the cache's index store at ``rows`` [n] one tile at a time; nothing of size [S, n] is kept.
    Faithful mode: q and keys are FP4 values (e2m1 x a power of two), exact in bf16, so they travel
    as bf16 (the same scores, and bf16 tensor-core dots in the kernel)."""
    S, Hi, k = x.shape[0], cfg.index_n_heads, cfg.index_topk
    q, weights = _indexer_query(x, qr, w, p, cfg, cos_sin, iq, faithful)
    kdt = torch.bfloat16 if faithful else torch.float32
    q = q.to(kdt)
    n = rows.shape[0]
    qt, et = _score_tiles(S, Hi, x.device)
    out = []
    for i0 in range(0, S, qt):
        t, best = positions[i0:i0 + qt, None], None
        for e0 in range(0, n, et):
            e = torch.arange(e0, min(n, e0 + et), device=x.device)
            keys = handle.read_index_keys_at(rows[e]).to(kdt)
            scores = kernels.indexer_scores(q[i0:i0 + qt], keys, weights[i0:i0 + qt])
            best = topk_merge(best, scores, e0, (e[None, :] + 1) * ratio <= t + 1, k)
        out.append(topk_entries(best))
    return torch.cat(out)


def _indexer_select(x, qr, w, p, cfg, keys, cos_sin, iq, visible, faithful) -> torch.Tensor:
    """Lightning Indexer: bool [S, T] of the top-index_topk visible entries per query.

    keys: [T, Di] the stored indexer keys; visible: [S, T] the entries each query may see."""
    return kernels.indexer_topk(_indexer_scores(x, qr, w, p, cfg, keys, cos_sin, iq, faithful), visible,
                                cfg.index_topk)

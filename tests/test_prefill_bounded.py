"""Prefill in bounded memory (#15): the tiled chunk attention and streaming indexer top-k equal the
whole-matrix path; chunked prefill equals one chunk for chunk sizes that cut windows in odd places;
the automatic chunk size; progress and interrupts that leave the cache at the last complete chunk;
int64 cache rows and positions past 2^31."""

import pytest
import torch

from dsv4.engine.model import attention as attn_mod
from dsv4.engine.model.model import Model
from dsv4.engine.runtime import session as session_mod
from dsv4.engine.runtime.session import PrefillInterrupted, Session, default_prefill_chunk
from dsv4.kernels.reference import chunk_attention as ca
from dsv4.kernels.reference.indexer import indexer_topk, topk_entries, topk_merge
from dsv4.train.trainer import sequence_handles

TOL = {"exact": 1e-5, "faithful": 5e-3}  # as tests/test_consistency.py (faithful: 1-ulp FP8/FP4 flips)


@pytest.fixture(scope="module")
def ids(tiny_cfg):
    return torch.randint(0, tiny_cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(5))


def _rel(a, b):
    return (a - b).abs().max().item() / b.abs().max().item()


def test_streaming_topk_equals_the_stable_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    S, T, k = 9, 300, 20
    scores = torch.randint(-4, 4, (S, T), generator=g).float() * 0.5  # many exact ties
    scores[0] = 0.0
    scores[0, ::3] = -0.0  # -0.0 ties with 0.0: the lower index wins
    visible = torch.rand(S, T, generator=g) < 0.8
    visible[1] = False
    visible[1, :5] = True  # fewer than k visible: all of them, then -1
    ref = indexer_topk(scores, visible, k)
    for tile in (1, 37, 300):
        best = None
        for f in range(0, T, tile):
            best = topk_merge(best, scores[:, f:f + tile], f, visible[:, f:f + tile], k)
        idx = topk_entries(best)
        got = torch.zeros_like(visible)
        for s in range(S):
            got[s, idx[s][idx[s] >= 0]] = True
        assert torch.equal(got, ref), tile
        assert (idx[1, 5:] == -1).all() and sorted(idx[1, :5].tolist()) == list(range(5))


@pytest.mark.parametrize("mode", ["exact", "faithful"])
def test_tiled_attention_and_indexer_equal_the_whole_matrix_path(tiny_cfg, tiny_tensors, ids, mode, monkeypatch):
    """Small tiles (16 queries x 8 keys; 8-entry indexer tiles) over the paged cache against the
    whole-matrix path (training's SequenceHandle) from position 0, every token's logits."""
    monkeypatch.setattr(ca, "Q_TILE", 16)
    monkeypatch.setattr(ca, "K_TILE", 8)
    monkeypatch.setattr(attn_mod, "_score_tiles", lambda S, heads, device: (5, 8))
    model = Model.from_state_dict(tiny_cfg, tiny_tensors, mode=mode)
    tiled = Session(model, 256).prefill(ids, chunk=ids.numel(), last_only=False)
    with torch.no_grad():
        dense = model.forward(ids, sequence_handles(model, model.device)[0], 0)
    if mode == "exact":
        assert _rel(tiled, dense) <= TOL[mode]
    else:  # summation order moves a few values across an FP8 / FP4 / bf16-query rounding boundary
        per_token = (tiled - dense).abs().amax(-1) / dense.abs().max()
        assert per_token.median() <= 1e-4 and per_token.max() <= 2 * TOL[mode], per_token.max()


@pytest.mark.parametrize("mode,chunks", [("exact", (13, 130)), ("faithful", (37,))])
def test_chunked_prefill_equals_one_chunk(tiny_cfg, tiny_tensors, ids, mode, chunks):
    model = Model.from_state_dict(tiny_cfg, tiny_tensors, mode=mode)
    full = Session(model, 256).prefill(ids, chunk=ids.numel(), last_only=False)
    for chunk in chunks:
        out = Session(model, 256, prefill_chunk=chunk).prefill(ids, last_only=False)
        assert _rel(out, full) <= TOL[mode], chunk


def test_default_chunk_follows_free_memory(tiny_cfg, tiny_tensors, monkeypatch):
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    sizes = []
    for free in (0, 4 << 30, 64 << 30, 1 << 50):
        monkeypatch.setattr(session_mod, "free_memory", lambda dev, f=free: f)
        sizes.append(default_prefill_chunk(model, budget=1 << 50))
    assert sizes == sorted(sizes) and sizes[0] == session_mod.MIN_CHUNK and sizes[-1] == session_mod.MAX_CHUNK
    assert all(s % 128 == 0 for s in sizes)
    # the transient budget caps it whatever is free: chunk x per-token bytes + fixed bytes <= budget
    per_token = session_mod.prefill_bytes_per_token(tiny_cfg, model.dtype)
    budget = session_mod.fixed_prefill_bytes(tiny_cfg) + 1000 * per_token
    assert default_prefill_chunk(model, budget=budget) == 896


def test_default_chunk_on_the_kernel_path(monkeypatch):
    """On CUDA the kernel path's estimate applies unless DSV4_KERNELS=reference forces the
    references: V4-Flash gets 12032 tokens (0.44 MB counted per token against 0.39 measured on the
    H100: peak about 4.4 GiB beyond weights + cache) against the reference path's 3328. The memory itself is
    checked on the GPU (tests/test_gpu_prefill.py::test_long_prefill_memory_stays_bounded)."""
    from dsv4.engine.model.config import DSV4Config
    from dsv4.kernels import dispatch

    cfg = DSV4Config.flash()
    model = type("M", (), {"cfg": cfg, "dtype": torch.bfloat16, "device": torch.device("cuda")})()
    monkeypatch.setattr(session_mod, "free_memory", lambda dev: 100 << 30)
    chunks = {}
    for mode in ("auto", "reference"):
        with dispatch.use_backend(mode):
            chunks[mode] = default_prefill_chunk(model)
    assert chunks == {"auto": 12032, "reference": 3328}
    with dispatch.use_backend("auto"):  # the CPU runs the references: their estimate
        assert default_prefill_chunk(model, device="cpu") == 3328


def test_progress_and_an_interrupt_between_chunks(tiny_cfg, tiny_tensors, ids):
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    ref = Session(model, 256).prefill(ids)
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if len(seen) == 2:
            raise KeyboardInterrupt

    s = Session(model, 256, prefill_chunk=64)
    with pytest.raises(PrefillInterrupted) as e:
        s.prefill(ids, progress=progress)
    # the interrupt came between chunks 2 and 3: both complete chunks stay in the cache
    assert seen == [(64, 150), (128, 150)] and (e.value.done, e.value.total) == (128, 150) and s.seq_len == 128
    assert isinstance(e.value, KeyboardInterrupt)
    assert _rel(s.prefill(ids[128:]), ref) <= 1e-5  # the session carries on from there


def test_an_interrupt_inside_a_chunk_rolls_the_cache_back(tiny_cfg, tiny_tensors, ids, monkeypatch):
    """Ctrl+C midway through a chunk (after some layers wrote their window, tails and entries): the
    cache is as after the last complete chunk, and continuing gives the uninterrupted logits."""
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    ref = Session(model, 256).prefill(ids)
    s = Session(model, 256, prefill_chunk=50)
    h = s.cache.handles(s.slot)[-1]  # the last layer: every earlier layer has written its state
    real, calls = type(h).read_window, []

    def cut(self):
        calls.append(self.seq_len)
        if self is h and self.seq_len == 100:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(type(h), "read_window", cut)
    with pytest.raises(PrefillInterrupted) as e:
        s.prefill(ids)
    monkeypatch.setattr(type(h), "read_window", real)
    assert e.value.done == 100 and s.seq_len == 100
    assert _rel(s.prefill(ids[100:]), ref) <= 1e-5


def test_cache_rows_are_int64_past_2_31(tiny_cfg, tiny_tensors):
    """A block id whose first row is past 2^31 (a 1M-token slot of a big pool): the handle's entry
    rows are exact int64 (the block table itself is int32, rows are computed in int64)."""
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    s = Session(model, 256)
    s.cache.prepare(s.slot, 200)
    layer = next(h for h in s.cache.handles(s.slot) if h.layer.ratio == 4)
    epb = layer.layer.entries_per_block
    big = (1 << 31) // epb + 3
    s.cache.block_table[s.slot, 1] = big
    rows = layer.entry_rows(epb - 2, 4)
    assert rows.dtype == torch.int64
    assert rows.tolist() == [s.cache.block_table[s.slot, 0].item() * epb + epb - 2,
                             s.cache.block_table[s.slot, 0].item() * epb + epb - 1, big * epb, big * epb + 1]


def test_chunk_attention_at_positions_past_2_31():
    """The reference's window / entry visibility at positions crossing 2^31 (int64 throughout)."""
    g = torch.Generator().manual_seed(1)
    S, H, D, W, start, ratio = 6, 2, 32, 4, (1 << 31) - 3, 4
    q, kv = torch.randn(S, H, D, generator=g), torch.randn(S, D, generator=g)
    pos = torch.arange(start, start + S)
    ring = torch.randn(W, D, generator=g)
    ring_pos = start - 1 - torch.remainder(start - 1 - torch.arange(W), W)
    entries = {"f32": torch.randn(5, D, generator=g)}
    rows = torch.arange(5)
    sink = torch.zeros(H)
    out = ca.chunk_attention(q, pos, ring, ring_pos, kv, W, entries, rows, ratio, None, sink, D ** -0.5)
    # query 0 sees ring positions start-3..start-1 and itself, and all 5 entries (all closed long ago)
    keys = torch.cat([ring[torch.argsort(ring_pos)][1:], kv[:1], entries["f32"]])
    p = torch.softmax(torch.cat([(q[0] @ keys.t()) * D ** -0.5, sink[:, None]], 1), 1)[:, :-1]
    assert torch.allclose(out[0], p @ keys, atol=1e-5)

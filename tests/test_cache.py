"""KV cache substrate: schema shapes, allocator, pool round trips, window ring, isolation, budgets."""

import gc
import pathlib
import warnings

import pytest
import torch

from dsv4.cache import BlockAllocator, CacheError, CacheManager, CacheSchema, EntryFormat, EntryStore, v32_bytes
from dsv4.engine.model.config import DSV4Config
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.kernels import quant


def test_schema_shapes_flash_and_pro():
    for cfg, n_csa, n_hca, n_swa in ((DSV4Config.flash(), 21, 20, 2), (DSV4Config.pro(), 30, 31, 0)):
        s = CacheSchema.from_config(cfg, "faithful")
        kinds = [ly.attn for ly in s.layers]
        assert (kinds.count("csa"), kinds.count("hca"), kinds.count("swa")) == (n_csa, n_hca, n_swa)
        csa = next(ly for ly in s.layers if ly.attn == "csa")
        hca = next(ly for ly in s.layers if ly.attn == "hca")
        assert (csa.entries_per_block, csa.tail_rows, csa.tail_width) == (32, 3, 1024)
        assert (hca.entries_per_block, hca.tail_rows, hca.tail_width, hca.idx) == (1, 127, 512, None)
        assert (csa.kv.nbytes, csa.idx.nbytes, csa.window) == (583, 68, 128)
        assert s.blocks_for(1) == 1 and s.blocks_for(128) == 1 and s.blocks_for(129) == 2
    e = CacheSchema.from_config(DSV4Config.flash(), "exact")
    assert e.layers[2].kv.nbytes == 2048 and e.layers[2].idx.nbytes == 512


def test_flash_accounting_at_1m_pinned_and_ratio_to_v32():
    T = 1_048_576
    for cfg, expect, claim in ((DSV4Config.flash(), 3_693_977_216, 0.07), (DSV4Config.pro(), 5_289_940_352, 0.10)):
        acc = CacheSchema.from_config(cfg, "faithful").bytes_for_context(T)
        ratio = acc["total"] / v32_bytes(T)
        print(f"\n{cfg.num_hidden_layers} layers at 1M: {acc['total']:,} bytes = {ratio:.1%} of V3.2 "
              f"(656 B x 61 layers); paper claims about {claim:.0%}")
        assert acc["total"] == expect
    # the closed form of cache/schema.py's docstring
    nb = T // 128
    assert 21 * (20832 * nb + 74624 + 51200) + 20 * (583 * nb + 74624 + 520192) + 2 * 74624 == 3_693_977_216


def test_allocator_acquire_release_exhaustion():
    a = BlockAllocator(3)
    got = [a.acquire() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and a.free_count == 0
    with pytest.raises(CacheError, match="exhausted"):
        a.acquire()
    a.release(got[1])
    assert a.acquire() == got[1]
    with pytest.raises(CacheError, match="released twice"):
        a.release(7)


def test_pool_roundtrip_faithful_equals_spec_quantization():
    x = torch.randn(10, 512) * 5
    kv = EntryStore(16, EntryFormat(512, 64, "kv"), "cpu")
    rows = torch.tensor([3, 0, 15, 7, 1, 2, 4, 5, 6, 8])
    kv.write(rows, x)
    assert torch.equal(kv.read(rows), quant.kv_quant_dequant(x, 64))
    assert kv.tensors["fp8"].dtype == torch.float8_e4m3fn and kv.tensors["bf16"].dtype == torch.bfloat16
    idx = EntryStore(16, EntryFormat(128, 0, "fp4"), "cpu")
    k = torch.randn(10, 128)
    idx.write(rows, k)
    assert torch.equal(idx.read(rows), quant.fp4_quant_dequant(k, 32))
    assert idx.tensors["fp4"].shape == (16, 64)
    ex = EntryStore(4, EntryFormat(512, 64, "f32"), "cpu")
    ex.write(slice(0, 2), x[:2])
    assert torch.equal(ex.read(slice(0, 2)), x[:2])


def _manager(cfg, slots=1, ctx=512, mode="exact", **kw):
    return CacheManager(CacheSchema.from_config(cfg, mode), ctx, num_slots=slots, **kw)


def test_prepare_writes_every_new_block_into_the_table(tiny_cfg):
    m = _manager(tiny_cfg, ctx=1024)
    slot = m.admit_request()
    m.prepare(slot, 1)  # the first block
    m.commit(slot, 1)
    m.prepare(slot, 300)  # 301 tokens: two more blocks, written in one copy
    row = m.block_table[slot].tolist()
    assert row[:3] == m._blocks[slot] and len(set(row[:3])) == 3 and all(b >= 0 for b in row[:3])
    assert row[3:] == [-1] * (len(row) - 3)


def test_window_wraps_around(tiny_cfg):
    m = _manager(tiny_cfg)
    slot = m.admit_request()
    h = m.handles(slot)[0]
    W = h.layer.window
    x = torch.arange(300, dtype=torch.float32)[:, None].expand(300, tiny_cfg.head_dim).contiguous()
    for start in (0, 100, 200):  # three writes of 100 tokens, wrapping the 128-entry ring
        m.prepare(slot, 100)
        h.write_window(x[start:start + 100], start)
        m.commit(slot, 100)
    entries, pos = h.read_window()
    assert sorted(pos.tolist()) == list(range(300 - W, 300))
    assert torch.equal(entries[:, 0], pos.float())


def test_three_requests_stay_isolated(tiny_cfg, tiny_tensors):
    model = Model.from_state_dict(tiny_cfg, tiny_tensors, mode="faithful")
    shared = _manager(tiny_cfg, slots=3, ctx=256, mode="faithful")
    sessions = [Session(model, cache=shared) for _ in range(3)]
    assert [s.slot for s in sessions] == [0, 1, 2]
    prompts = [torch.randint(0, tiny_cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    outs = [[] for _ in range(3)]
    for lo in range(0, 150, 50):  # interleave the three conversations
        for i, s in enumerate(sessions):
            outs[i].append(s.forward(prompts[i][lo:lo + 50]))
    for i in range(3):
        solo = Session(model, 256).prefill(prompts[i], chunk=50, last_only=False)  # same chunking, alone
        assert torch.equal(torch.cat(outs[i]), solo)


def test_reset_returns_every_block_and_release_frees_slot(tiny_cfg, tiny_tensors):
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    cache = _manager(tiny_cfg, slots=2, ctx=512)
    s = Session(model, cache=cache)
    free0 = cache.allocator.free_count
    s.prefill(torch.arange(300) % tiny_cfg.vocab_size)
    assert cache.blocks_held(s.slot) == 3 and cache.allocator.free_count == free0 - 3
    first = s.prefill(torch.arange(5))
    s.reset()
    assert cache.allocator.free_count == free0 and s.seq_len == 0
    assert torch.equal(s.prefill(torch.arange(5)), Session(model, 512).prefill(torch.arange(5)))
    assert not torch.equal(first, s.prefill(torch.arange(5)))  # context matters (sanity)
    s.close()
    assert cache.admit_request() == 0


def test_admission_beyond_budget_fails_and_leaves_others_intact(tiny_cfg, tiny_tensors):
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    cache = _manager(tiny_cfg, slots=3, ctx=512, num_blocks=6)  # room for 6*128 tokens in all
    a = Session(model, cache=cache)  # reserves 4 blocks (512 tokens)
    ids = torch.arange(200) % tiny_cfg.vocab_size
    before = a.prefill(ids)
    with pytest.raises(CacheError, match="budget exceeded.*needs 4 blocks, 2 of 6 are free"):
        cache.admit_request(512)
    small = cache.admit_request(200)  # 2 blocks still fit
    assert small == 1
    after = a.step(3)
    ref = Session(model, 512)  # the same request alone in its own cache
    assert torch.equal(before, ref.prefill(ids))  # a shared, nearly full cache gives the same logits
    assert torch.equal(after, ref.step(3))  # and a refused admission disturbed nothing
    with pytest.raises(CacheError, match="context limit reached"):
        cache.prepare(small, 201)


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_handle_acquisition_allocates_nothing_cpu(tiny_cfg):
    m = _manager(tiny_cfg, slots=2)
    slot = m.admit_request()
    m.handles(slot)
    before = _live_tensors()
    for _ in range(10):
        hs = m.handles(slot)
    after = _live_tensors()
    assert after == before and len(hs) == tiny_cfg.num_hidden_layers


@pytest.mark.gpu
def test_handle_acquisition_allocates_nothing_cuda(tiny_cfg):
    m = CacheManager(CacheSchema.from_config(tiny_cfg, "faithful"), 512, device="cuda")
    slot = m.admit_request()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(10):
        m.handles(slot)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


def test_engine_touches_cache_only_through_handles():
    root = pathlib.Path(__file__).resolve().parents[1] / "engine"
    for f in root.rglob("*.py"):
        text = f.read_text()
        for forbidden in ("layer_state", "EntryStore", ".tensors[", "block_table", "_pool"):
            assert forbidden not in text, f"{f.name} reaches into cache internals ({forbidden})"


def test_memory_report_by_type_and_component(tiny_cfg):
    m = _manager(tiny_cfg, slots=1, ctx=256, mode="faithful")
    rep = m.memory_report()
    assert set(rep["by_type"]) == {"swa", "csa", "hca"}
    assert rep["by_type"]["csa"]["fp8"] == 2 * 2 * 32 * (96 - 32)  # 2 layers x 2 blocks x 32 entries x 64 B
    assert rep["by_type"]["csa"]["fp4"] == 2 * 2 * 32 * 32
    assert rep["total"] == sum(t["total"] for t in rep["by_type"].values())


def test_session_refuses_a_cache_of_another_precision(tiny_cfg, tiny_tensors):
    """One source of truth for the entry formats: the cache schema's precision must be the model's."""
    model = Model.from_state_dict(tiny_cfg, tiny_tensors, mode="faithful")
    exact_cache = CacheManager(CacheSchema.from_config(tiny_cfg, "exact"), 64)
    with pytest.raises(CacheError, match="stores exact entries but the model runs faithful"):
        Session(model, cache=exact_cache)
    Session(model, cache=CacheManager(CacheSchema.from_config(tiny_cfg, "faithful"), 64))

"""Faithful mode's quantisation points, pinned to their published definition (DeepSeek-V4 spec,
section 3, and the reference inference code), with vectors computed by hand:

- KV entries (window and compressed): the non-RoPE channels FP8 e4m3 in groups of 64 channels, each
  group with a power-of-two scale 2^ceil(log2(max(amax, floor) / 448)) stored as its ue8m0 byte;
  the RoPE channels rounded to BF16.
  The published code floors amax at 1e-4; this project floors it at 2^-100, so a group whose values
  are all below 1e-4 keeps them at FP8 precision instead of flushing them toward zero. Only such
  groups differ (test_amax_floor below pins both the floor and where it matters).
- Indexer queries and keys: Hadamard-rotated (normalised Sylvester matrix, x @ H), then FP4 e2m1 in
  groups of 32 with a power-of-two scale 2^ceil(log2(amax / 6)), round-to-nearest-even.

Then the model: in faithful mode, the first layer's attention keys and indexer q/k are exactly the
exact-mode values sent through those points (the first layer's input is the same in both modes).
"""

import pytest
import torch

from dsv4 import kernels
from dsv4.cache.pools import EntryStore
from dsv4.cache.schema import EntryFormat
from dsv4.kernels import quant
from dsv4.kernels.reference.entries import read_entries
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import random_tensors, tiny_configs


# ----------------------------------------------------------------- FP8 e4m3 KV, 64-groups, RoPE in BF16
def _kv_vector() -> torch.Tensor:
    """head_dim 128, rope 64: channels 0..63 one FP8 group, 64..127 the RoPE channels."""
    x = torch.zeros(128)
    x[:5] = torch.tensor([3.0, 0.1, -1.234, 0.001, 2.9])
    x[64:68] = torch.tensor([1.00390625, 3.14159, -0.0123456, 1e-30])
    return x


def test_kv_fp8_point_hand_computed():
    x = _kv_vector()
    # amax 3.0: 3 / 448 = 0.0067 -> 2^ceil(-7.22) = 2^-7; ue8m0 byte 127 - 7 = 120
    q, e = quant.fp8_quantize(x[None, :64], 64)
    assert e.tolist() == [[120]]
    # x / 2^-7 = 384 (exact in e4m3), 12.8 -> 13 (step 1 in [8, 16)), -157.95 -> -160 (step 16 in
    # [128, 256)), 0.128 -> 0.125 (step 2^-6 in [2^-3, 2^-2)), 371.2 -> 384 (step 32 in [256, 448])
    assert q[0, :5].float().tolist() == [384.0, 13.0, -160.0, 0.125, 384.0]
    y = quant.kv_quant_dequant(x[None], rope_dim=64)[0]
    assert y[:5].tolist() == [3.0, 13 / 128, -1.25, 0.125 / 128, 3.0]
    assert torch.all(y[5:64] == 0)
    # RoPE channels: BF16 (8 significant bits, ties to even): 1 + 2^-8 -> 1.0; pi -> 3.140625;
    # -0.0123456 in [2^-7, 2^-6), step 2^-14: 202.27 -> -202 * 2^-14; 1e-30 keeps 8 significant bits
    assert y[64].item() == 1.0 and y[65].item() == 3.140625 and y[66].item() == -202 * 2 ** -14
    assert y[67].item() == torch.tensor(1e-30).to(torch.bfloat16).item() != 0


def test_kv_groups_are_64_channels_each_with_its_own_scale():
    x = torch.zeros(1, 192)  # 128 non-RoPE channels (two groups) + 64 RoPE
    x[0, 0], x[0, 64] = 448.0, 0.75  # group 0 amax 448 -> scale 1 (byte 127); group 1 0.75 -> 2^-9 (byte 118)
    x[0, 65] = 0.0101
    q, e = quant.fp8_quantize(x[:, :128], 64)
    assert e.tolist() == [[127, 118]]
    y = quant.kv_quant_dequant(x, rope_dim=64)
    # 0.75 / 2^-9 = 384 (exact); 0.0101 / 2^-9 = 5.171 -> 5 (step 0.5 in [4, 8)) -> 5 * 2^-9
    assert y[0, 0].item() == 448.0 and y[0, 64].item() == 0.75 and y[0, 65].item() == 5 * 2 ** -9


def test_amax_floor():
    """floor 2^-100: an all-zero group gets 2^ceil(log2(2^-100 / 448)) = 2^-108 (byte 19) and stays
    zero; a group of 5e-5 (below the published 1e-4 floor) keeps its value to FP8 precision."""
    x = torch.zeros(1, 128)
    x[0, 64] = 5e-5
    q, e = quant.fp8_quantize(x, 64)
    assert e.tolist() == [[19, 127 - 23]]  # 5e-5 / 448 = 1.1e-7 -> 2^ceil(-22.9) = 2^-22
    y = quant.fp8_dequantize(q, e, 64)
    assert torch.all(y[0, :64] == 0)
    # 5e-5 / 2^-22 = 209.7 -> 208 (step 16 in [128, 256)); published floor: 1e-4 / 448 -> 2^-22 as well
    assert y[0, 64].item() == 208 * 2 ** -22
    # far below 1e-4: with the published floor the scale is 2^-22 and 1e-10 / 2^-22 = 4.2e-4 is under half
    # e4m3's smallest subnormal (2^-9), so it would be stored as 0; here: 1e-10 / 448 -> 2^-42, and
    # 1e-10 / 2^-42 = 439.8 -> 448 (step 32 in [256, 448]) -> 448 * 2^-42
    tiny = torch.zeros(1, 64)
    tiny[0, 0] = 1e-10
    q, e = quant.fp8_quantize(tiny, 64)
    assert e.tolist() == [[127 - 42]]
    assert quant.fp8_dequantize(q, e, 64)[0, 0].item() == 448 * 2 ** -42


def test_cache_store_holds_the_kv_point_in_its_bytes():
    """The cache pools keep exactly the FP8 codes, the ue8m0 byte and the BF16 RoPE channels."""
    x = _kv_vector()[None]
    store = EntryStore(2, EntryFormat(128, 64, "kv"), "cpu")
    store.write(torch.tensor([1]), x)
    t = store.tensors
    assert t["scales"][1].tolist() == [120]
    assert t["fp8"][1, :5].float().tolist() == [384.0, 13.0, -160.0, 0.125, 384.0]
    assert t["bf16"][1, :2].float().tolist() == [1.0, 3.140625]
    assert torch.equal(store.read(torch.tensor([1])), quant.kv_quant_dequant(x, 64))
    assert store.fmt.nbytes == 64 + 1 + 128  # FP8 + one scale byte + BF16 RoPE


def test_cache_store_holds_the_indexer_point():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = 1.0, 0.3
    rotated = quant.hadamard_transform(x)  # the indexer compressor rotates before the store quantises
    store = EntryStore(1, EntryFormat(64, 0, "fp4"), "cpu")
    store.write(torch.tensor([0]), rotated)
    assert store.tensors["scales"][0].tolist() == [122, 122]
    assert store.tensors["fp4"][0, 0].item() == 7 | 5 << 4  # 6.0 (code 7) low nibble, 3.0 (code 5) high
    assert torch.equal(store.read(torch.tensor([0])), quant.indexer_quant_dequant(x, 32))


# ----------------------------------------------------------------- indexer: Hadamard then FP4 e2m1
def test_hadamard_is_normalised_sylvester():
    h4 = quant.hadamard_matrix(4)
    assert torch.equal(h4, 0.5 * torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]))


def test_e2m1_rounding_ties_to_even():
    # scale 1 (amax 6): midpoints go to the code with the even mantissa bit
    x = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.6, 0.1] + [0.0] * 22)
    y = quant.fp4_quant_dequant(x[None], 32)[0]
    assert y[:10].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -3.0, 0.0]


def test_indexer_point_hand_computed():
    """x = e0 + 0.3 e1 (64 channels): x @ H = (1 + 0.3 (-1)^j) / 8 -> 0.1625 (even j), 0.0875 (odd j).
    Each 32-group: amax 0.1625 / 6 -> scale 2^ceil(-5.21) = 2^-5; 5.2 -> 6 and 2.8 -> 3 on the e2m1
    grid: 0.1875 and 0.09375."""
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = 1.0, 0.3
    y = quant.indexer_quant_dequant(x, 32)[0]
    assert torch.equal(y[0::2], torch.full((32,), 0.1875)) and torch.equal(y[1::2], torch.full((32,), 0.09375))
    codes, e = quant.fp4_quantize(quant.hadamard_transform(x), 32)
    assert e.tolist() == [[122, 122]] and codes[0, :2].tolist() == [7, 5]  # 6.0 is code 7, 3.0 code 5


# ----------------------------------------------------------------- the model applies these points
@pytest.fixture(scope="module")
def first_layer_calls():
    """Inputs of the first layer's attention and indexer scoring, in exact and faithful mode, on a
    config whose layer 0 is CSA (head_dim 80 = 64 FP8 + 16 RoPE, index_head_dim 32); 80 tokens, so
    20 closed windows, more than index_topk (16): the indexer runs."""
    cfg = tiny_configs()["csa-heavy-plain-rope"]
    tensors = random_tensors(cfg, seed=4)
    ids = torch.randint(0, cfg.vocab_size, (80,), generator=torch.Generator().manual_seed(2))
    out = {}
    for mode in ("exact", "faithful"):
        seen = {}
        attn, scores = kernels.chunk_attention, kernels.indexer_scores

        def attn_spy(q, positions, ring, ring_pos, kv, window, store, rows, *a, **kw):
            # every key the chunk's queries may see: window ring, the chunk's own, compressed entries
            parts = [ring, kv] + ([read_entries(store, rows)] if store is not None else [])
            seen.setdefault("keys", torch.cat([t.float() for t in parts]))
            seen.setdefault("n_entries", 0 if rows is None else rows.shape[0])
            return attn(q, positions, ring, ring_pos, kv, window, store, rows, *a, **kw)

        def scores_spy(q, keys, w):
            seen.setdefault("iq", q.float().clone())
            seen.setdefault("ik", keys.float().clone())
            return scores(q, keys, w)

        kernels.chunk_attention, kernels.indexer_scores = attn_spy, scores_spy
        try:
            Session(Model.from_state_dict(cfg, tensors, mode=mode), 128).prefill(ids)
        finally:
            kernels.chunk_attention, kernels.indexer_scores = attn, scores
        out[mode] = seen
    return cfg, out


def test_model_kv_entries_are_the_fp8_point(first_layer_calls):
    cfg, out = first_layer_calls
    exact, faithful = out["exact"]["keys"], out["faithful"]["keys"]  # window ring + chunk + compressed entries
    assert exact.shape == faithful.shape and exact.shape[1] == cfg.head_dim == 80
    assert torch.equal(faithful, quant.kv_quant_dequant(exact, cfg.qk_rope_head_dim))
    assert not torch.equal(faithful, exact)


def test_model_indexer_q_and_keys_are_the_fp4_point(first_layer_calls):
    cfg, out = first_layer_calls
    for k in ("iq", "ik"):
        exact, faithful = out["exact"][k], out["faithful"][k]
        assert exact.shape[-1] == cfg.index_head_dim == 32
        assert torch.equal(faithful, quant.indexer_quant_dequant(exact, 32)), k
    assert out["faithful"]["ik"].shape[0] == out["faithful"]["n_entries"] == 80 // 4  # a key per closed window

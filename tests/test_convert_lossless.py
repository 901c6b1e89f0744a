"""MXFP4 -> NVFP4 keeps every value when e4m3 can carry the block exponents, and counts the blocks it
re-rounds when it cannot; the one float->stored encoder is what the writer, convert and training use."""

import pytest
import torch

from dsv4.engine.checkpoint.encode import FORMATS, decode, encode, stored_values, transcode
from dsv4.engine.checkpoint.published import to_published
from dsv4.kernels import quant
from dsv4.kernels.formats import FP8_BLOCK, MXFP4_GROUP, NVFP4_GROUP


def mxfp4(out, inn, exponents, seed=0):
    """Random MXFP4 tensor: random e2m1 codes (some all-zero blocks) and the given block exponents
    (ints, value = code x 2^k) -> (packed, ue8m0 scale, the exponents [out, in/32])."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out, inn), generator=g, dtype=torch.uint8)
    codes.view(out, inn // 16, 16)[torch.rand(out, inn // 16, generator=g) < 0.05] = 0  # dead blocks
    k = exponents(g, (out, inn // MXFP4_GROUP))
    scale = (k + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return quant.pack_fp4(codes).view(torch.float4_e2m1fn_x2), scale, k


def test_realistic_exponent_spread_is_exact():
    # trained expert weights: block amax around 2^-6 with a few binades of spread each way (span <= 17)
    def spread(g, shape):
        return (torch.randn(shape, generator=g) * 2.5 - 8).round().clamp(-16, -1).to(torch.int32)

    for seed in range(3):
        packed, scale, k = mxfp4(96, 512, spread, seed)
        assert int(k.max() - k.min()) >= 12  # a realistic, not a trivial, spread
        q, s, gs, n = quant.mxfp4_to_nvfp4(packed, scale)
        assert n == 0 and s.dtype == torch.float8_e4m3fn and s.shape == (96, 512 // NVFP4_GROUP)
        assert torch.equal(q.view(torch.uint8), packed.view(torch.uint8))  # the same e2m1 codes
        assert torch.equal(quant.dequant_nvfp4(q, s, gs), quant.dequant_mxfp4(packed, scale))
        # the tensor scale centres the live exponents: both ends keep room inside e4m3's 2^-9..2^8
        rel = k - int(torch.log2(gs))
        assert -9 <= int(rel.min()) and int(rel.max()) <= 8 and abs(int(rel.min()) + int(rel.max()) + 1) <= 1


def test_the_widest_exact_span_and_one_beyond():
    def span(width):
        return lambda g, shape: torch.randint(0, width + 1, shape, generator=g).to(torch.int32) - 20

    packed, scale, _ = mxfp4(32, 256, span(17))
    q, s, gs, n = quant.mxfp4_to_nvfp4(packed, scale)
    assert n == 0 and torch.equal(quant.dequant_nvfp4(q, s, gs), quant.dequant_mxfp4(packed, scale))
    packed, scale, _ = mxfp4(32, 256, span(18))
    assert quant.mxfp4_to_nvfp4(packed, scale)[3] > 0


def test_wide_span_rerounds_only_the_blocks_out_of_range_and_counts_them():
    def wide(g, shape):
        return torch.randint(-40, 10, shape, generator=g).to(torch.int32)

    packed, scale, k = mxfp4(64, 256, wide)
    q, s, gs, n = quant.mxfp4_to_nvfp4(packed, scale)
    a, b = quant.dequant_mxfp4(packed, scale), quant.dequant_nvfp4(q, s, gs)
    codes = quant.unpack_fp4(packed).view(64, 256 // 16, 16)
    live = ((codes & 7) != 0).any(-1)
    k16 = k.repeat_interleave(MXFP4_GROUP // NVFP4_GROUP, 1)
    top = int(k16[live].max())
    out_of_range = live & (k16 < top - 17)  # the largest blocks are kept exact; 18 binades below them
    assert n == int(out_of_range.sum()) > 0
    same = (a == b).view(64, 16, 16).all(-1)
    assert bool(same[~out_of_range].all())  # every other block is bit-exact
    err = (a - b).abs().view(64, 16, 16).amax(-1)
    assert float(err.max()) <= 2.0 ** (top - 17)  # re-rounded on the grid of the smallest e4m3 scale


def test_wide_span_count_reaches_the_convert_report():
    def wide(g, shape):
        return torch.randint(-40, 10, shape, generator=g).to(torch.int32)

    packed, scale, _ = mxfp4(64, 256, wide)
    stored = {"layers.0.ffn.experts.0.w1.weight": packed, "layers.0.ffn.experts.0.w1.scale": scale}
    t = transcode("layers.0.ffn.experts.0.w1.weight", stored, "nvfp4")
    assert t.rerounded_blocks == quant.mxfp4_to_nvfp4(packed, scale)[3] > 0 and not t.lossless
    assert set(t.tensors) == {"layers.0.ffn.experts.0.w1.weight", "layers.0.ffn.experts.0.w1.scale",
                              "layers.0.ffn.experts.0.w1.scale_2"}


def test_a_tensor_of_zeros_converts():
    packed = torch.zeros(4, 32, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    scale = torch.zeros(4, 2, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    q, s, gs, n = quant.mxfp4_to_nvfp4(packed, scale)
    assert n == 0 and quant.dequant_nvfp4(q, s, gs).abs().sum() == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_encoder_and_decoder(fmt):
    g = torch.Generator().manual_seed(1)
    name = "layers.0.attn.wq_a.weight"
    w = torch.randn(2 * FP8_BLOCK + 8, 96, generator=g) / 10
    if fmt == "int":
        w = torch.randint(0, 8, (12, 3), generator=g)
    stored = encode(name, w, fmt)
    back = decode(name, stored)
    assert torch.equal(stored_values(name, w, fmt), back)
    if fmt in ("f32", "int"):
        assert torch.equal(back, w.float())
    else:
        assert 0 < float((back - w).norm() / w.norm()) < {"fp8": 0.05, "mxfp4": 0.2, "nvfp4": 0.12, "bf16": 0.01}[fmt]
        assert torch.equal(stored_values(name, back, fmt), back)  # encoding a stored value is exact
    assert transcode(name, stored, fmt).lossless  # a format to itself keeps the bits


def test_writer_and_training_use_the_same_encoder():
    from dsv4.train.trainer import stored_roundtrip

    g = torch.Generator().manual_seed(2)
    for name, fmt in (("layers.1.attn.wkv.weight", "fp8"), ("layers.1.ffn.experts.3.w2.weight", "mxfp4"),
                      ("head.weight", "bf16"), ("layers.1.attn_norm.weight", "f32")):
        w = torch.randn(64, 128, generator=g) if fmt != "f32" else torch.randn(64, generator=g)
        written = to_published(name, w)
        assert {n: t.dtype for n, t in written.items()} == {n: t.dtype for n, t in encode(name, w, fmt).items()}
        assert torch.equal(stored_roundtrip(name, w), decode(name, written)), name

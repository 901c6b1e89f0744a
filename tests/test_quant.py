"""Number formats follow the spec: pow2 scales, RoPE channels BF16, Hadamard orthonormal, nibble order."""

import math

import torch

from dsv4.kernels import quant

g = torch.Generator().manual_seed(0)


def test_kv_fp8_roundtrip_pow2_scales_and_bf16_rope():
    x = torch.randn(50, 512, generator=g) * torch.logspace(-3, 2, 50)[:, None]
    y = quant.kv_quant_dequant(x, rope_dim=64)
    # RoPE channels: BF16-rounded, nothing else
    assert torch.equal(y[:, 448:], x[:, 448:].to(torch.bfloat16).float())
    q, e = quant.fp8_quantize(x[:, :448], 64)
    scale = quant.ue8m0_to_float(e)
    assert e.shape == (50, 7)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # powers of two
    amax = x[:, :448].reshape(50, 7, 64).abs().amax(-1)
    assert bool(((amax / scale <= 448) & (amax / scale > 224)).all())  # smallest pow2 with amax/s <= 448
    assert torch.equal(y[:, :448], quant.fp8_dequantize(q, e, 64))
    rel = ((y[:, :448] - x[:, :448]).abs() / amax.repeat_interleave(64, 1)).max()
    assert rel < 1 / 16  # e4m3 has 3 mantissa bits
    # storing an already-quantised value is exact
    assert torch.equal(quant.kv_quant_dequant(y, 64), y)


def test_hadamard_is_orthonormal_and_keeps_dot_products():
    h = quant.hadamard_matrix(128)
    assert torch.allclose(h @ h.t(), torch.eye(128), atol=1e-6)
    assert torch.equal(h, h.t()) and torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(128)))
    a, b = torch.randn(4, 128, generator=g), torch.randn(6, 128, generator=g)
    assert torch.allclose(quant.hadamard_transform(a) @ quant.hadamard_transform(b).t(), a @ b.t(), atol=1e-4)


def test_fp4_values_on_grid_with_pow2_scales():
    x = torch.randn(20, 128, generator=g) * 3
    codes, e = quant.fp4_quantize(x, 32)
    s = quant.ue8m0_to_float(e)
    vals = quant.e2m1_decode(codes)
    assert set(vals.abs().unique().tolist()) <= set(quant.E2M1_VALUES)
    amax = x.reshape(20, 4, 32).abs().amax(-1)
    assert bool(((amax / s <= 6) & (amax / s > 3)).all())
    y = quant.fp4_dequantize(codes, e, 32)
    assert torch.equal(quant.fp4_quant_dequant(y), y)


def test_e2m1_rounding_ties_to_even_and_sign():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.75, -0.1, 0.0])
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -1.0, -0.0, 0.0])
    assert torch.equal(quant.e2m1_decode(quant.e2m1_encode(x)), expect)


def test_fp4_nibble_order_low_first():
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = quant.pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x8F]]
    assert torch.equal(quant.unpack_fp4(packed), codes)
    # agrees with torch's float4_e2m1fn_x2 byte layout as declared by the spec
    assert packed.view(torch.float4_e2m1fn_x2).view(torch.uint8).tolist() == [[0x21, 0x8F]]


def test_ue8m0_decoding():
    e = torch.tensor([127, 128, 125, 0, 254], dtype=torch.uint8)
    assert quant.ue8m0_to_float(e).tolist() == [1.0, 2.0, 0.25, 2.0 ** -127, 2.0 ** 127]
    assert quant.ue8m0_to_float(e.view(torch.float8_e8m0fnu)).tolist()[:3] == [1.0, 2.0, 0.25]


def test_fp8_block_weight_dequant_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn)
    w = torch.nn.functional.pad(w.float(), (0, 128, 0, 128)).to(torch.float8_e4m3fn)  # [130, 130] -> 2x2 blocks
    scale = torch.tensor([[127, 128], [129, 126]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    d = quant.dequant_fp8_block(w, scale)
    assert d[0, :2].tolist() == [1.0, -2.0] and d[1, 1] == 448.0
    w2 = torch.zeros(130, 130)
    w2[129, 129], w2[0, 129], w2[129, 0] = 3.0, 1.5, -1.0
    d2 = quant.dequant_fp8_block(w2.to(torch.float8_e4m3fn), scale)
    assert (d2[129, 129], d2[0, 129], d2[129, 0]) == (1.5, 3.0, -4.0)


def test_mxfp4_decode_by_hand():
    # row of 32 values: first byte 0x2F -> low nibble 0xF (-6), high nibble 0x2 (1.0); scale 2^1
    packed = torch.zeros(1, 16, dtype=torch.uint8)
    packed[0, 0] = 0x2F
    packed[0, 15] = 0x70  # element 31 = 6.0, element 30 = 0
    scale = torch.tensor([[128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    d = quant.dequant_mxfp4(packed.view(torch.float4_e2m1fn_x2), scale)
    assert d[0, 0] == -12.0 and d[0, 1] == 2.0 and d[0, 31] == 12.0 and d[0, 2:31].abs().sum() == 0


def test_nvfp4_roundtrip_beats_mxfp4():
    w = torch.randn(256, 512, generator=g).to(torch.bfloat16).float()
    nv = quant.dequant_nvfp4(*quant.quant_nvfp4(w))
    mx = quant.dequant_mxfp4(*quant.quant_mxfp4(w))
    err_nv = ((nv - w).norm() / w.norm()).item()
    err_mx = ((mx - w).norm() / w.norm()).item()
    assert err_nv < err_mx < 0.2
    assert err_nv < 0.12


def test_nvfp4_small_block_beside_a_large_one_keeps_a_nonzero_scale():
    # the tensor scale is set by the 1000s; the 1e-3 block's ideal scale is below e4m3's smallest
    # (2^-9), and must take that smallest scale rather than round to 0 and vanish
    w = torch.zeros(1, 32)
    w[0, :16] = 1000.0
    w[0, 16] = 1e-3
    q, s, gs = quant.quant_nvfp4(w)
    assert s[0, 1].float() == 2.0 ** -9
    d = quant.dequant_nvfp4(q, s, gs)
    assert abs(d[0, 16].item() - 1e-3) < 0.5e-3 and abs(d[0, 0].item() - 1000.0) < 1000.0 / 8


def test_block_sizes_are_the_named_ones():
    from dsv4.kernels.formats import FP8_BLOCK, MXFP4_GROUP, NVFP4_GROUP

    w = torch.randn(FP8_BLOCK + 1, 2 * FP8_BLOCK, generator=g)
    assert quant.quant_fp8_block(w)[1].shape == (2, 2)
    assert quant.quant_mxfp4(w[:, :64])[1].shape == (FP8_BLOCK + 1, 64 // MXFP4_GROUP)
    assert quant.quant_nvfp4(w[:, :64])[1].shape == (FP8_BLOCK + 1, 64 // NVFP4_GROUP)

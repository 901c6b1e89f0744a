"""Number formats: FP8 e4m3, FP4 e2m1 (MX and NV flavours), ue8m0 scales, the Hadamard transform.

Reference implementations in plain torch. Conventions:
- "pow2 scale" = amax / qmax rounded UP to a power of two, stored as the ue8m0 exponent byte
  e (scale = 2^(e-127)). FP8 e4m3: qmax = 448. FP4 e2m1: qmax = 6.
- Packed FP4: two e2m1 codes per byte, the LOW nibble holds the even (first) element; bit 3 of a
  nibble is the sign (torch's float4_e2m1fn_x2 convention, the OCP MX layout).
"""

from __future__ import annotations

import functools
import math

import torch

from .formats import FP8_BLOCK, INDEXER_FP4_GROUP, KV_FP8_GROUP, MXFP4_GROUP, NVFP4_GROUP

FP8_MAX = 448.0
FP4_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_AMAX_FLOOR = 2.0 ** -100  # all-zero groups get a tiny but representable scale


# ----------------------------------------------------------------- ue8m0 scales
def pow2_scale_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """ue8m0 exponent byte (int32, 0..254) of the smallest power of two >= amax / qmax."""
    ratio = amax.float().clamp(min=_AMAX_FLOOR) / qmax
    e = torch.ceil(torch.log2(ratio))
    # guard against log2 rounding: make sure 2^e really is >= ratio
    e = torch.where(torch.exp2(e) < ratio, e + 1, e)
    return (e + 127).clamp(0, 254).to(torch.int32)


def ue8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """Decode ue8m0: a uint8/int exponent byte, or a float8_e8m0fnu tensor, to float32 2^(e-127)."""
    if e.dtype == torch.float8_e8m0fnu:
        e = e.view(torch.uint8)
    return torch.exp2(e.to(torch.float32) - 127.0)


# --------------------------------------------------------------------- FP8 e4m3
def fp8_quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last axis in groups of ``group`` to FP8 e4m3 with pow2 scales.

    x: [..., n] (n % group == 0) -> (q float8_e4m3fn [..., n], exp uint8 [..., n/group]).
    """
    *lead, n = x.shape
    g = x.float().reshape(*lead, n // group, group)
    e = pow2_scale_exponent(g.abs().amax(-1), FP8_MAX)
    q = (g / ue8m0_to_float(e).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*lead, n), e.to(torch.uint8)


def fp8_dequantize(q: torch.Tensor, e: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of fp8_quantize: float32 [..., n]."""
    *lead, n = q.shape
    g = q.float().reshape(*lead, n // group, group) * ue8m0_to_float(e).unsqueeze(-1)
    return g.reshape(*lead, n)


def act_quant_dequant(x: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Faithful mode's activations at the input of an FP8 / FP4 linear, as a round trip: each
    1 x ``block`` slice of the last axis through FP8 e4m3 with one ue8m0 (power-of-two) scale, as
    DeepSeek's own inference quantises them before its FP8 / FP4 GEMMs. A last slice shorter than
    ``block`` takes its own scale. x: [..., K] -> same shape and dtype."""
    K = x.shape[-1]
    pad = (-K) % block
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    q, e = fp8_quantize(xf, block)
    return fp8_dequantize(q, e, block)[..., :K].to(x.dtype)


def kv_quant_dequant(x: torch.Tensor, rope_dim: int, group: int = KV_FP8_GROUP) -> torch.Tensor:
    """The KV entry format the model was trained with, as a round trip.

    x: [..., head_dim]; the first head_dim - rope_dim channels go through FP8 e4m3 with one pow2
    scale per ``group`` channels, the last rope_dim (RoPE) channels through BF16. Same dtype out.
    """
    nope = x.shape[-1] - rope_dim
    q, e = fp8_quantize(x[..., :nope], group)
    a = fp8_dequantize(q, e, group)
    b = x[..., nope:].to(torch.bfloat16).float()
    return torch.cat([a, b], -1).to(x.dtype)


# --------------------------------------------------------------------- FP4 e2m1
_E2M1 = torch.tensor(E2M1_VALUES)
# midpoints between neighbours; at an exact tie, round to the value with an even mantissa bit
_E2M1_MID = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_TIE_UP = torch.tensor([False, True, False, True, False, True, False])  # tie goes to upper code?


@functools.lru_cache(maxsize=32)
def _on_device(name: str, device: torch.device) -> torch.Tensor:
    """A module constant copied once per device (no host-to-device copy per call, which a CUDA
    graph capture would refuse)."""
    return {"values": _E2M1, "mid": _E2M1_MID, "tie_up": _TIE_UP}[name].to(device)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round float values (already scaled into [-6, 6]) to 4-bit e2m1 codes (uint8 0..15).

    Round-to-nearest, ties to the even mantissa; bit 3 is the sign.
    """
    a = x.float().abs().clamp(max=FP4_MAX)
    mid = _on_device("mid", a.device)
    idx = torch.bucketize(a, mid, right=False)  # a <= mid[i] -> i ; a tie lands on the lower code
    tie = (idx < len(E2M1_VALUES) - 1) & (a == mid[idx.clamp(max=6)])
    idx = torch.where(tie & _on_device("tie_up", a.device)[idx.clamp(max=6)], idx + 1, idx)
    sign = (x < 0) & (idx > 0)
    return (idx + sign.to(idx.dtype) * 8).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (uint8 0..15) to float32."""
    c = codes.to(torch.int64)
    v = _on_device("values", codes.device)[c & 7]
    return torch.where(c & 8 != 0, -v, v)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] codes -> [..., n/2] uint8 bytes, even element in the low nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n/2] bytes (uint8/int8/float4_e2m1fn_x2) -> [..., n] codes, low nibble first."""
    b = packed.view(torch.uint8)
    return torch.stack([b & 15, b >> 4], -1).flatten(-2)


def fp4_quantize(x: torch.Tensor, group: int = INDEXER_FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 e2m1 with one pow2 (ue8m0) scale per ``group`` values along the last axis.

    x: [..., n] -> (codes uint8 [..., n], exp uint8 [..., n/group]).
    """
    *lead, n = x.shape
    g = x.float().reshape(*lead, n // group, group)
    e = pow2_scale_exponent(g.abs().amax(-1), FP4_MAX)
    codes = e2m1_encode(g / ue8m0_to_float(e).unsqueeze(-1))
    return codes.reshape(*lead, n), e.to(torch.uint8)


def fp4_dequantize(codes: torch.Tensor, e: torch.Tensor, group: int = INDEXER_FP4_GROUP) -> torch.Tensor:
    *lead, n = codes.shape
    g = e2m1_decode(codes).reshape(*lead, n // group, group) * ue8m0_to_float(e).unsqueeze(-1)
    return g.reshape(*lead, n)


def fp4_quant_dequant(x: torch.Tensor, group: int = INDEXER_FP4_GROUP) -> torch.Tensor:
    codes, e = fp4_quantize(x, group)
    return fp4_dequantize(codes, e, group).to(x.dtype)


# ------------------------------------------------------------------- Hadamard
@functools.lru_cache(maxsize=8)
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@functools.lru_cache(maxsize=16)
def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix [n, n] (symmetric, orthonormal), made once per device."""
    return _hadamard_cpu(n).to(device)


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last axis (H symmetric and orthonormal, so dot products are kept)."""
    h = hadamard_matrix(x.shape[-1], x.device).to(x.dtype)
    return x @ h


def indexer_quant_dequant(x: torch.Tensor, group: int = INDEXER_FP4_GROUP) -> torch.Tensor:
    """Indexer q / key path of faithful mode: Hadamard rotation, then FP4 e2m1 round trip."""
    return fp4_quant_dequant(hadamard_transform(x.float()), group).to(x.dtype)


# ------------------------------------------------------------- weight formats
def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 e4m3 weight [out, in] with per-128x128-block scales [ceil(out/128), ceil(in/128)].

    ``scale`` is float8_e8m0fnu (ue8m0) or float32 (older ``weight_scale_inv`` dumps). -> float32.
    """
    s = ue8m0_to_float(scale) if scale.dtype in (torch.float8_e8m0fnu, torch.uint8) else scale.float()
    out, inn = w.shape
    s = s.repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inn]
    return w.float() * s


def quant_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight [out, in] -> (float8_e4m3fn [out, in], ue8m0 float8_e8m0fnu [ceil(out/128), ceil(in/128)])."""
    out, inn = w.shape
    po, pi = -out % block, -inn % block
    wp = torch.nn.functional.pad(w.float(), (0, pi, 0, po))
    blocks = wp.reshape((out + po) // block, block, (inn + pi) // block, block)
    e = pow2_scale_exponent(blocks.abs().amax((1, 3)), FP8_MAX)
    s = ue8m0_to_float(e)
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(out + po, inn + pi)[:out, :inn].to(torch.float8_e4m3fn)
    return q, e.to(torch.uint8).view(torch.float8_e8m0fnu)


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, group: int = MXFP4_GROUP) -> torch.Tensor:
    """MXFP4 weight: packed e2m1 [out, in/2] + ue8m0 scales [out, in/32] -> float32 [out, in]."""
    codes = unpack_fp4(packed)
    s = ue8m0_to_float(scale)
    return (e2m1_decode(codes).reshape(*s.shape, group) * s.unsqueeze(-1)).reshape(codes.shape)


def quant_mxfp4(w: torch.Tensor, group: int = MXFP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (packed float4_e2m1fn_x2 [out, in/2], float8_e8m0fnu [out, in/32])."""
    codes, e = fp4_quantize(w, group)
    return pack_fp4(codes).view(torch.float4_e2m1fn_x2), e.view(torch.float8_e8m0fnu)


# NVFP4: value = e2m1 code x e4m3 block scale x float32 tensor scale. The powers of two an e4m3 byte
# holds exactly run from 2^-9 (its smallest subnormal) to 2^8 (2^9 would exceed 448): 18 binades.
E4M3_POW2_MIN, E4M3_POW2_MAX = -9, 8


def nvfp4_encode(w: torch.Tensor, gscale: torch.Tensor, group: int = NVFP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Float values -> NVFP4 codes and block scales under a given per-tensor scale.

    w: [out, in] float; gscale: float32 scalar. Each ``group``-value block gets the e4m3 scale
    nearest amax / 6 / gscale (at most 448; a non-zero block at least 2^-9, so it never collapses
    to zero), then its values round to e2m1 (ties to even). -> (packed float4_e2m1fn_x2
    [out, in/2], float8_e4m3fn [out, in/group])."""
    out, inn = w.shape
    g = w.float().reshape(out, inn // group, group)
    amax = g.abs().amax(-1)
    want = (amax / FP4_MAX / gscale.float()).clamp(2.0 ** E4M3_POW2_MIN, FP8_MAX)
    bscale = torch.where(amax > 0, want, torch.zeros_like(want)).to(torch.float8_e4m3fn)
    eff = bscale.float() * gscale.float()
    eff = torch.where(eff == 0, torch.ones_like(eff), eff)
    codes = e2m1_encode(g / eff.unsqueeze(-1)).reshape(out, inn)
    return pack_fp4(codes).view(torch.float4_e2m1fn_x2), bscale


def quant_nvfp4(w: torch.Tensor, group: int = NVFP4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 from float values: e2m1, one float8_e4m3 scale per 16 values, one float32 per tensor.

    w: [out, in] -> (packed float4_e2m1fn_x2 [out, in/2], scale float8_e4m3fn [out, in/16],
    global float32 scalar). The global scale maps the largest block scale onto e4m3's 448.
    """
    out, inn = w.shape
    block_amax = w.float().reshape(out, inn // group, group).abs().amax(-1)
    gscale = (block_amax.max().clamp(min=1e-12) / (FP4_MAX * FP8_MAX)).reshape(()).float()
    packed, bscale = nvfp4_encode(w, gscale, group)
    return packed, bscale, gscale


def nvfp4_tensor_exponent(block_exp: torch.Tensor, live: torch.Tensor) -> int:
    """The per-tensor power of two G (tensor scale 2^G) for blocks whose scales are 2^block_exp.

    Blocks with no non-zero value (``live`` False) do not count. When the live exponents span at most
    the 18 binades e4m3 holds exactly, G centres them in [2^-9, 2^8] and every block scale
    2^(k - G) is exact. When they span more, G keeps the largest blocks exact (saturating a large
    value would be the worse loss) and the blocks below the range are the ones re-rounded."""
    if not bool(live.any()):
        return 0
    lo, hi = int(block_exp[live].min()), int(block_exp[live].max())
    if hi - lo <= E4M3_POW2_MAX - E4M3_POW2_MIN:
        # centre [lo, hi] on the middle of [-9, 8], which is -0.5: G = ceil((lo + hi + 1) / 2)
        return -((-(lo + hi + 1)) // 2)
    return hi - E4M3_POW2_MAX


def mxfp4_to_nvfp4(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """MXFP4 -> NVFP4 keeping the e2m1 codes: lossless wherever e4m3 can carry the block's power of two.

    packed: e2m1 [out, in/2] (float4_e2m1fn_x2 / int8 / uint8); scale: ue8m0 [out, in/32]
    (float8_e8m0fnu or uint8). Each 16-value NVFP4 block inside a 32-value MXFP4 block has value
    code x 2^k; its e4m3 scale is 2^(k - G) and the tensor scale 2^G (nvfp4_tensor_exponent), so
    code x scale x 2^G is the MXFP4 value bit for bit. Live blocks whose 2^(k - G) lies outside e4m3's
    exact powers of two are re-encoded from their values (nvfp4_encode) and counted.
    -> (packed float4_e2m1fn_x2 [out, in/2], float8_e4m3fn [out, in/16], float32 scalar 2^G,
    number of re-rounded blocks)."""
    codes = unpack_fp4(packed)
    out, inn = codes.shape
    per = MXFP4_GROUP // NVFP4_GROUP
    k = scale.view(torch.uint8).to(torch.int32).repeat_interleave(per, 1) - 127  # [out, in/16]
    live = ((codes.reshape(out, inn // NVFP4_GROUP, NVFP4_GROUP) & 7) != 0).any(-1)
    G = nvfp4_tensor_exponent(k, live)
    gscale = torch.tensor(2.0 ** G, dtype=torch.float32)
    rel = k - G
    exact = (rel >= E4M3_POW2_MIN) & (rel <= E4M3_POW2_MAX)
    bscale = torch.exp2(rel.clamp(E4M3_POW2_MIN, E4M3_POW2_MAX).float()).to(torch.float8_e4m3fn)
    redo = live & ~exact
    n_redo = int(redo.sum())
    if not n_redo:
        return packed.view(torch.uint8).view(torch.float4_e2m1fn_x2), bscale, gscale, 0
    values = dequant_mxfp4(packed, scale)
    new_packed, new_scale = nvfp4_encode(values, gscale)
    new_codes = unpack_fp4(new_packed).reshape(out, inn // NVFP4_GROUP, NVFP4_GROUP)
    codes = torch.where(redo.unsqueeze(-1), new_codes, codes.reshape(out, inn // NVFP4_GROUP, NVFP4_GROUP))
    bscale = torch.where(redo, new_scale.float(), bscale.float()).to(torch.float8_e4m3fn)
    return pack_fp4(codes.reshape(out, inn)).view(torch.float4_e2m1fn_x2), bscale, gscale, n_redo


def dequant_nvfp4(packed: torch.Tensor, scale: torch.Tensor, gscale: torch.Tensor, group: int = NVFP4_GROUP) -> torch.Tensor:
    """NVFP4 weight: packed e2m1 [out, in/2] + e4m3 scales [out, in/16] + float32 scalar -> float32 [out, in]."""
    codes = unpack_fp4(packed)
    out, inn = codes.shape
    s = scale.float() * gscale.float()
    return (e2m1_decode(codes).reshape(out, inn // group, group) * s.unsqueeze(-1)).reshape(out, inn)

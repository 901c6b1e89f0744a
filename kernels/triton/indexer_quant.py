"""Triton kernel for kernels.indexer_quant: faithful mode's Lightning Indexer query path, the
Hadamard rotation then the FP4 e2m1 round trip (ue8m0 scale per 32), in one launch.

The torch reference (kernels/quant.indexer_quant_dequant) is a float32 matmul and about 45 small
elementwise kernels; in a decode step at long context those launches cost more than the indexer's
scoring itself (H100, 64k tokens: ~55 us per CSA layer, bench/results/h100_profile_decode_64k.txt).
Here each program takes BLOCK_R rows [BLOCK_R, Di] and rotates them: H = S / sqrt(Di) with S the
Sylvester signs (+-1, made in registers, exact in bf16), so x @ S is three bf16 tensor-core dots of
the parts of x split into bf16 (each product exact, float32 sums); a first design loading the float32
H for 3xTF32 dots took 16 us for one decode token's 64 heads (H100). Then it rounds each
32-group to e2m1 with the smallest power-of-two scale >= amax / 6, exactly as the reference rounds
(nearest, ties to the even mantissa). The rotation's sums run in another order than the reference's
matmul, so a value within an ulp of an e2m1 rounding midpoint (or a group amax at a power of two)
may land one step apart; everything else is bit-equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .attention import _e2m1_code, _pow2, _pow2_exponent, interpreted
from .decode_indexer import _e2m1

BLOCK_ROWS = 16  # rows per program: [16, 128] x [128, 128] per dot
MAX_DIM = 128  # the [Di, Di] signs are one dot operand held on chip


@triton.jit
def _indexer_quant(x_ptr, y_ptr, R, scale, DI: tl.constexpr, BLOCK_R: tl.constexpr, BF16: tl.constexpr,
                   PDL: tl.constexpr):
    pdl.wait(PDL)
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    d = tl.arange(0, DI)
    x = tl.load(x_ptr + r[:, None] * DI + d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    # the Sylvester signs S[i, j] = (-1)^popcount(i & j) (exact in bf16), made in registers
    b = d[:, None] & d[None, :]
    b ^= b >> 4
    b ^= b >> 2
    b ^= b >> 1
    signs = tl.where((b & 1) == 0, 1.0, -1.0)
    if BF16:  # x @ S at float32 accuracy: x as the sum of three bf16 parts, each product exact
        signs = signs.to(tl.bfloat16)
        x1 = x.to(tl.bfloat16)
        rest = x - x1.to(tl.float32)
        x2 = rest.to(tl.bfloat16)
        x3 = (rest - x2.to(tl.float32)).to(tl.bfloat16)
        y = tl.dot(x1, signs) + tl.dot(x2, signs) + tl.dot(x3, signs)
    else:  # the interpreter: float32 dots
        y = tl.dot(x, signs, input_precision="ieee")
    g = tl.reshape(y * scale, [BLOCK_R * (DI // 32), 32])  # 32-groups of x @ H, H = S / sqrt(Di)
    e = _pow2_exponent(tl.max(tl.abs(g), 1), 6.0)
    v = _e2m1(_e2m1_code(g * _pow2(254 - e)[:, None])) * _pow2(e)[:, None]
    tl.store(y_ptr + r[:, None] * DI + d[None, :], tl.reshape(v, [BLOCK_R, DI]).to(y_ptr.dtype.element_ty),
             mask=rm[:, None])


def indexer_quant_supported(x: torch.Tensor, group: int = 32) -> bool:
    """Rows of a power-of-two width 32..128, 32-groups; float32 / bf16 / fp16; no autograd."""
    d = x.shape[-1] if x.dim() else 0
    return (group == 32 and x.numel() > 0 and 32 <= d <= MAX_DIM and d & (d - 1) == 0
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and not x.requires_grad)


def indexer_quant_triton(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """kernels.indexer_quant for CUDA tensors: x [..., Di] -> the same shape and dtype."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    y = torch.empty_like(x2)
    _indexer_quant[(triton.cdiv(x2.shape[0], BLOCK_ROWS),)](x2, y, x2.shape[0], d ** -0.5, DI=d, BLOCK_R=BLOCK_ROWS,
                                                            BF16=not interpreted(), num_warps=4, **pdl.launch(x.device))
    return y.reshape(x.shape)

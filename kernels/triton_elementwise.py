"""Triton kernels for RoPE (incl. the inverse rotation on attention outputs) and the clamped SwiGLU:
one launch each instead of the reference's ~10 small ones. Contracts as kernels/rope.py and
kernels/moe.py; tensors that need gradients take the reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe import swiglu as swiglu_reference
from .rope import apply_rope as apply_rope_reference


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, y_ptr, H, D, RD, SIGN, BLOCK: tl.constexpr):
    """Row (s, h) of x [S, H, D]: channels >= D-RD rotate pairwise (even, odd) by position s's angle."""
    pid = tl.program_id(0)
    s = pid // H
    j = tl.arange(0, BLOCK)
    m = j < D
    x = tl.load(x_ptr + pid * D + j, mask=m, other=0.0)
    lo = D - RD
    rot = (j >= lo) & m
    r = tl.where(rot, j - lo, 0)
    partner = tl.load(x_ptr + pid * D + lo + (r ^ 1), mask=rot, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + s * (RD // 2) + r // 2, mask=rot, other=1.0)
    sn = tl.load(sin_ptr + s * (RD // 2) + r // 2, mask=rot, other=0.0) * SIGN
    xf = x.to(tl.float32)
    y = tl.where((r & 1) == 0, xf * c - partner * sn, xf * c + partner * sn)
    tl.store(y_ptr + pid * D + j, tl.where(rot, y, xf).to(y_ptr.dtype.element_ty), mask=m)


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    if x.numel() == 0 or x.requires_grad or x.shape[-1] > 16384:
        return apply_rope_reference(x, cos, sin, inverse)
    S, D = x.shape[0], x.shape[-1]
    x3 = x.reshape(S, -1, D).contiguous()
    y = torch.empty_like(x3)
    _rope[(x3.shape[0] * x3.shape[1],)](x3, cos.float().contiguous(), sin.float().contiguous(), y, x3.shape[1], D,
                                        2 * cos.shape[-1], -1.0 if inverse else 1.0, BLOCK=triton.next_power_of_2(D))
    return y.reshape(x.shape)


@triton.jit
def _swiglu(g_ptr, u_ptr, y_ptr, n, limit, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.minimum(tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32), limit)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    tl.store(y_ptr + i, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=m)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    if gate.requires_grad or up.requires_grad or gate.shape != up.shape or gate.numel() == 0:
        return swiglu_reference(gate, up, limit)
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    _swiglu[(triton.cdiv(n, 1024),)](g, u, y, n, float(limit), BLOCK=1024)
    return y

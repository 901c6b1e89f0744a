"""Triton kernels for RoPE (incl. the inverse rotation on attention outputs), its cos/sin tables at
a device position, the clamped SwiGLU and a decode step's entry rows: one launch each instead of
the reference's 3 to 20 small ones. Contracts as kernels/reference/rope.py, kernels/reference/moe.py and
kernels/entries.py; tensors that need gradients take the reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl

# rows per RoPE program: up to ROPE_ROWS, at most ROPE_TILE elements per program, for more than
# ROPE_ONE_ROW rows (a decode step's heads stay one row per program). H100, bench/rope_rows.py:
# a 6400-token chunk's indexer heads (6400 x 64 x 128) 494 -> 113 us, its query heads (x 512) 493 ->
# 489 us; one decode token's 64 query heads 1.3 us with one row per program, 3.7 us with 16.
ROPE_ROWS, ROPE_TILE, ROPE_ONE_ROW = 16, 4096, 1024


@triton.jit
def _normed(x, rs, w_ptr, idx, mask, NORM: tl.constexpr, HAS_W: tl.constexpr, dtype: tl.constexpr):
    """x (float32) times the row's 1/rms (and the norm weight at idx), rounded to the row dtype as
    kernels.rms_norm returns it; x unchanged without NORM."""
    if NORM:
        x = x * rs
        if HAS_W:
            x = x * tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        x = x.to(dtype).to(tl.float32)
    return x


@triton.jit
def _rope(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, R, H, D, RD, SIGN, eps, NORM: tl.constexpr, HAS_W: tl.constexpr,
          ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Rows i = (s, h) of x [S, H, D] (R = S x H rows, ROWS per program): channels >= D-RD rotate
    pairwise (even, odd) by position s's angle; with NORM, each row is RMS-normalised first (weight w
    if HAS_W)."""
    pdl.wait(PDL)
    i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    im = i < R
    s = i // H
    j = tl.arange(0, BLOCK)
    m = im[:, None] & (j < D)[None, :]
    row = x_ptr + i[:, None] * D
    x = tl.load(row + j[None, :], mask=m, other=0.0)
    dt: tl.constexpr = x_ptr.dtype.element_ty
    rs = tl.full([ROWS], 1.0, tl.float32)
    if NORM:
        rs = tl.rsqrt(tl.sum(x.to(tl.float32) * x.to(tl.float32), 1) / D + eps)
    lo = D - RD
    rot = (j >= lo)[None, :] & m
    r = tl.where(j >= lo, j - lo, 0)[None, :]
    partner = tl.load(row + lo + (r ^ 1), mask=rot, other=0.0).to(tl.float32)
    partner = _normed(partner, rs[:, None], w_ptr, lo + (r ^ 1), rot, NORM, HAS_W, dt)
    c = tl.load(cos_ptr + s[:, None] * (RD // 2) + r // 2, mask=rot, other=1.0)
    sn = tl.load(sin_ptr + s[:, None] * (RD // 2) + r // 2, mask=rot, other=0.0) * SIGN
    xf = _normed(x.to(tl.float32), rs[:, None], w_ptr, j[None, :], m, NORM, HAS_W, dt)
    y = tl.where((r & 1) == 0, xf * c - partner * sn, xf * c + partner * sn)
    tl.store(y_ptr + i[:, None] * D + j[None, :], tl.where(rot, y, xf).to(y_ptr.dtype.element_ty), mask=m)


def _rope_launch(x, weight, eps, cos, sin, inverse: bool, norm: bool, dtype=None) -> torch.Tensor:
    """One launch over all S x H rows, several rows per program (a prefill chunk's query heads are
    ~400k rows of 512 channels: one row per program left the kernel launch-bound)."""
    S, D = x.shape[0], x.shape[-1]
    x3 = x.reshape(S, -1, D).contiguous()
    y = torch.empty(x3.shape, device=x3.device, dtype=dtype or x3.dtype)
    w = weight.contiguous() if weight is not None else x3
    R, block = x3.shape[0] * x3.shape[1], triton.next_power_of_2(D)
    rows = 1 if R <= ROPE_ONE_ROW else max(1, min(ROPE_ROWS, ROPE_TILE // block))
    _rope[(triton.cdiv(R, rows),)](x3, w, cos.float().contiguous(), sin.float().contiguous(), y, R, x3.shape[1], D,
                                   2 * cos.shape[-1], -1.0 if inverse else 1.0, float(eps), NORM=norm,
                                   HAS_W=weight is not None, ROWS=rows, BLOCK=block, **pdl.launch(x3.device))
    return y.reshape(x.shape)


def apply_rope_supported(x: torch.Tensor, *args, **kwargs) -> bool:
    """Rows up to 16384 wide; no autograd."""
    return not (x.numel() == 0 or x.requires_grad or x.shape[-1] > 16384)


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    return _rope_launch(x, None, 0.0, cos, sin, inverse, False)


def rms_norm_rope_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                         sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """kernels.rms_norm_rope for CUDA tensors: one launch (computed in float32, rounded to x's dtype
    where the reference rounds, stored in ``dtype``)."""
    return _rope_launch(x, weight, eps, cos, sin, False, True, dtype)


@triton.jit
def _swiglu(g_ptr, u_ptr, y_ptr, n, limit, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.minimum(tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32), limit)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    tl.store(y_ptr + i, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=m)


def rms_norm_rope_supported(x: torch.Tensor, weight: torch.Tensor | None, *args) -> bool:
    """Rows up to 16384 wide; no autograd."""
    return not (x.numel() == 0 or x.requires_grad or x.shape[-1] > 16384 or (weight is not None and weight.requires_grad))


def swiglu_supported(gate: torch.Tensor, up: torch.Tensor, limit: float) -> bool:
    return not (gate.requires_grad or up.requires_grad or gate.shape != up.shape or gate.numel() == 0)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    _swiglu[(triton.cdiv(n, 1024),)](g, u, y, n, float(limit), BLOCK=1024, **pdl.launch(g.device))
    return y


@triton.jit
def _cos_sin(pos_ptr, inv_ptr, cos_ptr, sin_ptr, HALF, RATIO: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    s = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK)
    m = r < HALF
    p = tl.load(pos_ptr + s)
    ang = (p // RATIO * RATIO).to(tl.float32) * tl.load(inv_ptr + r, mask=m, other=0.0)
    tl.store(cos_ptr + s * HALF + r, tl.cos(ang), mask=m)
    tl.store(sin_ptr + s * HALF + r, tl.sin(ang), mask=m)


def rope_cos_sin_supported(positions: torch.Tensor, inv_freq: torch.Tensor, *args) -> bool:
    return inv_freq.dtype == torch.float32 and positions.dim() == 1 and positions.numel() > 0


def rope_cos_sin_triton(positions: torch.Tensor, inv_freq: torch.Tensor, ratio: int = 1):
    """kernels.rope_cos_sin for CUDA positions: one launch."""
    half = inv_freq.shape[0]
    cos = torch.empty((positions.shape[0], half), device=positions.device, dtype=torch.float32)
    sin = torch.empty_like(cos)
    _cos_sin[(positions.shape[0],)](positions, inv_freq.to(positions.device), cos, sin, half, RATIO=ratio,
                                    BLOCK=triton.next_power_of_2(half), **pdl.launch(positions.device))
    return cos, sin


@triton.jit
def _entry_rows(pos_ptr, bt_ptr, row_ptr, rows_ptr, ok_ptr, CAP, RATIO: tl.constexpr, EPB: tl.constexpr,
                BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    jm = j < CAP
    pos = tl.load(pos_ptr)
    blk = tl.maximum(tl.load(bt_ptr + j // EPB, mask=jm, other=0), 0).to(tl.int64)
    tl.store(rows_ptr + j, blk * EPB + j % EPB, mask=jm)
    tl.store(ok_ptr + j, (j + 1) * RATIO <= pos + 1, mask=jm)
    if tl.program_id(0).to(tl.int64) == 0:
        e = pos // RATIO
        tl.store(row_ptr, tl.maximum(tl.load(bt_ptr + e // EPB), 0).to(tl.int64) * EPB + e % EPB)


def entry_rows_supported(pos: torch.Tensor, block_row: torch.Tensor, *args) -> bool:
    return block_row.dtype == torch.int32


def entry_rows_triton(pos: torch.Tensor, block_row: torch.Tensor, ratio: int, per_block: int, capacity: int):
    """kernels.entry_rows for CUDA tensors: one launch."""
    row = torch.empty(1, device=pos.device, dtype=torch.int64)
    rows = torch.empty(capacity, device=pos.device, dtype=torch.int64)
    ok = torch.empty(capacity, device=pos.device, dtype=torch.bool)
    block = min(1024, triton.next_power_of_2(max(capacity, 1)))
    _entry_rows[(max(1, triton.cdiv(capacity, block)),)](pos, block_row.contiguous(), row, rows, ok, capacity,
                                                       RATIO=ratio, EPB=per_block, BLOCK=block,
                                                       **pdl.launch(pos.device))
    return row, rows, ok

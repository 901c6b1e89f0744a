"""Triton kernels for the compressors: a prefill chunk's window pooling (kernels.compress_windows,
one launch) and one token's step (kernels.compress_decode).

compress_windows: one program per (window, block of channels), the softmax over the window's
slots in registers (HCA: ratio slots; CSA: window w-1's series a, then window w's series b).
compress_decode, two launches instead of ~60 small ones: (1) per block of channels, on the token that
closes its window, an online softmax over the window's slots (HCA: ratio slots; CSA: the previous
window's series a, then this window's series b), and on every token that block's share of the state
updates (tail row, series a on a close); (2) RMSNorm and RoPE on the last rd channels (channel pairs
handled as the two columns of a [D/2, 2] tile), zeros on a token that closes no window (the entry of
an open window is invisible; the pooling, the read of the whole tail, runs once a window).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl



@triton.jit
def _pool(c_ptr, z_ptr, tc_ptr, tz_ptr, ape_ptr, pc_ptr, pz_ptr, pos_ptr, out_ptr,
          D: tl.constexpr, WIDTH: tl.constexpr, RATIO: tl.constexpr, OVERLAP: tl.constexpr, BLOCK: tl.constexpr,
          BLOCK_J: tl.constexpr, PDL: tl.constexpr):
    """Pooled entry channels [BLOCK] of program 0..D/BLOCK-1, and this program's share of the state."""
    pdl.wait(PDL)
    d = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    dm = d < D
    pos = tl.load(pos_ptr)
    k = pos % RATIO
    if k == RATIO - 1:  # the token closes its window: pool it (else the entry is zeros, _finish), then
        _pool_window(c_ptr, z_ptr, tc_ptr, tz_ptr, ape_ptr, pc_ptr, pz_ptr, pos, out_ptr, d, dm, D, WIDTH, RATIO,
                     OVERLAP, BLOCK, BLOCK_J)
        if OVERLAP:  # this window's series a becomes the state (after the pooling read the last one's)
            for j in range(0, RATIO):
                last = j == RATIO - 1
                cj = tl.load(tl.where(last, c_ptr, tc_ptr + j * WIDTH) + d, mask=dm, other=0.0)
                zj = tl.load(tl.where(last, z_ptr, tz_ptr + j * WIDTH) + d, mask=dm, other=0.0)
                zj = zj + tl.load(ape_ptr + j * WIDTH + d, mask=dm, other=0.0)
                tl.store(pc_ptr + j * D + d, cj, mask=dm)
                tl.store(pz_ptr + j * D + d, zj, mask=dm)
    row = tl.minimum(k, RATIO - 2)  # this token's row of the tail (this program's channels)
    for h in range(0, WIDTH // D):
        tl.store(tc_ptr + row * WIDTH + h * D + d, tl.load(c_ptr + h * D + d, mask=dm, other=0.0), mask=dm)
        tl.store(tz_ptr + row * WIDTH + h * D + d, tl.load(z_ptr + h * D + d, mask=dm, other=0.0), mask=dm)


@triton.jit
def _pool_window(c_ptr, z_ptr, tc_ptr, tz_ptr, ape_ptr, pc_ptr, pz_ptr, pos, out_ptr, d, dm, D: tl.constexpr,
                 WIDTH: tl.constexpr, RATIO: tl.constexpr, OVERLAP: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_J: tl.constexpr):
    """The window's pooled channels d: an online softmax over its slots (the tail's rows, this token's last)."""
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    if OVERLAP:  # series a of the previous window (its z already has ape); absent before the first
        has_prev = pos >= RATIO
        for j in range(0, RATIO):
            cj = tl.load(pc_ptr + j * D + d, mask=dm, other=0.0)
            zj = tl.where(has_prev, tl.load(pz_ptr + j * D + d, mask=dm, other=float("-inf")), float("-inf"))
            m_new = tl.maximum(m, zj)
            mu = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.exp(m - mu)
            p = tl.exp(zj - mu)
            l = l * a + p
            acc = acc * a + p * cj
            m = m_new
        off = D  # series b: the second half of each row
    else:
        off = 0
    for j0 in range(0, RATIO, BLOCK_J):  # BLOCK_J slots at a time (loads in flight together)
        slot = j0 + tl.arange(0, BLOCK_J)
        last = (slot == RATIO - 1)[:, None]
        jm = (slot < RATIO)[:, None] & dm[None, :]
        col = off + d[None, :]
        cj = tl.load(tl.where(last, c_ptr + col, tc_ptr + slot[:, None] * WIDTH + col), mask=jm, other=0.0)
        zj = tl.load(tl.where(last, z_ptr + col, tz_ptr + slot[:, None] * WIDTH + col), mask=jm, other=float("-inf"))
        zj = zj + tl.load(ape_ptr + slot[:, None] * WIDTH + col, mask=jm, other=0.0)
        m_new = tl.maximum(m, tl.max(zj, 0))
        a = tl.exp(m - m_new)
        p = tl.exp(zj - m_new[None, :])
        l = l * a + tl.sum(p, 0)
        acc = acc * a + tl.sum(p * cj, 0)
        m = m_new
    tl.store(out_ptr + d, acc / l, mask=dm)


@triton.jit
def _finish(e_ptr, w_ptr, cos_ptr, sin_ptr, pos_ptr, eps, D: tl.constexpr, RD: tl.constexpr, RATIO: tl.constexpr,
            BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """RMSNorm, then RoPE on the last RD channels, of the pooled entry in place, when the token at
    pos closes its window; else the entry is zeros (_pool did not pool). Channels are laid out as
    [BLOCK_H, 2]: pair i holds channels 2i and 2i+1."""
    pdl.wait(PDL)
    i = tl.arange(0, BLOCK_H)
    d = i[:, None] * 2 + tl.arange(0, 2)[None, :]
    dm = d < D
    if tl.load(pos_ptr) % RATIO != RATIO - 1:
        tl.store(e_ptr + d, tl.zeros([BLOCK_H, 2], tl.float32), mask=dm)
        return
    e = tl.load(e_ptr + d, mask=dm, other=0.0)
    e = e * tl.rsqrt(tl.sum(tl.sum(e * e, 1), 0) / D + eps) * tl.load(w_ptr + d, mask=dm, other=0.0)
    ev = tl.sum(tl.where(d % 2 == 0, e, 0.0), 1)
    od = tl.sum(tl.where(d % 2 == 1, e, 0.0), 1)
    r = i - (D - RD) // 2  # pair index within the RoPE channels
    rot = (r >= 0) & (i < D // 2)
    cs = tl.load(cos_ptr + r, mask=rot, other=1.0)
    sn = tl.load(sin_ptr + r, mask=rot, other=0.0)
    e = tl.where(d % 2 == 0, (ev * cs - od * sn)[:, None], (ev * sn + od * cs)[:, None])
    tl.store(e_ptr + d, e, mask=dm)


def compress_decode_supported(c, z, tail_c, tail_z, ape, prev_c, prev_z, norm_w, *args) -> bool:
    """Float32 state, ratio >= 2, an even entry width; no autograd."""
    f32 = all(t is None or t.dtype == torch.float32 for t in (c, z, tail_c, tail_z, prev_c, prev_z))
    return not (c.requires_grad or z.requires_grad or ape.shape[0] < 2 or norm_w.shape[0] % 2 or not f32)


def compress_decode_triton(c, z, tail_c, tail_z, ape, prev_c, prev_z, norm_w, cos, sin, pos, eps):
    """kernels.compress_decode for CUDA tensors: two launches (pool on a window's last token + state, per
    channel block, then norm + RoPE or zeros)."""
    ratio, width = ape.shape
    D = norm_w.shape[0]
    out = torch.empty((1, D), device=c.device, dtype=torch.float32)
    overlap = prev_c is not None
    block = min(64, triton.next_power_of_2(D))
    _pool[(triton.cdiv(D, block),)](
        c.contiguous(), z.contiguous(), tail_c, tail_z, ape.float().contiguous(), prev_c if overlap else tail_c,
        prev_z if overlap else tail_z, pos, out, D=D, WIDTH=width, RATIO=ratio, OVERLAP=overlap, BLOCK=block,
        BLOCK_J=min(32, triton.next_power_of_2(ratio)), **pdl.launch(c.device))
    _finish[(1,)](out, norm_w.float().contiguous(), cos.contiguous(), sin.contiguous(), pos, float(eps), D=D,
                  RD=2 * cos.shape[-1], RATIO=ratio, BLOCK_H=triton.next_power_of_2(D // 2), **pdl.launch(c.device))
    return out


@triton.jit
def _windows(c_ptr, z_ptr, pc_ptr, pz_ptr, out_ptr, D, WIDTH, RATIO, OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr,
             RP: tl.constexpr, BLOCK: tl.constexpr):
    """Entry w = program 0, channels [pid1 * BLOCK, +BLOCK): softmax over the slots of z, times c,
    summed (rows w * RATIO.. of c / z [n, WIDTH]; with OVERLAP the series a slots of window w-1,
    channels 0..D-1, or of prev (pc / pz [RATIO, D]) for w = 0, and series b, channels D..2D-1)."""
    w = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, RP)
    m2 = (j < RATIO)[:, None] & (d < D)[None, :]
    rows = w * RATIO + j
    off = D if OVERLAP else 0  # series b (or the only series) lives in channels off..off+D-1
    zb = tl.load(z_ptr + rows[:, None] * WIDTH + off + d[None, :], mask=m2, other=float("-inf"))
    cb = tl.load(c_ptr + rows[:, None] * WIDTH + off + d[None, :], mask=m2, other=0.0)
    m = tl.max(zb, 0)
    if OVERLAP:
        if w > 0:
            prow = rows - RATIO
            za = tl.load(z_ptr + prow[:, None] * WIDTH + d[None, :], mask=m2, other=float("-inf"))
            ca = tl.load(c_ptr + prow[:, None] * WIDTH + d[None, :], mask=m2, other=0.0)
        elif HAS_PREV:
            za = tl.load(pz_ptr + j[:, None] * D + d[None, :], mask=m2, other=float("-inf"))
            ca = tl.load(pc_ptr + j[:, None] * D + d[None, :], mask=m2, other=0.0)
        else:
            za = tl.full([RP, BLOCK], float("-inf"), tl.float32)
            ca = tl.zeros([RP, BLOCK], tl.float32)
        m = tl.maximum(m, tl.max(za, 0))
        ea = tl.exp(za - m[None, :])
        eb = tl.exp(zb - m[None, :])
        den = tl.sum(ea, 0) + tl.sum(eb, 0)
        num = tl.sum(ea * ca, 0) + tl.sum(eb * cb, 0)
    else:
        eb = tl.exp(zb - m[None, :])
        den = tl.sum(eb, 0)
        num = tl.sum(eb * cb, 0)
    tl.store(out_ptr + w * D + d, num / den, mask=d < D)


def compress_windows_supported(c, z, ratio: int, overlap: bool, prev_a=None) -> bool:
    """Float32 c / z (the compressor's rows), a whole number of windows, prev_a [ratio, D] on their
    device; no autograd."""
    return (c.dtype == z.dtype == torch.float32 and c.shape == z.shape and c.shape[0] % ratio == 0
            and c.shape[0] > 0 and not (c.requires_grad or z.requires_grad)
            and (not overlap or (c.shape[1] % 2 == 0 and (prev_a is None or all(
                t.shape == (ratio, c.shape[1] // 2) and t.device == c.device for t in prev_a)))))


def compress_windows_triton(c, z, ratio: int, overlap: bool, prev_a=None):
    """kernels.compress_windows for CUDA tensors (contract: kernels/reference/compress.compress_windows):
    one launch over (windows, channel blocks)."""
    n, width = c.shape
    nw = n // ratio
    D = width // 2 if overlap else width
    c, z = c.contiguous(), z.contiguous()
    out = torch.empty((nw, D), device=c.device, dtype=torch.float32)
    has_prev = overlap and prev_a is not None
    pc, pz = (prev_a[0].float().contiguous(), prev_a[1].float().contiguous()) if has_prev else (c, z)
    block = 64 if ratio > 32 else 128
    _windows[(nw, triton.cdiv(D, block))](c, z, pc, pz, out, D, width, ratio, OVERLAP=overlap, HAS_PREV=has_prev,
                                          RP=triton.next_power_of_2(ratio), BLOCK=block)
    last = None
    if overlap:
        tail = slice(n - ratio, n)
        last = (c[tail, :D], z[tail, :D])
    return out, last

"""Softmax-gated token pooling of the CSA/HCA compressors (and the indexer's compressor)."""

from __future__ import annotations

import torch

from .rope import rms_norm_rope


def compress_windows(c: torch.Tensor, z: torch.Tensor, ratio: int, overlap: bool,
                     prev_a: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Pool complete windows of ``ratio`` tokens into one entry each.

    c, z: [Nw*ratio, W] per-token values and gate logits (ape already added to z), float32.
      Non-overlapping (HCA): W = D; entry w = sum_j softmax_j(z_j) * c_j over window w.
      Overlapping (CSA): W = 2D; entry w pools 2*ratio slots: window w-1's series a (first half
      of c/z) and window w's series b (second half). ``prev_a`` = (c_a, z_a) [ratio, D] of the
      window before the first one here, or None (those slots then get weight 0).
    Returns (entries [Nw, D] float32, last window's series a (c_a, z_a) or None).
    """
    n, width = c.shape
    nw = n // ratio
    c = c.float().reshape(nw, ratio, width)
    z = z.float().reshape(nw, ratio, width)
    if not overlap:
        return (torch.softmax(z, 1) * c).sum(1), None
    d = width // 2
    ca, cb = c[..., :d], c[..., d:]
    za, zb = z[..., :d], z[..., d:]
    if prev_a is None:
        pc = torch.zeros(1, ratio, d, dtype=c.dtype, device=c.device)
        pz = torch.full((1, ratio, d), float("-inf"), dtype=c.dtype, device=c.device)
    else:
        pc, pz = prev_a[0].float().unsqueeze(0), prev_a[1].float().unsqueeze(0)
    slots_c = torch.cat([torch.cat([pc, ca[:-1]], 0), cb], 1)  # [nw, 2*ratio, d]
    slots_z = torch.cat([torch.cat([pz, za[:-1]], 0), zb], 1)
    entries = (torch.softmax(slots_z, 1) * slots_c).sum(1)
    return entries, (ca[-1], za[-1])


def compress_decode(c: torch.Tensor, z: torch.Tensor, tail_c: torch.Tensor, tail_z: torch.Tensor, ape: torch.Tensor,
                    prev_c: torch.Tensor | None, prev_z: torch.Tensor | None, norm_w: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, eps: float) -> torch.Tensor:
    """One token's compressor step with shapes that do not depend on its position pos [1].

    c, z: [1, W] this token's values and raw gate logits (W = D, or 2D when overlapping);
    tail_c, tail_z: [ratio-1, W] pending rows (row j = window position j; rows at or past
    pos % ratio are stale); ape: [ratio, W]; prev_c, prev_z: [ratio, D] the last closed window's
    series a (z with ape), or None (HCA); norm_w: [D]; cos, sin: [1, rd/2] at the window's first
    position. -> entry [1, D] (normed, RoPE'd): the window pooled when pos closes it
    (pos % ratio == ratio-1), else zeros (an open window's entry is invisible until it closes, so
    the GPU kernel skips the pooling then).
    Updates the state in place: tail row min(pos % ratio, ratio-2) <- (c, z); when the window
    closes and overlapping, prev <- this window's series a.
    """
    ratio = ape.shape[0]
    C = torch.cat([tail_c, c], 0).float()
    Z = torch.cat([tail_z, z], 0).float() + ape.float()
    overlap = prev_c is not None
    prev = None
    if overlap:
        prev = (prev_c, torch.where(pos >= ratio, prev_z, float("-inf")))  # no series a before the first window
    entry, last_a = compress_windows(C, Z, ratio, overlap, prev)
    k = pos % ratio
    closing = k == ratio - 1
    entry = torch.where(closing, rms_norm_rope(entry, norm_w, eps, cos, sin), 0.0)
    if overlap:
        new_c, new_z = torch.where(closing, last_a[0], prev_c), torch.where(closing, last_a[1], prev_z)
        prev_c.copy_(new_c)
        prev_z.copy_(new_z)
    row = k.clamp(max=ratio - 2)
    tail_c.index_copy_(0, row, c.float())
    tail_z.index_copy_(0, row, z.float())
    return entry

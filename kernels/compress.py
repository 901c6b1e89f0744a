"""Softmax-gated token pooling of the CSA/HCA compressors (and the indexer's compressor)."""

from __future__ import annotations

import torch


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

"""The KV compressors (CSA overlapping, HCA plain, and the indexer's own) over cache state.

Per token: C = wkv(x), Z = wgate(x) in float32. Pending tokens of the unfinished window live in the
cache tail (raw Z, ape not yet added); every window that completes emits one entry:
softmax-pooled, RMSNorm'd, RoPE'd at the window's first position, quantised (faithful mode) and
appended to the cache.
"""

from __future__ import annotations

import torch

import kernels


def compress_step(x: torch.Tensor, w: dict, prefix: str, handle, start: int, ratio: int, overlap: bool,
                  rope, eps: float, quantise, name: str = "main", append=None) -> int:
    """Feed tokens start..start+S-1 (x: [S, d] normed block input) to a compressor.

    w: weights; prefix: e.g. "layers.3.attn.compressor"; rope: RopeTables; quantise: entry -> entry
    (storage-format round trip or identity); append(first, entries) stores emitted entries.
    Returns the number of entries visible after this call ((start+S) // ratio).
    """
    S = x.shape[0]
    c = kernels.linear(x.float(), w[prefix + ".wkv"])
    z = kernels.linear(x.float(), w[prefix + ".wgate"])
    tail_c, tail_z = handle.tail(name)
    k = tail_c.shape[0]
    first_pos = start - k
    C = torch.cat([tail_c, c], 0)
    Z = torch.cat([tail_z, z], 0)
    n = (k + S) // ratio
    used = n * ratio
    if n:
        ape = w[prefix + ".ape"].float()
        pos = torch.arange(first_pos, first_pos + used, device=x.device)
        zz = Z[:used] + ape[pos % ratio]
        entries, last_a = kernels.compress_windows(C[:used], zz, ratio, overlap, handle.prev_a(name) if overlap else None)
        entries = kernels.rms_norm(entries, w[prefix + ".norm.weight"], eps)
        w0 = first_pos // ratio
        epos = (w0 + torch.arange(n, device=x.device)) * ratio
        cos, sin = rope.cos_sin(epos, yarn=True)
        entries = quantise(kernels.apply_rope(entries, cos, sin))
        append(w0, entries)
        if overlap:
            handle.set_prev_a(last_a[0], last_a[1], name)
    handle.set_tail(C[used:], Z[used:], name)
    return (start + S) // ratio

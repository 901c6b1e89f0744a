"""The KV compressors (CSA overlapping, HCA plain, and the indexer's own) over cache state.

Per token: C = wkv(x), Z = wgate(x) in float32. Pending tokens of the unfinished window live in the
cache tail (raw Z, ape not yet added); every window that completes emits one entry:
softmax-pooled, RMSNorm'd, RoPE'd at the window's first position, quantised (faithful mode) and
appended to the cache. ``compress_step`` feeds a chunk at a host-known start; ``compress_decode``
feeds one token at a device position with fixed shapes (for CUDA-graph capture).
"""

from __future__ import annotations

import torch

from dsv4 import kernels


def _finish(entries, w, prefix, eps, rope, epos, quantise):
    """Pooled entries [n, D] -> normed, RoPE'd at window starts epos [n], quantised."""
    cos, sin = rope.cos_sin(epos, yarn=True)
    return quantise(kernels.rms_norm_rope(entries, w[prefix + ".norm.weight"], eps, cos, sin))


def compress_step(x: torch.Tensor, w: dict, prefix: str, handle, start: int, ratio: int, overlap: bool,
                  rope, eps: float, quantise, name: str = "main", append=None) -> int:
    """Feed tokens start..start+S-1 (x: [S, d] normed block input) to a compressor.

    w: weights; prefix: e.g. "layers.3.attn.compressor"; rope: RopeTables; quantise: entry -> entry
    (storage-format round trip or identity); append(first, entries) stores emitted entries.
    Returns the number of entries visible after this call ((start+S) // ratio).
    """
    S = x.shape[0]
    xf = x.float()
    c = kernels.linear(xf, w[prefix + ".wkv"])
    z = kernels.linear(xf, w[prefix + ".wgate"])
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
        w0 = first_pos // ratio
        append(w0, _finish(entries, w, prefix, eps, rope, (w0 + torch.arange(n, device=x.device)) * ratio, quantise))
        if overlap:
            handle.set_prev_a(last_a[0], last_a[1], name)
    handle.set_tail(C[used:], Z[used:], name)
    return (start + S) // ratio


def compress_decode(x: torch.Tensor, w: dict, prefix: str, handle, pos: torch.Tensor, ratio: int, overlap: bool,
                    rope, eps: float, quantise, name: str = "main", store=None, cz=()) -> None:
    """Feed one token (x: [1, d]) at device position pos [1], with shapes that do not depend on it.

    On the token that closes its window, the window is pooled from the whole tail and this token
    (kernels.compress_decode) and stored as entry pos // ratio by store(entry [1, D]); on the
    others the same store writes zeros, shapes being static: an open window's entry is invisible
    (attention sees entry e only once (e+1)*ratio <= pos+1) and is written when the window closes.
    rope: the step's engine.rope.StepRope; cz: (c, z) when the caller computed them (stacked GEMV),
    else computed here.
    """
    if cz:
        c, z = cz
    else:
        xf = x.float()
        c, z = kernels.linear(xf, w[prefix + ".wkv"]), kernels.linear(xf, w[prefix + ".wgate"])
    tail_c, tail_z = handle.full_tail(name)
    prev_c, prev_z = handle.prev_state(name) if overlap else (None, None)
    cos, sin = rope.at_window(ratio)
    entry = kernels.compress_decode(c, z, tail_c, tail_z, w[prefix + ".ape"], prev_c, prev_z,
                                    w[prefix + ".norm.weight"], cos, sin, pos, eps)
    store(quantise(entry))

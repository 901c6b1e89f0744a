"""Interleaved rotary position embedding (plain and YaRN), applied to the LAST rope_dim channels.

Channel pairs (2i, 2i+1) of the rope slice rotate by angle position * inv_freq[i].
"""

from __future__ import annotations

import math

import torch

from .norm import rms_norm


def rope_inv_freq(dim: int, base: float, yarn_factor: float = 1.0, original_max_position: int = 65536,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> torch.Tensor:
    """Inverse frequencies [dim/2] (float32). yarn_factor == 1 gives plain RoPE.

    YaRN: frequencies whose wavelength fits in the original context many times (fast) keep
    their value, slow ones are divided by the factor, with a linear ramp between the correction
    dimensions (floor/ceil of the beta_fast/beta_slow dims). No mscale on cos/sin (DeepSeek-V4).
    """
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn_factor == 1.0:
        return inv

    def corr_dim(rot: float) -> float:
        return dim * math.log(original_max_position / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 -> extrapolate (keep), 0 -> interpolate (divide by factor)
    return inv / yarn_factor * (1 - keep) + inv * keep


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, ratio: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [S] int -> cos, sin: [S, dim/2] float32 at each position rounded down to a
    multiple of ``ratio`` (the first position of its compression window; 1: the position)."""
    if ratio > 1:
        positions = positions // ratio * ratio
    ang = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2*cos.shape[-1] channels of x pairwise; inverse=True rotates by -angle.

    x: [S, ..., D]; cos/sin: [S, rd/2] (broadcast over the middle axes).
    """
    rd = 2 * cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if inverse:
        s = -s
    r = x[..., -rd:].float()
    a, b = r[..., 0::2], r[..., 1::2]
    rot = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    return torch.cat([x[..., :-rd], rot.to(x.dtype)], -1)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """apply_rope(rms_norm(x, weight, eps), cos, sin): x [S, ..., D] normalised over D, then its
    last 2*cos.shape[-1] channels rotated (one launch on the GPU), computed in x's dtype and
    returned in ``dtype`` (default: x's; faithful mode's queries are rounded to bf16 here)."""
    y = apply_rope(rms_norm(x, weight, eps), cos, sin)
    return y if dtype is None else y.to(dtype)

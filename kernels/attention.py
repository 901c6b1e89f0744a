"""Shared-KV multi-query attention with a per-head sink logit."""

from __future__ import annotations

import torch


def sparse_mqa_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sink: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Attention of every head over one shared key=value set.

    q: [S, H, D] queries; kv: [T, D] entries (keys AND values); bias: [S, T] additive mask
    (0 = visible, -inf = hidden); sink: [H] logit that joins the softmax denominator only.
    Returns [S, H, D] in q's dtype. Computed in float32.
    """
    logits = torch.einsum("shd,td->sht", q.float(), kv.float()) * scale + bias.float().unsqueeze(1)
    S, H, _ = logits.shape
    sinks = sink.float().view(1, H, 1).expand(S, H, 1)
    full = torch.cat([logits, sinks], -1)
    full = full - full.amax(-1, keepdim=True)
    p = torch.softmax(full, -1)[..., :-1]
    return torch.einsum("sht,td->shd", p, kv.float()).to(q.dtype)

"""Routers (sqrtsoftplus top-k with bias, hash table) and the clamped SwiGLU expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def router_scores(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """sqrt(softplus(x . gate^T)) in float32.  x: [S, d], gate_weight: [E, d] -> [S, E]."""
    return F.softplus(x.float() @ gate_weight.float().t()).sqrt()


def router_topk(scores: torch.Tensor, bias: torch.Tensor, k: int, scale: float):
    """Dense router: experts = top-k of (scores + bias) (lower index wins ties); the bias only selects.

    Returns (weights [S, k] float32 = chosen scores / their sum * scale, ids [S, k] int64).
    """
    ids = torch.sort(scores + bias.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return _normalise(scores, ids, scale), ids


def hash_route(scores: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor, scale: float):
    """Hash router: experts = tid2eid[token_id]. Returns (weights [S, k], ids [S, k])."""
    ids = tid2eid[token_ids].long()
    return _normalise(scores, ids, scale), ids


def _normalise(scores: torch.Tensor, ids: torch.Tensor, scale: float) -> torch.Tensor:
    w = scores.gather(1, ids)
    return w / (w.sum(-1, keepdim=True) + 1e-20) * scale


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(clamp(gate, max=limit)) * clamp(up, -limit, limit)."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)

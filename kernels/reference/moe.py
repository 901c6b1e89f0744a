"""Routers (sqrtsoftplus top-k with bias, hash table) and the clamped SwiGLU expert."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .linear import QWeight, linear_reference


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


@dataclass
class ExpertSet:
    """The routed experts of one MoE layer, by expert id: w1 (gate), w3 (up) [inter, d] and
    w2 (down) [d, inter] QWeights, all in one format. Holds references, never copies; kernels may
    keep derived lookup tables (device pointer arrays) in ``tables``.

    local: on one rank of several (expert parallel), int64 [n_routed_experts] mapping a router's
    expert id to its index in these lists, -1 for the experts other ranks hold (they add nothing
    here and nothing of theirs is read); None when the lists hold every expert, by id."""

    w1: list[QWeight]
    w3: list[QWeight]
    w2: list[QWeight]
    tables: dict = field(default_factory=dict, repr=False)
    local: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.w1)


def routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertSet,
                   limit: float, act_quant: bool = False) -> torch.Tensor:
    """sum_j weights[s, j] * w2[e] swiglu(w1[e] x_s, w3[e] x_s), e = ids[s, j], clamp ``limit``.

    x: [S, d]; ids: [S, k] int; weights: [S, k] float32. -> [S, d] in x's dtype. Experts are
    visited in ascending id order and each one's weighted output is added in x's dtype. With
    ``experts.local`` the ids are mapped to this rank's experts first; -1 (another rank's) is skipped.
    act_quant (faithful mode): x and the SwiGLU output h go through e4m3 per 1 x 128 slice before
    the FP8 / FP4 weights (linear.quantised_input); the routing weight multiplies w2's output.
    """
    if experts.local is not None:
        ids = experts.local.to(ids.device)[ids]
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        rows, slot = torch.where(ids == e)
        xe = x[rows]
        h = swiglu(linear_reference(xe, experts.w1[e], act_quant), linear_reference(xe, experts.w3[e], act_quant),
                   limit)
        y = linear_reference(h, experts.w2[e], act_quant)
        out.index_add_(0, rows, (y.float() * weights[rows, slot, None]).to(x.dtype))
    return out

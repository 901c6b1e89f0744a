"""Mixture of experts: hash or sqrtsoftplus router, top-6 routed SwiGLU experts + one shared expert."""

from __future__ import annotations

import torch

import kernels
from kernels import ExpertSet


def layer_experts(w: dict, p: str, n_experts: int) -> tuple[ExpertSet, ExpertSet]:
    """(routed, shared) ExpertSets of the MoE at prefix p ("layers.i.ffn"), referencing w's weights."""
    routed = ExpertSet(*([w[f"{p}.experts.{e}.{n}"] for e in range(n_experts)] for n in ("w1", "w3", "w2")))
    shared = ExpertSet(*([w[f"{p}.shared_experts.{n}"]] for n in ("w1", "w3", "w2")))
    return routed, shared


def moe(x: torch.Tensor, w: dict, p: str, spec, cfg, token_ids: torch.Tensor, experts=None) -> torch.Tensor:
    """x: [S, d] normed; p: "layers.i.ffn"; token_ids: [S] (hash routing); experts: layer_experts(...)
    (built here if None). -> [S, d]. The expert ids stay on the device (no host read)."""
    routed, shared = experts or layer_experts(w, p, cfg.n_routed_experts)
    gate = w[p + ".gate"]
    scores = kernels.router_scores(x, gate.data if gate.fmt == "dense" and gate.dense is None else gate.dequant())
    k, scale = cfg.num_experts_per_tok, cfg.routed_scaling_factor
    if spec.router.value == "hash":
        weights, ids = kernels.hash_route(scores, w[p + ".gate.tid2eid"], token_ids, scale)
    else:
        weights, ids = kernels.router_topk(scores, w[p + ".gate.bias"], k, scale)
    out = kernels.routed_experts(x, ids, weights, routed, cfg.swiglu_limit)
    one = torch.ones((x.shape[0], 1), device=x.device)
    return out + kernels.routed_experts(x, torch.zeros_like(one, dtype=torch.long), one, shared, cfg.swiglu_limit)

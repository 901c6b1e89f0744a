"""Mixture of experts: hash or sqrtsoftplus router, top-6 routed SwiGLU experts + one shared expert."""

from __future__ import annotations

import torch

import kernels


def expert(x: torch.Tensor, w: dict, p: str, limit: float) -> torch.Tensor:
    """w2(swiglu(w1 x, w3 x)) with the clamp.  x: [n, d] -> [n, d]."""
    h = kernels.swiglu(kernels.linear(x, w[p + ".w1"]), kernels.linear(x, w[p + ".w3"]), limit)
    return kernels.linear(h, w[p + ".w2"])


def moe(x: torch.Tensor, w: dict, p: str, spec, cfg, token_ids: torch.Tensor) -> torch.Tensor:
    """x: [S, d] normed; p: "layers.i.ffn"; token_ids: [S] (hash routing). -> [S, d]."""
    scores = kernels.router_scores(x, w[p + ".gate"].dequant())
    k, scale = cfg.num_experts_per_tok, cfg.routed_scaling_factor
    if spec.router.value == "hash":
        weights, ids = kernels.hash_route(scores, w[p + ".gate.tid2eid"], token_ids, scale)
    else:
        weights, ids = kernels.router_topk(scores, w[p + ".gate.bias"], k, scale)
    if x.shape[0] == 1:  # decode: one host read of the k expert ids, no gather/scatter
        order = sorted(enumerate(ids[0].tolist()), key=lambda t: t[1])  # ascending expert id, as below
        out = torch.zeros_like(x)
        for slot, e in order:
            out = out + (expert(x, w, f"{p}.experts.{e}", cfg.swiglu_limit).float() * weights[:, slot, None]).to(x.dtype)
        return out + expert(x, w, p + ".shared_experts", cfg.swiglu_limit)
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        rows, slot = torch.where(ids == e)
        y = expert(x[rows], w, f"{p}.experts.{e}", cfg.swiglu_limit)
        out.index_add_(0, rows, (y.float() * weights[rows, slot, None]).to(x.dtype))
    return out + expert(x, w, p + ".shared_experts", cfg.swiglu_limit)

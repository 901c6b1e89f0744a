"""Mixture of experts: hash or sqrtsoftplus router, top-6 routed SwiGLU experts + one shared expert."""

from __future__ import annotations

import torch

from dsv4 import kernels
from dsv4.kernels import ExpertSet, streams


def layer_experts(w: dict, p: str, n_experts: int) -> ExpertSet:
    """The routed experts of the MoE at prefix p ("layers.i.ffn"), referencing w's weights. When w
    holds only some of them (one rank of several, expert parallel): those, with the other experts'
    ids mapped to -1 (ExpertSet.local: they add nothing and are never read)."""
    here = [e for e in range(n_experts) if f"{p}.experts.{e}.w1" in w]
    sets = ([w[f"{p}.experts.{e}.{k}"] for e in here] for k in ("w1", "w3", "w2"))
    if len(here) == n_experts:
        return ExpertSet(*sets)
    local = torch.full((n_experts,), -1, dtype=torch.long)
    local[here] = torch.arange(len(here))
    return ExpertSet(*sets, local=local)


def stacked_linears(p: str) -> dict[str, list[str]]:
    """The shared expert's w1 and w3 at p (same input), by the name the decode step gives their
    stacked weight (engine/weights.fuse_rows)."""
    return {p + ".w1+w3": [p + ".w1", p + ".w3"]}


def shared_expert(x: torch.Tensor, w: dict, p: str, limit: float, faithful: bool = False) -> torch.Tensor:
    """w2(swiglu(w1 x, w3 x)) with the clamp, for the always-on expert at p. x: [S, d] -> [S, d].
    w1 and w3 run as one GEMV where the decode step stacked them (w[p + ".w1+w3"]). faithful: the
    FP8 linears quantise their inputs (kernels.linear act_quant)."""
    if p + ".w1+w3" in w:
        g, u = kernels.linear(x, w[p + ".w1+w3"], act_quant=faithful).chunk(2, -1)
    else:
        g, u = kernels.linear(x, w[p + ".w1"], act_quant=faithful), kernels.linear(x, w[p + ".w3"], act_quant=faithful)
    h = kernels.swiglu(g, u, limit)
    return kernels.linear(h, w[p + ".w2"], act_quant=faithful)


def moe(x: torch.Tensor, ctx) -> torch.Tensor:
    """x: [S, d] normed -> [S, d]: the routed experts (ctx.experts; hash routing by ctx.token_ids [S])
    plus the shared expert. The expert ids stay on the device (no host read). On a GPU, for a few
    rows, the shared expert runs on the side stream (kernels/streams.py), beside the router and
    the routed experts."""
    w, p, cfg = ctx.w, ctx.prefix + ".ffn", ctx.cfg
    shared, join = streams.beside(streams.side(x, "moe"), lambda: shared_expert(
        x, w, p + ".shared_experts", cfg.swiglu_limit, ctx.faithful))
    out = _routed(x, ctx)
    join()
    return out + shared


def _routed(x: torch.Tensor, ctx) -> torch.Tensor:
    """The router and the routed experts of moe(): x [S, d] -> [S, d]. A static step of several
    tokens (MTP's batched verify) routes token by token, through the one-token kernels, so that
    each token gets the bits a one-token step gives it."""
    if ctx.static and x.shape[0] > 1:
        return torch.cat([_route(x[i:i + 1], ctx, ctx.token_ids[i:i + 1]) for i in range(x.shape[0])])
    return _route(x, ctx, ctx.token_ids)


def _route(x: torch.Tensor, ctx, token_ids: torch.Tensor) -> torch.Tensor:
    w, p, spec, cfg, routed = ctx.w, ctx.prefix + ".ffn", ctx.spec, ctx.cfg, ctx.experts
    gate = w[p + ".gate"]
    scores = kernels.router_scores(x, gate.data if gate.fmt == "dense" and gate.dense is None else gate.dequant())
    k, scale = cfg.num_experts_per_tok, cfg.routed_scaling_factor
    if spec.router.value == "hash":
        weights, ids = kernels.hash_route(scores, w[p + ".gate.tid2eid"], token_ids, scale)
    else:
        weights, ids = kernels.router_topk(scores, w[p + ".gate.bias"], k, scale)
    return kernels.routed_experts(x, ids, weights, routed, cfg.swiglu_limit, act_quant=ctx.faithful)

"""One decoder block: mHC(attention) then mHC(MoE), on the [S, hc_mult, d] residual streams."""

from __future__ import annotations

from typing import Iterable

import torch

from dsv4 import kernels

from .attention import attention, decode_attention
from .context import LayerContext
from .moe import moe


def block(streams: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """streams: [S, n, d] at positions ctx.positions -> new streams [S, n, d]. The static decode step
    (ctx.static) attends through ``decode_attention`` over fixed-size cache views. On several ranks
    each sub-layer's output is this rank's partial sum (its heads; its experts + its slice of the
    shared expert), made whole by one all-reduce (ctx.comm) before mHC post; the streams stay
    replicated."""
    return blocks(streams, [ctx])


def blocks(streams: torch.Tensor, ctxs: Iterable[LayerContext]) -> torch.Tensor:
    """``block`` for each layer context in turn (a generator is consumed one layer at a time). Each
    mHC post comes with the next mHC pre and that sub-layer's RMSNorm as one fused op (one launch
    fewer each in the decode step): the attention's post with the MoE's pre, the MoE's post with
    the next layer's attention pre; the last layer's MoE post runs alone."""
    carry = None
    for ctx in ctxs:
        streams, carry = _block(streams, ctx, carry)
    return streams if carry is None else kernels.mhc_post(*carry)


def _block(streams: torch.Tensor, ctx: LayerContext, carry):
    """One layer with its MoE's mHC post left to the caller: -> (streams before that post, carry =
    (MoE output, streams, post, comb)). ``carry``: the previous layer's, applied here, or None."""
    cfg, w, p = ctx.cfg, ctx.w, ctx.prefix
    it, he, eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
    attend = decode_attention if ctx.static else attention
    hc = (w[p + ".hc_attn_fn"], w[p + ".hc_attn_base"], w[p + ".hc_attn_scale"], it, he, eps, w[p + ".attn_norm.weight"])
    if carry is None:
        x, post, comb = kernels.mhc_pre_norm(streams, *hc)
    else:
        streams, x, post, comb = kernels.mhc_post_pre_norm(*carry, *hc)
    a = ctx.comm.all_reduce(attend(x, ctx))
    hc = (w[p + ".hc_ffn_fn"], w[p + ".hc_ffn_base"], w[p + ".hc_ffn_scale"], it, he, eps, w[p + ".ffn_norm.weight"])
    streams, x, post, comb = kernels.mhc_post_pre_norm(a, streams, post, comb, *hc)
    m = ctx.comm.all_reduce(moe(x, ctx))
    return streams, (m, streams, post, comb)

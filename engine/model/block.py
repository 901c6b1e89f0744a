"""One decoder block: mHC(attention) then mHC(MoE), on the [S, hc_mult, d] residual streams."""

from __future__ import annotations

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
    cfg, w, p = ctx.cfg, ctx.w, ctx.prefix
    it, he, eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
    attend = decode_attention if ctx.static else attention
    x, post, comb = kernels.mhc_pre(streams, w[p + ".hc_attn_fn"], w[p + ".hc_attn_base"], w[p + ".hc_attn_scale"],
                                    it, he, eps)
    a = ctx.comm.all_reduce(attend(kernels.rms_norm(x, w[p + ".attn_norm.weight"], eps), ctx))
    streams = kernels.mhc_post(a, streams, post, comb)
    x, post, comb = kernels.mhc_pre(streams, w[p + ".hc_ffn_fn"], w[p + ".hc_ffn_base"], w[p + ".hc_ffn_scale"],
                                    it, he, eps)
    m = ctx.comm.all_reduce(moe(kernels.rms_norm(x, w[p + ".ffn_norm.weight"], eps), ctx))
    return kernels.mhc_post(m, streams, post, comb)

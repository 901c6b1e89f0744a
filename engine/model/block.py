"""One decoder block: mHC(attention) then mHC(MoE), on the [S, hc_mult, d] residual streams."""

from __future__ import annotations

import torch

from dsv4 import kernels

from .attention import attention
from .moe import moe


def block(streams: torch.Tensor, w: dict, p: str, spec, cfg, handle, positions: torch.Tensor,
          token_ids: torch.Tensor, rope, mode: str, start, experts=None, attend=attention) -> torch.Tensor:
    """streams: [S, n, d]; p: "layers.i" (or "mtp.0"); positions start..start+S-1. -> new streams [S, n, d].

    experts: the layer's routed ExpertSet (engine/moe.layer_experts; built on the fly if None);
    attend: ``attention``, or ``decode_attention`` for the captured decode step."""
    it, he, eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
    x, post, comb = kernels.mhc_pre(streams, w[p + ".hc_attn_fn"], w[p + ".hc_attn_base"], w[p + ".hc_attn_scale"],
                                    it, he, eps)
    a = attend(kernels.rms_norm(x, w[p + ".attn_norm.weight"], eps), w, p + ".attn", spec, cfg, handle,
               positions, rope, mode, start)
    streams = kernels.mhc_post(a, streams, post, comb)
    x, post, comb = kernels.mhc_pre(streams, w[p + ".hc_ffn_fn"], w[p + ".hc_ffn_base"], w[p + ".hc_ffn_scale"],
                                    it, he, eps)
    m = moe(kernels.rms_norm(x, w[p + ".ffn_norm.weight"], eps), w, p + ".ffn", spec, cfg, token_ids, experts)
    return kernels.mhc_post(m, streams, post, comb)

"""One attention layer (SWA, CSA or HCA) over the slot's cache, for a chunk of S new tokens."""

from __future__ import annotations

import torch

import kernels
from kernels import quant

from .compressor import compress_step


def attention(x: torch.Tensor, w: dict, p: str, spec, cfg, handle, positions: torch.Tensor, rope,
              mode: str, start: int) -> torch.Tensor:
    """x: [S, d] normed input; p: weight prefix "layers.i.attn"; positions: [S] absolute, the first
    being ``start`` (a host int, so no device sync). -> [S, d]."""
    S = x.shape[0]
    H, D, rd, eps = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.rms_norm_eps
    faithful = mode == "faithful"
    cos, sin = rope.cos_sin(positions, spec.yarn)

    qr = kernels.rms_norm(kernels.linear(x, w[p + ".wq_a"]), w[p + ".q_norm.weight"], eps)  # [S, q_lora]
    q = kernels.linear(qr, w[p + ".wq_b"]).view(S, H, D)
    q = kernels.apply_rope(kernels.rms_norm(q, None, eps), cos, sin)
    kv = kernels.rms_norm(kernels.linear(x, w[p + ".wkv"]), w[p + ".kv_norm.weight"], eps)  # [S, D]
    kv = kernels.apply_rope(kv, cos, sin)
    if faithful:
        kv = quant.kv_quant_dequant(kv, rd)

    # sliding window: ring (before this chunk) + this chunk; key k visible to t iff t-W < k <= t
    ring, ring_pos = handle.read_window()
    keys = torch.cat([ring.to(kv.dtype), kv], 0)
    kpos = torch.cat([ring_pos, positions], 0)
    t = positions[:, None]
    visible = (kpos[None, :] >= 0) & (kpos[None, :] <= t) & (kpos[None, :] > t - cfg.sliding_window)
    handle.write_window(kv, start)

    if spec.ratio:
        m = spec.ratio
        kvq = (lambda e: quant.kv_quant_dequant(e, rd)) if faithful else (lambda e: e)
        n = compress_step(x, w, p + ".compressor", handle, start, m, spec.attn == "csa", rope, eps, kvq,
                          append=handle.append_entries)
        entries = handle.read_entries(n).to(kv.dtype)  # [n, D]
        ent_vis = (torch.arange(n, device=x.device)[None, :] + 1) * m <= t + 1  # [S, n]
        if spec.attn == "csa":
            ent_vis = ent_vis & _indexer_select(x, qr, w, p + ".indexer", cfg, handle, positions, start, rope,
                                                faithful, ent_vis)
        keys = torch.cat([keys, entries], 0)
        visible = torch.cat([visible, ent_vis], 1)

    bias = torch.zeros(visible.shape, dtype=torch.float32, device=x.device).masked_fill(~visible, float("-inf"))
    o = kernels.sparse_mqa_attention(q, keys, bias, w[p + ".attn_sink"], D ** -0.5)  # [S, H, D]
    o = kernels.apply_rope(o, cos, sin, inverse=True)
    return _grouped_out(o, w, p, cfg)


def _grouped_out(o: torch.Tensor, w: dict, p: str, cfg) -> torch.Tensor:
    """heads -> o_groups groups; wo_a maps each group (H/G*D) -> o_lora_rank with its own rows; wo_b -> d."""
    y = kernels.grouped_linear(o.reshape(o.shape[0], cfg.o_groups, -1), w[p + ".wo_a"])  # [S, G*R]
    return kernels.linear(y, w[p + ".wo_b"])


def _indexer_select(x, qr, w, p, cfg, handle, positions, start, rope, faithful, ent_vis) -> torch.Tensor:
    """Lightning Indexer: bool [S, n] of the top-index_topk visible compressed entries per query."""
    S = x.shape[0]
    Hi, Di, eps = cfg.index_n_heads, cfg.index_head_dim, cfg.rms_norm_eps
    iq = (lambda e: quant.indexer_quant_dequant(e)) if faithful else (lambda e: e)
    n = compress_step(x, w, p + ".compressor", handle, start, handle.layer.ratio, True, rope, eps, iq, name="idx",
                      append=handle.append_index_keys)
    keys = handle.read_index_keys(n)  # [n, Di]
    cos, sin = rope.cos_sin(positions, yarn=True)
    q = kernels.apply_rope(kernels.linear(qr, w[p + ".wq_b"]).view(S, Hi, Di), cos, sin)
    q = iq(q)
    weights = kernels.linear(x, w[p + ".weights_proj"]).float() * (Di ** -0.5 * Hi ** -0.5)
    scores = kernels.indexer_scores(q, keys, weights)
    return kernels.indexer_topk(scores, ent_vis, cfg.index_topk)

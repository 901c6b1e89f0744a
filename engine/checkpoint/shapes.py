"""Every tensor a DeepSeek-V4 checkpoint holds: published name -> (kind, logical shape), from the config.

Kinds say what a tensor is (``lin`` a linear [out, in], ``norm`` an RMSNorm weight [d], ``embed``
the embedding [vocab, d], ``hc`` an mHC mixing matrix, ``small``/``scale`` small float vectors,
``tid2eid`` the hash-routing table [vocab, k]); the stored format comes from the name
(engine/checkpoint/formats.py). Read by the checkpoint validator, convert, and the synthetic-weight
and benchmark tools.
"""

from __future__ import annotations

from dsv4.engine.model.config import DSV4Config


def _layer_shapes(cfg: DSV4Config, p: str, spec) -> dict:
    d, D, H, q = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.q_lora_rank
    n = cfg.hc_mult
    G, R = cfg.o_groups, cfg.o_lora_rank
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    s = {
        f"{p}.attn_norm.weight": ("norm", (d,)), f"{p}.ffn_norm.weight": ("norm", (d,)),
        f"{p}.attn.wq_a.weight": ("lin", (q, d)), f"{p}.attn.q_norm.weight": ("norm", (q,)),
        f"{p}.attn.wq_b.weight": ("lin", (H * D, q)), f"{p}.attn.wkv.weight": ("lin", (D, d)),
        f"{p}.attn.kv_norm.weight": ("norm", (D,)), f"{p}.attn.wo_a.weight": ("lin", (G * R, H * D // G)),
        f"{p}.attn.wo_b.weight": ("lin", (d, G * R)), f"{p}.attn.attn_sink": ("small", (H,)),
        f"{p}.ffn.gate.weight": ("lin", (E, d)),
    }
    for k in ("attn", "ffn"):
        s[f"{p}.hc_{k}_fn"] = ("hc", ((2 + n) * n, n * d))
        s[f"{p}.hc_{k}_base"] = ("small", ((2 + n) * n,))
        s[f"{p}.hc_{k}_scale"] = ("scale", (3,))
    if spec.ratio:
        w = 2 * D if spec.attn == "csa" else D
        c = f"{p}.attn.compressor"
        s.update({f"{c}.wkv.weight": ("lin", (w, d)), f"{c}.wgate.weight": ("lin", (w, d)),
                  f"{c}.norm.weight": ("norm", (D,)), f"{c}.ape": ("small", (spec.ratio, w))})
    if spec.attn == "csa":
        Di, Hi = cfg.index_head_dim, cfg.index_n_heads
        ix = f"{p}.attn.indexer"
        s.update({f"{ix}.wq_b.weight": ("lin", (Hi * Di, q)), f"{ix}.weights_proj.weight": ("lin", (Hi, d)),
                  f"{ix}.compressor.wkv.weight": ("lin", (2 * Di, d)),
                  f"{ix}.compressor.wgate.weight": ("lin", (2 * Di, d)),
                  f"{ix}.compressor.norm.weight": ("norm", (Di,)), f"{ix}.compressor.ape": ("small", (4, 2 * Di))})
    if spec.router.value == "hash":
        s[f"{p}.ffn.gate.tid2eid"] = ("tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok))
    else:
        s[f"{p}.ffn.gate.bias"] = ("small", (E,))
    for e in range(E):
        for nm, shp in (("w1", (I, d)), ("w2", (d, I)), ("w3", (I, d))):
            s[f"{p}.ffn.experts.{e}.{nm}.weight"] = ("lin", shp)
    for nm, shp in (("w1", (I * cfg.n_shared_experts, d)), ("w2", (d, I * cfg.n_shared_experts)),
                    ("w3", (I * cfg.n_shared_experts, d))):
        s[f"{p}.ffn.shared_experts.{nm}.weight"] = ("lin", shp)
    return s


def tensor_shapes(cfg: DSV4Config, mtp: bool = True) -> dict:
    """Published name -> (kind, shape) for every tensor of the model."""
    d, n, V = cfg.hidden_size, cfg.hc_mult, cfg.vocab_size
    s = {"embed.weight": ("embed", (V, d)), "head.weight": ("lin", (V, d)), "norm.weight": ("norm", (d,)),
         "hc_head_fn": ("hc", (n, n * d)), "hc_head_base": ("small", (n,)), "hc_head_scale": ("scale", (1,))}
    for spec in cfg.schedule():
        s.update(_layer_shapes(cfg, f"layers.{spec.index}", spec))
    if mtp and cfg.num_nextn_predict_layers:
        p = "mtp.0"
        s.update(_layer_shapes(cfg, p, cfg.mtp_layer(0)))
        s.update({f"{p}.e_proj.weight": ("lin", (d, d)), f"{p}.h_proj.weight": ("lin", (d, d)),
                  f"{p}.enorm.weight": ("norm", (d,)), f"{p}.hnorm.weight": ("norm", (d,)),
                  f"{p}.norm.weight": ("norm", (d,)), f"{p}.hc_head_fn": ("hc", (n, n * d)),
                  f"{p}.hc_head_base": ("small", (n,)), f"{p}.hc_head_scale": ("scale", (1,))})
    return s

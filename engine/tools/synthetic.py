"""Random weights with the published names and shapes, for tests and benchmarks.

``random_tensors`` gives float tensors (norms near 1, linears scaled by 1/sqrt(fan_in), a hash
table with distinct ids per row). Format conversion to the published FP8/FP4 layout is done by
engine/checkpoint.py.
"""

from __future__ import annotations

import torch

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


def random_tensor(kind: str, shape: tuple, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    r = torch.randn(shape, generator=g)
    if kind == "norm":
        t = 1.0 + 0.1 * r
    elif kind == "lin":
        t = r / shape[-1] ** 0.5
    elif kind == "embed":
        t = r
    elif kind == "hc":
        t = r * 0.02
    elif kind == "scale":
        t = 1.0 + 0.1 * r
    else:  # small
        t = 0.5 * r
    return t.to(dtype)


def random_tensors(cfg: DSV4Config, seed: int = 0, mtp: bool = True, dtype=torch.float32) -> dict:
    """Every tensor of the model, random, in float ``dtype`` (tid2eid int32)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (kind, shape) in tensor_shapes(cfg, mtp).items():
        if kind == "tid2eid":
            V, k = shape
            out[name] = torch.argsort(torch.rand(V, cfg.n_routed_experts, generator=g), -1)[:, :k].to(torch.int32)
        else:
            out[name] = random_tensor(kind, shape, g, dtype)
    return out


def tiny_configs() -> dict[str, DSV4Config]:
    """Small random-model configs that together cover SWA, CSA (index_topk below the visible
    entries), HCA, hash and dense routing, hc_mult 4 with 20 Sinkhorn iterations, YaRN and plain RoPE."""
    common = dict(max_position_embeddings=65536, sliding_window=128, hc_mult=4, hc_sinkhorn_iters=20)
    return {
        "swa-csa-hca": DSV4Config(
            vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=96,
            qk_rope_head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=16, compress_ratios=(0, 4, 128, 4),
            index_n_heads=2, index_head_dim=64, index_topk=8, n_routed_experts=8, num_experts_per_tok=3,
            moe_intermediate_size=32, num_hash_layers=2, **common),
        "hca-csa-swa": DSV4Config(
            vocab_size=131, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, head_dim=128,
            qk_rope_head_dim=64, q_lora_rank=24, o_groups=3, o_lora_rank=24, compress_ratios=(128, 4, 0),
            index_n_heads=3, index_head_dim=64, index_topk=5, n_routed_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=24, num_hash_layers=1, routed_scaling_factor=2.5, **common),
        "csa-heavy-plain-rope": DSV4Config(
            vocab_size=89, hidden_size=32, num_hidden_layers=5, num_attention_heads=2, head_dim=80,
            qk_rope_head_dim=16, q_lora_rank=16, o_groups=1, o_lora_rank=32, compress_ratios=(4, 4, 128, 0, 128),
            index_n_heads=4, index_head_dim=32, index_topk=16, n_routed_experts=5, num_experts_per_tok=2,
            moe_intermediate_size=16, num_hash_layers=0, yarn_factor=1.0, compress_rope_theta=50000.0, **common),
    }


def demo_config() -> DSV4Config:
    """The tiny random model the quick start and CLI tests run on: every layer type, the byte
    tokenizer's 262-token vocabulary."""
    return tiny_configs()["swa-csa-hca"].replace(vocab_size=262)

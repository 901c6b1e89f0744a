"""Random weights with the published names and shapes, for tests and benchmarks.

``random_tensors`` gives float tensors (norms near 1, linears scaled by 1/sqrt(fan_in), a hash
table with distinct ids per row). The names and shapes come from
engine/checkpoint/shapes.py; conversion to the published FP8/FP4 layout is engine/checkpoint/encode.py.
"""

from __future__ import annotations

import math

import torch

from dsv4.engine.checkpoint.formats import SCALE, linear_base, published_format
from dsv4.engine.checkpoint.shapes import tensor_shapes
from dsv4.kernels.formats import FP8_BLOCK, MXFP4_GROUP
from dsv4.engine.model.config import DSV4Config


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


def synthetic_stored(cfg, device, seed: int = 0, mtp: bool = False) -> dict:
    """Every tensor of ``cfg`` (with the MTP layer when ``mtp``) in its published stored format,
    random, made on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    gcpu = torch.Generator().manual_seed(seed)
    out = {}
    for name, (kind, shape) in tensor_shapes(cfg, mtp=mtp).items():
        out.update(stored_random(cfg, name, kind, shape, device, g, gcpu))
    return out


def stored_random(cfg, name: str, kind: str, shape: tuple, device, g: torch.Generator,
                  gcpu: torch.Generator) -> dict:
    """One published tensor ``name`` of ``shape``, random, in its stored format on ``device``:
    {name: data} plus its scale for FP8 (ue8m0 per FP8_BLOCK x FP8_BLOCK) and MXFP4 (ue8m0 per
    MXFP4_GROUP). g: a generator on ``device``; gcpu: one on the CPU (small float tensors)."""
    fmt, base = published_format(name), linear_base(name)
    if fmt == "fp8":
        sshape = (math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK))
        e = torch.randint(118, 124, sshape, device=device, dtype=torch.uint8, generator=g)
        return {name: (torch.randn(shape, device=device, generator=g) * 0.5).to(torch.float8_e4m3fn),
                base + SCALE: e.view(torch.float8_e8m0fnu)}
    if fmt == "mxfp4":
        codes = torch.randint(0, 256, (shape[0], shape[1] // 2), device=device, dtype=torch.uint8, generator=g)
        e = torch.randint(119, 123, (shape[0], shape[1] // MXFP4_GROUP), device=device, dtype=torch.uint8,
                          generator=g)
        return {name: codes.view(torch.float4_e2m1fn_x2), base + SCALE: e.view(torch.float8_e8m0fnu)}
    if fmt == "int":
        V, k = shape
        ids = torch.argsort(torch.rand(V, cfg.n_routed_experts, device=device, generator=g), -1)[:, :k]
        return {name: ids.to(torch.int32)}
    t = random_tensor(kind, shape, gcpu, torch.float32)
    return {name: t.to(device, torch.bfloat16 if fmt == "bf16" else torch.float32)}

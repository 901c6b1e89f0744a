"""transformers' DeepseekV4ForCausalLM with the same weights as this engine: the test oracle, and the
``dsv4 bench --compare transformers`` baseline. transformers is optional (imported on use)."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import torch

# The checkout root: its top-level ``kernels/`` folder is this project's (installed as dsv4.kernels),
# but where the root itself is on sys.path (``python -m ...`` or ``python -m pytest`` run from it) it
# shadows Hugging Face's ``kernels`` distribution, which transformers >= 5.25 imports.
_CHECKOUT = Path(__file__).resolve().parents[2]


def _is_checkout(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == _CHECKOUT
    except OSError:
        return False


@contextlib.contextmanager
def _checkout_off_path():
    """While importing transformers: the checkout root off sys.path, and a ``kernels`` module that
    was wrongly taken from the checkout's folder forgotten, so ``import kernels`` finds the real one."""
    saved = list(sys.path)
    sys.path[:] = [e for e in sys.path if not _is_checkout(e)]
    wrong = sys.modules.get("kernels")
    if wrong is not None and Path(getattr(wrong, "__file__", "") or "/").resolve().parent == _CHECKOUT / "kernels":
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            del sys.modules[name]
    try:
        yield
    finally:
        sys.path[:] = saved


def transformers_names(*names: str) -> tuple:
    """``from transformers import <names>`` (raises ImportError as that would), immune to the
    checkout's ``kernels/`` folder shadowing Hugging Face's ``kernels``. -> the objects, in order."""
    with _checkout_off_path():
        import transformers

        try:
            return tuple(getattr(transformers, n) for n in names)
        except AttributeError as e:
            raise ImportError(f"transformers {transformers.__version__} has no {e.name}") from None


def hf_config(cfg):
    (DeepseekV4Config,) = transformers_names("DeepseekV4Config")

    return DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim, q_lora_rank=cfg.q_lora_rank, num_experts_per_tok=cfg.num_experts_per_tok,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, rope_theta=cfg.rope_theta,
        compress_ratios=list(cfg.compress_ratios), num_hash_layers=cfg.num_hash_layers,
        qk_rope_head_dim=cfg.qk_rope_head_dim, compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters=({"rope_type": "yarn", "factor": cfg.yarn_factor,
                          "original_max_position_embeddings": cfg.yarn_original_max_position,
                          "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow}
                         if cfg.yarn_factor != 1.0 else None),
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.sliding_window, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
    )


_SIMPLE = [
    (r"^embed\.weight$", "model.embed_tokens.weight"), (r"^head\.weight$", "lm_head.weight"),
    (r"^norm\.weight$", "model.norm.weight"), (r"^hc_head_fn$", "model.hc_head.hc_fn"),
    (r"^hc_head_base$", "model.hc_head.hc_base"), (r"^hc_head_scale$", "model.hc_head.hc_scale"),
]
_LAYER = [
    ("attn_norm.weight", "input_layernorm.weight"), ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"), ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"), ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"), ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"), ("attn.attn_sink", "self_attn.sinks"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
]


def hf_state_dict(cfg, tensors: dict) -> dict:
    """Published names -> transformers names (experts stacked into gate_up_proj / down_proj)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("mtp."):
            continue
        for pat, hf in _SIMPLE:
            if re.match(pat, name):
                out[hf] = t
        m = re.match(r"^layers\.(\d+)\.(.*)$", name)
        if m:
            i, rest = m.groups()
            for ours, hf in _LAYER:
                if rest == ours:
                    out[f"model.layers.{i}.{hf}"] = t.long() if ours.endswith("tid2eid") else t
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}.ffn.experts"
        E = cfg.n_routed_experts
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}.{e}.w1.weight"], tensors[f"{p}.{e}.w3.weight"]], 0) for e in range(E)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{p}.{e}.w2.weight"] for e in range(E)])
    return out


def build_hf_model(cfg, tensors: dict, device="cpu"):
    """tensors: published name -> float tensor (logical weights). -> float32 model in eval mode."""
    (DeepseekV4ForCausalLM,) = transformers_names("DeepseekV4ForCausalLM")

    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    sd = {k: v.to(device) for k, v in hf_state_dict(cfg, tensors).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "inv_freq" not in k]
    if missing or unexpected:
        raise RuntimeError(f"transformers' DeepseekV4 does not match these weights: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model


def float32_bytes(cfg) -> int:
    """Bytes of the model (without MTP) held in float32, as transformers would hold it."""
    from dsv4.engine.checkpoint.shapes import tensor_shapes

    n = 0
    for _kind, shape in tensor_shapes(cfg, mtp=False).values():
        k = 1
        for s in shape:
            k *= s
        n += k
    return 4 * n


@contextlib.contextmanager
def stable_topk():
    """Make Tensor.topk / torch.topk break ties by the lower index (this project's rule)."""
    orig_method, orig_fn = torch.Tensor.topk, torch.topk

    def topk(x, k, dim=-1, largest=True, sorted=True):
        idx = torch.sort(x, dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
        return torch.return_types.topk((x.gather(dim, idx), idx))

    torch.Tensor.topk = topk
    torch.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk, torch.topk = orig_method, orig_fn

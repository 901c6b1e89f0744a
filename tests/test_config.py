"""DSV4Config: presets, both config.json spellings, the layer schedule, and one clear error per invalid case."""

import json

import pytest

from dsv4.engine.model.config import ConfigError, DSV4Config, Router


def test_flash_preset_values_and_schedule():
    c = DSV4Config.flash()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank) == (4096, 43, 64, 1024)
    assert (c.n_routed_experts, c.moe_intermediate_size, c.index_topk, c.routed_scaling_factor) == (256, 2048, 512, 1.5)
    s = c.schedule()
    assert [ly.attn for ly in s[:4]] == ["swa", "swa", "csa", "hca"]
    assert sum(ly.attn == "csa" for ly in s) == 21 and sum(ly.attn == "hca" for ly in s) == 20
    assert [ly.router for ly in s[:4]] == [Router.HASH] * 3 + [Router.DENSE]
    assert not s[0].yarn and s[2].yarn


def test_pro_preset_values_and_schedule():
    c = DSV4Config.pro()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.o_groups) == (7168, 61, 128, 16)
    assert (c.n_routed_experts, c.moe_intermediate_size, c.index_topk, c.routed_scaling_factor) == (384, 3072, 1024, 2.5)
    s = c.schedule()
    assert [ly.ratio for ly in s[:5]] == [128, 128, 4, 128, 4] and s[-1].ratio == 4
    assert sum(ly.attn == "csa" for ly in s) == 30 and sum(ly.attn == "hca" for ly in s) == 31


PUBLISHED = {
    "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "head_dim": 96, "qk_rope_head_dim": 32,
    "q_lora_rank": 16, "o_groups": 2, "o_lora_rank": 8, "compress_ratios": [0, 4, 128, 0],
    "num_hash_layers": 1, "index_n_heads": 2, "index_head_dim": 64, "index_topk": 4, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 16, "vocab_size": 100, "num_nextn_predict_layers": 1,
    "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
}


def test_published_spelling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED))
    c = DSV4Config.from_pretrained(tmp_path)
    assert c.compress_ratios == (0, 4, 128) and c.mtp_compress_ratios == (0,)
    assert c.num_hash_layers == 1 and c.yarn_factor == 16 and c.qk_rope_head_dim == 32
    assert DSV4Config.from_dict(c.to_dict()) == c


def test_transformers_spelling_equals_published():
    hf = {k: v for k, v in PUBLISHED.items() if k not in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim",
                                                          "rope_scaling", "rope_theta", "compress_rope_theta")}
    hf.update({
        "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        "mlp_layer_types": ["hash_moe", "moe", "moe"],
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        "partial_rotary_factor": 32 / 96,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": 10000},
                            "compress": {"rope_type": "yarn", "rope_theta": 160000, "factor": 16,
                                         "original_max_position_embeddings": 65536, "beta_fast": 32,
                                         "beta_slow": 1}},
    })
    assert DSV4Config.from_dict(hf) == DSV4Config.from_dict(PUBLISHED)


BAD = [
    ({"compress_ratios": [0, 8, 128, 0]}, "not one of 0, 4, 128"),
    ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries for 3 layers"),
    ({"num_attention_heads": 6, "o_groups": 4}, "not divisible by o_groups"),
    ({"qk_rope_head_dim": 128}, "larger than head_dim"),
    ({"qk_rope_head_dim": 31}, "positive even number"),
    ({"num_experts_per_tok": 9}, "exceeds n_routed_experts"),
    ({"index_topk": 0}, "index_topk must be >= 1"),
    ({"num_hash_layers": 4}, "num_hash_layers (4) must be between 0 and 3"),
    ({"index_head_dim": 48}, "must be a power of two"),
    ({"num_key_value_heads": 2}, "shared-KV MQA"),
    ({"scoring_func": "softmax"}, "not supported"),
    ({"sliding_window": 0}, "sliding_window must be >= 1"),
    ({"rope_scaling": {"type": "longrope"}}, "rope type 'longrope' is not supported"),
    ({"layer_types": ["sliding_attention", "bogus", "sliding_attention"], "compress_ratios": None},
     "unknown layer type 'bogus'"),
    ({"hidden_size": "big"}, "hidden_size must be an integer, got 'big'"),
    ({"hidden_size": True}, "hidden_size must be an integer, got True"),
    ({"num_attention_heads": 4.5}, "num_attention_heads must be an integer, got 4.5"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number, got 'tiny'"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
    ({"compress_ratios": "0,4,128,0"}, "compress_ratios must be a list of integers"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
    ({"hidden_size": 0}, "hidden_size must be >= 1, got 0"),
    ({"vocab_size": -5}, "vocab_size must be >= 1, got -5"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_invalid_config_raises_clear_error(change, message):
    d = dict(PUBLISHED)
    d.update(change)
    with pytest.raises(ConfigError) as e:
        DSV4Config.from_dict(d)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_corrupt_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        DSV4Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DSV4Config.from_pretrained(tmp_path)


@pytest.mark.parametrize("doc,message", [
    ([], "config must be a JSON object of model settings, got list"),
    ("flash", "config must be a JSON object of model settings, got str"),
    ({}, "missing required keys vocab_size, hidden_size, num_hidden_layers, num_attention_heads, head_dim, "
         "q_lora_rank, o_lora_rank, n_routed_experts, num_experts_per_tok, moe_intermediate_size, "
         "compress_ratios or layer_types"),
    ({k: v for k, v in PUBLISHED.items() if k != "head_dim"}, "missing required key head_dim "),
    ({k: v for k, v in PUBLISHED.items() if k != "compress_ratios"}, "missing required key compress_ratios or layer_types"),
])
def test_not_a_v4_config_is_refused_not_defaulted_to_flash(tmp_path, doc, message):
    with pytest.raises(ConfigError) as e:
        DSV4Config.from_dict(doc)
    assert message in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as e:
        DSV4Config.from_pretrained(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "config.json")) and message in str(e.value)


def test_faithful_problem_names_the_head_dims():
    assert DSV4Config.flash().faithful_problem() is None
    c = DSV4Config.from_dict(dict(PUBLISHED, qk_rope_head_dim=16))
    assert c.faithful_problem() == "head_dim - qk_rope_head_dim (96 - 16 = 80) is not a multiple of 64"

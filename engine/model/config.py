"""DeepSeek-V4 model configuration, presets and the per-layer schedule.

Field names follow the published ``config.json``. ``compress_ratios`` here holds ONE entry per
main decoder layer (0 = SWA only, 4 = CSA, 128 = HCA); the published file carries one extra
trailing entry per MTP layer, which ``from_dict`` moves to ``mtp_compress_ratios``.

Sources for the presets: the published ``config.json`` of DeepSeek-V4-Flash and DeepSeek-V4-Pro
(values summarised in shared/spec/DSV4.md section 1). The Pro schedule the sheet abbreviates is
``[128, 128] + [4, 128] * 29 + [4]`` for the 61 layers (two HCA bootstrap layers, then CSA/HCA
alternating, 30 CSA and 31 HCA) followed by one trailing MTP ``0``, as in the Pro ``config.json``.
Flash is ``[0, 0] + [4, 128] * 20 + [4]`` (2 SWA, 21 CSA, 20 HCA) plus the MTP ``0``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import get_type_hints

from dsv4.kernels.formats import INDEXER_FP4_GROUP, KV_FP8_GROUP

ATTN_SWA, ATTN_CSA, ATTN_HCA = "swa", "csa", "hca"
RATIO_TO_ATTN = {0: ATTN_SWA, 4: ATTN_CSA, 128: ATTN_HCA}
_HF_LAYER_TYPES = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}


class ConfigError(ValueError):
    """An inconsistent or unreadable model configuration (one clear message)."""


# config.json keys with no safe default: a file without them is not a DeepSeek-V4 config, and
# silently taking the Flash values would build a model of the wrong shape. Alternatives spell the
# same fact in the transformers layout.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "q_lora_rank", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size")
REQUIRED_ONE_OF = (("compress_ratios", "layer_types"),)
# sizes and counts that must be >= 1 (the others may be 0: num_hash_layers, n_shared_experts, MTP layers)
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "q_lora_rank", "o_groups",
                   "o_lora_rank", "index_n_heads", "index_head_dim", "n_routed_experts", "moe_intermediate_size",
                   "max_position_embeddings")


class Router(str, Enum):
    HASH = "hash"
    DENSE = "dense"


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is: attention type, compression ratio, router mode, RoPE kind."""

    index: int
    attn: str  # "swa" | "csa" | "hca"
    ratio: int  # 0, 4 or 128
    router: Router
    yarn: bool  # CSA/HCA layers use YaRN RoPE at compress_rope_theta; SWA layers plain RoPE


@dataclass(frozen=True)
class DSV4Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4,)
    mtp_compress_ratios: tuple[int, ...] = (0,)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn_factor: float = 16.0  # 1.0 disables YaRN
    yarn_original_max_position: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    num_nextn_predict_layers: int = 1
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        object.__setattr__(self, "mtp_compress_ratios", tuple(int(r) for r in self.mtp_compress_ratios))
        self.validate()

    # ----------------------------------------------------------------- presets
    @classmethod
    def flash(cls, **overrides) -> "DSV4Config":
        """DeepSeek-V4-Flash (284B total, ~13B active)."""
        return cls(**overrides)

    @classmethod
    def pro(cls, **overrides) -> "DSV4Config":
        """DeepSeek-V4-Pro (1.6T total, ~49B active)."""
        base = dict(
            hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
            o_groups=16, o_lora_rank=1024, compress_ratios=(128, 128) + (4, 128) * 29 + (4,),
            index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072,
            routed_scaling_factor=2.5,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def preset(cls, name: str) -> "DSV4Config":
        if name == "flash":
            return cls.flash()
        if name == "pro":
            return cls.pro()
        raise ConfigError(f"unknown preset {name!r}: use 'flash' or 'pro'")

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError with one clear message for the first inconsistency found."""
        n = self.num_hidden_layers
        for k in POSITIVE_FIELDS:
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if n < 1:
            raise ConfigError(f"num_hidden_layers must be >= 1, got {n}")
        if len(self.compress_ratios) != n:
            raise ConfigError(
                f"compress_ratios has {len(self.compress_ratios)} entries for {n} layers "
                f"(expected {n}, or {n} + num_nextn_predict_layers in config.json)"
            )
        for i, r in enumerate(self.compress_ratios + self.mtp_compress_ratios):
            if r not in RATIO_TO_ATTN:
                raise ConfigError(f"compress ratio {r} at layer {i} is not one of 0, 4, 128")
        if self.num_key_value_heads != 1:
            raise ConfigError(f"num_key_value_heads must be 1 (shared-KV MQA), got {self.num_key_value_heads}")
        if self.num_attention_heads % self.o_groups:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) is not divisible by o_groups ({self.o_groups})"
            )
        rd = self.qk_rope_head_dim
        if rd > self.head_dim:
            raise ConfigError(f"qk_rope_head_dim ({rd}) is larger than head_dim ({self.head_dim})")
        if rd % 2 or rd <= 0:
            raise ConfigError(f"qk_rope_head_dim must be a positive even number, got {rd}")
        if rd > self.index_head_dim:
            raise ConfigError(f"qk_rope_head_dim ({rd}) is larger than index_head_dim ({self.index_head_dim})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})"
            )
        if self.num_experts_per_tok < 1:
            raise ConfigError(f"num_experts_per_tok must be >= 1, got {self.num_experts_per_tok}")
        if self.index_topk < 1:
            raise ConfigError(f"index_topk must be >= 1, got {self.index_topk}")
        if not 0 <= self.num_hash_layers <= n:
            raise ConfigError(f"num_hash_layers ({self.num_hash_layers}) must be between 0 and {n} layers")
        if self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")
        if self.hc_mult < 1 or self.hc_sinkhorn_iters < 1:
            raise ConfigError("hc_mult and hc_sinkhorn_iters must be >= 1")
        if self.scoring_func != "sqrtsoftplus":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (DeepSeek-V4 uses 'sqrtsoftplus')")
        ih = self.index_head_dim
        if ih & (ih - 1):
            raise ConfigError(f"index_head_dim ({ih}) must be a power of two (Hadamard transform)")
        if not 0 <= self.bos_token_id < self.vocab_size or not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError("bos_token_id and eos_token_id must be inside the vocabulary")

    # --------------------------------------------------------------- schedule
    def layer(self, i: int) -> LayerSpec:
        r = self.compress_ratios[i]
        router = Router.HASH if i < self.num_hash_layers else Router.DENSE
        return LayerSpec(index=i, attn=RATIO_TO_ATTN[r], ratio=r, router=router, yarn=r != 0)

    def schedule(self) -> list[LayerSpec]:
        """Per main layer: attention type (SWA/CSA/HCA), ratio and router mode (hash/dense)."""
        return [self.layer(i) for i in range(self.num_hidden_layers)]

    def mtp_layer(self, k: int = 0) -> LayerSpec:
        r = self.mtp_compress_ratios[k] if k < len(self.mtp_compress_ratios) else 0
        return LayerSpec(index=self.num_hidden_layers + k, attn=RATIO_TO_ATTN[r], ratio=r,
                         router=Router.DENSE, yarn=r != 0)

    def faithful_problem(self) -> str | None:
        """Why faithful precision cannot run this model (its cache formats need the non-RoPE KV
        channels in whole FP8 groups of KV_FP8_GROUP and the indexer keys in whole FP4 groups of
        INDEXER_FP4_GROUP), or None when it can."""
        if self.nope_head_dim % KV_FP8_GROUP:
            return (f"head_dim - qk_rope_head_dim ({self.head_dim} - {self.qk_rope_head_dim} = {self.nope_head_dim}) "
                    f"is not a multiple of {KV_FP8_GROUP}")
        if self.index_head_dim % INDEXER_FP4_GROUP:
            return f"index_head_dim ({self.index_head_dim}) is not a multiple of {INDEXER_FP4_GROUP}"
        return None

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def replace(self, **changes) -> "DSV4Config":
        return dataclasses.replace(self, **changes)

    def layer_range(self, start: int, stop: int) -> "DSV4Config":
        """The same model cut to its main layers start..stop-1 (the one place a config is cut: bench
        --layers N is layer_range(0, N); the GPU tests take one CSA and one HCA layer, (2, 4)). Each
        kept layer keeps its compress ratio and its router (hash layers stay hash layers)."""
        if not 0 <= start < stop <= self.num_hidden_layers:
            raise ConfigError(f"layers {start}..{stop - 1} are not within the model's {self.num_hidden_layers}")
        hashed = max(0, min(self.num_hash_layers, stop) - start)  # the hash layers are the first ones
        return self.replace(num_hidden_layers=stop - start, compress_ratios=self.compress_ratios[start:stop],
                            num_hash_layers=hashed)

    # -------------------------------------------------------------- file I/O
    @classmethod
    def from_dict(cls, d: dict) -> "DSV4Config":
        """Read either the published config.json spelling or the transformers spelling.

        Refuses (ConfigError, naming the key) a non-object, missing required keys (REQUIRED_KEYS) and
        values of the wrong type; keys it does not know are kept in ``extra``."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object of model settings, got {type(d).__name__}")
        d = dict(d)
        missing = [k for k in REQUIRED_KEYS if d.get(k) is None]
        missing += [" or ".join(alts) for alts in REQUIRED_ONE_OF if all(d.get(a) is None for a in alts)]
        if missing:
            raise ConfigError(f"config is missing required key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)} (not a DeepSeek-V4 config.json?)")
        _check_types(cls, d)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "compress_ratios", "mtp_compress_ratios"}
        kw = {k: d[k] for k in known if k in d and d[k] is not None}
        n = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        n_mtp = int(d.get("num_nextn_predict_layers", 1) or 0)
        kw["num_nextn_predict_layers"] = n_mtp
        ratios = None
        if d.get("compress_ratios") is not None:
            ratios = [int(r) for r in d["compress_ratios"]]
        elif d.get("layer_types") is not None:
            rates = dict(_HF_LAYER_TYPES)
            for name, r in (d.get("compress_rates") or {}).items():
                rates[name] = int(r)
            try:
                ratios = [rates[t] for t in d["layer_types"]]
            except KeyError as e:
                raise ConfigError(f"unknown layer type {e.args[0]!r} in layer_types") from None
        if ratios is not None:
            if len(ratios) < n:
                raise ConfigError(f"compress_ratios has {len(ratios)} entries for {n} layers")
            kw["compress_ratios"] = tuple(ratios[:n])
            kw["mtp_compress_ratios"] = tuple(ratios[n:n + n_mtp]) or (0,) * n_mtp
        if "mlp_layer_types" in d and d["mlp_layer_types"] is not None and "num_hash_layers" not in d:
            types = list(d["mlp_layer_types"])
            nh = 0
            while nh < len(types) and types[nh] == "hash_moe":
                nh += 1
            if "hash_moe" in types[nh:]:
                raise ConfigError("mlp_layer_types must list all hash_moe layers first")
            kw["num_hash_layers"] = nh
        if "qk_rope_head_dim" not in d and d.get("partial_rotary_factor") is not None:
            kw["qk_rope_head_dim"] = int(round(int(d.get("head_dim", cls.head_dim)) * float(d["partial_rotary_factor"])))
        rope = d.get("rope_scaling")
        rp = d.get("rope_parameters")
        if rope is None and isinstance(rp, dict):
            if isinstance(rp.get("compress"), dict):
                rope = rp["compress"]
                if "rope_theta" in rope:
                    kw["compress_rope_theta"] = float(rope["rope_theta"])
                if isinstance(rp.get("main"), dict) and "rope_theta" in rp["main"]:
                    kw["rope_theta"] = float(rp["main"]["rope_theta"])
            else:
                rope = rp
        if isinstance(rope, dict):
            rtype = rope.get("rope_type", rope.get("type", "default"))
            if rtype == "yarn":
                kw["yarn_factor"] = float(rope.get("factor", 16.0))
                kw["yarn_original_max_position"] = int(rope.get("original_max_position_embeddings", 65536))
                kw["yarn_beta_fast"] = float(rope.get("beta_fast") or 32.0)
                kw["yarn_beta_slow"] = float(rope.get("beta_slow") or 1.0)
            elif rtype == "default":
                kw["yarn_factor"] = 1.0
            else:
                raise ConfigError(f"rope type {rtype!r} is not supported (expected 'yarn')")
        for k in ("eos_token_id", "bos_token_id"):
            if isinstance(kw.get(k), list):
                kw[k] = int(kw[k][0])
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kw, extra=extra)
        except TypeError as e:
            raise ConfigError(f"bad config value: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DSV4Config":
        """Read ``path``/config.json (or the file ``path``); errors name the file."""
        path = Path(path)
        f = path / "config.json" if path.is_dir() else path
        if not f.exists():
            raise ConfigError(f"{f}: no config.json found")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except (UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{f}: cannot read ({type(e).__name__})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{f}: {e}") from None

    def to_dict(self) -> dict:
        """The published config.json spelling (MTP ratios appended to compress_ratios)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("extra", "compress_ratios", "mtp_compress_ratios")
             and not f.name.startswith("yarn_")}
        d["compress_ratios"] = list(self.compress_ratios) + list(self.mtp_compress_ratios[: self.num_nextn_predict_layers])
        d["model_type"] = "deepseek_v4"
        d["architectures"] = ["DeepseekV4ForCausalLM"]
        if self.yarn_factor != 1.0:
            d["rope_scaling"] = {"type": "yarn", "factor": self.yarn_factor,
                                 "original_max_position_embeddings": self.yarn_original_max_position,
                                 "beta_fast": self.yarn_beta_fast, "beta_slow": self.yarn_beta_slow}
        return d


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_types(cls, d: dict) -> None:
    """ConfigError naming the first key of ``d`` whose value has the wrong JSON type for its field
    (an integer field refuses 2.5, "big" and true; a number field takes integers too)."""
    hints = get_type_hints(cls)
    for k, v in d.items():
        want = hints.get(k)
        if v is None or want is None or k == "extra":
            continue
        if k in ("compress_ratios", "mtp_compress_ratios"):
            if not isinstance(v, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in v):
                raise ConfigError(f"{k} must be a list of integers, got {v!r}")
            continue
        if k in ("bos_token_id", "eos_token_id") and isinstance(v, list) and v:
            v = v[0]  # some configs list several stop ids
        if want is bool:
            ok = isinstance(v, bool)
        elif want is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif want is str:
            ok = isinstance(v, str)
        else:
            continue
        if not ok:
            raise ConfigError(f"{k} must be {_TYPE_NAMES[want]}, got {v!r}")
    for k in ("layer_types", "mlp_layer_types"):
        if d.get(k) is not None and not (isinstance(d[k], list) and all(isinstance(t, str) for t in d[k])):
            raise ConfigError(f"{k} must be a list of strings, got {d[k]!r}")
    for k in ("rope_scaling", "rope_parameters", "compress_rates"):
        if d.get(k) is not None and not isinstance(d[k], dict):
            raise ConfigError(f"{k} must be an object, got {d[k]!r}")

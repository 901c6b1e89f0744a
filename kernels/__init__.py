"""Every numeric op the model needs, as plain functions over tensors (no files, no configs).

Each op has a torch reference (the math is the oracle); ``dispatch`` picks a faster registered
implementation where one exists for the input's device (see kernels/dispatch.py).
"""

from __future__ import annotations

from . import quant
from .reference.attention import decode_attention as _dattention_ref, sparse_mqa_attention as _attention_ref
from .reference.entries import entry_rows as _entry_rows_ref, store_entry as _store_entry_ref
from .reference.compress import compress_decode as _cdecode_ref, compress_windows as _compress_ref
from .dispatch import backends, implementation, register, use_backend
from .reference.indexer import indexer_scores as _iscores_ref, indexer_topk as _itopk_ref
from .reference.linear import QWeight, grouped_linear_reference as _glinear_ref, linear_reference as _linear_ref
from .reference.mhc import hc_head as _hc_head_ref, mhc_post as _mhc_post_ref, mhc_pre as _mhc_pre_ref, sinkhorn
from .reference.moe import (ExpertSet, hash_route as _hash_ref, routed_experts as _experts_ref, router_scores as _rscores_ref, router_topk as _rtopk_ref, swiglu as _swiglu_ref)
from .reference.norm import rms_norm as _rms_ref
from .reference.rope import (apply_rope as _rope_ref, rms_norm_rope as _norm_rope_ref, rope_cos_sin as _cos_sin_ref, rope_inv_freq)

_REFS = {
    "rope_cos_sin": _cos_sin_ref, "entry_rows": _entry_rows_ref, "rms_norm_rope": _norm_rope_ref,
    "linear": _linear_ref, "grouped_linear": _glinear_ref, "rms_norm": _rms_ref, "apply_rope": _rope_ref, "mhc_pre": _mhc_pre_ref,
    "mhc_post": _mhc_post_ref, "hc_head": _hc_head_ref, "sparse_mqa_attention": _attention_ref,
    "compress_windows": _compress_ref, "indexer_scores": _iscores_ref, "indexer_topk": _itopk_ref,
    "router_scores": _rscores_ref, "router_topk": _rtopk_ref, "swiglu": _swiglu_ref, "routed_experts": _experts_ref,
    "decode_attention": _dattention_ref, "store_entry": _store_entry_ref, "compress_decode": _cdecode_ref,
    "hash_route": _hash_ref,
}
for _name, _fn in _REFS.items():
    register(_name, "reference", _fn)


def _register_gpu_kernels() -> None:
    """Triton kernels under the "cuda" backend, when CUDA and Triton are both present."""
    import torch

    if not torch.cuda.is_available():
        return
    try:
        from .triton import (attention as triton_attention, compress as triton_compress, elementwise as triton_elementwise, linear as triton_linear, mhc as triton_mhc, moe as triton_moe, router as triton_router)
    except ImportError:
        return
    register("apply_rope", "cuda", triton_elementwise.apply_rope_triton)
    register("swiglu", "cuda", triton_elementwise.swiglu_triton)
    register("rope_cos_sin", "cuda", triton_elementwise.rope_cos_sin_triton)
    register("entry_rows", "cuda", triton_elementwise.entry_rows_triton)
    register("rms_norm_rope", "cuda", triton_elementwise.rms_norm_rope_triton)
    register("linear", "cuda", triton_linear.linear_triton)
    register("grouped_linear", "cuda", triton_linear.grouped_linear_triton)
    register("mhc_pre", "cuda", triton_mhc.mhc_pre_triton)
    register("mhc_post", "cuda", triton_mhc.mhc_post_triton)
    register("rms_norm", "cuda", triton_mhc.rms_norm_triton)
    register("routed_experts", "cuda", triton_moe.routed_experts_triton)
    register("store_entry", "cuda", triton_attention.store_entry_triton)
    register("decode_attention", "cuda", triton_attention.decode_attention_triton)
    register("compress_decode", "cuda", triton_compress.compress_decode_triton)
    register("router_scores", "cuda", triton_router.router_scores_triton)
    register("router_topk", "cuda", triton_router.router_topk_triton)
    register("hash_route", "cuda", triton_router.hash_route_triton)


_register_gpu_kernels()


def _dispatching(name: str):
    ref = _REFS[name]

    def call(x, *args, **kwargs):
        return implementation(name, x.device.type)(x, *args, **kwargs)

    call.__name__ = name
    call.__doc__ = ref.__doc__
    return call


linear = _dispatching("linear")
grouped_linear = _dispatching("grouped_linear")
rms_norm = _dispatching("rms_norm")
apply_rope = _dispatching("apply_rope")
mhc_pre = _dispatching("mhc_pre")
mhc_post = _dispatching("mhc_post")
hc_head = _dispatching("hc_head")
sparse_mqa_attention = _dispatching("sparse_mqa_attention")
compress_windows = _dispatching("compress_windows")
indexer_scores = _dispatching("indexer_scores")
indexer_topk = _dispatching("indexer_topk")
router_scores = _dispatching("router_scores")
router_topk = _dispatching("router_topk")
swiglu = _dispatching("swiglu")
routed_experts = _dispatching("routed_experts")
decode_attention = _dispatching("decode_attention")
store_entry = _dispatching("store_entry")
compress_decode = _dispatching("compress_decode")
hash_route = _dispatching("hash_route")
rope_cos_sin = _dispatching("rope_cos_sin")
entry_rows = _dispatching("entry_rows")
rms_norm_rope = _dispatching("rms_norm_rope")

__all__ = [
    "ExpertSet", "QWeight", "compress_decode", "decode_attention", "entry_rows", "routed_experts", "store_entry", "apply_rope", "backends", "compress_windows", "grouped_linear", "hash_route", "hc_head",
    "indexer_scores",
    "indexer_topk", "linear", "mhc_post", "mhc_pre", "quant", "register", "rms_norm", "rms_norm_rope", "rope_cos_sin",
    "rope_inv_freq", "router_scores", "router_topk", "sinkhorn", "sparse_mqa_attention", "swiglu",
    "use_backend",
]

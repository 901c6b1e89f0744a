"""Triton kernels for CUDA (Hopper, sm_90), each registered against its torch reference.

``KERNELS`` lists them: op name -> (kernel, supports). ``supports`` takes the op's arguments and
says whether the kernel handles them (shapes, formats, no autograd); where it does not, dispatch
runs the reference and records that it did (kernels/dispatch.py). Adding a GPU kernel for an op is
one row here.
"""

from __future__ import annotations

from . import attention, compress, decode_indexer, elementwise, indexer_quant, mhc, router
from . import prefill_attention, prefill_experts, prefill_indexer, prefill_linear

KERNELS = {
    "linear": (prefill_linear.linear_triton, prefill_linear.linear_supported),  # GEMM for many rows, else GEMV
    "grouped_linear": (prefill_linear.grouped_linear_triton, prefill_linear.grouped_linear_supported),
    "mhc_pre": (mhc.mhc_pre_triton, mhc.mhc_supported),
    "mhc_post": (mhc.mhc_post_triton, mhc.mhc_post_supported),
    "rms_norm": (mhc.rms_norm_triton, mhc.rms_norm_supported),
    "apply_rope": (elementwise.apply_rope_triton, elementwise.apply_rope_supported),
    "rms_norm_rope": (elementwise.rms_norm_rope_triton, elementwise.rms_norm_rope_supported),
    "swiglu": (elementwise.swiglu_triton, elementwise.swiglu_supported),
    "rope_cos_sin": (elementwise.rope_cos_sin_triton, elementwise.rope_cos_sin_supported),
    "entry_rows": (elementwise.entry_rows_triton, elementwise.entry_rows_supported),
    "routed_experts": (prefill_experts.routed_experts_triton, prefill_experts.routed_experts_supported),
    "store_entry": (attention.store_entry_triton, attention.store_entry_supported),
    "decode_attention": (attention.decode_attention_triton, attention.decode_attention_supported),
    "chunk_attention": (prefill_attention.chunk_attention_triton, prefill_attention.chunk_attention_supported),
    "indexer_scores": (prefill_indexer.indexer_scores_triton, prefill_indexer.indexer_scores_supported),
    "indexer_select_decode": (decode_indexer.indexer_select_decode_triton,
                              decode_indexer.indexer_select_decode_supported),
    "indexer_quant": (indexer_quant.indexer_quant_triton, indexer_quant.indexer_quant_supported),
    "compress_decode": (compress.compress_decode_triton, compress.compress_decode_supported),
    "compress_windows": (compress.compress_windows_triton, compress.compress_windows_supported),
    "router_scores": (router.router_scores_triton, router.router_scores_supported),
    "router_topk": (router.router_topk_triton, router.router_topk_supported),
    "hash_route": (router.hash_route_triton, router.hash_route_supported),
}

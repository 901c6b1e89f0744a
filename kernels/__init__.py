"""Every numeric op the model needs, as plain functions over tensors (no files, no configs).

Each op is one line below: its name and its torch reference (kernels/reference/, the math is the
oracle). Calls go through ``dispatch.call``, which runs a registered GPU kernel (kernels/triton/,
``KERNELS``) where the inputs' device and shapes suit it, else the reference, and records which ran.
Adding an op: the reference function, one line here, and (for a GPU kernel) one row in
kernels/triton/__init__.py.
"""

from __future__ import annotations

import functools
import sys
import warnings

from . import dispatch, formats, quant
from .dispatch import backends, implementation, register, use_backend
from .reference import attention as _attention, compress as _compress, entries as _entries, indexer as _indexer
from .reference import chunk_attention as _chunk_attention
from .reference import linear as _linear, mhc as _mhc, moe as _moe, norm as _norm, rope as _rope
from .reference.linear import QWeight
from .reference.mhc import sinkhorn
from .reference.moe import ExpertSet
from .reference.rope import rope_inv_freq


def _op(name: str, reference):
    """Register ``reference`` as op ``name``'s oracle; return the dispatching function."""
    register(name, "reference", reference)

    @functools.wraps(reference)
    def run(*args, **kwargs):
        return dispatch.call(name, *args, **kwargs)

    run.__name__ = run.__qualname__ = name
    return run


linear = _op("linear", _linear.linear_reference)
grouped_linear = _op("grouped_linear", _linear.grouped_linear_reference)
rms_norm = _op("rms_norm", _norm.rms_norm)
apply_rope = _op("apply_rope", _rope.apply_rope)
rms_norm_rope = _op("rms_norm_rope", _rope.rms_norm_rope)
rope_cos_sin = _op("rope_cos_sin", _rope.rope_cos_sin)
mhc_pre = _op("mhc_pre", _mhc.mhc_pre)
mhc_post = _op("mhc_post", _mhc.mhc_post)
hc_head = _op("hc_head", _mhc.hc_head)
sparse_mqa_attention = _op("sparse_mqa_attention", _attention.sparse_mqa_attention)
decode_attention = _op("decode_attention", _attention.decode_attention)
chunk_attention = _op("chunk_attention", _chunk_attention.chunk_attention)
compress_windows = _op("compress_windows", _compress.compress_windows)
compress_decode = _op("compress_decode", _compress.compress_decode)
indexer_scores = _op("indexer_scores", _indexer.indexer_scores)
indexer_topk = _op("indexer_topk", _indexer.indexer_topk)
indexer_select_decode = _op("indexer_select_decode", _indexer.indexer_select_decode)
indexer_quant = _op("indexer_quant", quant.indexer_quant_dequant)
router_scores = _op("router_scores", _moe.router_scores)
router_topk = _op("router_topk", _moe.router_topk)
hash_route = _op("hash_route", _moe.hash_route)
swiglu = _op("swiglu", _moe.swiglu)
routed_experts = _op("routed_experts", _moe.routed_experts)
store_entry = _op("store_entry", _entries.store_entry)
entry_rows = _op("entry_rows", _entries.entry_rows)


def register_triton_kernels(device: str = "cuda") -> None:
    """Register every kernel of kernels/triton/ for ``device`` (tests register them for "cpu" to run
    them in Triton's interpreter)."""
    from .triton import KERNELS

    for name, (fn, supports) in KERNELS.items():
        register(name, "triton", fn, device=device, supports=supports)


def _load_gpu_kernels() -> None:
    """On a machine with CUDA, register the Triton kernels. If they fail to import, say so loudly
    with the cause, and record it: building a CUDA model then fails (dispatch.require_kernels)
    unless DSV4_KERNELS=reference asks for the references."""
    import torch

    if not torch.cuda.is_available():
        return
    try:
        register_triton_kernels("cuda")
    except Exception as e:  # ImportError, or a compile-time error inside a kernel module
        cause = f"{type(e).__name__}: {e}"
        dispatch.mark_unavailable("cuda", cause)
        if dispatch.mode() != "reference":
            warnings.warn(f"dsv4: the Triton GPU kernels failed to load ({cause}); CUDA models will refuse to "
                          "run unless DSV4_KERNELS=reference", RuntimeWarning, stacklevel=2)
            print(f"dsv4: warning: the Triton GPU kernels failed to load: {cause}", file=sys.stderr)


_load_gpu_kernels()

__all__ = [
    "ExpertSet", "QWeight", "apply_rope", "backends", "chunk_attention", "compress_decode", "compress_windows",
    "decode_attention",
    "dispatch", "entry_rows", "formats", "grouped_linear", "hash_route", "hc_head", "implementation",
    "indexer_quant", "indexer_scores", "indexer_select_decode", "indexer_topk", "linear", "mhc_post", "mhc_pre",
    "quant", "register",
    "register_triton_kernels", "rms_norm", "rms_norm_rope", "rope_cos_sin", "rope_inv_freq", "router_scores",
    "router_topk", "routed_experts", "sinkhorn", "sparse_mqa_attention", "store_entry", "swiglu", "use_backend",
]

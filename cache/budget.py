"""Memory budgets from the cache schema: what a context costs, by layer type and component, and the
longest context a byte budget holds.

Everything here is shapes and bytes (cache/schema.py's accounting); no model math. Units: bytes,
tokens.
"""

from __future__ import annotations

from .schema import CacheSchema, layer_block_breakdown, v32_bytes

MAX_SEARCH_TOKENS = 1 << 40  # longest_context never answers more than this without a model limit


def plain_bf16_bytes(cfg, tokens: int) -> int:
    """A plain attention cache of the same width: K and V of hidden_size BF16 channels (2 bytes) per
    token, in every layer. -> bytes for ``tokens`` tokens."""
    return 2 * cfg.hidden_size * 2 * cfg.num_hidden_layers * tokens


def context_report(cfg, schema: CacheSchema, tokens: int) -> dict:
    """The cache of one request of ``tokens`` tokens (>= 1), by layer type and component.

    -> {"context_tokens", "total_bytes", "precision", "by_type": {attn: {fp8, bf16, scales, fp4, f32,
    window, state, total, layers, entries_per_block, bytes_per_entry: {...}, block_bytes_per_layer,
    bytes_per_token}}, "v32_bytes", "ratio_to_v32", "plain_bf16_bytes", "ratio_to_plain_bf16"}."""
    if tokens < 1:
        raise ValueError(f"a context holds at least 1 token, got {tokens}")
    acc = schema.bytes_for_context(tokens)
    per_type = {}
    for attn, t in acc["by_type"].items():
        ly = next(x for x in schema.layers if x.attn == attn)
        per_entry = {"fp8": ly.kv.fp8_bytes, "bf16": ly.kv.bf16_bytes, "scales": ly.kv.scale_bytes,
                     "fp4": ly.idx.fp4_bytes if ly.idx else 0, "f32": ly.kv.f32_bytes}
        if ly.idx:
            per_entry["scales"] += ly.idx.scale_bytes
            per_entry["f32"] += ly.idx.f32_bytes
        per_type[attn] = {**t, "entries_per_block": ly.entries_per_block, "bytes_per_entry": per_entry,
                          "block_bytes_per_layer": layer_block_breakdown(ly)["total"],
                          "bytes_per_token": t["total"] / tokens}
    v32, plain = v32_bytes(tokens), plain_bf16_bytes(cfg, tokens)
    return {"context_tokens": tokens, "total_bytes": acc["total"], "precision": str(schema.mode),
            "by_type": per_type, "v32_bytes": v32, "ratio_to_v32": acc["total"] / v32, "plain_bf16_bytes": plain,
            "ratio_to_plain_bf16": acc["total"] / plain}


def longest_context(schema: CacheSchema, budget: int, max_tokens: int | None = None) -> int:
    """Largest token count whose cache fits in ``budget`` bytes, at most ``max_tokens`` (the model's
    max_position_embeddings; None: no model limit). 0 when not even one token fits.

    The cost is non-decreasing in the token count (whole blocks of entries plus fixed window and
    state bytes), so a doubling search then bisection finds it in O(log) evaluations."""
    cap = MAX_SEARCH_TOKENS if max_tokens is None else min(max_tokens, MAX_SEARCH_TOKENS)
    if cap < 1 or schema.bytes_for_context(1)["total"] > budget:
        return 0
    if schema.bytes_for_context(cap)["total"] <= budget:
        return cap
    lo, hi = 1, 2  # invariant: cost(lo) <= budget < cost(hi) once the doubling stops
    while hi < cap and schema.bytes_for_context(hi)["total"] <= budget:
        lo, hi = hi, min(2 * hi, cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if schema.bytes_for_context(mid)["total"] <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def budget_report(schema: CacheSchema, budget: int, max_tokens: int | None) -> dict:
    """-> {"budget_bytes", "longest_context_tokens", "capped_at_model_maximum": bool,
    "model_max_tokens", "uncapped_tokens" (what the budget alone would hold, up to MAX_SEARCH_TOKENS)}."""
    free = longest_context(schema, budget)
    n = free if max_tokens is None else min(free, max_tokens)
    return {"budget_bytes": budget, "longest_context_tokens": n, "model_max_tokens": max_tokens,
            "capped_at_model_maximum": max_tokens is not None and free > max_tokens, "uncapped_tokens": free}

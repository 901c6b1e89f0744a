"""Single-request generation: prefill (in chunks), decode one token at a time, reset.

All per-request state lives in a CacheManager slot; a Session only tracks which slot it owns.
Prefill runs in chunks (``default_prefill_chunk``: sized from the free memory and the model) so its
memory stays bounded at any prompt length; it reports progress per chunk, and an interrupt
(Ctrl+C) or error leaves the cache as it was after the last complete chunk (``PrefillInterrupted``).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from dsv4.cache import CacheError, CacheManager, CacheSchema
from dsv4.kernels import dispatch

from .decode import DecodeRunner
from .generate import decode_tokens
from dsv4.engine.model.model import Model

# Bounds of the automatic prefill chunk (tokens), the share of the free memory its transients may
# use, and the most they may use (the bound: peak <= weights + KV cache + 8 GiB).
MIN_CHUNK, MAX_CHUNK, MEMORY_SHARE, TRANSIENT_BUDGET = 128, 16384, 0.5, 7 << 30


class PrefillInterrupted(KeyboardInterrupt):
    """Ctrl+C during a prefill: the cache holds the prompt's first ``done`` of ``total`` tokens (the
    complete chunks; the cut chunk was rolled back). A KeyboardInterrupt, so callers that only catch
    that still see it; the session stays usable (continue with the rest, or ``reset``)."""

    def __init__(self, done: int, total: int):
        super().__init__(f"prefill interrupted after {done} of {total} tokens")
        self.done, self.total = done, total


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA: the driver's count plus what torch's allocator holds unused;
    CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def prefill_bytes_per_token(cfg, dtype: torch.dtype, kernels: bool = False) -> int:
    """Upper estimate of the chunk forward's transient bytes per chunk token, beyond the fixed tiles
    (attention / indexer tiles and one dequantised weight).

    Reference path: the residual streams and mHC copies, the queries [H, D] and their RoPE /
    attention-output copies, the compressors' float32 C and Z rows, the indexer's queries, and the
    routed experts' hidden rows (k per token), at the model's element size or float32.
    Kernel path (``kernels``: the GPU kernels, which keep no dequantised weights and write many rows
    as bf16 / FP8): what is alive at its peak, the attention sub-layer: the float32 streams, the
    sub-layer's input and its norm (float32), the queries as the GEMM wrote them (float32), normed and
    rotated (bf16), and the attention output (float32), plus the indexer's bf16 queries: 0.44 MB a
    token at V4-Flash, against 0.38-0.39 MB measured (H100, 4 Flash layers, faithful: peak beyond
    weights + cache 2.31 / 2.96 / 5.88 / 11.83 GiB at chunks of 6400 / 8192 / 16384 / 32768,
    bench/results/h100_prefill_chunks.json). Checked on V4-Flash only; the kernel-path count leaves
    out the MoE rows and the model's dtype (its peak is the attention sub-layer, in float32 and bf16).
    The 65k-token GPU test (tests/test_gpu_prefill.py) holds the whole peak under 8 GiB."""
    if kernels:
        return (4 * cfg.hc_mult * cfg.hidden_size + 2 * 4 * cfg.hidden_size
                + (4 + 2 + 4) * cfg.num_attention_heads * cfg.head_dim + 2 * cfg.index_n_heads * cfg.index_head_dim)
    el = max(torch.finfo(dtype).bits // 8, 4)  # much of the reference's chunk forward runs in float32
    streams = 6 * cfg.hc_mult * cfg.hidden_size
    rest = (4 * cfg.num_attention_heads * cfg.head_dim + 3 * cfg.index_n_heads * cfg.index_head_dim
            + 8 * cfg.head_dim + 2 * cfg.q_lora_rank + 2 * cfg.o_groups * cfg.o_lora_rank
            + 3 * cfg.num_experts_per_tok * cfg.moe_intermediate_size)
    return (streams + rest) * el


def fixed_prefill_bytes(cfg, kernels: bool = False) -> int:
    """The chunk forward's transients that do not grow with the chunk: on the reference path one
    weight dequantised to float32 (the largest, the vocabulary head) and the attention / indexer
    tiles (a few hundred MiB); on the kernel path (weights read as stored) 2 GiB for the tiles and
    what grows with the context (H100, chunks of 6400: peak beyond weights + cache 2.31 GiB at 8k,
    2.62 GiB at 128k; H200: 4.07 GiB at 1M)."""
    return (2 << 30) if kernels else 4 * cfg.vocab_size * cfg.hidden_size + (1 << 30)


def default_prefill_chunk(model: Model, device: torch.device | str | None = None,
                          budget: int = TRANSIENT_BUDGET) -> int:
    """Prefill chunk (tokens) for ``model`` on ``device`` (default: the model's): the transients may
    take MEMORY_SHARE of the free memory and at most ``budget`` bytes; less the fixed transients,
    over the per-token ones (the kernel path's estimates on CUDA, unless DSV4_KERNELS=reference);
    a multiple of 128 between MIN_CHUNK and MAX_CHUNK. V4-Flash on a GPU with 14 GiB or more free:
    12032 tokens (H100, 4 Flash layers: between the 8192 and 16384 of bench/results/h100_prefill_chunks.json,
    5-11% faster than the 6400 of the earlier, coarser estimate; peak about 4.4 GiB beyond weights + cache)."""
    dev = torch.device(device or model.device)
    kernels = dev.type == "cuda" and dispatch.mode() != "reference"
    room = min(MEMORY_SHARE * free_memory(dev), budget) - fixed_prefill_bytes(model.cfg, kernels)
    n = int(room // prefill_bytes_per_token(model.cfg, model.dtype, kernels))
    return max(MIN_CHUNK, min(MAX_CHUNK, n // 128 * 128))


class Session:
    """cuda_graph: decode steps through a captured CUDA graph (engine/decode.py). Default: on for a
    CUDA model unless the kernels are forced to the torch references (DSV4_KERNELS=reference).
    prefill_chunk: tokens per prefill chunk (default: default_prefill_chunk, chosen at the first prefill)."""

    def __init__(self, model: Model, max_context: int | None = None, cache: CacheManager | None = None,
                 cuda_graph: bool | None = None, prefill_chunk: int | None = None):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.prefill_chunk = model, prefill_chunk
        cfg = model.cfg
        if cache is None:
            max_context = max_context or min(cfg.max_position_embeddings, 8192)
            cache = CacheManager(CacheSchema.from_config(cfg, model.mode), max_context, device=model.device)
        elif cache.schema.mode != model.precision:  # the schema's precision decides the entry formats
            raise CacheError(f"the cache stores {cache.schema.mode} entries but the model runs {model.precision}: "
                             "make the cache from the model's precision")
        self.cache = cache
        self.slot = cache.admit_request()
        if cuda_graph is None:
            cuda_graph = model.device.type == "cuda" and dispatch.mode() != "reference"
        self.runner = DecodeRunner(model, cache.handles(self.slot), graph=True) if cuda_graph else None

    @property
    def seq_len(self) -> int:
        """Tokens already in this session's cache."""
        return self.cache.seq_len(self.slot)

    @property
    def max_context(self) -> int:
        return self.cache.max_context

    def forward(self, token_ids, last_only: bool = False, head: bool = True) -> torch.Tensor | None:
        """Append tokens to the context as one chunk; returns their logits [S, vocab] ([1, vocab] if
        last_only; None without the head)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("no tokens to run")
        self.cache.prepare(self.slot, ids.numel())
        with torch.inference_mode():
            logits = self.model.forward(ids, self.cache.handles(self.slot), self.seq_len, last_only=last_only,
                                        head=head)
        self.cache.commit(self.slot, ids.numel())
        return logits

    def prefill(self, token_ids, chunk: int | None = None, last_only: bool = True,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Run a prompt in chunks of ``chunk`` tokens (default: the session's prefill_chunk, else
        default_prefill_chunk); returns the logits of the last token [vocab] (or of all tokens
        [S, vocab] with last_only=False). progress(done, total) is called after every chunk.

        A KeyboardInterrupt (or any error) inside a chunk rolls the cache back to the end of the last
        complete chunk; an interrupt is raised as PrefillInterrupted(done, total)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("no tokens to run")
        chunk = chunk or self.prefill_chunk or default_prefill_chunk(self.model)
        total, done, outs = ids.numel(), 0, []
        try:
            for i in range(0, total, chunk):
                part = ids[i:i + chunk]
                last = i + chunk >= total
                saved = self.cache.snapshot(self.slot)
                try:
                    out = self.forward(part, last_only=last_only, head=last or not last_only)
                except BaseException:
                    self.cache.restore(self.slot, saved)
                    raise
                done = i + part.numel()
                if out is not None:
                    outs.append(out)
                if progress is not None:
                    progress(done, total)
        except KeyboardInterrupt:
            raise PrefillInterrupted(done, total) from None
        return outs[-1][-1] if last_only else torch.cat(outs, 0)

    def step(self, token: int) -> torch.Tensor:
        """Decode one token; returns next-token logits [vocab]."""
        if self.runner is None:
            return self.forward([token])[-1]
        self.cache.prepare(self.slot, 1)
        logits = self.runner.step(int(token), self.seq_len)
        self.cache.commit(self.slot, 1)
        return logits

    def generate(self, prompt_ids, sample: Callable[[torch.Tensor], int], max_new_tokens: int,
                 stop_ids: set[int] | frozenset = frozenset(), chunk: int | None = None) -> Iterator[int]:
        """Prefill ``prompt_ids`` then yield sampled tokens until a stop id (yielded) or the limit.

        Stops early, without error, when the context is full (engine/runtime/generate.py's loop)."""
        logits = self.prefill(prompt_ids, chunk=chunk)
        for tok, _ in decode_tokens(self, logits, sample, max_new_tokens, stop_ids):
            yield tok

    def reset(self) -> None:
        """Forget the conversation; the slot stays reserved for the next one."""
        self.cache.reset_slot(self.slot)

    def close(self) -> None:
        self.cache.release_request(self.slot)

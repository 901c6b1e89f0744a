"""Benchmark measurements: decode, prefill and perplexity, plus the rooflines they are compared with.

Timing: CUDA events on GPU, perf_counter on CPU; warm-up first, then median and p10/p90 of runs.
Synthetic weights are generated directly in their stored formats on the target device (FP8 e4m3
linears with ue8m0 block scales, MXFP4 experts), never zeros.

Units: seconds (``*_s``), milliseconds (``*_ms``), bytes, bytes/s, FLOP/s. "Per token" is one
decode step of batch 1.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable

import torch

from dsv4.engine.checkpoint.formats import published_format, stored_entries
from dsv4.engine.model.config import DSV4Config
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.decode import capture_graph
from dsv4.engine.runtime.session import Session
from dsv4.kernels import dispatch
from dsv4.engine.checkpoint.shapes import tensor_shapes
from .synthetic import synthetic_stored  # noqa: F401  (bench users build models through it)

Progress = Callable[[str], None]  # receives a short status line ("prefill 512 tokens", "step 3/32")


class BenchError(ValueError):
    """A benchmark that cannot run as asked (the message says why and what would)."""


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times a callable: CUDA events on GPU, wall clock on CPU. Returns seconds."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1000
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def median_time(device, fn, runs: int) -> float:
    """Median seconds of ``runs`` timed calls after one untimed warm-up call."""
    timer = Timer(device)
    fn()
    sync(device)
    return statistics.median(timer(fn) for _ in range(runs))


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_bytes(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def summary(times: list[float]) -> dict:
    s = sorted(times)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"median_s": statistics.median(s), "p10_s": q(0.1), "p90_s": q(0.9), "runs": len(s)}


def measure_bandwidth(device, nbytes: int = 1 << 30, runs: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a large device-to-device copy (read + write)."""
    if torch.device(device).type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    b = torch.empty_like(a)
    return 2 * nbytes / median_time(device, lambda: b.copy_(a), runs)


def measure_matmul_rate(device, n: int = 8192, runs: int = 10) -> float:
    """Dense BF16 (GPU) / FP32 (CPU) matrix rate in FLOP/s."""
    cuda = torch.device(device).type == "cuda"
    n = n if cuda else 1024
    dt = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    return 2 * n ** 3 / median_time(device, lambda: a @ b, runs)


def _weight_nbytes(name: str, v, cfg) -> int:
    """Bytes of one weight that one decode token reads: the whole tensor, one row of the embedding,
    nothing of the hash routers' token -> expert table (an index lookup)."""
    from dsv4.kernels import QWeight

    if name.endswith("tid2eid"):
        return 0
    nb = v.nbytes() if isinstance(v, QWeight) else v.numel() * v.element_size()
    return nb // cfg.vocab_size if name == "embed.weight" else nb


def weight_bytes_split(model: Model) -> dict:
    """Weight bytes one decode token reads, split into {"layers": the main layers (routed experts
    counted for the num_experts_per_tok of n_routed_experts a token uses), "head_embed": one
    embedding row plus the hc head, final norm and vocabulary head (read whole)}."""
    cfg = model.cfg
    return _per_token_split(cfg, ((name, _weight_nbytes(name, v, cfg)) for name, v in model.w.items()
                                  if not name.startswith("mtp.")))


def _per_token_split(cfg: DSV4Config, sizes: Iterable[tuple[str, int]]) -> dict:
    """(tensor name, bytes) pairs -> the bytes one decode token reads, {"layers", "head_embed"}: all of
    every tensor but the routed experts, of which top-k / n_routed (on average)."""
    parts = {"layers": 0, "head_embed": 0}
    experts = 0
    for name, nb in sizes:
        if ".ffn.experts." in name:
            experts += nb
        else:
            parts["layers" if name.startswith("layers.") else "head_embed"] += nb
    parts["layers"] += experts * cfg.num_experts_per_tok // cfg.n_routed_experts
    return parts


def weight_bytes_per_token(model: Model) -> int:
    """Weight bytes one decode token reads: everything but the routed experts, plus top-k of them,
    plus one embedding row (the head is read whole)."""
    return sum(weight_bytes_split(model).values())


def published_weight_bytes(cfg: DSV4Config) -> dict:
    """Closed form of weight_bytes_split for a model stored in the published formats (FP8 e4m3
    linears with one ue8m0 byte per 128x128 block, MXFP4 experts with one ue8m0 byte per 32 inputs,
    BF16 embedding/head/gate/compressor linears, F32 norms and small tensors), computed from the
    config's shapes alone: what a --layers run projects its floor to. -> {"layers", "head_embed"}."""
    def stored_bytes(name: str, shape: tuple) -> int:
        fmt = published_format(name)
        if fmt == "int":  # the hash routing table is indexed, not read whole
            return 0
        if fmt in ("fp8", "mxfp4"):  # every stored tensor of these formats is one byte per element
            nb = sum(math.prod(shp) for shp, _ in stored_entries(name, shape, fmt).values())
        else:
            nb = math.prod(shape) * (2 if fmt == "bf16" else 4)
        return nb // cfg.vocab_size if name == "embed.weight" else nb  # one embedding row

    return _per_token_split(cfg, ((name, stored_bytes(name, shape))
                                  for name, (_, shape) in tensor_shapes(cfg, mtp=False).items()))


def kv_read_bytes(layers: Iterable, seq_len: int, index_topk: int) -> int:
    """Cache bytes one decode step reads at ``seq_len`` cached tokens, over cache/schema LayerSchemas:
    per layer the window (min(n, window) entries); CSA: every indexer key of the n // ratio closed
    entries and the top-k selected KV entries; HCA: every closed entry."""
    total = 0
    for ly in layers:
        total += min(seq_len, ly.window) * ly.kv.nbytes
        if ly.ratio:
            ent = seq_len // ly.ratio
            if ly.idx is not None:
                total += ent * ly.idx.nbytes + min(ent, index_topk) * ly.kv.nbytes
            else:
                total += ent * ly.kv.nbytes
    return total


def kv_bytes_per_token(session: Session) -> int:
    """Cache bytes one decode step reads at the session's current length."""
    return kv_read_bytes([h.layer for h in session.cache.handles(session.slot)], session.seq_len,
                         session.model.cfg.index_topk)


def _floor_sum(n: int, m: int) -> int:
    """sum of x // m for x = 1..n."""
    q, r = divmod(n, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def _capped_floor_sum(n: int, m: int, cap: int) -> int:
    """sum of min(x // m, cap) for x = 1..n."""
    if n < cap * m:
        return _floor_sum(n, m)
    return _floor_sum(cap * m - 1, m) + cap * (n - cap * m + 1)


def _window_sum(n: int, w: int) -> int:
    """sum of min(x, w) for x = 1..n."""
    return n * (n + 1) // 2 if n <= w else w * (w + 1) // 2 + (n - w) * w


PREFILL_FLOPS_FORMULA = (
    "flops = linear + routed_experts + head + attention + indexer, for a P-token prompt from position 0 "
    "(query t = 0..P-1 sees x = t+1 tokens); a multiply-add is 2 FLOPs. "
    "linear = 2 x P x (every dense linear and mHC mixing matrix of every layer: attention projections, "
    "compressors, router gate, shared expert; the indexer's wq_b / weights_proj are in indexer); "
    "routed_experts = 2 x P x layers x k x 3 x I x d; "
    "head = 2 x (V x d + hc x hc x d), the last token only (the prefill's logits); "
    "attention = sum over layers and queries of 4 x H x D x keys(x) (QK and PV over shared-KV MQA keys of "
    "width D), keys(x) = min(x, W) window keys + c(x) compressed entries, c(x) = 0 (SWA), x // m (HCA, "
    "every closed entry), min(x // m, topk) (CSA, the indexer's top-k); "
    "indexer = sum over CSA layers and the queries with n = x // m > topk (the others need no selection) "
    "of 2 x Hi x Di x n (scores over every causal compressed entry) + 2 x (Hi x Di x q_lora + Hi x d) "
    "(its query and head-weight projections); elementwise work (norms, RoPE, softmax, pooling, "
    "quantisation, top-k) is not counted. This is the useful (causal) work: the engine also projects "
    "every row of a chunk once its CSA layer passes topk entries and scores a query tile against every "
    "entry before masking, which is not counted")


def prefill_flops(cfg: DSV4Config, tokens: int) -> dict:
    """FLOPs of a ``tokens``-token prefill from position 0 of ``cfg`` (PREFILL_FLOPS_FORMULA, from the
    config's shapes and attention schedule alone). -> {"linear", "routed_experts", "head", "attention",
    "indexer", "total", "attended_keys": {"window", "hca", "csa"} (query-key pairs summed over layers),
    "indexer_scored_entries" (query-entry pairs summed over CSA layers)}."""
    P, d = tokens, cfg.hidden_size
    dense = experts = 0
    for name, (kind, shape) in tensor_shapes(cfg, mtp=False).items():
        if kind not in ("lin", "hc") or name in ("head.weight", "hc_head_fn") or \
                name.endswith((".indexer.wq_b.weight", ".indexer.weights_proj.weight")):
            continue
        if ".ffn.experts." in name:
            experts += math.prod(shape)
        else:
            dense += math.prod(shape)
    keys = {"window": 0, "hca": 0, "csa": 0}
    scored = indexer_queries = 0
    K = cfg.index_topk
    for spec in cfg.schedule():
        keys["window"] += _window_sum(P, cfg.sliding_window)
        if spec.attn == "hca":
            keys["hca"] += _floor_sum(P, spec.ratio)
        elif spec.attn == "csa":
            m = spec.ratio
            keys["csa"] += _capped_floor_sum(P, m, K)
            first = min(P, (K + 1) * m - 1)  # x below (K + 1) * m sees at most K entries
            scored += _floor_sum(P, m) - _floor_sum(first, m)
            indexer_queries += P - first
    Hi, Di = cfg.index_n_heads, cfg.index_head_dim
    out = {"linear": 2 * P * dense, "routed_experts": 2 * P * experts * cfg.num_experts_per_tok // cfg.n_routed_experts,
           "head": 2 * (cfg.vocab_size * d + cfg.hc_mult * cfg.hc_mult * d),
           "attention": 4 * cfg.num_attention_heads * cfg.head_dim * sum(keys.values()),
           "indexer": 2 * Hi * Di * scored + 2 * indexer_queries * (Hi * Di * cfg.q_lora_rank + Hi * d)}
    out["total"] = sum(out.values())
    out.update({"attended_keys": keys, "indexer_scored_entries": scored})
    return out


def prefill_formula_values(cfg: DSV4Config) -> str:
    """The symbols of PREFILL_FLOPS_FORMULA for ``cfg``."""
    ratios = sorted({s.ratio for s in cfg.schedule() if s.ratio})
    kinds = [s.attn for s in cfg.schedule()]
    return (f"layers={cfg.num_hidden_layers} ({kinds.count('swa')} SWA, {kinds.count('csa')} CSA, "
            f"{kinds.count('hca')} HCA; m in {ratios}), d={cfg.hidden_size}, H={cfg.num_attention_heads}, "
            f"D={cfg.head_dim}, W={cfg.sliding_window}, topk={cfg.index_topk}, Hi={cfg.index_n_heads}, "
            f"Di={cfg.index_head_dim}, q_lora={cfg.q_lora_rank}, k={cfg.num_experts_per_tok} of "
            f"{cfg.n_routed_experts}, I={cfg.moe_intermediate_size}, V={cfg.vocab_size}, hc={cfg.hc_mult}")


def device_bytes(tensors: Iterable) -> int:
    """Bytes of the distinct storages behind ``tensors`` (torch tensors, or objects such as QWeight
    whose tensor attributes are counted; views of one storage count once)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()

    for v in tensors:
        if isinstance(v, torch.Tensor):
            add(v)
        else:
            for t in vars(v).values() if hasattr(v, "__dict__") else ():
                if isinstance(t, torch.Tensor):
                    add(t)
    return total


# ------------------------------------------------------------------ models to time
def synthetic_model(preset: str, layers: int | None, device, precision, progress: Progress | None = None,
                    mtp: bool = False):
    """The first ``layers`` layers (None: all) of the flash/pro preset with random weights in their
    published stored formats (and the MTP layer when ``mtp``), made on ``device``.
    -> (Model, full-size config, display name)."""
    full = DSV4Config.preset(preset)
    n = layers or full.num_hidden_layers
    if not 1 <= n <= full.num_hidden_layers:
        raise BenchError(f"{preset} has {full.num_hidden_layers} layers; cannot take {n}")
    cfg = full.layer_range(0, n)
    _say(progress, f"making synthetic weights ({n} of {full.num_hidden_layers} {preset} layers, "
                   f"{stored_model_bytes(cfg) / 2**30:.1f} GiB) on {device}")
    m = Model.from_state_dict(cfg, synthetic_stored(cfg, device, mtp=mtp), mode=str(precision), device=device)
    return m, full, f"synthetic {preset} ({n} of {full.num_hidden_layers} layers)"


def checkpoint_model(path, device, precision, progress: Progress | None = None):
    """A checkpoint folder loaded in its stored formats (float32 compute). -> (Model, its config, name)."""
    from dsv4.engine.checkpoint.loader import load_model

    seen = [0, 0]

    def tick(t):
        seen[0] += 1
        seen[1] += t.numel() * t.element_size()
        _say(progress, f"loading {path}: {seen[0]} tensors, {seen[1] / 2**30:.2f} GiB")

    _say(progress, f"loading {path}")
    m = load_model(path, mode=str(precision), device=device, dtype=torch.float32, progress=tick)
    return m, m.cfg, str(path)


def stored_model_bytes(cfg: DSV4Config) -> int:
    """Bytes of every main-model weight of ``cfg`` in the published formats (memory, not per token)."""
    total = 0
    for name, (_, shape) in tensor_shapes(cfg, mtp=False).items():
        fmt = published_format(name)
        if fmt in ("fp8", "mxfp4"):
            total += sum(math.prod(shp) for shp, _ in stored_entries(name, shape, fmt).values())
        else:
            total += math.prod(shape) * {"bf16": 2, "int": 4}.get(fmt, 4)
    return total


def cpu_slow_warning(cfg: DSV4Config, device) -> str | None:
    """A warning to show before a CPU run whose weights are big enough that each decode token takes
    long: the torch reference dequantises every FP8/FP4 weight it reads on every call. None when
    the run is small (under 1 GiB of weights read per token) or not on the CPU."""
    if torch.device(device).type != "cpu":
        return None
    per_token = sum(published_weight_bytes(cfg).values())
    if per_token < 1 << 30:
        return None
    return (f"CPU run at real dimensions: each token reads {per_token / 2**30:.1f} GiB of weights through the "
            f"torch reference (dequantised on every call) and the model holds {stored_model_bytes(cfg) / 2**30:.1f} "
            "GiB; expect minutes to make the weights and prefill, and up to minutes per token. This is GPU work; "
            "on the CPU use --layers 1, a short --prompt-len and a few --steps")


# ------------------------------------------------------------------ measurements
def head_and_embed_seconds(model: Model, runs: int = 20, graph: bool = False) -> float:
    """Median seconds of the decode step's work outside the layers, timed on its own: the
    embedding row lookup (and the hc_mult-stream broadcast) plus the hc head -> final norm ->
    vocabulary head for one token. graph: replay it from one captured CUDA graph, as the decode
    step does (CUDA only); else eager launches."""
    cfg, dev, w = model.cfg, model.device, model.w
    token = torch.zeros(1, dtype=torch.long, device=dev)
    g = torch.Generator().manual_seed(1)
    streams = torch.randn(1, cfg.hc_mult, cfg.hidden_size, generator=g).to(dev, model.dtype)

    def once():
        h = w["embed.weight"][token].to(model.dtype).unsqueeze(1).expand(-1, cfg.hc_mult, -1).contiguous()
        return h, model._head(streams, "")

    with torch.inference_mode():
        fn = capture_graph(once)[0] if graph and dev.type == "cuda" else once
        return median_time(dev, fn, runs)


def bench_decode(model: Model, prompt_len: int, steps: int, warmup: int = 3, cuda_graph: bool | None = None,
                 progress: Progress | None = None) -> dict:
    """Decode ``steps`` tokens after a ``prompt_len`` prompt; cuda_graph as Session's (None: the default).

    -> median/p10/p90 seconds per step, tokens/s, the weight and cache bytes one step reads (split
    into layers and head+embedding), head_embed_s (that part timed on its own, in the same run) and
    "kernels": {op: {implementation: calls}} of the warm-up and timed steps (kernels.dispatch.report;
    with a CUDA graph the calls are those of its capture, which every replay repeats)."""
    dev = model.device
    s = Session(model, max_context=prompt_len + steps + warmup + 8, cuda_graph=cuda_graph)
    prompt, toks = _bench_tokens(model.cfg.vocab_size, prompt_len, steps + warmup)
    timer = Timer(dev)
    _reset_peak(dev)
    _say(progress, f"prefill {prompt_len} tokens")
    ttft = timer(lambda: s.prefill(prompt))
    dispatch.reset_report()
    for i, t in enumerate(toks[:warmup]):
        _say(progress, f"warm-up step {i + 1}/{warmup}")
        s.step(t)
    kv = kv_bytes_per_token(s)
    seq_len = s.seq_len
    times = []
    for i, t in enumerate(toks[warmup:]):
        _say(progress, f"decode step {i + 1}/{steps}")
        times.append(timer(lambda t=t: s.step(t)))
    ran = dispatch.report()
    graph = s.runner is not None
    _say(progress, "timing the head and embedding alone")
    head_s = head_and_embed_seconds(model, runs=max(5, min(steps, 50)), graph=graph)
    split = weight_bytes_split(model)
    out = summary(times)
    out.update({"prompt_tokens": prompt_len, "decode_tokens": steps, "time_to_first_token_s": ttft,
                "tokens_per_s": 1 / out["median_s"], "ms_per_token": out["median_s"] * 1000,
                "layers": model.cfg.num_hidden_layers, "kv_seq_len": seq_len,
                "weight_bytes_per_token": split["layers"] + split["head_embed"],
                "layer_weight_bytes_per_token": split["layers"], "head_embed_bytes_per_token": split["head_embed"],
                "kv_bytes_per_token": kv, "head_embed_s": head_s,
                "peak_device_bytes": _peak_bytes(dev), "cuda_graph": graph, "kernels": ran})
    s.close()
    return out


def decode_roofline(r: dict, bandwidth: float, full: DSV4Config, precision) -> dict:
    """Figures of a bench_decode result ``r`` against the bandwidth floor (bytes read / ``bandwidth``
    bytes/s), for the whole step, per layer with the head and embedding subtracted, and (when ``r``
    ran fewer layers than ``full``) projected to the whole model.

    per layer: (median step - head_embed_s) / layers, against (layer weight + cache bytes) / layers
    / bandwidth. Projection: head_embed_s + per-layer time x full layers, against the closed-form
    bytes of the whole model in the published formats (published_weight_bytes) plus its cache
    reads at the same length (cache/schema accounting)."""
    from dsv4.cache.schema import CacheSchema

    n = r["layers"]
    step_bytes = r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
    layer_bytes = r["layer_weight_bytes_per_token"] + r["kv_bytes_per_token"]
    layers_s = r["median_s"] - r["head_embed_s"]
    out = {"measured_bandwidth_bytes_per_s": bandwidth,
           "bandwidth_floor_ms_per_token": step_bytes / bandwidth * 1000,
           "achieved_bandwidth_fraction": step_bytes / r["median_s"] / bandwidth,
           "floor_ratio": r["median_s"] / (step_bytes / bandwidth),
           "head_embed_ms": r["head_embed_s"] * 1000,
           "head_embed_floor_ms": r["head_embed_bytes_per_token"] / bandwidth * 1000,
           "head_embed_floor_ratio": r["head_embed_s"] / (r["head_embed_bytes_per_token"] / bandwidth),
           "ms_per_layer": layers_s * 1000 / n,
           "layer_floor_ms": layer_bytes / n / bandwidth * 1000,
           "layer_floor_ratio": layers_s / (layer_bytes / bandwidth),
           "per_layer_note": "per layer = (step time - head/embedding timed alone in this run) / layers; "
                             "floor = (layer weights + cache bytes read) / measured bandwidth"}
    if n < full.num_hidden_layers:
        N = full.num_hidden_layers
        w = published_weight_bytes(full)
        kv = kv_read_bytes(CacheSchema.from_config(full, str(precision)).layers, r["kv_seq_len"], full.index_topk)
        ms = out["head_embed_ms"] + out["ms_per_layer"] * N
        floor_ms = (w["layers"] + w["head_embed"] + kv) / bandwidth * 1000
        out.update({"projected_full_model_ms_per_token": ms, "projected_full_model_tokens_per_s": 1000 / ms,
                    "full_model_floor_ms_per_token": floor_ms, "projected_full_model_floor_ratio": ms / floor_ms,
                    "projection_note": f"PROJECTED: head/embedding time + measured per-layer time x {N} layers, "
                                       f"against the {N}-layer model's closed-form bytes per token (published "
                                       "formats) and cache reads at the same length"})
    return out


def prefill_roofline(r: dict, matmul_rate: float, full: DSV4Config, layers: int, devices: int = 1) -> dict:
    """A bench_prefill result against the measured matrix rate (FLOP/s; over ``devices`` ranks, against
    that many times the rate measured on one); with fewer ``layers`` than ``full``, the prefill time
    projected to the whole model (per-layer time x its layers)."""
    out = {"measured_matmul_flop_per_s": matmul_rate,
           "matmul_rate_fraction": r["flop_per_s"] / (matmul_rate * devices)}
    if devices > 1:
        out["matmul_rate_note"] = (f"fraction of {devices} x the rate measured on rank 0's device (the whole "
                                   "prefill's FLOPs over the ranks' summed rate; CPU ranks share the host's "
                                   "cores, so there the summed rate overstates what they have)")
    if layers < full.num_hidden_layers:
        out.update({"projected_full_model_prefill_s": r["ms_per_layer"] * full.num_hidden_layers / 1000,
                    "projection_note": f"PROJECTED: measured per-layer time x {full.num_hidden_layers} layers"})
    return out


def fresh_sessions(model: Model, max_context: int):
    """bench_prefill's default ``open_session``: a new Session per run (no decode follows, so no CUDA
    graph is captured), closed after it. -> callable () -> (session, close)."""
    def open_session():
        s = Session(model, max_context=max_context, cuda_graph=False)
        return s, s.close
    return open_session


def reused_session(session):
    """``open_session`` for bench_prefill over one long-lived session (rank 0's ParallelSession, whose
    workers cannot be made again per run): reset before each run, never closed here."""
    def open_session():
        session.reset()
        return session, lambda: None
    return open_session


PROFILE_ROWS = 15


@contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a moment (C++ code that prints there unasked)."""
    import os

    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profile_call(fn, device, rows: int = PROFILE_ROWS) -> dict:
    """Run ``fn`` once under torch.profiler. -> {"profile": the ``rows`` kernels (CUDA: by self device
    time) or torch ops (CPU: by self CPU time) that took longest, each {"name", "self_s", "share",
    "calls"} (share of the total self time), "profile_total_s": that total, "profile_by": "device
    kernels" | "cpu ops", "profiled_wall_s": the profiled call's wall time (the profiler slows it)}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    prof = profile(activities=acts)
    with _quiet_stderr(), warnings.catch_warnings():  # the profiler's own start line
        warnings.simplefilter("ignore")
        prof.start()
    try:
        t = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t
    finally:
        with _quiet_stderr(), warnings.catch_warnings():  # its stop line, and a warning about cycles
            warnings.simplefilter("ignore")
            prof.stop()
    events = prof.key_averages()
    if cuda:
        from torch.autograd import DeviceType

        kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
        if not kernels:  # older profilers attribute the kernel time to the ops that launched them
            kernels = [e for e in events if e.self_device_time_total > 0]
        rows_ = [(e.key, e.self_device_time_total, e.count) for e in kernels]
    else:
        rows_ = [(e.key, e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0]
    rows_.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows_) or 1.0
    return {"profile": [{"name": k, "self_s": us / 1e6, "share": us / total, "calls": n} for k, us, n in rows_[:rows]],
            "profile_total_s": total / 1e6, "profile_by": "device kernels" if cuda else "cpu ops",
            "profiled_wall_s": wall}


def bench_prefill(model: Model, prompt_len: int, runs: int = 5, warmup: int = 1, chunk: int | None = None,
                  profile: bool = False, progress: Progress | None = None, open_session=None,
                  cfg: DSV4Config | None = None) -> dict:
    """Prefill a ``prompt_len`` prompt ``runs`` times after ``warmup`` untimed ones, through
    Session.prefill in chunks of ``chunk`` tokens (None: default_prefill_chunk, chosen once with the
    first session open, as ``dsv4 chat`` would choose it).

    open_session: () -> (session, close) per run (default fresh_sessions: a new Session each time;
    reused_session for a ParallelSession). cfg: the model whose FLOPs are counted (default: model's;
    over ranks, the whole model, not rank 0's part). profile: one more prefill under torch.profiler
    (profile_call's fields).

    -> median/p10/p90 seconds, tokens/s, prefill_chunk, FLOPs (prefill_flops: "flops" the total,
    "flops_breakdown", "flops_formula") and FLOP/s, greedy_next_token (the argmax of the last run's
    logits), and memory: weight_bytes and cache_bytes (the model's and one session's tensors),
    peak_device_bytes (the most allocated during a prefill) and peak_beyond_weights_and_cache_bytes
    (that peak less what was allocated just before the prefill started: weights, the session's
    cache and anything else resident); the peaks are None off CUDA."""
    from dsv4.engine.runtime.session import default_prefill_chunk

    dev = model.device
    cuda = dev.type == "cuda"
    cfg = cfg or model.cfg
    prompt, _ = _bench_tokens(model.cfg.vocab_size, prompt_len, 0)
    open_session = open_session or fresh_sessions(model, prompt_len)
    timer = Timer(dev)
    chosen = chunk
    mem = {"peak": None, "beyond": None, "cache": None}
    last = [None]

    def run(s):
        last[0] = s.prefill(prompt, chunk=chosen)

    def once(label, timed=True):
        nonlocal chosen
        _say(progress, f"prefill {prompt_len} tokens ({label})")
        s, close = open_session()
        try:
            if chosen is None:
                chosen = default_prefill_chunk(s.model)
            mem["cache"] = s.cache.memory_report()["total"]
            if not timed:
                return profile_call(lambda: run(s), dev)
            if cuda:
                torch.cuda.synchronize(dev)
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t = timer(lambda: run(s))
            if cuda:
                peak = torch.cuda.max_memory_allocated(dev)
                mem["peak"] = max(mem["peak"] or 0, peak)
                mem["beyond"] = max(mem["beyond"] or 0, peak - base)
            return t
        finally:
            close()

    for i in range(warmup):
        once(f"warm-up {i + 1}/{warmup}")
    out = summary([once(f"run {i + 1}/{runs}") for i in range(runs)])
    next_token = int(last[0].argmax())
    prof = once("profiled", timed=False) if profile else {}
    f = prefill_flops(cfg, prompt_len)
    n_layers = model.cfg.num_hidden_layers
    out.update({"prompt_tokens": prompt_len, "prefill_chunk": chosen,
                "prefill_chunk_source": "--prefill-chunk" if chunk else "default_prefill_chunk",
                "prefill_chunks": -(-prompt_len // chosen),
                "tokens_per_s": prompt_len / out["median_s"], "time_to_first_token_s": out["median_s"],
                "layers": n_layers, "ms_per_layer": out["median_s"] * 1000 / n_layers,
                "flops": f["total"], "flop_per_s": f["total"] / out["median_s"],
                "flops_breakdown": {k: f[k] for k in ("linear", "routed_experts", "head", "attention", "indexer")},
                "attended_keys": f["attended_keys"], "indexer_scored_entries": f["indexer_scored_entries"],
                "flops_formula": PREFILL_FLOPS_FORMULA + "; here " + prefill_formula_values(cfg),
                "greedy_next_token": next_token,
                "weight_bytes": device_bytes(model.w.values()), "cache_bytes": mem["cache"],
                "peak_device_bytes": mem["peak"], "peak_beyond_weights_and_cache_bytes": mem["beyond"],
                **prof})
    return out


def perplexity(model: Model, token_ids: list[int], bos_id: int, max_context: int, chunk: int = 512,
               progress: Progress | None = None) -> dict:
    """Score every token after bos; windows of max_context, each starting with bos. -> ppl, nll, count."""
    if max_context < 2:
        raise ValueError("max_context must be >= 2")
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    step = max_context - 1
    for i in range(0, len(token_ids), step):
        _say(progress, f"scoring tokens {i + 1}-{min(i + step, len(token_ids))} of {len(token_ids)}")
        window = [bos_id] + token_ids[i:i + step]
        s = Session(model, max_context=len(window))
        logits = s.prefill(window, chunk=chunk, last_only=False)[:-1]
        target = torch.tensor(window[1:], device=logits.device)
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
        count += len(window) - 1
        s.close()
    dt = time.perf_counter() - t0
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": count, "tokens_per_s": count / dt}


def environment(device, threads: int | None = None) -> dict:
    """Where and when a result was measured: date (UTC), the command line, versions, host, the card
    (GPU name, or the CPU model and its core counts), the torch CPU threads used, the DSV4_*
    settings in the environment (DSV4_PDL, DSV4_OVERLAP, ...: they change how kernels launch) and,
    on a GPU, whether the kernels launched with PDL."""
    import os

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["dsv4"] + sys.argv[1:]), "python": platform.python_version(),
           "torch": torch.__version__, "device": str(device), "host": platform.node(),
           "torch_threads": torch.get_num_threads() if threads is None else threads,
           "dsv4_settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("DSV4_")}}
    if str(device).startswith("cuda"):
        env["card"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            from dsv4.kernels.triton import pdl

            env["pdl"] = pdl.on(torch.device(device))
        except ImportError:  # no Triton: the torch reference ran, nothing launched with PDL
            env["pdl"] = False
    else:
        env["card"] = _cpu_model() or platform.processor() or platform.machine()
        env["logical_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if hasattr(os, "getloadavg"):
            env["load_average_1min"] = round(os.getloadavg()[0], 2)
    from importlib.metadata import PackageNotFoundError, version

    try:
        env["dsv4"] = version("dsv4")
    except PackageNotFoundError:
        env["dsv4"] = "dev"
    return env


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ comparisons
COMPARE_AGAINST = ("reference", "transformers", "eager")


def check_compare(against: str, kind: str, model: Model) -> None:
    """Refuse, before any timing, a comparison that cannot run: ``against`` in COMPARE_AGAINST,
    ``kind`` "decode" | "prefill". Raises BenchError naming the reason."""
    if against == "eager" and kind != "decode":
        raise BenchError("eager applies to decode (prefill never uses the CUDA graph)")
    if against == "eager" and model.device.type != "cuda":
        raise BenchError("eager needs a CUDA device (decode on the CPU never uses a CUDA graph)")
    if against == "transformers":
        try:
            from .hf import transformers_names

            transformers_names("DeepseekV4ForCausalLM")
        except ImportError as e:
            raise BenchError(f"transformers needs transformers >= 5.23 (pip install 'transformers>=5.23'); "
                             f"importing it failed: {e}") from None
        from .hf import float32_bytes

        need, free = 2 * float32_bytes(model.cfg), free_memory_bytes(model.device)
        if free is not None and need > free:
            raise BenchError(f"transformers: its float32 model (plus the copy it loads from) needs "
                             f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is free on {model.device} "
                             "(take fewer layers)")


def compare_run(against: str, kind: str, model: Model, ours: dict, prompt_len: int, n: int, warmup: int,
                chunk: int | None = None) -> dict:
    """Time the same work another way: "reference" (the torch reference kernels), "transformers"
    (its DeepseekV4ForCausalLM with the same weights) or "eager" (decode without the CUDA graph).
    chunk: the prefill chunk of ``ours`` (the reference prefill runs the same chunks).
    -> flat compare_* fields; compare_speed_ratio > 1 means dsv4 is faster."""
    run = bench_decode if kind == "decode" else (lambda *a: bench_prefill(*a, chunk=chunk))
    extra = {}
    if against == "reference":
        from dsv4.kernels.dispatch import use_backend

        with use_backend("reference"):
            other = run(model, prompt_len, n, warmup)
    elif against == "eager":
        other = bench_decode(model, prompt_len, n, warmup, cuda_graph=False)
    else:
        from dsv4.engine.model.weights import logical_tensors
        from .hf import build_hf_model

        hf = build_hf_model(model.cfg, logical_tensors(model.w), model.device)
        other = (hf_decode(hf, model, prompt_len, n, warmup) if kind == "decode"
                 else hf_prefill(hf, model, prompt_len, n, warmup))
        extra = {k: other[k] for k in ("max_abs_logit_diff_on_prompt", "max_abs_logit") if k in other}
        del hf
    return {"compare_against": against, "compare_median_s": other["median_s"], "compare_p10_s": other["p10_s"],
            "compare_p90_s": other["p90_s"], "compare_speed_ratio": other["median_s"] / ours["median_s"],
            "compare_note": f"speed_ratio = {against} median time / dsv4 median time (> 1: dsv4 is faster)",
            **{f"compare_{k}": v for k, v in extra.items()}}


def free_memory_bytes(device) -> int:
    """Free memory on ``device`` in bytes (engine/runtime/session.free_memory: CUDA's driver count
    plus torch's unused reserve, CPU MemAvailable)."""
    from dsv4.engine.runtime.session import free_memory

    return free_memory(torch.device(device))


def _bench_tokens(vocab: int, prompt_len: int, n: int) -> tuple[torch.Tensor, list[int]]:
    """The same prompt and decode tokens bench_decode uses (seeded)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g)
    return prompt, torch.randint(0, vocab, (n,), generator=g).tolist()


def hf_decode(hf, model: Model, prompt_len: int, steps: int, warmup: int = 3) -> dict:
    """transformers' model through the same work as bench_decode: prefill, then timed single-token
    steps with its own cache. Also the largest |logit| difference from this engine on the prompt
    (checked in a separate untimed pass with indexer ties broken to the lower index, as here)."""
    from .hf import stable_topk, transformers_names

    (DynamicCache,) = transformers_names("DynamicCache")

    dev = model.device
    prompt, toks = _bench_tokens(model.cfg.vocab_size, prompt_len, steps + warmup)
    timer = Timer(dev)
    with torch.no_grad():
        with stable_topk():
            check = hf(prompt[None].to(dev)).logits[0, -1]
        cache = DynamicCache(config=hf.config)
        ttft = timer(lambda: hf(prompt[None].to(dev), cache=cache, use_cache=True))
        step = lambda t: hf(torch.tensor([[t]], device=dev), cache=cache, use_cache=True)  # noqa: E731
        for t in toks[:warmup]:
            step(t)
        times = [timer(lambda t=t: step(t)) for t in toks[warmup:]]
    ours = Session(model, max_context=prompt_len + 1).prefill(prompt)
    r = summary(times)
    r.update({"time_to_first_token_s": ttft,
              "max_abs_logit_diff_on_prompt": (check.float() - ours.float()).abs().max().item(),
              "max_abs_logit": ours.abs().max().item()})
    return r


def hf_prefill(hf, model: Model, prompt_len: int, runs: int = 5, warmup: int = 1) -> dict:
    from .hf import transformers_names

    (DynamicCache,) = transformers_names("DynamicCache")

    dev = model.device
    prompt, _ = _bench_tokens(model.cfg.vocab_size, prompt_len, 0)
    timer = Timer(dev)

    def once():
        cache = DynamicCache(config=hf.config)
        return timer(lambda: hf(prompt[None].to(dev), cache=cache, use_cache=True))

    with torch.no_grad():
        for _ in range(warmup):
            once()
        return summary([once() for _ in range(runs)])


def bench_linears(model: Model, layers=(2, 3), runs: int = 50) -> list[dict]:
    """Time each linear of the given layers (and the head) as one decode token sees it (one row of
    input), through ``kernels`` dispatch. -> rows with bytes read, median seconds, bytes/s and the
    implementation that ran (kernels.dispatch.report)."""
    from dsv4 import kernels
    from dsv4.kernels import QWeight

    dev = model.device
    cfg = model.cfg
    rows = []
    names = [n for n, v in model.w.items() if isinstance(v, QWeight)
             and (n == "head" or any(n.startswith(f"layers.{i}.") for i in layers))]
    # one routed expert stands for the 6 a token uses (same shapes)
    names = [n for n in names if ".experts." not in n or ".experts.0." in n]
    aq = model.precision.faithful  # the decode GEMVs as the model runs them (faithful: e4m3 inputs)
    for name in names:
        w = model.w[name]
        N, K = w.shape
        if name.endswith("attn.wo_a"):
            G, op = cfg.o_groups, "grouped_linear"
            x = torch.randn(1, G, K, device=dev)
            fn = lambda x=x, w=w: kernels.grouped_linear(x, w, act_quant=aq)  # noqa: E731
        else:
            op = "linear"
            x = torch.randn(1, K, device=dev)
            fn = lambda x=x, w=w: kernels.linear(x, w, act_quant=aq)  # noqa: E731
        dispatch.reset_report()
        t = median_time(dev, fn, runs)
        nbytes = w.nbytes() + x.numel() * 4 + N * 4
        rows.append({"name": name, "format": w.fmt, "out": N, "in": K, "bytes": nbytes, "median_s": t,
                     "bytes_per_s": nbytes / t, "implementation": ",".join(dispatch.report().get(op, {}))})
    return rows

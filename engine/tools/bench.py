"""Benchmark measurements: decode, prefill and perplexity, plus the rooflines they are compared with.

Timing: CUDA events on GPU, perf_counter on CPU; warm-up first, then median and p10/p90 of runs.
Synthetic weights are generated directly in their stored formats on the target device (FP8 e4m3
linears with ue8m0 block scales, MXFP4 experts), never zeros.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from dsv4.engine.checkpoint.formats import published_format
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from .synthetic import random_tensor, tensor_shapes


def synthetic_stored(cfg, device, seed: int = 0) -> dict:
    """Every tensor of ``cfg`` (no MTP) in its published stored format, random, made on ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    gcpu = torch.Generator().manual_seed(seed)
    out = {}
    for name, (kind, shape) in tensor_shapes(cfg, mtp=False).items():
        fmt = published_format(name)
        base = name[: -len(".weight")]
        if fmt == "fp8":
            out[name] = (torch.randn(shape, device=device, generator=g) * 0.5).to(torch.float8_e4m3fn)
            sshape = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
            e = torch.randint(118, 124, sshape, device=device, dtype=torch.uint8, generator=g)
            out[base + ".scale"] = e.view(torch.float8_e8m0fnu)
        elif fmt == "mxfp4":
            out[name] = torch.randint(0, 256, (shape[0], shape[1] // 2), device=device, dtype=torch.uint8,
                                      generator=g).view(torch.float4_e2m1fn_x2)
            e = torch.randint(119, 123, (shape[0], shape[1] // 32), device=device, dtype=torch.uint8, generator=g)
            out[base + ".scale"] = e.view(torch.float8_e8m0fnu)
        elif fmt == "int":
            V, k = shape
            out[name] = torch.argsort(torch.rand(V, cfg.n_routed_experts, device=device, generator=g), -1)[:, :k] \
                .to(torch.int32)
        else:
            t = random_tensor(kind, shape, gcpu, torch.float32)
            out[name] = t.to(device, torch.bfloat16 if fmt == "bf16" else torch.float32)
    return out


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


def _per_token(model: Model, size) -> int:
    """Sum of size(name, weight) over what one token touches: every main-model weight but the
    routed experts, plus num_experts_per_tok / n_routed_experts of those."""
    cfg, dense, experts = model.cfg, 0, 0
    for name, v in model.w.items():
        if name.startswith("mtp."):
            continue
        if ".ffn.experts." in name:
            experts += size(name, v)
        else:
            dense += size(name, v)
    return dense + experts * cfg.num_experts_per_tok // cfg.n_routed_experts


def weight_bytes_per_token(model: Model) -> int:
    """Weight bytes one decode token reads: everything but the routed experts, plus top-k of them,
    plus one embedding row (the head is read whole)."""
    from dsv4.kernels import QWeight

    def size(name, v):
        nb = v.nbytes() if isinstance(v, QWeight) else v.numel() * v.element_size()
        if name == "embed.weight":
            return nb // model.cfg.vocab_size
        return 0 if name.endswith("tid2eid") else nb

    return _per_token(model, size)


def kv_bytes_per_token(session: Session) -> int:
    """Cache bytes one decode step reads at the session's current length."""
    n, total = session.seq_len, 0
    for h in session.cache.handles(session.slot):
        ly = h.layer
        total += min(n, ly.window) * ly.kv.nbytes
        if ly.ratio:
            ent = n // ly.ratio
            if ly.idx is not None:
                total += ent * ly.idx.nbytes + min(ent, session.model.cfg.index_topk) * ly.kv.nbytes
            else:
                total += ent * ly.kv.nbytes
    return total


def active_params_per_token(model: Model) -> int:
    """Multiply-accumulate weights touched per token (for prefill FLOPs = 2 x this x tokens)."""
    from dsv4.kernels import QWeight

    return _per_token(model, lambda name, v: v.shape[0] * v.shape[1] if isinstance(v, QWeight) else 0)


def bench_decode(model: Model, prompt_len: int, steps: int, warmup: int = 3, cuda_graph: bool | None = None) -> dict:
    """Decode ``steps`` tokens after a ``prompt_len`` prompt; cuda_graph as Session's (None: the default)."""
    dev = model.device
    s = Session(model, max_context=prompt_len + steps + warmup + 8, cuda_graph=cuda_graph)
    prompt, toks = _bench_tokens(model.cfg.vocab_size, prompt_len, steps + warmup)
    timer = Timer(dev)
    _reset_peak(dev)
    ttft = timer(lambda: s.prefill(prompt))
    for t in toks[:warmup]:
        s.step(t)
    kv = kv_bytes_per_token(s)
    times = [timer(lambda t=t: s.step(t)) for t in toks[warmup:]]
    out = summary(times)
    out.update({"prompt_tokens": prompt_len, "decode_tokens": steps, "time_to_first_token_s": ttft,
                "tokens_per_s": 1 / out["median_s"], "ms_per_token": out["median_s"] * 1000,
                "ms_per_layer": out["median_s"] * 1000 / model.cfg.num_hidden_layers,
                "weight_bytes_per_token": weight_bytes_per_token(model), "kv_bytes_per_token": kv,
                "peak_device_bytes": _peak_bytes(dev), "cuda_graph": s.runner is not None})
    return out


def bench_prefill(model: Model, prompt_len: int, runs: int = 5, warmup: int = 1) -> dict:
    dev = model.device
    prompt, _ = _bench_tokens(model.cfg.vocab_size, prompt_len, 0)
    timer = Timer(dev)
    _reset_peak(dev)

    def once():
        s = Session(model, max_context=prompt_len)
        return timer(lambda: s.prefill(prompt))

    for _ in range(warmup):
        once()
    out = summary([once() for _ in range(runs)])
    flops = 2 * active_params_per_token(model) * prompt_len
    out.update({"prompt_tokens": prompt_len, "tokens_per_s": prompt_len / out["median_s"],
                "time_to_first_token_s": out["median_s"], "ms_per_layer": out["median_s"] * 1000 / model.cfg.num_hidden_layers,
                "flops": flops, "flop_per_s": flops / out["median_s"], "peak_device_bytes": _peak_bytes(dev)})
    return out


def perplexity(model: Model, token_ids: list[int], bos_id: int, max_context: int, chunk: int = 512) -> dict:
    """Score every token after bos; windows of max_context, each starting with bos. -> ppl, nll, count."""
    if max_context < 2:
        raise ValueError("max_context must be >= 2")
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    step = max_context - 1
    for i in range(0, len(token_ids), step):
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


# ------------------------------------------------------------------ comparisons
def free_memory_bytes(device) -> int | None:
    """Free memory on ``device`` (CUDA: the driver's count; CPU: MemAvailable), None if unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _bench_tokens(vocab: int, prompt_len: int, n: int) -> tuple[torch.Tensor, list[int]]:
    """The same prompt and decode tokens bench_decode uses (seeded)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g)
    return prompt, torch.randint(0, vocab, (n,), generator=g).tolist()


def hf_decode(hf, model: Model, prompt_len: int, steps: int, warmup: int = 3) -> dict:
    """transformers' model through the same work as bench_decode: prefill, then timed single-token
    steps with its own cache. Also the largest |logit| difference from this engine on the prompt
    (checked in a separate untimed pass with indexer ties broken to the lower index, as here)."""
    from transformers import DynamicCache

    from .hf import stable_topk

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
    from transformers import DynamicCache

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
    input), through ``kernels`` dispatch. -> rows with bytes read, median seconds and bytes/s."""
    from dsv4 import kernels
    from dsv4.kernels import QWeight

    dev = model.device
    cfg = model.cfg
    rows = []
    names = [n for n, v in model.w.items() if isinstance(v, QWeight)
             and (n == "head" or any(n.startswith(f"layers.{i}.") for i in layers))]
    # one routed expert stands for the 6 a token uses (same shapes)
    names = [n for n in names if ".experts." not in n or ".experts.0." in n]
    for name in names:
        w = model.w[name]
        N, K = w.shape
        if name.endswith("attn.wo_a"):
            G = cfg.o_groups
            x = torch.randn(1, G, K, device=dev)
            fn = lambda x=x, w=w: kernels.grouped_linear(x, w)  # noqa: E731
        else:
            x = torch.randn(1, K, device=dev)
            fn = lambda x=x, w=w: kernels.linear(x, w)  # noqa: E731
        t = median_time(dev, fn, runs)
        nbytes = w.nbytes() + x.numel() * 4 + N * 4
        rows.append({"name": name, "format": w.fmt, "out": N, "in": K, "bytes": nbytes, "median_s": t,
                     "bytes_per_s": nbytes / t})
    return rows

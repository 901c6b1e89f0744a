"""Per-kernel GPU time of one decode step (the static step, launched eagerly so every kernel shows).

python3 bench/profile_decode.py [--layers 4] [--prompt-len 1024] [--out FILE] [--trace]
Prints the kernels of 5 decode steps of a synthetic V4-Flash model sorted by total GPU time.
--trace: one step kernel by kernel instead, grouped per layer (a layer starts at its first mHC
kernel): each layer's kernel count and time, then per kernel (GEMVs by weight shape, with GB/s):
calls per layer and microseconds, and the CUDA-graph step time against the kernels' sum.
DSV4_PDL=0 in the environment: kernels launched without programmatic dependent launch.
--compare DSV4_PDL=0,DSV4_PDL=1,DSV4_OVERLAP=0+DSV4_PDL=0: the CUDA-graph step time (median of 30)
under each setting in the order given, one graph captured per setting; a setting is VAR=VALUE
assignments joined by '+', each applied on top of the starting environment (DSV4_PDL:
kernels/triton/pdl.py, DSV4_OVERLAP: kernels/streams.py); a VAR of the form MODULE.TABLE.KEY is a
kernel settings table entry instead (bench/run_tuned.py --set: mhc.DECODE.block_k=256), restored
after its setting.
--tokens 2: the default table for the static step of 2 tokens (MTP's batched verify,
Model.static_step), per step; compare with --tokens 1 (the plain step) from the same command line.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from dsv4.engine.tools.synthetic import synthetic_stored
from dsv4.engine.model.config import DSV4Config
from dsv4.engine.runtime.decode import DecodeRunner
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.kernels.triton import linear, pdl, router
from run_tuned import applied, check_settings  # bench/, this script's folder

GEMV_KERNELS = ("_gemv_fp8_dense", "_gemv_fp4")


def kernel_events(prof) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel / copy the profile saw, in start order."""
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ev.sort(key=lambda e: e.time_range.start)
    return [(e.name, e.time_range.elapsed_us()) for e in ev]


def trace(events, shapes, layers: int, graph_ms: float) -> str:
    """The per-layer and per-kernel tables of one step (see the module docstring)."""
    starts = [i for i, (n, _) in enumerate(events) if n == "_mix_partials"][::2][:layers]
    bounds = starts + [len(events)]
    lines, per = [], defaultdict(lambda: [0, 0.0, 0])
    gi = 0  # GEMV calls seen so far, matched in order with the recorded shapes
    total = sum(t for _, t in events)
    lines.append(f"step: {len(events)} kernels, {total:.1f} us of kernel time; CUDA-graph step {graph_ms * 1000:.1f} us")
    lines.append(f"before the first layer: {len(events[:bounds[0]])} kernels, {sum(t for _, t in events[:bounds[0]]):.1f} us")
    for li in range(len(starts)):
        seg = events[bounds[li]:bounds[li + 1]]
        tail = " (and the head after it)" if li == len(starts) - 1 else ""
        lines.append(f"layer {li}{tail}: {len(seg)} kernels, {sum(t for _, t in seg):.1f} us")
    for name, us in events:
        key, nbytes = name[:60], 0
        if name in GEMV_KERNELS and gi < len(shapes):
            (N, K, M, fmt, nbytes), gi = shapes[gi], gi + 1
            key = f"{name} {fmt} {N}x{K} M={M}"
        r = per[key]
        r[0] += 1
        r[1] += us
        r[2] += nbytes
    lines.append(f"{'kernel':70s} {'calls/layer':>11s} {'us/call':>8s} {'us/layer':>9s} {'GB/s':>7s}")
    n = max(len(starts), 1)
    for key, (c, us, b) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        gbs = f"{b / (us * 1e-6) / 1e9:7.0f}" if b else ""
        lines.append(f"{key:70s} {c / n:11.2f} {us / c:8.2f} {us / n:9.2f} {gbs}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--compare", default=None, metavar="SETTINGS")
    ap.add_argument("--tokens", type=int, default=1, help="tokens per static step (2: MTP's batched verify)")
    a = ap.parse_args()
    if a.tokens != 1 and (a.trace or a.compare):
        ap.error("--tokens goes with the default table only")
    if not 1 <= a.tokens <= 16:
        ap.error("--tokens: 1 to 16")
    if a.compare and a.trace:
        ap.error("--compare and --trace are two separate runs: pick one")
    try:  # a bad setting is one usage line (exit 2) before the model is built
        settings = check_settings(a.compare, "--compare") if a.compare else []
    except SystemExit as e:
        ap.error(str(e))
    full = DSV4Config.flash()
    cfg = full.layer_range(0, a.layers)
    model = Model.from_state_dict(cfg, synthetic_stored(cfg, "cuda"), mode="faithful", device="cuda")
    extra = 40 * len(settings)
    s = Session(model, a.prompt_len + 64 + extra, cuda_graph=False)
    ids = torch.randint(0, cfg.vocab_size, (a.prompt_len + 40 + extra,),
                        generator=torch.Generator().manual_seed(0)).tolist()
    s.prefill(ids[:a.prompt_len])
    r = DecodeRunner(model, s.cache.handles(s.slot), graph=False)

    def step(t, runner=r):
        if a.tokens > 1:  # the static step of several tokens, eager (engine/runtime/speculative.py's verify)
            s.cache.prepare(s.slot, a.tokens)
            with torch.inference_mode():
                model.static_step(torch.full((a.tokens,), t, device="cuda"),
                                  torch.tensor([s.seq_len], device="cuda"), s.cache.handles(s.slot))
            s.cache.commit(s.slot, a.tokens)
            return
        s.cache.prepare(s.slot, 1)
        runner.step(t, s.seq_len)
        s.cache.commit(s.slot, 1)

    for t in ids[a.prompt_len:a.prompt_len + 3]:
        step(t)
    torch.cuda.synchronize()

    def graph_ms(runner, toks) -> float:
        """Median CUDA-graph step time (ms) over toks (the first 4 warm up)."""
        for t in toks[:4]:
            step(t, runner)
        torch.cuda.synchronize()
        a0, b0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for t in toks[4:]:
            s.cache.prepare(s.slot, 1)
            a0.record()
            runner.step(t, s.seq_len)
            b0.record()
            b0.synchronize()
            s.cache.commit(s.slot, 1)
            times.append(a0.elapsed_time(b0))
        return sorted(times)[len(times) // 2]

    if settings:
        rows, at = [], a.prompt_len + 3
        for st in settings:
            with applied(st):
                g = DecodeRunner(model, s.cache.handles(s.slot), graph=True)
                ms = graph_ms(g, ids[at:at + 34])
            at += 34
            rows.append(f"{st:40s} graph step {ms * 1000:8.1f} us")
            print(rows[-1], flush=True)
            del g
        text = f"{a.layers} layers, prompt {a.prompt_len}, faithful\n" + "\n".join(rows)
    elif a.trace:
        shapes, inner = [], linear.gemv

        def recording(x, w, rows_per_group=None, act_quant=False):
            shapes.append((w.shape[0], w.shape[1], x.shape[0], w.fmt + ("+aq" if act_quant else ""), w.nbytes()))
            return inner(x, w, rows_per_group=rows_per_group, act_quant=act_quant)

        linear.gemv = router.gemv = recording
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(ids[a.prompt_len + 3])
            torch.cuda.synchronize()
        linear.gemv = router.gemv = inner
        g = DecodeRunner(model, s.cache.handles(s.slot), graph=True)
        ms = graph_ms(g, ids[a.prompt_len + 4:a.prompt_len + 28])
        head = (f"{a.layers} layers, prompt {a.prompt_len}, faithful, "
                f"PDL {'on' if pdl.on(torch.device('cuda')) else 'off'}")
        text = head + "\n" + trace(kernel_events(prof), shapes, a.layers, ms)
    else:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for t in ids[a.prompt_len + 3:a.prompt_len + 8]:
                step(t)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
        total = sum(e.self_device_time_total for e in prof.key_averages()) / 5
        n = sum(e.count for e in prof.key_averages() if e.self_device_time_total > 0) / 5
        text = (f"{a.layers} layers, prompt {a.prompt_len}, {a.tokens} token(s) per step: {total / 1000:.3f} ms of kernel time per step, "
                f"~{n:.0f} kernels\n{table}")
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

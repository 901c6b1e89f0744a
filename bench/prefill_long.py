"""Long-context prefill on one GPU (#15): time to first token, tokens/s, peak memory beyond the
weights and the KV cache, and the fraction of the measured bf16 matmul rate, for a synthetic
V4-Flash cut to its first ``--layers`` layers; projected to the whole model; then decode steps
through the CUDA graph after the longest prompt.

python3 bench/prefill_long.py [--layers 4] [--prompt-lens 8192,32768,131072,1048576] [--chunk N[,N...]]
       [--runs 1] [--precision faithful] [--time-limit 300] [--decode-steps 32] [--profile] [--json-out FILE]

``--chunk`` takes several sizes (``auto``: default_prefill_chunk's choice) to compare chunk sizes on one
model build: each size is warmed up, then every prompt length runs under it; ``--runs N`` keeps the
fastest of N prefills per (chunk, length).

FLOPs counted (stated in the output as ``flop_formula``), for a prompt of P tokens:
- projections: 2 x (each layer's weights touched per token: attention, compressors, indexer,
  router, shared expert, and k/E of the routed experts) x P, plus the vocabulary head once (prefill
  returns the last token's logits);
- attention, per layer, summed over the query positions t = 1..P: 4 x H x D x keys(t) (QK and PV),
  keys(t) = min(W, t) window keys, + floor(t/128) entries (HCA), + min(topk, floor(t/4)) (CSA);
- the CSA indexer: 2 x Hi x Di x floor(t/4) per query (its q.k over every visible entry).
Projection to the whole model: the measured time x (the whole model's FLOPs / the measured model's
FLOPs), i.e. the measured FLOP rate held (the schedule's CSA/HCA/SWA layers counted by type).
A prompt length whose prefill passes --time-limit is cut through the prefill's progress callback
(Session.prefill raises PrefillInterrupted), and its rate is reported over the tokens done.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from dsv4.engine.model.config import DSV4Config
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import PrefillInterrupted, Session, default_prefill_chunk
from dsv4.engine.tools.bench import measure_matmul_rate
from dsv4.engine.tools.synthetic import synthetic_stored
from dsv4.kernels import QWeight, dispatch


def layer_params(model: Model) -> list[int]:
    """Weights touched per token by each layer's projections (routed experts: k of E)."""
    cfg, out = model.cfg, []
    for spec in model.specs:
        p, n = f"layers.{spec.index}.", 0
        for name, v in model.w.items():
            if name.startswith(p) and isinstance(v, QWeight):
                share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".ffn.experts." in name else 1
                n += v.shape[0] * v.shape[1] * share
        out.append(int(n))
    return out


def attention_flops(cfg: DSV4Config, attn: str, P: int) -> int:
    """Attention (and CSA indexer) FLOPs of one layer of type ``attn`` over a P-token prompt."""
    t = torch.arange(1, P + 1, dtype=torch.float64)
    keys = t.clamp(max=cfg.sliding_window)
    idx = 0.0
    if attn == "hca":
        keys = keys + torch.div(t, 128, rounding_mode="floor")
    elif attn == "csa":
        e = torch.div(t, 4, rounding_mode="floor")
        keys = keys + e.clamp(max=cfg.index_topk)
        idx = 2 * cfg.index_n_heads * cfg.index_head_dim * e.sum().item()
    return int(4 * cfg.num_attention_heads * cfg.head_dim * keys.sum().item() + idx)


def prefill_flops(cfg: DSV4Config, params: list[int], attns: list[str], P: int) -> int:
    return (2 * sum(params) * P + 2 * cfg.vocab_size * cfg.hidden_size
            + sum(attention_flops(cfg, a, P) for a in attns))


def parse_chunks(text: str | None) -> list[int | None]:
    """--chunk: comma-separated token counts or ``auto`` (None: default_prefill_chunk) -> the list."""
    if text is None:
        return [None]
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "auto":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise ValueError(f"--chunk {text!r}: give positive token counts or auto, separated by commas")
    return out


def run_prompt(model: Model, P: int, chunk: int | None, limit: float, decode_steps: int) -> dict:
    dev = model.device
    ids = torch.randint(0, model.cfg.vocab_size, (P + decode_steps,), generator=torch.Generator().manual_seed(P))
    chunk = chunk or default_prefill_chunk(model)
    s = Session(model, P + decode_steps, prefill_chunk=chunk)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    dispatch.reset_report()
    t0 = time.perf_counter()

    def progress(done, total):
        if time.perf_counter() - t0 > limit:
            raise KeyboardInterrupt
        print(f"\r  prefill {done}/{total} tokens, {done / (time.perf_counter() - t0):,.0f} tok/s",
              end="", file=sys.stderr, flush=True)

    cut = None
    try:
        s.prefill(ids[:P], progress=progress)
    except PrefillInterrupted as e:
        cut = e.done
    torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    print(file=sys.stderr)
    r = {"prompt_tokens": P, "chunk": chunk, "seconds": secs,
         "tokens_done": cut if cut is not None else P, "cut_at_time_limit": cut is not None,
         "peak_bytes_beyond_weights_and_cache": torch.cuda.max_memory_allocated(dev) - base,
         "kernels": dispatch.report()}
    r["tokens_per_s"] = r["tokens_done"] / secs
    if cut is None:
        r["time_to_first_token_s"] = secs
        if decode_steps:
            times = []
            for tok in ids[P:].tolist():
                torch.cuda.synchronize(dev)
                a = time.perf_counter()
                s.step(tok)
                torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - a)
            r["decode_ms_per_step_median"] = 1000 * statistics.median(times[2:] or times)
    s.close()
    return r


def profile_prefill(model: Model, P: int) -> None:
    """Per-kernel GPU time of one P-token prefill (after a warm-up), the top 25 by self time
    (engine/tools/bench.profile_call, what ``dsv4 bench prefill --profile`` reports)."""
    from dsv4.engine.tools.bench import profile_call

    ids = torch.randint(0, model.cfg.vocab_size, (P,), generator=torch.Generator().manual_seed(1))
    Session(model, P).prefill(ids)
    r = profile_call(lambda: Session(model, P).prefill(ids), model.device, rows=25)
    for row in r["profile"]:
        print(f"{row['self_s'] * 1000:10.2f} ms {row['share']:6.1%} {row['calls']:7d}  {row['name'][:100]}",
              file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-lens", default="8192,32768,131072,1048576")
    ap.add_argument("--chunk", default=None,
                    help="prefill chunk sizes, comma-separated (auto: default_prefill_chunk, the default)")
    ap.add_argument("--runs", type=int, default=1, help="prefills per chunk and length; the fastest is kept")
    ap.add_argument("--precision", default="faithful")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per prompt length")
    ap.add_argument("--decode-steps", type=int, default=32, help="after the longest prompt")
    ap.add_argument("--profile", action="store_true", help="per-kernel time of an 8192-token prefill")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    try:
        chunks = parse_chunks(a.chunk)
        lens = [int(x) for x in a.prompt_lens.split(",")]
    except ValueError as e:
        ap.error(str(e) if "--chunk" in str(e)
                 else f"--prompt-lens {a.prompt_lens!r}: give token counts separated by commas")
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    if a.layers < 1 or a.decode_steps < 0 or min(lens) < 1:
        ap.error("--layers and every --prompt-lens must be at least 1, --decode-steps at least 0")
    if not torch.cuda.is_available():
        raise SystemExit("prefill_long.py: needs a CUDA device")
    full = DSV4Config.flash()
    cfg = full.layer_range(0, a.layers)
    model = Model.from_state_dict(cfg, synthetic_stored(cfg, "cuda"), mode=a.precision, device="cuda")
    rate = measure_matmul_rate("cuda")
    params = layer_params(model)
    attns = [s.attn for s in model.specs]
    full_attns = [s.attn for s in full.schedule()]
    full_params = [round(sum(params) / len(params))] * full.num_hidden_layers
    if a.profile:
        run_prompt(model, 8192, chunks[0], a.time_limit, 0)
        profile_prefill(model, 8192)
    results = []
    for chunk in chunks:
        # warm-up: compile the kernels, for a first chunk and for a later one (which sees the compressors'
        # carried state: kernel variants of their own; an 8k prompt once took 3.7 s of compiling here)
        run_prompt(model, (chunk or default_prefill_chunk(model)) + 1024, chunk, a.time_limit, 0)
        for P in lens:
            r = min((run_prompt(model, P, chunk, a.time_limit, 0) for _ in range(a.runs)),
                    key=lambda r: (-r["tokens_done"], r["seconds"]))
            if a.decode_steps and P == max(lens) and chunk == chunks[-1] and not r["cut_at_time_limit"]:
                # the decode steps after a prefill of their own (the kept prefill's figures stay the fastest run's)
                d = run_prompt(model, P, chunk, a.time_limit, a.decode_steps)
                if "decode_ms_per_step_median" in d:
                    r["decode_ms_per_step_median"] = d["decode_ms_per_step_median"]
            done = r["tokens_done"]
            flops = prefill_flops(cfg, params, attns, done)
            full_flops = prefill_flops(full, full_params, full_attns, P)
            r.update({"flops": flops, "flop_per_s": flops / r["seconds"], "measured_bf16_matmul_flop_per_s": rate,
                      "matmul_rate_fraction": flops / r["seconds"] / rate, "runs": a.runs,
                      "projected_43_layer_ttft_s": r["seconds"] * full_flops / flops})
            results.append(r)
            cut = f"CUT at {done} tokens, " if r["cut_at_time_limit"] else ""
            ms = r.get("decode_ms_per_step_median")
            decode = f", decode {ms:.2f} ms/step" if ms is not None else ""
            print(f"chunk {r['chunk']:>6} P={P:>8}: {cut}{r['seconds']:.3f} s, {r['tokens_per_s']:,.0f} tok/s, "
                  f"{r['matmul_rate_fraction']:.1%} of bf16 matmul rate, peak "
                  f"+{r['peak_bytes_beyond_weights_and_cache'] / 2**30:.2f} GiB, projected 43 layers "
                  f"{r['projected_43_layer_ttft_s']:.1f} s{decode}")
    out = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
           "layers": a.layers, "precision": a.precision, "flop_formula": __doc__.split("FLOPs counted")[1].split(
               "A prompt length")[0].strip(), "results": results}
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

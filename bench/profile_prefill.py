"""Per-kernel GPU time of one prefill (the chunked path `dsv4 chat` uses), by kernel name.

python3 bench/profile_prefill.py [--layers 4] [--prompt-len 8192] [--precision faithful] [--out FILE]
Prefills a synthetic V4-Flash model once untimed, then once under torch.profiler; prints the wall
time, the kernel time per kernel name (sorted, with its share) and the launches.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dsv4.engine.model.config import DSV4Config
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session, default_prefill_chunk
from dsv4.engine.tools.synthetic import synthetic_stored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--precision", default="faithful")
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = DSV4Config.flash().layer_range(0, a.layers)
    model = Model.from_state_dict(cfg, synthetic_stored(cfg, "cuda"), mode=a.precision, device="cuda")
    ids = torch.randint(0, cfg.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    chunk = a.chunk or default_prefill_chunk(model)

    def once():
        s = Session(model, a.prompt_len + 16, cuda_graph=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        s.prefill(ids, chunk=chunk)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        s.close()
        return dt

    once()
    wall = once()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        once()
    ev = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    ev.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in ev)
    lines = [f"{a.layers} Flash layers, {a.precision}, prompt {a.prompt_len}, chunk {chunk}: wall {wall:.3f} s "
             f"({a.prompt_len / wall:.0f} tok/s), kernel time {total / 1e6:.3f} s, "
             f"{sum(e.count for e in ev)} launches",
             f"{'ms':>9} {'share':>6} {'calls':>6}  kernel"]
    for e in ev[:a.rows]:
        lines.append(f"{e.self_device_time_total / 1000:9.1f} {e.self_device_time_total / total:6.1%} "
                     f"{e.count:6d}  {e.key[:110]}")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

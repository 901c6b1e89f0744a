"""Per-kernel GPU time of one decode step (the static step, launched eagerly so every kernel shows).

python3 bench/profile_decode.py [--layers 4] [--prompt-len 1024] [--out FILE]
Prints the kernels of 5 decode steps of a synthetic V4-Flash model sorted by total GPU time.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dsv4.engine.tools.synthetic import synthetic_stored
from dsv4.engine.model.config import DSV4Config
from dsv4.engine.runtime.decode import DecodeRunner
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    full = DSV4Config.flash()
    cfg = full.layer_range(0, a.layers)
    model = Model.from_state_dict(cfg, synthetic_stored(cfg, "cuda"), mode="faithful", device="cuda")
    s = Session(model, a.prompt_len + 64, cuda_graph=False)
    ids = torch.randint(0, cfg.vocab_size, (a.prompt_len + 16,), generator=torch.Generator().manual_seed(0)).tolist()
    s.prefill(ids[:a.prompt_len])
    r = DecodeRunner(model, s.cache.handles(s.slot), graph=False)

    def step(t):
        s.cache.prepare(s.slot, 1)
        r.step(t, s.seq_len)
        s.cache.commit(s.slot, 1)

    for t in ids[a.prompt_len:a.prompt_len + 3]:
        step(t)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for t in ids[a.prompt_len + 3:a.prompt_len + 8]:
            step(t)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60, max_name_column_width=90)
    total = sum(e.self_device_time_total for e in prof.key_averages()) / 5
    n = sum(e.count for e in prof.key_averages() if e.self_device_time_total > 0) / 5
    head = f"{a.layers} layers, prompt {a.prompt_len}: {total / 1000:.3f} ms of kernel time per step, ~{n:.0f} kernels"
    print(head)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(head + "\n" + table + "\n")


if __name__ == "__main__":
    main()

"""Prefill time under several kernel settings in one process (CUDA only): one model build for all.

python3 bench/compare_prefill.py --compare base=0,mhc.TILE.rows=32,DSV4_PDL=0 [--layers 4]
       [--prompt-len 8192] [--runs 3] [--out FILE]
Synthetic V4-Flash layers, faithful mode, the default prefill chunk. Each setting (VAR=VALUE joined by
'+': a MODULE.TABLE.KEY of dsv4.kernels.triton, as bench/run_tuned.py --set, or an environment
variable) is applied on top of the defaults; one untimed prefill (Triton compiles a changed tile
there), then the median of --runs timed ones (a fresh session each, the GPU synchronised), and the
greedy next token (a setting that changes it changed more than rounding).
"""

from __future__ import annotations

import argparse
import time

import torch

from run_tuned import applied, check_settings  # bench/, this script's folder
from synthetic import flash_on_cuda


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", required=True, metavar="SETTINGS")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    settings = check_settings(a.compare, "compare_prefill.py: --compare")
    if a.runs < 1 or a.prompt_len < 1 or a.layers < 1:
        raise SystemExit("compare_prefill.py: --runs, --prompt-len and --layers must be at least 1")
    from dsv4.engine.runtime.session import Session

    model, ids = flash_on_cuda("compare_prefill.py", a.layers, a.prompt_len)

    def once() -> tuple[float, int]:
        s = Session(model, a.prompt_len + 8)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = s.prefill(ids)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, int(logits.argmax())

    rows = [f"{a.layers} Flash layers, {a.prompt_len}-token prefill, faithful, {torch.cuda.get_device_name()}"]
    print(rows[0], flush=True)
    for st in settings:
        with applied(st):
            once()
            runs = [once() for _ in range(a.runs)]
        times = sorted(t for t, _ in runs)
        rows.append(f"{st:44s} {times[len(times) // 2] * 1000:9.1f} ms  (min {times[0] * 1000:.1f})  "
                    f"next token {runs[-1][1]}")
        print(rows[-1], flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()

"""Where the host waits for the GPU during a prefill (CUDA only).

python3 bench/sync_points.py [--layers 4] [--prompt-len 8192]
Builds synthetic V4-Flash layers (faithful mode), prefills once to warm up, then prefills again under
torch.cuda.set_sync_debug_mode("warn") and prints each source line that made the host wait, with
its count. A wait inside a prefill leaves the GPU idle while the host queues the next launches.
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch

from synthetic import flash_on_cuda  # bench/, this script's folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8192)
    a = ap.parse_args()
    if a.layers < 1 or a.prompt_len < 1:
        raise SystemExit("sync_points.py: --layers and --prompt-len must be at least 1")
    from dsv4.engine.runtime.session import Session

    model, ids = flash_on_cuda("sync_points.py", a.layers, a.prompt_len)
    Session(model, a.prompt_len + 8).prefill(ids)
    s = Session(model, a.prompt_len + 8)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            s.prefill(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print(f"{sum(where.values())} host waits in one {a.prompt_len}-token prefill of {a.layers} layers")
    for loc, n in where.most_common():
        print(f"{n:6d}  {loc}")


if __name__ == "__main__":
    main()

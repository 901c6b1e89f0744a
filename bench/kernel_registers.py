"""Registers and local-memory (spill) bytes of every Triton kernel a prefill and a decode compile (CUDA only).

python3 bench/kernel_registers.py [--layers 4] [--prompt-len 8192] [--steps 4]
Builds synthetic V4-Flash layers (faithful mode), prefills --prompt-len tokens and decodes --steps
tokens, then lists each compiled kernel variant: registers per thread, local memory per thread (the
stack ptxas spills to: off-chip, so a kernel with it is usually far from its speed), warps, stages,
shared memory. Spilling variants are listed first.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import torch

from synthetic import flash_on_cuda  # bench/, this script's folder


def compiled_kernels() -> list[dict]:
    """Every compiled variant of every @triton.jit function in dsv4.kernels.triton, loaded on the device."""
    from triton.runtime.jit import JITFunction

    import dsv4.kernels.triton as pkg

    rows = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, fn in vars(mod).items():
            if not isinstance(fn, JITFunction) or fn.__module__ != mod.__name__:
                continue
            for cache in fn.device_caches.values():
                for kern in cache[0].values():
                    kern._init_handles()
                    md = kern.metadata
                    rows.append({"kernel": f"{info.name}.{name}", "registers": kern.n_regs,
                                 "local_bytes": kern.n_spills * 4, "warps": md.num_warps, "stages": md.num_stages,
                                 "shared_bytes": md.shared})
    return sorted(rows, key=lambda r: (-r["local_bytes"], r["kernel"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    if a.layers < 1 or a.prompt_len < 1 or a.steps < 0:
        raise SystemExit("kernel_registers.py: --layers and --prompt-len must be at least 1, --steps at least 0")
    from dsv4.engine.runtime.session import Session

    model, ids = flash_on_cuda("kernel_registers.py", a.layers, a.prompt_len)
    s = Session(model, a.prompt_len + a.steps + 8)
    s.prefill(ids)
    tok = ids[-1]
    for _ in range(a.steps):
        tok = int(s.step(tok).argmax())
    torch.cuda.synchronize()
    rows = compiled_kernels()
    print(f"{'kernel':44s} {'regs':>5s} {'local B':>8s} {'warps':>5s} {'stages':>6s} {'shared B':>9s}")
    for r in rows:
        flag = "  <- spills" if r["local_bytes"] else ""
        print(f"{r['kernel']:44s} {r['registers']:5d} {r['local_bytes']:8d} {r['warps']:5d} {r['stages']:6d} "
              f"{r['shared_bytes']:9d}{flag}")


if __name__ == "__main__":
    main()

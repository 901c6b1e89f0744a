"""The bench scripts' model and prompt: synthetic V4-Flash layers on CUDA, faithful mode."""

from __future__ import annotations

import torch


def flash_on_cuda(script: str, layers: int, prompt_len: int):
    """-> (model, prompt token ids [prompt_len] as a list): ``layers`` synthetic Flash layers
    (engine/tools/bench.synthetic_model) and a seeded random prompt. SystemExit with one line
    starting ``script:`` without a CUDA device or for a layer count the preset lacks."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: needs a CUDA device")
    from dsv4.engine.tools.bench import BenchError, synthetic_model

    try:
        model, _, _ = synthetic_model("flash", layers, "cuda", "faithful")
    except BenchError as e:
        raise SystemExit(f"{script}: {e}") from None
    ids = torch.randint(0, model.cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    return model, ids

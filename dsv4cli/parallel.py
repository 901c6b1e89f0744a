"""CLI glue for one request over several ranks (issue #18), for ``dsv4 chat`` and ``dsv4 bench`` to call.

Options (the spelling the commands expose):
- ``--gpus N``: N GPUs of this host, rank r on cuda:r, NCCL; ``--gpus auto``: the fewest GPUs whose
  memory holds the weights, the cache at --max-context and the reserve (dsv4 plan's answer);
  ``--gpus 1`` (or no --gpus): today's single-device path, unchanged.
- ``--device cpu --ranks N``: the same split in N CPU processes over gloo (tests, CI).
- Under ``torchrun`` (RANK/WORLD_SIZE set) the ranks come from its environment and --gpus/--ranks
  are ignored; only rank 0 returns from ``open_session``, the others serve and exit.
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import UserError

H200_BYTES = 141 * 10 ** 9  # what dsv4 plan assumes without a GPU to ask


def visible_gpus() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_memory() -> int:
    """Total memory of GPU 0 in bytes, or H200_BYTES without a GPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return H200_BYTES


def under_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_ranks(device: str, gpus: str | None, ranks: int | None, model_dir, max_context: int,
                  precision: str) -> tuple[str, int]:
    """The options -> (device kind "cpu" | "cuda", number of ranks). One rank means the ordinary
    single-device path. UserError for contradictions (--gpus with --device cpu, --ranks without it,
    more GPUs than visible, a split the model does not allow)."""
    from dsv4.engine.runtime.parallel import plan as P

    if under_torchrun():
        return ("cpu" if device == "cpu" else "cuda"), int(os.environ["WORLD_SIZE"])
    if gpus is not None and ranks is not None:
        raise UserError("give --gpus (GPUs) or --ranks (CPU processes with --device cpu), not both")
    if ranks is not None:
        if device != "cpu":
            raise UserError(f"--ranks {ranks} runs CPU processes: add --device cpu (for GPUs use --gpus {ranks})")
        if ranks < 1:
            raise UserError(f"--ranks {ranks}: use 1 or more")
        return "cpu", ranks
    if gpus is None:
        return device, 1
    if device == "cpu":
        raise UserError("--gpus runs on GPUs: drop --device cpu (CPU processes: --device cpu --ranks N)")
    have = visible_gpus()
    if have == 0:
        raise UserError(f"--gpus {gpus}: no CUDA GPU is visible here (CPU processes: --device cpu --ranks N)")
    if gpus == "auto":
        from dsv4.engine.model.config import DSV4Config

        cfg = DSV4Config.from_pretrained(model_dir)
        n = P.fewest_ranks(cfg, P.checkpoint_tensors(model_dir), max_context, device_memory(), have, precision)
        if n is None:
            raise UserError(f"{model_dir} with a {max_context:,}-token cache does not fit on the {have} GPUs here "
                            "(see dsv4 plan)")
        return "cuda", n
    try:
        n = int(gpus)
    except ValueError:
        raise UserError(f"--gpus {gpus!r}: use a number or auto") from None
    if not 1 <= n <= have:
        raise UserError(f"--gpus {n}: this machine has {have} visible GPU{'s' if have != 1 else ''}")
    return (device if n == 1 and device.startswith("cuda") else "cuda"), n  # one GPU: the one asked for


def open_session(model_dir, precision: str, max_context: int, device: str, ranks: int, threads: int | None = None,
                 progress=None, synthetic=None):
    """Rank 0's session over ``ranks`` processes (spawned here, or torchrun's), a drop-in for
    engine.runtime.session.Session (Conversation and the decode loop take it as they are). The
    model's checkpoint is read by every rank, each its own slices. Errors: UserError with one line
    (a checkpoint or layout problem, a rank that failed to start). ``session.close()`` (also at exit)
    stops every rank. progress(tensor): called per tensor rank 0 reads. A CheckpointError (bad folder,
    corrupt shard) comes out as it is, before any worker starts. synthetic: a DSV4Config whose random
    stored-format weights every rank makes, its own slices only, instead of reading model_dir."""
    from dsv4.engine.runtime.parallel.launch import ParallelError, RunSpec, from_torchrun, start
    from dsv4.engine.runtime.parallel.layout import LayoutError

    if device == "cpu" and threads is None:
        from .common import default_threads

        threads = max(1, default_threads() // ranks)
    spec = RunSpec(str(Path(model_dir)) if model_dir is not None else "", ranks,
                   device="cpu" if device == "cpu" else "cuda", mode=str(precision), max_context=max_context,
                   threads=threads, synthetic=synthetic)
    try:
        return from_torchrun(spec, progress) or start(spec, progress)
    except LayoutError as e:
        raise UserError(f"{model_dir or 'the synthetic model'}: {e}") from None
    except ParallelError as e:
        raise UserError(str(e)) from None


def load_conversation(model_dir, device: str, precision: str, max_context: int, messages, think, reasoning_effort,
                      ranks: int, threads: int | None = None, prefill_chunk: int | None = None):
    """chat.load_conversation over ``ranks`` processes (device "cpu" or "cuda"): the same (conv, info),
    the Conversation over rank 0's ParallelSession. chat calls it instead when resolve_ranks gives
    more than one rank."""
    from dsv4.engine.runtime.conversation import Conversation
    from dsv4.engine.runtime.tokenizer import Tokenizer

    from dsv4.engine.model.config import DSV4Config

    tok = Tokenizer.from_dir(model_dir)
    max_context = min(max_context, DSV4Config.from_pretrained(model_dir).max_position_embeddings)
    session = open_session(model_dir, precision, max_context, device, ranks, threads=threads)
    session.prefill_chunk = prefill_chunk  # rank 0 cuts the prompt; the workers run its chunks
    cfg = session.model.cfg
    if tok.vocab_size > cfg.vocab_size:
        session.close()
        raise UserError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    where = f"{ranks} GPUs" if device != "cpu" else f"{ranks} CPU ranks"
    info = (f"{Path(model_dir).name} · {cfg.num_hidden_layers} layers · {precision} · {where} · "
            f"context {session.max_context}")
    conv = Conversation(session, tok, thinking=think, reasoning_effort=reasoning_effort, messages=messages)
    return conv, info


def time_decode(session, prompt_len: int, steps: int, warmup: int = 3) -> dict:
    """Decode timing over ranks (rank 0's view, which includes the collectives and the command
    channel): prefill a ``prompt_len`` prompt, ``warmup`` steps, then ``steps`` timed steps.
    -> {"median_s", "p10_s", "p90_s", "runs", "ms_per_token", "tokens_per_s", "time_to_first_token_s",
    "ranks"}."""
    from dsv4.engine.tools.bench import Timer, _bench_tokens, summary

    prompt, toks = _bench_tokens(session.model.cfg.vocab_size, prompt_len, steps + warmup)
    timer = Timer(session.model.device)
    ttft = timer(lambda: session.prefill(prompt))
    for t in toks[:warmup]:
        session.step(t)
    out = summary([timer(lambda t=t: session.step(t)) for t in toks[warmup:]])
    out.update({"ms_per_token": out["median_s"] * 1000, "tokens_per_s": 1 / out["median_s"],
                "time_to_first_token_s": ttft, "ranks": session.ranks})
    return out

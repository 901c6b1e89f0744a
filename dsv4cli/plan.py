"""``dsv4 plan``: what fits where over N GPUs before anything loads (weights, KV cache, headroom per GPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import UserError, check_precision, guard

HELP = """Show how a model splits over N GPUs (or CPU ranks) and what each holds before anything loads:
its experts, heads and vocabulary rows, weight bytes (from the checkpoint's headers, or the
published formats for a preset), the KV cache at --context (every GPU holds the whole cache of its
request), a fixed reserve for activations, CUDA graph and NCCL, and the headroom left on each GPU.
--gpus auto answers the fewest GPUs that hold it all."""


def plan(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint folder (its headers are read, no weights)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="flash or pro (published formats), instead of --model."),
    gpus: str = typer.Option("auto", "--gpus", help="Number of GPUs (ranks), or auto: the fewest that fit."),
    context: str = typer.Option("64k", "--context", "-c", help="Context length held in the KV cache (k = 1024, m = 1024k)."),
    precision: str = typer.Option("faithful", "--precision", help="faithful (FP8/FP4 cache) or exact (float32 cache)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory of one GPU, e.g. 141GB, 80GiB "
                                             "(default: GPU 0's total here, else 141GB, an H200)."),
    available: Optional[int] = typer.Option(None, "--available", help="GPUs --gpus auto may use (default: the "
                                            "GPUs visible here, else 8)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    guard(_plan)(model, preset, gpus, context, precision, gpu_memory, available, json_out)


def _plan(model, preset, gpus, context, precision, gpu_memory, available, json_out):
    from dsv4.engine.model.config import DSV4Config
    from dsv4.engine.runtime.parallel.layout import LayoutError
    from dsv4.engine.runtime.parallel import plan as P

    from .inspect_cache import parse_bytes, parse_contexts
    from .parallel import device_memory, visible_gpus

    precision = str(check_precision(precision))
    if model is not None and preset is not None:
        raise UserError("give --model or --preset, not both")
    if model is not None:
        from dsv4.engine.checkpoint.published import model_folder

        model_folder(model)
        cfg, name, tensors = DSV4Config.from_pretrained(model), str(model), P.checkpoint_tensors(model)
    else:
        preset = preset or "flash"
        if preset not in ("flash", "pro"):
            raise UserError(f"--preset {preset!r}: use flash or pro")
        cfg, name = DSV4Config.preset(preset), f"DeepSeek-V4-{preset.capitalize()}"
        tensors = P.published_tensors(cfg)
    tokens = parse_contexts(context)
    if len(tokens) != 1:
        raise UserError(f"--context {context!r}: give one length")
    tokens = tokens[0]
    if tokens > cfg.max_position_embeddings:
        raise UserError(f"--context {tokens:,}: {name} holds at most {cfg.max_position_embeddings:,} tokens")
    try:
        memory = parse_bytes(gpu_memory) if gpu_memory else device_memory()
    except UserError:
        raise UserError(f"--gpu-memory {gpu_memory!r}: use a size like 141GB or 80GiB") from None
    if gpus == "auto":
        pool = available or visible_gpus() or 8
        n = P.fewest_ranks(cfg, tensors, tokens, memory, pool, precision)
        if n is None:
            raise UserError(f"{name} with a {tokens:,}-token cache does not fit on {pool} GPUs of "
                            f"{memory / 1e9:.0f} GB; use more GPUs (--available) or a shorter --context")
    else:
        try:
            n = int(gpus)
        except ValueError:
            raise UserError(f"--gpus {gpus!r}: use a number or auto") from None
        if n < 1:
            raise UserError(f"--gpus {n}: use 1 or more")
    try:
        out = P.plan(cfg, tensors, n, tokens, precision, memory)
    except LayoutError as e:
        raise UserError(f"--gpus {n}: {e}") from None
    out["model"] = name
    if json_out:
        print(json.dumps(out, indent=1))
        return
    _render(out, memory)


def _gb(n) -> str:
    return f"{n / 1e9:.2f}"


def _render(out: dict, memory: int) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"{out['model']} over {out['ranks']} GPU{'s' if out['ranks'] > 1 else ''} · "
                    f"{out['context_tokens']:,}-token cache · {out['precision']} · {memory / 1e9:.0f} GB per GPU "
                    "(bytes in GB)",
              title_justify="left")
    for col in ("rank", "experts", "heads", "vocab", "weights", "KV", "reserve", "total", "free"):
        t.add_column(col, justify="right")
    for r in out["per_rank"]:
        head = r["headroom_bytes"]
        t.add_row(str(r["rank"]), f"{r['experts'][0]}-{r['experts'][1] - 1}", f"{r['heads'][0]}-{r['heads'][1] - 1}",
                  f"{r['vocab'][0]}-{r['vocab'][1] - 1}", _gb(r["weight_bytes"]), _gb(r["kv_bytes"]),
                  _gb(r["reserve_bytes"]), _gb(r["total_bytes"]),
                  _gb(head) if head >= 0 else f"[red]{_gb(head)}[/]")
    con.print(t)
    con.print("fits" if out["fits"] else "[red]does not fit[/]: use more GPUs or a shorter --context")

"""``dsv4 convert SRC DST``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import THREADS_OPT_HELP, UserError, apply_threads, guard

HELP = """Convert a DeepSeek-V4 checkpoint (published Hugging Face layout, or BF16 with the same names)
to this project's layout: routed experts to NVFP4 by default (from MXFP4 the values are kept exactly;
blocks whose scale e4m3 cannot carry are re-rounded and counted), dense linears FP8 with 128x128 block
scales (kept bit-exact when already FP8), small tensors as stored, plus a manifest. Streams tensor by
tensor; DST appears only when complete. --force replaces only a previous dsv4 output."""


def convert(
    src: Path = typer.Argument(..., help="Source checkpoint folder."),
    dst: Path = typer.Argument(..., help="Destination folder: new, empty, or a previous dsv4 output with --force."),
    experts: str = typer.Option("nvfp4", "--experts", help="Routed experts: nvfp4, mxfp4, fp8 or bf16."),
    dense: str = typer.Option("fp8", "--dense", help="Dense linears: fp8 or bf16."),
    force: bool = typer.Option(False, "--force", help="Replace DST when it is a previous dsv4 convert output."),
    verify_out: bool = typer.Option(False, "--verify", help="Reload DST and report the max |difference| per format against SRC (0 where lossless)."),
    shard_size: int = typer.Option(1024, "--shard-size-mb", help="Output shard size in MiB (also bounds memory use)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_OPT_HELP),
):
    guard(_convert)(src, dst, experts, dense, force, verify_out, shard_size, threads)


def _convert(src, dst, experts, dense, force, verify_out, shard_size, threads=None):
    apply_threads(threads)  # on a busy 2-core machine the default torch threads made convert 6x slower
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from dsv4.engine.checkpoint.convert import (ConvertError, DestinationExists, Terminated, convert_checkpoint,
                                                plan_convert, verify, verify_summary)

    console = Console(stderr=True)
    if shard_size < 1:
        raise UserError("--shard-size-mb must be >= 1")
    try:  # every argument and the destination are checked before anything is drawn or written
        plan = plan_convert(src, dst, experts=experts, dense=dense, force=force)
    except DestinationExists as e:
        raise UserError(f"{e.path}: already exists (use --force to replace it)") from None
    except ConvertError as e:
        if e.option:
            raise UserError(f"--{e.option} {e.value!r}: use one of {', '.join(e.choices)}") from None
        raise
    if plan.faithful_problem:
        console.print(f"[yellow]warning:[/] this model cannot run in faithful precision ({plan.faithful_problem}); "
                      f"run it with --precision exact", highlight=False, soft_wrap=True)
    for p in plan.stale:
        console.print(f"removing {p}: left by an interrupted convert", highlight=False, soft_wrap=True)
    try:
        with Progress(TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=console, transient=False) as bar:
            task = bar.add_task("convert", total=plan.total_bytes)
            result = convert_checkpoint(src, dst, max_shard_bytes=shard_size << 20, plan=plan,
                                        progress=lambda n: bar.advance(task, n))
    except Terminated:
        console.print(f"terminated: the partial output was removed, {dst} was not written", highlight=False)
        raise typer.Exit(143) from None
    experts_n = sum(f == experts for n, f in result.formats.items() if ".experts." in n)
    console.print(f"wrote {dst} (experts {experts}, dense {dense}, {len(result.formats)} tensors)", highlight=False)
    if experts == "nvfp4":
        rr = result.rerounded_blocks
        exact = sum(1 for n, f in result.formats.items() if ".experts." in n and f == experts and n in result.lossless)
        console.print(f"experts -> NVFP4: {exact} of {experts_n} expert tensors bit-exact in value (lossless from "
                      "MXFP4; a float source is rounded)"
                      + (f"; {sum(rr.values())} blocks re-rounded in {len(rr)} tensors (exponent span wider than "
                         f"e4m3 holds)" if rr else ""), highlight=False, soft_wrap=True)
        for name, n in sorted(rr.items(), key=lambda kv: -kv[1])[:10]:
            console.print(f"  {name:<48} {n} blocks re-rounded", highlight=False)
    if verify_out:
        rows = verify(src, dst)
        for fmt, s in sorted(verify_summary(rows).items()):
            what = "lossless" if s["lossless"] == s["tensors"] else f"{s['lossless']} lossless"
            extra = f", {s['rerounded_blocks']} blocks re-rounded" if s["rerounded_blocks"] else ""
            console.print(f"  {fmt:<6} {s['tensors']:>5} tensors  max |difference| {s['max_abs']:.3g}  ({what}{extra})",
                          highlight=False)
        bad = [r for r in rows if not r.ok]
        for r in sorted((r for r in rows if r.max_abs > 0 or not r.ok), key=lambda r: -r.rel)[:5]:
            console.print(f"  {r.name:<48} {r.fmt:<6} max |diff| {r.max_abs:.3g} rel err {r.rel:.4f} "
                          f"{'ok' if r.ok else 'TOO HIGH'}", highlight=False, soft_wrap=True)
        console.print(f"verified {len(rows)} tensors: {len(rows) - len(bad)} within limits, {len(bad)} above",
                      highlight=False)
        if bad:
            raise UserError(f"--verify: {len(bad)} tensors exceed their error limit (worst "
                            f"{max(bad, key=lambda r: r.rel).name})")

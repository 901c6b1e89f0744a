"""``dsv4 convert SRC DST``."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import UserError, guard

HELP = """Convert a DeepSeek-V4 checkpoint (published Hugging Face layout, or BF16 with the same names)
to this project's layout: routed experts to NVFP4 by default, dense linears FP8 with 128x128 block
scales (kept bit-exact when already FP8), small tensors as stored, plus a manifest. Streams tensor by
tensor; DST appears only when complete."""


def convert(
    src: Path = typer.Argument(..., help="Source checkpoint folder."),
    dst: Path = typer.Argument(..., help="Destination folder (must not exist unless --force)."),
    experts: str = typer.Option("nvfp4", "--experts", help="Routed experts: nvfp4, mxfp4, fp8 or bf16."),
    dense: str = typer.Option("fp8", "--dense", help="Dense linears: fp8 or bf16."),
    force: bool = typer.Option(False, "--force", help="Replace an existing DST."),
    verify_out: bool = typer.Option(False, "--verify", help="Reload DST and report per-tensor error against SRC."),
    shard_size: int = typer.Option(1024, "--shard-size-mb", help="Output shard size in MiB (also bounds memory use)."),
):
    guard(_convert)(src, dst, experts, dense, force, verify_out, shard_size)


def _convert(src, dst, experts, dense, force, verify_out, shard_size):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from dsv4.engine.checkpoint.published import open_checkpoint
    from dsv4.engine.checkpoint.convert import convert_checkpoint, verify

    console = Console(stderr=True)
    if shard_size < 1:
        raise UserError("--shard-size-mb must be >= 1")
    if not Path(src).is_dir():
        raise UserError(f"{src}: no such checkpoint folder")
    ck = open_checkpoint(src)
    total = sum((Path(src) / s).stat().st_size for s in set(ck.weight_map.values()))
    with Progress(TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task("convert", total=total)
        convert_checkpoint(src, dst, experts=experts, dense=dense, force=force,
                           max_shard_bytes=shard_size << 20, progress=lambda n: bar.advance(task, n))
    console.print(f"wrote {dst} (experts {experts}, dense {dense})")
    if verify_out:
        rows = verify(src, dst)
        bad = [r for r in rows if not r[3]]
        worst = sorted(rows, key=lambda r: -r[2])[:5]
        for name, fmt, err, ok in worst:
            console.print(f"  {name:<48} {fmt:<6} rel err {err:.4f} {'ok' if ok else 'TOO HIGH'}")
        console.print(f"verified {len(rows)} tensors: {len(rows) - len(bad)} within limits, {len(bad)} above")
        if bad:
            raise UserError(f"--verify: {len(bad)} tensors exceed their error limit (worst {bad[0][0]})")

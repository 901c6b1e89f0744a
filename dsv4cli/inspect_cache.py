"""``dsv4 inspect-cache``: KV cache memory by layer type and component, from cache/'s own accounting."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from .common import UserError, guard

HELP = """Show the KV cache memory of a model at given context lengths, by layer type (SWA/CSA/HCA)
and component (FP8, BF16 RoPE, scales, FP4 indexer keys, window, compressor state), compared with
a DeepSeek-V3.2-style MLA cache (656 B/token/layer x 61 layers) and a plain BF16 K+V cache of the
same width. Sizes: k = 1024 tokens, m = 1024k (so 1m = 1,048,576)."""

PAPER_CLAIM = {"flash": "about 7% of V3.2 at 1M", "pro": "about 10% of V3.2 at 1M"}
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_BYTES = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_contexts(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*", part)
        if not m or float(m.group(1)) <= 0:
            raise UserError(f"--context {part.strip()!r}: use token counts like 8192, 8k, 128k or 1m")
        out.append(int(float(m.group(1)) * _UNITS[m.group(2).lower()]))
    return out


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _BYTES:
        raise UserError(f"--budget {text!r}: use a size like 40GiB, 80GB or 500MiB")
    return int(float(m.group(1)) * _BYTES[m.group(2).lower()])


def plain_bf16_bytes(cfg, tokens: int) -> int:
    """A plain attention cache: K and V of width hidden_size in BF16, every layer."""
    return 2 * cfg.hidden_size * 2 * cfg.num_hidden_layers * tokens


def report(cfg, schema, tokens: int) -> dict:
    from dsv4.cache.schema import layer_block_breakdown, v32_bytes

    acc = schema.bytes_for_context(tokens)
    per_type = {}
    for attn, t in acc["by_type"].items():
        ly = next(x for x in schema.layers if x.attn == attn)
        per_entry = {"fp8": ly.kv.fp8_bytes, "bf16": ly.kv.bf16_bytes, "scales": ly.kv.scale_bytes,
                     "fp4": ly.idx.fp4_bytes if ly.idx else 0, "f32": ly.kv.f32_bytes}
        if ly.idx:
            per_entry["scales"] += ly.idx.scale_bytes
            per_entry["f32"] += ly.idx.f32_bytes
        per_type[attn] = {**t, "entries_per_block": ly.entries_per_block, "bytes_per_entry": per_entry,
                          "block_bytes_per_layer": layer_block_breakdown(ly)["total"],
                          "bytes_per_token": t["total"] / tokens}
    v32, plain = v32_bytes(tokens), plain_bf16_bytes(cfg, tokens)
    return {"context_tokens": tokens, "total_bytes": acc["total"], "mode": schema.mode, "by_type": per_type,
            "v32_bytes": v32, "ratio_to_v32": acc["total"] / v32, "plain_bf16_bytes": plain,
            "ratio_to_plain_bf16": acc["total"] / plain}


def longest_context(schema, budget: int) -> int:
    """Largest token count whose cache fits in ``budget`` bytes (0 if none)."""
    lo, hi = 0, 1
    while schema.bytes_for_context(hi)["total"] <= budget and hi < 1 << 40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if schema.bytes_for_context(mid)["total"] <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def inspect_cache(
    preset: Optional[str] = typer.Option(None, "--preset", help="flash or pro (default flash unless --model)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Read the config of this checkpoint folder."),
    context: str = typer.Option("8k,128k,1m", "--context", "-c", help="Comma-separated context lengths."),
    mode: str = typer.Option("faithful", "--mode", help="faithful (FP8/FP4 storage) or exact (float32)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Also answer the longest context that fits, e.g. 40GiB."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of bytes against context length."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list, one object per context."),
):
    guard(_inspect)(preset, model, context, mode, budget, plot, json_out)


def _inspect(preset, model, context, mode, budget, plot, json_out):
    from dsv4.cache import CacheSchema
    from dsv4.engine.model.config import DSV4Config

    if mode not in ("faithful", "exact"):
        raise UserError(f"--mode {mode!r}: use faithful or exact")
    if preset and model:
        raise UserError("give --preset or --model, not both")
    if model:
        cfg, name = DSV4Config.from_pretrained(model), str(model)
    else:
        preset = preset or "flash"
        if preset not in ("flash", "pro"):
            raise UserError(f"--preset {preset!r}: use flash or pro")
        cfg, name = DSV4Config.preset(preset), f"DeepSeek-V4-{preset.capitalize()}"
    schema = CacheSchema.from_config(cfg, mode)
    rows = [report(cfg, schema, t) for t in parse_contexts(context)]
    fit = None
    if budget:
        b = parse_bytes(budget)
        fit = {"budget_bytes": b, "longest_context_tokens": longest_context(schema, b)}
    if plot:
        _plot(cfg, schema, plot, name)
    if json_out:
        out = rows if fit is None else rows + [fit]
        print(json.dumps(out, indent=1))
        return
    _render(rows, name, preset, fit)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _render(rows, name, preset, fit):
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for r in rows:
        t = Table(title=f"{name} · {r['context_tokens']:,} tokens · {r['mode']}", title_justify="left")
        for col in ("type", "layers", "entries/block", "FP8 B/entry", "BF16 B/entry", "scale B/entry",
                    "FP4 B/entry", "window", "state", "B/token", "total"):
            t.add_column(col, justify="right")
        for attn in ("swa", "csa", "hca"):
            if attn not in r["by_type"]:
                continue
            x = r["by_type"][attn]
            e = x["bytes_per_entry"]
            t.add_row(attn.upper(), str(x["layers"]), str(x["entries_per_block"]), str(e["fp8"] or e["f32"]),
                      str(e["bf16"]), str(e["scales"]), str(e["fp4"]), _human(x["window"]), _human(x["state"]),
                      f"{x['bytes_per_token']:.1f}", _human(x["total"]))
        t.add_row("all", "", "", "", "", "", "", "", "", f"{r['total_bytes'] / r['context_tokens']:.1f}",
                  _human(r["total_bytes"]), style="bold")
        con.print(t)
        claim = f" (paper: {PAPER_CLAIM[preset]})" if preset in PAPER_CLAIM else ""
        con.print(f"  vs DeepSeek-V3.2 MLA cache {_human(r['v32_bytes'])}: {r['ratio_to_v32']:.1%}{claim}")
        con.print(f"  vs plain BF16 K+V cache {_human(r['plain_bf16_bytes'])}: {r['ratio_to_plain_bf16']:.2%}\n")
    if fit:
        con.print(f"Longest context within {_human(fit['budget_bytes'])}: {fit['longest_context_tokens']:,} tokens")


def _plot(cfg, schema, path: Path, name: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'dsv4[plot]'") from None
    from dsv4.cache.schema import v32_bytes

    xs = [1 << k for k in range(10, 21)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(xs, [schema.bytes_for_context(x)["total"] for x in xs], "o-", label=f"{name} ({schema.mode})")
    ax.loglog(xs, [v32_bytes(x) for x in xs], "s--", label="DeepSeek-V3.2 MLA (656 B x 61 layers)")
    ax.loglog(xs, [plain_bf16_bytes(cfg, x) for x in xs], "^:", label="plain BF16 K+V, same width")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache bytes per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

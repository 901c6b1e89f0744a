"""``dsv4 inspect-cache``: KV cache memory by layer type and component, from cache/'s own accounting."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import UserError, check_precision, guard

HELP = """Show the KV cache memory of a model at given context lengths, by layer type (SWA/CSA/HCA)
and component (FP8, BF16 RoPE, scales, FP4 indexer keys, window, compressor state), compared with
a DeepSeek-V3.2-style MLA cache (656 B/token/layer x 61 layers) and a plain BF16 K+V cache of the
same width. Sizes: k = 1024 tokens, m = 1024k (so 1m = 1,048,576)."""

PAPER_CLAIM = {"flash": "about 7% of V3.2 at 1M", "pro": "about 10% of V3.2 at 1M"}
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_BYTES = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_contexts(text: str) -> list[int]:
    """"8k,128k,1m" -> [8192, 131072, 1048576]: whole token counts >= 1 (k = 1024, m = 1024k, g = 1024m)."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)\s*", part)
        if not m:
            raise UserError(f"--context {part.strip()!r}: use token counts like 8192, 8k, 128k or 1m")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if n < 1:
            raise UserError(f"--context {part.strip()!r}: a context holds at least 1 token")
        out.append(int(n))
    return out


def parse_bytes(text: str) -> int:
    """"40GiB" -> 42949672960: a size with a unit (B, kB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _BYTES:
        raise UserError(f"--budget {text!r}: use a size like 40GiB, 80GB or 500MiB")
    return int(float(m.group(1)) * _BYTES[m.group(2).lower()])


def inspect_cache(
    preset: Optional[str] = typer.Option(None, "--preset", help="flash or pro (default flash unless --model)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Read the config of this checkpoint folder."),
    context: str = typer.Option("8k,128k,1m", "--context", "-c", help="Comma-separated context lengths in tokens "
                                "(k = 1024, m = 1024k), at most the model's maximum."),
    precision: str = typer.Option("faithful", "--precision", help="faithful (FP8/FP4 storage) or exact (float32)."),
    mode: Optional[str] = typer.Option(None, "--mode", hidden=True, help="Old name of --precision."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Also answer the longest context that fits in this "
                                         "many bytes, e.g. 40GiB (capped at the model's maximum)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of cache bytes against context length "
                                        "(marking --context and --budget)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list to stdout: one object per context, then "
                                  "the --budget answer."),
):
    guard(_inspect)(preset, model, context, mode if mode is not None else precision, budget, plot, json_out,
                    "--mode" if mode is not None else "--precision")


def _inspect(preset, model, context, precision, budget, plot, json_out, precision_opt="--precision"):
    from dsv4.cache import CacheError, CacheSchema
    from dsv4.cache.budget import budget_report, context_report
    from dsv4.engine.model.config import DSV4Config

    precision = check_precision(precision, precision_opt)
    if preset and model:
        raise UserError("give --preset or --model, not both")
    if model:
        cfg, name = DSV4Config.from_pretrained(model), str(model)
    else:
        preset = preset or "flash"
        if preset not in ("flash", "pro"):
            raise UserError(f"--preset {preset!r}: use flash or pro")
        cfg, name = DSV4Config.preset(preset), f"DeepSeek-V4-{preset.capitalize()}"
    limit = cfg.max_position_embeddings
    tokens = parse_contexts(context)
    for t in tokens:
        if t > limit:
            raise UserError(f"--context {t:,} tokens: {name} holds at most {limit:,} (max_position_embeddings)")
    try:
        schema = CacheSchema.from_config(cfg, str(precision))
    except CacheError as e:
        hint = "; use --precision exact for this model" if precision.faithful else ""
        raise UserError(f"{name}: {e}{hint}") from None
    fit = budget_report(schema, parse_bytes(budget), limit) if budget else None
    rows = [context_report(cfg, schema, t) for t in tokens]
    if plot:
        _plot(cfg, schema, plot, name, tokens, fit)
    if json_out:
        print(json.dumps(rows if fit is None else rows + [fit], indent=1))
    else:
        _render(rows, name, preset, fit)
    if plot:
        sys.stderr.write(f"wrote {plot}\n")


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
        t = Table(title=f"{name} · {r['context_tokens']:,} tokens · {r['precision']}", title_justify="left")
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
        if fit["capped_at_model_maximum"]:
            con.print(f"  (the model's maximum, max_position_embeddings; the budget alone would hold "
                      f"{fit['uncapped_tokens']:,})")


def _plot(cfg, schema, path: Path, name: str, tokens: list[int], fit: dict | None):
    """PNG of cache bytes per request against context length (log-log, from 1k tokens to the
    largest of the model's maximum and --context), the asked contexts marked, and the --budget as a
    horizontal line with its longest context."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'dsv4[plot]'") from None
    from dsv4.cache.budget import plain_bf16_bytes
    from dsv4.cache.schema import v32_bytes

    top = max([cfg.max_position_embeddings, *tokens])
    lo = min([1024, *tokens])
    xs = sorted({lo, top, *tokens, *(1 << k for k in range(lo.bit_length(), top.bit_length()))})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.loglog(xs, [schema.bytes_for_context(x)["total"] for x in xs], "-", label=f"{name} ({schema.mode})")
    ax.loglog(xs, [v32_bytes(x) for x in xs], "--", label="DeepSeek-V3.2 MLA (656 B x 61 layers)")
    ax.loglog(xs, [plain_bf16_bytes(cfg, x) for x in xs], ":", label="plain BF16 K+V, same width")
    ax.loglog(tokens, [schema.bytes_for_context(t)["total"] for t in tokens], "o", color="C0")
    for t in tokens:
        ax.annotate(f"{_tokens(t)}: {_human(schema.bytes_for_context(t)['total'])}",
                    (t, schema.bytes_for_context(t)["total"]), textcoords="offset points", xytext=(-4, 6),
                    ha="right", fontsize=8)
    if fit:
        ax.axhline(fit["budget_bytes"], color="C3", lw=0.8)
        ax.annotate(f"budget {_human(fit['budget_bytes'])}: {fit['longest_context_tokens']:,} tokens"
                    + (" (model maximum)" if fit["capped_at_model_maximum"] else ""),
                    (xs[0], fit["budget_bytes"]), textcoords="offset points", xytext=(2, 3), fontsize=8, color="C3")
    ax.set_xscale("log", base=2)  # ticks at 1k, 4k, 16k, ... and 1, 8, 64 ... MiB / GiB
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=4))
    ax.yaxis.set_major_locator(LogLocator(base=8))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tokens(v)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.set_title(f"KV cache per request: {name}, {schema.mode}")
    ax.set_xlabel("context length (tokens; k = 1024)")
    ax.set_ylabel("KV cache size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise UserError(f"--plot {path}: cannot write ({e.strerror})") from None
    finally:
        plt.close(fig)


def _tokens(n: float) -> str:
    """A token count in k (1024) / m (1024k) units: 131072 -> 128k."""
    for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.3g}{unit}"
    return f"{n:.0f}"

"""``dsv4 bench decode | prefill | perplexity``."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import UserError, check_precision, guard, resolve_device

app = typer.Typer(no_args_is_help=True, help="Measure decode and prefill speed, or perplexity (batch 1).")

MODEL_OPT = typer.Option(None, "--model", "-m", help="Checkpoint folder.")
PRESET_OPT = typer.Option(None, "--preset", help="flash or pro: real dimensions with --synthetic weights.")
LAYERS_OPT = typer.Option(None, "--layers", help="Use only the first N layers (figures are projected to all).")
SYN_OPT = typer.Option(False, "--synthetic", help="Random weights generated in their stored formats on the device.")
JSON_OPT = typer.Option(None, "--json", help="Write results as JSON to FILE ('-' for stdout).")
COMPARE_OPT = typer.Option(None, "--compare", help="Also run the same work through 'reference' (the torch "
                           "reference kernels), 'transformers' (its DeepseekV4ForCausalLM with the same weights, "
                           "float32, where it fits in memory) or, for decode on a GPU, 'eager' (no CUDA graph: the "
                           "ordinary per-token forward, kernels launched one by one) and report the speed ratio.")


def _check_compare_name(against, kind: str = "decode") -> None:
    if against not in (None, "reference", "transformers", "eager"):
        raise UserError(f"--compare {against!r}: use reference, transformers or eager")
    if against == "eager" and kind != "decode":
        raise UserError("--compare eager applies to decode (prefill never uses the CUDA graph)")


def _check_compare(against, m) -> None:
    """Refuse a --compare that cannot run, before any timing starts."""
    if against is None:
        return
    if against == "eager" and m.device.type != "cuda":
        raise UserError("--compare eager needs a CUDA device (decode on the CPU never uses a CUDA graph)")
    if against == "transformers":
        try:
            from transformers import DeepseekV4ForCausalLM  # noqa: F401
        except ImportError:
            raise UserError("--compare transformers needs transformers >= 5.23 (pip install 'transformers>=5.23')") from None
        from dsv4.engine.tools import bench as B
        from dsv4.engine.tools.hf import float32_bytes

        need, free = 2 * float32_bytes(m.cfg), B.free_memory_bytes(m.device)
        if free is not None and need > free:
            raise UserError(f"--compare transformers: its float32 model (plus the copy it loads from) needs "
                            f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is free on {m.device} (try fewer --layers)")


def _timed(kind: str, model, preset, layers, synthetic, device, precision, compare, prompt_len, n, warmup,
           **options):
    """Load the model, check --compare, time ``kind`` ("decode" | "prefill") and the comparison.
    options: extra arguments of our run (decode: cuda_graph). -> (result, model, full-size config,
    display name, resolved device)."""
    from dsv4.engine.tools import bench as B

    _check_compare_name(compare, kind)
    m, full, name, device = _load(model, preset, layers, synthetic, device, precision)
    _check_compare(compare, m)
    run = B.bench_decode if kind == "decode" else B.bench_prefill
    r = run(m, prompt_len, n, warmup, **options)
    if compare:
        r.update(_compare(compare, kind, run, m, r, prompt_len, n, warmup))
    return r, m, full, name, device


def _compare(against, kind: str, run, m, ours: dict, prompt_len: int, n: int, warmup: int) -> dict:
    """Time the same work another way (``run`` is ours, for the reference backend); -> flat
    compare_* fields (ratio > 1: dsv4 is faster). ``against`` was checked by _check_compare."""
    from dsv4.engine.tools import bench as B

    if against == "reference":
        from dsv4.kernels.dispatch import use_backend

        with use_backend("reference"):
            other = run(m, prompt_len, n, warmup)
        extra = {}
    elif against == "eager":
        other, extra = B.bench_decode(m, prompt_len, n, warmup, cuda_graph=False), {}
    else:
        from dsv4.engine.tools.hf import build_hf_model
        from dsv4.engine.model.weights import logical_tensors

        hf = build_hf_model(m.cfg, logical_tensors(m.w), m.device)
        other = (B.hf_decode(hf, m, prompt_len, n, warmup) if kind == "decode"
                 else B.hf_prefill(hf, m, prompt_len, n, warmup))
        extra = {k: other[k] for k in ("max_abs_logit_diff_on_prompt", "max_abs_logit") if k in other}
        del hf
    return {"compare_against": against, "compare_median_s": other["median_s"], "compare_p10_s": other["p10_s"],
            "compare_p90_s": other["p90_s"], "compare_speed_ratio": other["median_s"] / ours["median_s"],
            "compare_note": f"speed_ratio = {against} median time / dsv4 median time (> 1: dsv4 is faster)",
            **{f"compare_{k}": v for k, v in extra.items()}}


def _load(model, preset, layers, synthetic, device, precision):
    """-> (model, full-size config, display name, resolved device)."""
    import torch

    from dsv4.engine.model.config import DSV4Config
    from dsv4.engine.model.model import Model

    check_precision(precision)
    device = resolve_device(device)
    if (model is None) == (preset is None):
        raise UserError("give either --model DIR or --preset flash|pro --synthetic")
    if preset is not None:
        if not synthetic:
            raise UserError("--preset needs --synthetic (no checkpoint is read)")
        full = DSV4Config.preset(preset)
        n = layers or full.num_hidden_layers
        if not 1 <= n <= full.num_hidden_layers:
            raise UserError(f"--layers must be between 1 and {full.num_hidden_layers}")
        cfg = full.layer_range(0, n)
        from dsv4.engine.tools.bench import synthetic_stored

        return Model.from_state_dict(cfg, synthetic_stored(cfg, device), mode=precision, device=device), full, \
            f"synthetic {preset} ({n} of {full.num_hidden_layers} layers)", device
    from dsv4.engine.checkpoint.loader import load_model

    if not Path(model).is_dir():
        raise UserError(f"--model {model}: no such folder")
    m = load_model(model, mode=precision, device=device, dtype=torch.float32)
    return m, m.cfg, str(model), device


def _report(r: dict, m, full, name: str, precision: str, device: str, json_path, roofline: dict, project) -> None:
    """Add the model, roofline and (with --layers) the projection labelled as such; print / write."""
    r.update({"model": name, "precision": precision, **roofline})
    N = full.num_hidden_layers
    if m.cfg.num_hidden_layers < N:
        r.update(project(r["ms_per_layer"] * N))
    r["environment"] = _environment(device)
    _emit(r, json_path)


def _environment(device: str) -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["dsv4"] + sys.argv[1:]), "python": platform.python_version(),
           "torch": torch.__version__, "device": device, "host": platform.node()}
    if device.startswith("cuda"):
        env["card"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["card"] = platform.processor() or platform.machine()
    from importlib.metadata import PackageNotFoundError, version

    try:
        env["dsv4"] = version("dsv4")
    except PackageNotFoundError:
        env["dsv4"] = "dev"
    return env


def _emit(result: dict, json_path: Optional[str]):
    from rich.console import Console

    text = json.dumps(result, indent=1, default=str)
    if json_path == "-":
        print(text)
        return
    con = Console()
    for k, v in result.items():
        if isinstance(v, dict):
            continue
        con.print(f"  {k:<32} {v:.4g}" if isinstance(v, float) else f"  {k:<32} {v}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
        con.print(f"wrote {json_path}")


@app.command("decode", help="Time single-token decode steps after a prompt (median, p10/p90), with the "
                            "weight + KV bytes read per token against the measured memory bandwidth.")
def decode(model: Optional[Path] = MODEL_OPT, preset: Optional[str] = PRESET_OPT, layers: Optional[int] = LAYERS_OPT,
           synthetic: bool = SYN_OPT, prompt_len: int = typer.Option(512, "--prompt-len"),
           steps: int = typer.Option(32, "--steps", help="Timed decode steps."),
           warmup: int = typer.Option(3, "--warmup"), device: str = typer.Option("auto", "--device"),
           precision: str = typer.Option("faithful", "--precision"), json_path: Optional[str] = JSON_OPT,
           compare: Optional[str] = COMPARE_OPT,
           cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="On a GPU, replay each decode "
                                           "step from one captured CUDA graph (the default) or run the ordinary "
                                           "per-token forward, launching kernels one by one.")):
    guard(_decode)(model, preset, layers, synthetic, prompt_len, steps, warmup, device, precision, json_path, compare,
                   cuda_graph)


def _decode(model, preset, layers, synthetic, prompt_len, steps, warmup, device, precision, json_path, compare=None,
            cuda_graph=True):
    from dsv4.engine.tools.bench import measure_bandwidth

    if prompt_len < 1 or steps < 1 or warmup < 0:
        raise UserError("--prompt-len and --steps must be >= 1, --warmup >= 0")
    if compare == "eager" and not cuda_graph:
        raise UserError("--compare eager with --no-cuda-graph would time the same path twice")
    r, m, full, name, device = _timed("decode", model, preset, layers, synthetic, device, precision, compare,
                                      prompt_len, steps, warmup, cuda_graph=None if cuda_graph else False)
    bw = measure_bandwidth(device)
    bytes_tok = r["weight_bytes_per_token"] + r["kv_bytes_per_token"]
    roofline = {"measured_bandwidth_bytes_per_s": bw, "bandwidth_floor_ms_per_token": bytes_tok / bw * 1000,
                "achieved_bandwidth_fraction": bytes_tok / r["median_s"] / bw,
                "floor_ratio": r["median_s"] / (bytes_tok / bw)}
    _report(r, m, full, name, precision, device, json_path, roofline, lambda ms: {
        "projected_full_model_ms_per_token": ms, "projected_full_model_tokens_per_s": 1000 / ms,
        "projection_note": f"PROJECTED: measured per-layer time x {full.num_hidden_layers} layers "
                           "(head/embedding counted per layer)"})


@app.command("prefill", help="Time the prefill of a prompt (median, p10/p90), with FLOPs against the "
                             "measured matrix rate.")
def prefill(model: Optional[Path] = MODEL_OPT, preset: Optional[str] = PRESET_OPT, layers: Optional[int] = LAYERS_OPT,
            synthetic: bool = SYN_OPT, prompt_len: int = typer.Option(1024, "--prompt-len"),
            runs: int = typer.Option(5, "--runs"), warmup: int = typer.Option(1, "--warmup"),
            device: str = typer.Option("auto", "--device"), precision: str = typer.Option("faithful", "--precision"),
            json_path: Optional[str] = JSON_OPT, compare: Optional[str] = COMPARE_OPT):
    guard(_prefill)(model, preset, layers, synthetic, prompt_len, runs, warmup, device, precision, json_path, compare)


def _prefill(model, preset, layers, synthetic, prompt_len, runs, warmup, device, precision, json_path, compare=None):
    from dsv4.engine.tools.bench import measure_matmul_rate

    if prompt_len < 1 or runs < 1 or warmup < 0:
        raise UserError("--prompt-len and --runs must be >= 1, --warmup >= 0")
    r, m, full, name, device = _timed("prefill", model, preset, layers, synthetic, device, precision, compare,
                                      prompt_len, runs, warmup)
    rate = measure_matmul_rate(device)
    roofline = {"measured_matmul_flop_per_s": rate, "matmul_rate_fraction": r["flop_per_s"] / rate}
    _report(r, m, full, name, precision, device, json_path, roofline, lambda ms: {
        "projected_full_model_prefill_s": ms / 1000,
        "projection_note": f"PROJECTED: measured per-layer time x {full.num_hidden_layers} layers"})


@app.command("perplexity", help="Perplexity of a text file: bos prepended, every later token scored, windows "
                                "of --max-context tokens each starting with bos.")
def perplexity_cmd(model: Path = typer.Option(..., "--model", "-m", help="Checkpoint folder."),
                   text: Path = typer.Option(..., "--text", help="UTF-8 text file."),
                   max_context: int = typer.Option(2048, "--max-context"),
                   device: str = typer.Option("auto", "--device"),
                   precision: str = typer.Option("faithful", "--precision"),
                   chunk: int = typer.Option(512, "--chunk", help="Tokens per forward (<= 16 runs the GPU "
                                             "decode kernels; larger chunks the prefill path)."),
                   json_path: Optional[str] = JSON_OPT):
    guard(_ppl)(model, text, max_context, device, precision, json_path, chunk)


def _ppl(model, text, max_context, device, precision, json_path, chunk=512):
    from dsv4.engine.tools.bench import perplexity
    from dsv4.engine.runtime.tokenizer import Tokenizer

    if max_context < 2:
        raise UserError("--max-context must be >= 2")
    if chunk < 1:
        raise UserError("--chunk must be >= 1")
    if not Path(text).is_file():
        raise UserError(f"--text {text}: no such file")
    m, _, name, device = _load(model, None, None, False, device, precision)
    tok = Tokenizer.from_dir(model)
    ids = tok.encode(Path(text).read_text(encoding="utf-8"))
    if not ids:
        raise UserError(f"--text {text}: no tokens in the file")
    r = perplexity(m, ids, tok.bos_id, max_context, chunk=chunk)
    r.update({"model": name, "precision": precision, "text": str(text), "environment": _environment(device)})
    _emit(r, json_path)


@app.command("kernels", help="Time each linear of one CSA and one HCA layer (and the head) for one decode "
                             "token on synthetic weights at real dimensions: bytes read, time, achieved "
                             "bandwidth against the bandwidth measured in the same run.")
def kernels_cmd(preset: str = typer.Option("flash", "--preset", help="flash or pro."),
                device: str = typer.Option("auto", "--device"), runs: int = typer.Option(50, "--runs"),
                compare: bool = typer.Option(False, "--compare-reference", help="Also time the torch reference."),
                json_path: Optional[str] = JSON_OPT):
    guard(_kernels)(preset, device, runs, compare, json_path)


def _kernels(preset, device, runs, compare, json_path):
    from rich.console import Console
    from rich.table import Table

    from dsv4.engine.tools.bench import bench_linears, measure_bandwidth
    from dsv4.kernels.dispatch import use_backend

    if runs < 1:
        raise UserError("--runs must be >= 1")
    m, full, name, device = _load(None, preset, 4, True, device, "faithful")
    bw = measure_bandwidth(device)
    rows = bench_linears(m, runs=runs)
    if compare:
        with use_backend("reference"):
            for r, ref in zip(rows, bench_linears(m, runs=max(3, runs // 10))):
                r["reference_median_s"] = ref["median_s"]
                r["speedup"] = ref["median_s"] / r["median_s"]
    for r in rows:
        r["bandwidth_fraction"] = r["bytes_per_s"] / bw
    result = {"model": name, "measured_bandwidth_bytes_per_s": bw, "kernels": rows,
              "environment": _environment(device)}
    if json_path == "-":
        print(json.dumps(result, indent=1))
        return
    t = Table(title=f"decode linears, {name}, measured bandwidth {bw / 1e12:.2f} TB/s")
    for c in ("weight", "format", "out x in", "MB", "us", "GB/s", "of bw") + (("ref us", "speedup") if compare else ()):
        t.add_column(c, justify="left" if c in ("weight", "format") else "right")
    for r in rows:
        cells = [r["name"], r["format"], f"{r['out']}x{r['in']}", f"{r['bytes'] / 1e6:.1f}",
                 f"{r['median_s'] * 1e6:.1f}", f"{r['bytes_per_s'] / 1e9:.0f}", f"{r['bandwidth_fraction']:.0%}"]
        if compare:
            cells += [f"{r['reference_median_s'] * 1e6:.0f}", f"{r['speedup']:.1f}x"]
        t.add_row(*cells)
    Console().print(t)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
        Console().print(f"wrote {json_path}")

"""``dsv4 bench decode | prefill | perplexity | kernels``: parse, call engine/tools/bench, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import (THREADS_OPT_HELP, Command, Group, Progress, UserError, apply_threads, check_precision, guard,
                     resolve_device, warn)

app = typer.Typer(cls=Group, no_args_is_help=True,
                  help="Measure decode and prefill speed, or perplexity (batch 1).")
command = lambda name, help: app.command(name, help=help, cls=Command)  # noqa: E731

MODEL_OPT = typer.Option(None, "--model", "-m", help="Checkpoint folder.")
PRESET_OPT = typer.Option(None, "--preset", help="flash or pro: real dimensions with --synthetic weights.")
LAYERS_OPT = typer.Option(None, "--layers", help="With --preset: use only the first N layers (figures are "
                          "also projected to the whole model).")
SYN_OPT = typer.Option(False, "--synthetic", help="Random weights generated in their stored formats on the device.")
DEVICE_OPT = typer.Option("auto", "--device", help="cpu, cuda or cuda:N (auto: cuda when available).")
PRECISION_OPT = typer.Option("faithful", "--precision", help="faithful (FP8 KV, FP4 indexer, as trained; e4m3 "
                             "inputs to the FP8/FP4 linears and bf16 attention queries, as DeepSeek's inference) or "
                             "exact (no quantisation simulation).")
THREADS_OPT = typer.Option(None, "--threads", help=THREADS_OPT_HELP)
JSON_OPT = typer.Option(False, "--json", help="Print the results as JSON to stdout (nothing else on stdout).")
JSON_OUT_OPT = typer.Option(None, "--json-out", help="Also write the results as JSON to FILE.")
WARMUP_HELP = "Untimed runs before the timed ones."
GPUS_HELP = ("{what} over N GPUs of this host, the layout of dsv4 plan, timed on rank 0, collectives included: a "
             "checkpoint (--model; auto: the fewest GPUs whose memory holds it and its cache), or --preset P "
             "--synthetic [--layers N], each GPU making only its own slices of the random weights.")
RANKS_HELP = "With --device cpu: over N CPU processes (gloo), a checkpoint or a synthetic preset as for --gpus."
COMPARE_OPT = typer.Option(None, "--compare", help="Also run the same work through 'reference' (the torch "
                           "reference kernels), 'transformers' (its DeepseekV4ForCausalLM with the same weights, "
                           "float32, where it fits in memory) or, for decode on a GPU, 'eager' (no CUDA graph: the "
                           "ordinary per-token forward, kernels launched one by one) and report the speed ratio.")


def _check_compare_name(against) -> None:
    from dsv4.engine.tools.bench import COMPARE_AGAINST

    if against is not None and against not in COMPARE_AGAINST:
        raise UserError(f"--compare {against!r}: use reference, transformers or eager")


def _load(model, preset, layers, synthetic, device, precision, progress, mtp: bool = False):
    """Validate the model options, then build it. -> (model, full-size config, display name, device)."""
    from dsv4.engine.tools import bench as B

    device = resolve_device(device)
    if (model is None) == (preset is None):
        raise UserError("give either --model DIR or --preset flash|pro --synthetic")
    if preset is not None:
        from dsv4.engine.model.config import DSV4Config

        if preset not in ("flash", "pro"):
            raise UserError(f"--preset {preset!r}: use flash or pro")
        if not synthetic:
            raise UserError("--preset needs --synthetic (no checkpoint is read)")
        full = DSV4Config.preset(preset)
        if layers is not None and not 1 <= layers <= full.num_hidden_layers:
            raise UserError(f"--layers must be between 1 and {full.num_hidden_layers}")
        slow = B.cpu_slow_warning(full.layer_range(0, layers or full.num_hidden_layers), device)
        if slow:
            warn(slow)
        m, full, name = B.synthetic_model(preset, layers, device, precision, progress, mtp=mtp)
        return m, full, name, device
    if layers is not None:
        raise UserError("--layers applies to --preset runs (a checkpoint is timed whole)")
    if not Path(model).is_dir():
        raise UserError(f"--model {model}: no such folder")
    m, full, name = B.checkpoint_model(model, device, precision, progress)
    return m, full, name, device


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _emit(result: dict, as_json: bool, json_out: Optional[Path]) -> None:
    """--json: the JSON on stdout only; else one line per figure. --json-out FILE: also written there."""
    text = json.dumps(result, indent=1, default=str)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(text + "\n")
    if as_json:
        print(text)
        return
    from rich.console import Console

    con = Console(highlight=False, soft_wrap=True)
    for k, v in result.items():
        if not isinstance(v, (dict, list)):
            con.print(f"  {k:<36} {_fmt(v)}")
    if isinstance(result.get("flops_breakdown"), dict):
        total = result.get("flops") or 1
        con.print("  flops_breakdown " + ", ".join(f"{k} {v:.4g} ({v / total:.1%})"
                                                   for k, v in result["flops_breakdown"].items()))
    if isinstance(result.get("profile"), list):
        con.print(f"  where the time goes ({result['profile_by']}, self time, one profiled prefill):")
        for row in result["profile"]:
            con.print(f"  {row['self_s'] * 1000:10.2f} ms {row['share']:6.1%} {row['calls']:7d}  {row['name'][:100]}")
    if isinstance(result.get("kernels"), dict):
        by_impl: dict[str, list[str]] = {}
        for op, v in result["kernels"].items():
            for impl in (v if isinstance(v, dict) else {v: None}):
                by_impl.setdefault(impl, []).append(op)
        for impl, ops in sorted(by_impl.items()):
            con.print(f"  kernels ran: {impl:<26} {', '.join(ops)}")
    if json_out is not None:
        con.print(f"wrote {json_out}")


def _common(threads, precision, compare=None):
    """Edge validation shared by decode and prefill. -> (Precision, threads set)."""
    _check_compare_name(compare)
    return check_precision(precision), apply_threads(threads)


@command("decode", help="Time single-token decode steps after a prompt (median, p10/p90), with the weight + KV "
                        "bytes read per token against the measured memory bandwidth: for the whole step, per "
                        "layer (head and embedding timed alone and subtracted), and projected to the whole model.")
def decode(model: Optional[Path] = MODEL_OPT, preset: Optional[str] = PRESET_OPT, layers: Optional[int] = LAYERS_OPT,
           synthetic: bool = SYN_OPT,
           prompt_len: int = typer.Option(512, "--prompt-len", help="Prompt tokens prefilled before decoding."),
           steps: int = typer.Option(32, "--steps", help="Timed decode steps."),
           warmup: int = typer.Option(3, "--warmup", help=WARMUP_HELP), device: str = DEVICE_OPT,
           precision: str = PRECISION_OPT, threads: Optional[int] = THREADS_OPT, as_json: bool = JSON_OPT,
           json_out: Optional[Path] = JSON_OUT_OPT, compare: Optional[str] = COMPARE_OPT,
           cuda_graph: bool = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="On a GPU, replay each decode "
                                           "step from one captured CUDA graph (the default) or run the ordinary "
                                           "per-token forward, launching kernels one by one."),
           mtp: bool = typer.Option(False, "--mtp", help="Also decode --steps tokens greedily with MTP drafts (the "
                                    "checkpoint's MTP layer; --synthetic makes one) in the same run: accepted "
                                    "tokens per verify step, effective tok/s against plain, identical output."),
           mtp_acceptance: Optional[float] = typer.Option(None, "--mtp-acceptance", help="With --mtp: project "
                                                          "tok/s at this draft acceptance rate (0-1; default: the "
                                                          "measured one; random synthetic weights accept ~0)."),
           gpus: Optional[str] = typer.Option(None, "--gpus", help=GPUS_HELP.format(what="Decode")),
           ranks: Optional[int] = typer.Option(None, "--ranks", help=RANKS_HELP),
           simulate_rank: Optional[str] = typer.Option(None, "--simulate-rank", help="With --preset --synthetic on "
                                                       "a GPU: time rank r of R (r/R, e.g. 0/2) alone, its share of "
                                                       "the experts, heads and vocabulary, collectives as no-ops "
                                                       "(--warmup and --no-cuda-graph apply); predicts the R-GPU "
                                                       "step.")):
    guard(_decode)(model, preset, layers, synthetic, prompt_len, steps, warmup, device, precision, threads, as_json,
                   json_out, compare, cuda_graph, mtp, mtp_acceptance, gpus, ranks, simulate_rank)


def _decode(model, preset, layers, synthetic, prompt_len, steps, warmup, device, precision, threads, as_json,
            json_out, compare=None, cuda_graph=True, mtp=False, mtp_acceptance=None, gpus=None, ranks=None,
            simulate_rank=None):
    from dsv4.engine.tools import bench as B

    if prompt_len < 1 or steps < 1 or warmup < 0:
        raise UserError("--prompt-len and --steps must be >= 1, --warmup >= 0")
    if compare == "eager" and not cuda_graph:
        raise UserError("--compare eager with --no-cuda-graph would time the same path twice")
    if mtp_acceptance is not None and not (mtp and 0 <= mtp_acceptance <= 1):
        raise UserError("--mtp-acceptance is a rate in [0, 1] and needs --mtp")
    if simulate_rank is not None:
        return _simulated_rank(preset, layers, synthetic, simulate_rank, prompt_len, steps, device, precision,
                               threads, as_json, json_out, gpus, ranks, mtp, compare, warmup, cuda_graph)
    if gpus is not None or ranks is not None:
        ctx = prompt_len + steps + warmup + 8
        kind, n, model, cfg, _ = _split_target(model, preset, layers, synthetic, device, gpus, ranks, ctx, precision)
        if n > 1:
            return _decode_over_ranks(model, prompt_len, steps, warmup, kind, n, precision, threads, as_json,
                                      json_out, mtp, compare, ctx, cfg)
        device = kind  # one rank: the ordinary single-device path, unchanged (--gpus 1)
    precision, n_threads = _common(threads, precision, compare)
    with Progress("bench decode") as progress:
        m, full, name, device = _load(model, preset, layers, synthetic, device, precision, progress, mtp=mtp)
        if mtp and not m.has_mtp:
            raise UserError(f"{name}: no MTP layer (mtp.0.*): run without --mtp")
        _max_context_fits(m, prompt_len + steps + warmup + 8)
        if compare:
            _compare_checked(compare, "decode", m)
        r = B.bench_decode(m, prompt_len, steps, warmup, cuda_graph=None if cuda_graph else False, progress=progress)
        if compare:
            progress(f"timing --compare {compare}")
            r.update(B.compare_run(compare, "decode", m, r, prompt_len, steps, warmup))
        if mtp:
            from dsv4.engine.tools.mtp_bench import bench_mtp_decode

            progress("timing plain vs MTP greedy decoding")
            prompt, _ = B._bench_tokens(m.cfg.vocab_size, prompt_len, 1)
            r.update(bench_mtp_decode(m, prompt.tolist(), steps, cuda_graph=None if cuda_graph else False,
                                      acceptance=mtp_acceptance))
        progress("measuring memory bandwidth")
        roof = B.decode_roofline(r, B.measure_bandwidth(device), full, precision)
    _emit({"model": name, "precision": str(precision), **r, **roof,
           "environment": B.environment(device, n_threads)}, as_json, json_out)


def _split_target(model, preset, layers, synthetic, device, gpus, ranks, max_context, precision):
    """--gpus/--ranks: what to split and over how many ranks. -> (kind "cpu" | "cuda", ranks, model
    folder or None, the synthetic config or None, its whole-model config or None). A checkpoint
    (--model) is timed whole; a synthetic preset (--preset P --synthetic [--layers N]) is made by
    every rank, its own slices only. One rank: the caller takes the single-device path."""
    from .parallel import resolve_ranks

    if model is not None:
        if preset is not None or layers is not None:
            raise UserError("give --model DIR or --preset P --synthetic [--layers N], not both "
                            "(a checkpoint is timed whole)")
        if not Path(model).is_dir():
            raise UserError(f"--model {model}: no such folder")
        kind, n = resolve_ranks(device, gpus, ranks, model, max_context, str(check_precision(precision)))
        return kind, n, model, None, None
    if preset is None or not synthetic:
        raise UserError("--gpus/--ranks need --model DIR, or --preset flash|pro --synthetic")
    if gpus == "auto":
        raise UserError("--gpus auto plans a checkpoint (--model DIR); with --preset give the number of GPUs")
    full = _preset_config(preset)
    cfg = full.layer_range(0, layers) if layers else full
    kind, n = resolve_ranks(device, gpus, ranks, None, max_context, str(check_precision(precision)))
    return kind, n, None, cfg, full


def _preset_config(preset: str):
    from dsv4.engine.model.config import ConfigError, DSV4Config

    try:
        return DSV4Config.preset(preset)
    except ConfigError as e:
        raise UserError(str(e)) from None


def _decode_over_ranks(model, prompt_len, steps, warmup, kind, n, precision, threads, as_json, json_out, mtp,
                       compare, ctx, synthetic=None):
    """bench decode over ``n`` > 1 ranks (device ``kind``, "cpu" or "cuda"): a checkpoint split as
    dsv4 plan shows (or the ``synthetic`` config's random weights, each rank making its slices),
    timed on rank 0."""
    from .parallel import open_session, time_decode
    from dsv4.engine.tools import bench as B

    if mtp or compare:
        raise UserError("--mtp and --compare run on one device: drop them, or drop --gpus/--ranks")
    precision, n_threads = _common(threads, precision, None)
    with Progress("bench decode") as progress:
        progress(f"starting {n} ranks")
        s = open_session(model, str(precision), ctx, kind, n, threads=threads, synthetic=synthetic)
        try:
            r = time_decode(s, prompt_len, steps, warmup)
        finally:
            s.close()
    name = str(model) if synthetic is None else f"synthetic {synthetic.num_hidden_layers}-layer"
    _emit({"model": name, "precision": str(precision), **r,
           "environment": B.environment(kind, n_threads)}, as_json, json_out)


def _simulated_rank(preset, layers, synthetic, spec, prompt_len, steps, device, precision, threads, as_json,
                    json_out, gpus, ranks, mtp, compare, warmup=3, cuda_graph=True):
    """bench decode --simulate-rank r/R: one rank's share of a synthetic preset, timed alone on one GPU
    (--warmup steps first; --no-cuda-graph: the eager per-token forward instead of the graph)."""
    from dsv4.engine.runtime.parallel.simulate import simulate_rank as simulate
    from dsv4.engine.tools import bench as B

    try:
        rank, of = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--simulate-rank {spec!r}: use r/R, e.g. 0/2") from None
    if not 0 <= rank < of:
        raise UserError(f"--simulate-rank {spec!r}: need 0 <= r < R")
    if preset is None or not synthetic:
        raise UserError("--simulate-rank times a synthetic preset: add --preset flash|pro --synthetic")
    if gpus is not None or ranks is not None or mtp or compare:
        raise UserError("--simulate-rank runs one rank on one GPU: drop --gpus/--ranks/--mtp/--compare")
    dev = resolve_device(device)
    if not dev.startswith("cuda"):
        raise UserError("--simulate-rank needs a CUDA GPU (it predicts the GPU decode step)")
    precision, n_threads = _common(threads, precision, None)
    with Progress("bench decode") as progress:
        r = simulate(preset, layers or 16, rank, of, dev, str(precision), prompt_len, steps, warmup=warmup,
                     cuda_graph=None if cuda_graph else False, progress=progress)
    _emit({"model": f"synthetic {preset}, rank {rank} of {of}", "precision": str(precision), **r,
           "environment": B.environment(dev, n_threads)}, as_json, json_out)


def _max_context_fits(m, tokens: int) -> None:
    if tokens > m.cfg.max_position_embeddings:
        raise UserError(f"--prompt-len + --steps + --warmup need {tokens} positions; the model has "
                        f"{m.cfg.max_position_embeddings}")


def _compare_checked(compare, kind, m) -> None:
    from dsv4.engine.tools.bench import BenchError, check_compare

    try:
        check_compare(compare, kind, m)
    except BenchError as e:
        raise UserError(f"--compare {e}") from None


@command("prefill", help="Time the prefill of a prompt (median, p10/p90) through the chunked path dsv4 chat uses: "
                         "time to first token, tokens/s, peak memory beyond the weights and the KV cache, and FLOPs "
                         "(linear and expert work plus attention and indexer work at that context, formula in the "
                         "JSON) against the measured matrix rate.")
def prefill(model: Optional[Path] = MODEL_OPT, preset: Optional[str] = PRESET_OPT, layers: Optional[int] = LAYERS_OPT,
            synthetic: bool = SYN_OPT,
            prompt_len: int = typer.Option(1024, "--prompt-len", help="Prompt tokens per prefill."),
            runs: int = typer.Option(5, "--runs", help="Timed prefills (each in a fresh session; over ranks, "
                                     "the same session reset)."),
            warmup: int = typer.Option(1, "--warmup", help=WARMUP_HELP), device: str = DEVICE_OPT,
            precision: str = PRECISION_OPT, threads: Optional[int] = THREADS_OPT, as_json: bool = JSON_OPT,
            json_out: Optional[Path] = JSON_OUT_OPT, compare: Optional[str] = COMPARE_OPT,
            prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="Prompt tokens per prefill "
                                                        "chunk (default: the engine's choice from the free device "
                                                        "memory and the model, as dsv4 chat makes it)."),
            profile: bool = typer.Option(False, "--profile", help="After the timed runs, one more prefill under "
                                         "torch.profiler: the kernels (GPU, by self device time) or torch ops (CPU, "
                                         "by self CPU time) that took longest, with their share."),
            gpus: Optional[str] = typer.Option(None, "--gpus", help=GPUS_HELP.format(what="Prefill")),
            ranks: Optional[int] = typer.Option(None, "--ranks", help=RANKS_HELP)):
    guard(_prefill)(model, preset, layers, synthetic, prompt_len, runs, warmup, device, precision, threads, as_json,
                    json_out, compare, prefill_chunk, profile, gpus, ranks)


def _prefill(model, preset, layers, synthetic, prompt_len, runs, warmup, device, precision, threads, as_json,
             json_out, compare=None, prefill_chunk=None, profile=False, gpus=None, ranks=None):
    from dsv4.engine.tools import bench as B

    if prompt_len < 1 or runs < 1 or warmup < 0:
        raise UserError("--prompt-len and --runs must be >= 1, --warmup >= 0")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    if compare == "eager":
        raise UserError("--compare eager applies to decode (prefill never uses the CUDA graph)")
    if gpus is not None or ranks is not None:
        if compare:
            raise UserError("--compare runs on one device: drop it, or drop --gpus/--ranks")
        device, n, model, cfg, full = _split_target(model, preset, layers, synthetic, device, gpus, ranks, prompt_len,
                                                    precision)
        if n > 1:
            return _prefill_over_ranks(model, prompt_len, runs, warmup, device, n, precision, threads, as_json,
                                       json_out, prefill_chunk, profile, cfg, full)
    precision, n_threads = _common(threads, precision, compare)
    with Progress("bench prefill") as progress:
        m, full, name, device = _load(model, preset, layers, synthetic, device, precision, progress)
        _max_context_fits(m, prompt_len)
        if compare:
            _compare_checked(compare, "prefill", m)
        r = B.bench_prefill(m, prompt_len, runs, warmup, chunk=prefill_chunk, profile=profile, progress=progress)
        if compare:
            progress(f"timing --compare {compare}")
            r.update(B.compare_run(compare, "prefill", m, r, prompt_len, runs, warmup, chunk=r["prefill_chunk"]))
        progress("measuring the matrix rate")
        roof = B.prefill_roofline(r, B.measure_matmul_rate(device), full, m.cfg.num_hidden_layers)
    _emit({"model": name, "precision": str(precision), **r, **roof,
           "environment": B.environment(device, n_threads)}, as_json, json_out)


def _prefill_over_ranks(model, prompt_len, runs, warmup, kind, n, precision, threads, as_json, json_out,
                        prefill_chunk, profile, synthetic=None, full=None):
    """bench prefill over ``n`` ranks (device ``kind``, "cpu" or "cuda"): a checkpoint split as dsv4 plan
    shows (or the ``synthetic`` config, a cut of ``full``, made by every rank, its slices only), timed on
    rank 0 through ParallelSession.prefill (each chunk runs on every rank)."""
    from .parallel import open_session
    from dsv4.engine.model.config import DSV4Config
    from dsv4.engine.tools import bench as B

    precision, n_threads = _common(threads, precision, None)
    cfg = DSV4Config.from_pretrained(model) if synthetic is None else synthetic
    full = full or cfg
    if prompt_len > cfg.max_position_embeddings:
        raise UserError(f"--prompt-len needs {prompt_len} positions; the model has {cfg.max_position_embeddings}")
    with Progress("bench prefill") as progress:
        progress(f"starting {n} ranks")
        s = open_session(model, str(precision), prompt_len, kind, n, threads=threads, synthetic=synthetic)
        try:
            r = B.bench_prefill(s.model, prompt_len, runs, warmup, chunk=prefill_chunk, profile=profile,
                                progress=progress, open_session=B.reused_session(s), cfg=cfg)
        finally:
            s.close()
        progress("measuring the matrix rate")
        roof = B.prefill_roofline(r, B.measure_matmul_rate(s.model.device), full, cfg.num_hidden_layers, devices=n)
    name = str(model) if synthetic is None else f"synthetic {cfg.num_hidden_layers}-layer"
    _emit({"model": name, "precision": str(precision), "ranks": n, **r, **roof,
           "memory_note": "weight_bytes, cache_bytes and the peaks are rank 0's (its device, its part)",
           "environment": B.environment(s.model.device, n_threads)}, as_json, json_out)


@command("perplexity", help="Perplexity of a text file: bos prepended, every later token scored, windows of "
                            "--max-context tokens each starting with bos.")
def perplexity_cmd(model: Path = typer.Option(..., "--model", "-m", help="Checkpoint folder."),
                   text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
                   max_context: int = typer.Option(2048, "--max-context", help="Tokens per window (bos included)."),
                   device: str = DEVICE_OPT, precision: str = PRECISION_OPT,
                   chunk: int = typer.Option(512, "--chunk", help="Tokens per forward (<= 16 runs the GPU "
                                             "decode kernels; larger chunks the prefill path)."),
                   threads: Optional[int] = THREADS_OPT, as_json: bool = JSON_OPT,
                   json_out: Optional[Path] = JSON_OUT_OPT):
    guard(_ppl)(model, text, max_context, device, precision, threads, as_json, json_out, chunk)


def read_text_file(path: Path, option: str = "--text") -> str:
    """The contents of a UTF-8 text file; a missing, binary or non-UTF-8 file is a UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option} {path}: no such file")
    data = p.read_bytes()
    if b"\x00" in data:
        raise UserError(f"{option} {path}: a binary file (it contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{option} {path}: not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                        "give a UTF-8 text file") from None


def _ppl(model, text, max_context, device, precision, threads, as_json, json_out, chunk=512):
    from dsv4.engine.runtime.tokenizer import Tokenizer
    from dsv4.engine.tools import bench as B

    if max_context < 2:
        raise UserError("--max-context must be >= 2")
    if chunk < 1:
        raise UserError("--chunk must be >= 1")
    body = read_text_file(text)
    precision, n_threads = _common(threads, precision)
    with Progress("bench perplexity") as progress:
        m, _, name, device = _load(model, None, None, False, device, precision, progress)
        if max_context > m.cfg.max_position_embeddings:
            raise UserError(f"--max-context {max_context}: the model has {m.cfg.max_position_embeddings} positions")
        tok = Tokenizer.from_dir(model)
        ids = tok.encode(body)
        if not ids:
            raise UserError(f"--text {text}: no tokens in the file")
        r = B.perplexity(m, ids, tok.bos_id, max_context, chunk=chunk, progress=progress)
    _emit({"model": name, "precision": str(precision), "text": str(text), **r,
           "environment": B.environment(device, n_threads)}, as_json, json_out)


@command("kernels", help="Time each linear of one CSA and one HCA layer (and the head) for one decode token on "
                         "synthetic weights at real dimensions: bytes read, time, achieved bandwidth against the "
                         "bandwidth measured in the same run.")
def kernels_cmd(preset: str = typer.Option("flash", "--preset", help="flash or pro."), device: str = DEVICE_OPT,
                runs: int = typer.Option(50, "--runs", help="Timed calls per linear."),
                compare: bool = typer.Option(False, "--compare-reference", help="Also time the torch reference."),
                threads: Optional[int] = THREADS_OPT, as_json: bool = JSON_OPT,
                json_out: Optional[Path] = JSON_OUT_OPT):
    guard(_kernels)(preset, device, runs, compare, threads, as_json, json_out)


def _kernels(preset, device, runs, compare, threads, as_json, json_out):
    from rich.console import Console
    from rich.table import Table

    from dsv4.engine.tools.bench import bench_linears, environment, measure_bandwidth
    from dsv4.kernels.dispatch import use_backend

    if runs < 1:
        raise UserError("--runs must be >= 1")
    n_threads = apply_threads(threads)
    with Progress("bench kernels") as progress:
        m, full, name, device = _load(None, preset, 4, True, device, "faithful", progress)
        progress("measuring memory bandwidth")
        bw = measure_bandwidth(device)
        progress("timing the linears")
        rows = bench_linears(m, runs=runs)
        if compare:
            progress("timing the torch reference")
            with use_backend("reference"):
                for r, ref in zip(rows, bench_linears(m, runs=max(3, runs // 10))):
                    r["reference_median_s"] = ref["median_s"]
                    r["speedup"] = ref["median_s"] / r["median_s"]
    for r in rows:
        r["bandwidth_fraction"] = r["bytes_per_s"] / bw
    result = {"model": name, "measured_bandwidth_bytes_per_s": bw, "kernels": rows,
              "environment": environment(device, n_threads)}
    if as_json:
        _emit(result, True, json_out)
        return
    t = Table(title=f"decode linears, {name}, measured bandwidth {bw / 1e12:.2f} TB/s")
    for c in ("weight", "format", "kernel", "out x in", "MB", "us", "GB/s", "of bw") + (("ref us", "speedup") if compare else ()):
        t.add_column(c, justify="left" if c in ("weight", "format", "kernel") else "right")
    for r in rows:
        cells = [r["name"], r["format"], r["implementation"], f"{r['out']}x{r['in']}", f"{r['bytes'] / 1e6:.1f}",
                 f"{r['median_s'] * 1e6:.1f}", f"{r['bytes_per_s'] / 1e9:.0f}", f"{r['bandwidth_fraction']:.0%}"]
        if compare:
            cells += [f"{r['reference_median_s'] * 1e6:.0f}", f"{r['speedup']:.1f}x"]
        t.add_row(*cells)
    Console().print(t)
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1) + "\n")
        Console().print(f"wrote {json_out}")

"""``dsv4 chat``: the REPL, or one-shot answers with -p / stdin (text or --json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import UserError, builtin_model_dir, check_precision, guard, resolve_device

HELP = """Chat with DeepSeek-V4.

Without -p (and with a terminal on stdin) this opens the REPL; type /help there. With -p "..." or a
prompt piped on stdin it prints the answer to stdout (reasoning to stderr) and exits. Without
--model it runs the built-in default model."""


def chat(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint folder (published or converted layout). Default: the built-in model."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one prompt and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    think: bool = typer.Option(False, "--think/--no-think", help="Thinking mode (reasoning before the answer) or chat mode."),
    reasoning_effort: Optional[str] = typer.Option(None, "--reasoning-effort", help="'high' or 'max' (thinking mode)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy. Default: generation_config.json, else 1.0."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens to generate per turn."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    precision: str = typer.Option("faithful", "--precision", help="exact or faithful (FP8 KV / FP4 indexer as trained)."),
    max_context: int = typer.Option(4096, "--max-context", help="Context length reserved in the KV cache (tokens)."),
    json_out: bool = typer.Option(False, "--json", help="One-shot: print one JSON object with ids, text and timings."),
    hide_reasoning: bool = typer.Option(False, "--hide-reasoning", help="One-shot: do not print the reasoning."),
    history_file: Path = typer.Option(Path.home() / ".dsv4_history", "--history-file", help="REPL input history."),
):
    guard(_chat)(model, prompt, system, think, reasoning_effort, temperature, top_p, top_k, min_p, seed,
                 max_tokens, device, precision, max_context, json_out, hide_reasoning, history_file)


def _chat(model, prompt, system, think, reasoning_effort, temperature, top_p, top_k, min_p, seed, max_tokens,
          device, precision, max_context, json_out, hide_reasoning, history_file):
    from dsv4.engine.runtime.sampling import SamplingParams

    check_precision(precision)
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    if max_context < 16:
        raise UserError(f"--max-context must be >= 16, got {max_context}")
    if reasoning_effort not in (None, "high", "max"):
        raise UserError(f"--reasoning-effort {reasoning_effort!r}: use high or max")
    interactive = prompt is None and sys.stdin.isatty() and not json_out
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise UserError("no prompt: pass -p \"...\" or pipe text on stdin")
    if model is not None and not Path(model).is_dir():
        raise UserError(f"--model {model}: no such folder")
    model_dir, builtin = (Path(model), False) if model is not None else (builtin_model_dir(), True)

    from dsv4.engine.checkpoint.loader import generation_defaults

    gen = generation_defaults(model_dir)
    params = SamplingParams(
        temperature=temperature if temperature is not None else float(gen.get("temperature", 1.0)),
        top_p=top_p if top_p is not None else float(gen.get("top_p", 1.0)),
        top_k=top_k if top_k is not None else int(gen.get("top_k", 0)), min_p=min_p)
    try:
        params.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    conv, info = load_conversation(model_dir, resolve_device(device), precision, max_context, system, think,
                                   reasoning_effort)
    banner = f"dsv4 · {info}" + (" · built-in default model (25M-parameter DeepSeek-V4 trained on Python "
                                 "standard-library docs; ask about Python, e.g. What does json.dumps do?)"
                                 if builtin else "")
    if interactive:
        from .repl import run_repl

        run_repl(conv, params, seed, max_tokens, banner, history_file)
    else:
        one_shot(conv, prompt, params, seed, max_tokens, json_out, hide_reasoning, banner)


def load_conversation(model_dir, device, precision, max_context, system, think, reasoning_effort):
    from dsv4.engine.runtime.conversation import Conversation
    from dsv4.engine.checkpoint.loader import load_model
    from dsv4.engine.runtime.session import Session
    from dsv4.engine.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, mode=precision, device=device)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    max_context = min(max_context, model.cfg.max_position_embeddings)
    session = Session(model, max_context=max_context)
    info = f"{Path(model_dir).name} · {model.cfg.num_hidden_layers} layers · {precision} · {device} · context {max_context}"
    return Conversation(session, tok, system=system, thinking=think, reasoning_effort=reasoning_effort), info


def one_shot(conv, prompt, params, seed, max_tokens, json_out, hide_reasoning, banner):
    from dsv4.engine.runtime.sampling import Sampler

    sampler = Sampler(params, seed)
    if not json_out:
        sys.stderr.write(banner + "\n")
    turn = None
    for turn, pieces in conv.send(prompt.rstrip("\n"), sampler, max_tokens):
        if json_out:
            continue
        for p in pieces:
            if p.kind == "answer":
                sys.stdout.write(p.text)
                sys.stdout.flush()
            elif not hide_reasoning:
                sys.stderr.write(p.text)
                sys.stderr.flush()
    st = turn.stats
    if json_out:
        print(json.dumps({
            "prompt_token_ids": turn.prompt_ids, "token_ids": turn.token_ids, "text": turn.parser.answer_text,
            "reasoning": turn.parser.reasoning_text, "stop_reason": st.stop_reason,
            "prompt_tokens": st.prompt_tokens, "generated_tokens": st.generated_tokens,
            "time_to_first_token_s": round(st.ttft_s, 6), "decode_s": round(st.decode_s, 6),
            "tokens_per_s": round(st.tokens_per_s, 3),
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")

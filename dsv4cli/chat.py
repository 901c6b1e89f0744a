"""``dsv4 chat``: the REPL, one-shot answers (-p / stdin / a conversation file), or --render."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import THREADS_OPT_HELP, UserError, apply_threads, builtin_model_dir, check_precision, guard, resolve_device

HELP = """Chat with DeepSeek-V4.

Without -p (and with a terminal on stdin) this opens the REPL; type /help there. With -p "..." or a
prompt piped on stdin it prints the answer to stdout (reasoning to stderr) and exits. --messages FILE
continues a saved conversation (a JSON list of OpenAI-style messages, or {"messages", "tools",
"response_format"}); --render prints the exact prompt text instead (tokenizer only, no weights).
Without --model it runs the built-in default model."""


def chat(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint folder (published or converted layout). Default: the built-in model."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one prompt and exit."),
    messages: Optional[Path] = typer.Option(None, "--messages", help="Conversation file to continue (or render): a JSON list of messages or {\"messages\", \"tools\", \"response_format\"}."),
    render: bool = typer.Option(False, "--render", help="Print the prompt text the model would receive and exit (with --json: also its token ids)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    think: Optional[bool] = typer.Option(None, "--think/--no-think", help="Thinking mode (reasoning before the answer) or chat mode. Default: the conversation file's, else chat."),
    reasoning_effort: Optional[str] = typer.Option(None, "--reasoning-effort", help="'high' or 'max' (thinking mode)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy. Default: generation_config.json, else 1.0."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass in (0, 1]."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top probability."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Most tokens to generate per turn."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    precision: str = typer.Option("faithful", "--precision", help="exact or faithful (FP8 KV / FP4 indexer as "
                                  "trained; e4m3 linear inputs and bf16 attention queries as DeepSeek's inference)."),
    max_context: int = typer.Option(4096, "--max-context", help="Context length reserved in the KV cache (tokens)."),
    json_out: bool = typer.Option(False, "--json", help="One-shot: print one JSON object (the new assistant message, finish_reason, ids, timings)."),
    hide_reasoning: bool = typer.Option(False, "--hide-reasoning", help="One-shot: do not print the reasoning."),
    history_file: Path = typer.Option(Path.home() / ".dsv4_history", "--history-file", help="REPL input history."),
    mtp: bool = typer.Option(False, "--mtp/--no-mtp", help="Speculative decoding with the checkpoint's MTP layer: it drafts the next token, the main model verifies it and the draft in one step (same greedy output, same sampled distribution). Off by default: that step still costs ~1.6x a plain one, so it is slower (see bench decode --mtp)."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_OPT_HELP),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Split the model over N GPUs of this machine (tensor + expert parallel), or 'auto': the fewest whose memory holds the model and the cache. See dsv4 plan."),
    ranks: Optional[int] = typer.Option(None, "--ranks", help="With --device cpu: the same split over N CPU processes (gloo)."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="Prompt tokens per prefill chunk (default: chosen from the free device memory and the model, so memory stays bounded at any prompt length)."),
):
    guard(_chat)(model, prompt, messages, render, system, think, reasoning_effort, temperature, top_p, top_k,
                 min_p, seed, max_tokens, device, precision, max_context, json_out, hide_reasoning, history_file,
                 mtp, threads, gpus, ranks, prefill_chunk)


def check_sampling(params) -> None:
    """Sampling options: finite numbers in their ranges (UserError naming the option)."""
    for name, v in (("--temperature", params.temperature), ("--top-p", params.top_p), ("--min-p", params.min_p)):
        if not math.isfinite(v):
            raise UserError(f"{name} {v}: use a finite number")
    try:
        params.validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def _chat(model, prompt, messages, render, system, think, reasoning_effort, temperature, top_p, top_k, min_p,
          seed, max_tokens, device, precision, max_context, json_out, hide_reasoning, history_file, mtp=False,
          threads=None, gpus=None, ranks=None, prefill_chunk=None):
    from dsv4.engine.runtime.chat import ChatFormatError
    from dsv4.engine.runtime.conversation import ConversationError, answerable
    from dsv4.engine.runtime.messages import ConversationFileError, read_conversation
    from dsv4.engine.runtime.sampling import SamplingParams

    check_precision(precision)
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    if max_context < 16:
        raise UserError(f"--max-context must be >= 16, got {max_context}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    if reasoning_effort not in (None, "high", "max"):
        raise UserError(f"--reasoning-effort {reasoning_effort!r}: use high or max")
    if model is not None and not Path(model).is_dir():
        raise UserError(f"--model {model}: no such folder")
    model_dir, builtin = (Path(model), False) if model is not None else (builtin_model_dir(), True)
    try:
        conv_file = read_conversation(messages) if messages is not None else None
    except ConversationFileError as e:
        raise UserError(f"--messages {e}") from None
    msgs = conv_file.messages if conv_file else []
    if think is None:
        think = bool(conv_file and conv_file.thinking)
    if system is not None:
        msgs = _with_system(msgs, system)

    if render:
        return _render(msgs + ([{"role": "user", "content": prompt}] if prompt is not None else []), think,
                       reasoning_effort, json_out, model_dir)

    if model is not None:
        from dsv4.engine.checkpoint.published import model_folder

        model_folder(model)  # "not a model folder" before the tokenizer is looked for (--render needs only that)
    interactive = False
    if prompt is None and messages is None:
        if sys.stdin.isatty():
            if json_out:
                raise UserError("--json answers one prompt: pass -p \"...\", pipe the prompt on stdin, or give "
                                "--messages FILE")
            interactive = True
        else:
            prompt = sys.stdin.read()
            if not prompt.strip():
                raise UserError("no prompt: pass -p \"...\" or pipe text on stdin")
    elif prompt is None:  # a conversation file: continue it (the REPL when on a terminal)
        interactive = sys.stdin.isatty() and not json_out
        if not sys.stdin.isatty():
            piped = sys.stdin.read()
            prompt = piped if piped.strip() else None  # text piped with --messages is the next user turn
    if prompt is not None:
        prompt = prompt.rstrip("\n")
    # check the conversation before loading any weights
    try:
        from dsv4.engine.runtime.chat import encode_messages

        pending = msgs + ([{"role": "user", "content": prompt}] if prompt is not None else [])
        encode_messages(pending, "thinking" if think else "chat", reasoning_effort=reasoning_effort)
        if not interactive:
            answerable(pending)
    except (ChatFormatError, ConversationError) as e:
        raise UserError(f"--messages {messages}: {e}" if messages is not None else str(e)) from None

    from dsv4.engine.checkpoint.loader import generation_defaults

    gen = generation_defaults(model_dir)
    params = SamplingParams(
        temperature=temperature if temperature is not None else float(gen.get("temperature", 1.0)),
        top_p=top_p if top_p is not None else float(gen.get("top_p", 1.0)),
        top_k=top_k if top_k is not None else int(gen.get("top_k", 0)), min_p=min_p)
    check_sampling(params)
    apply_threads(threads)
    from .parallel import load_conversation as load_parallel, resolve_ranks

    kind, n_ranks = resolve_ranks(device, gpus, ranks, model_dir, max_context, precision)
    if n_ranks > 1:
        if mtp:
            raise UserError("--mtp runs on one device: drop it, or drop --gpus/--ranks")
        conv, info = load_parallel(model_dir, kind, precision, max_context, msgs, think, reasoning_effort, n_ranks,
                                   threads, prefill_chunk)
    else:
        conv, info = load_conversation(model_dir, resolve_device(kind), precision, max_context, msgs, think,
                                       reasoning_effort, mtp, prefill_chunk)
    conv.on_prefill = PrefillProgress()
    banner = f"dsv4 · {info}" + (" · built-in default model (25M-parameter DeepSeek-V4 trained on Python "
                                 "standard-library docs; ask about Python, e.g. What does json.dumps do?)"
                                 if builtin else "")
    if interactive:
        from .repl import run_repl

        run_repl(conv, params, seed, max_tokens, banner, history_file)
    else:
        one_shot(conv, prompt, params, seed, max_tokens, json_out, hide_reasoning, banner)


def _with_system(msgs: list[dict], text: str) -> list[dict]:
    """``msgs`` with the first system message's text set to ``text`` (one added in front if none)."""
    msgs = list(msgs)
    k = next((i for i, m in enumerate(msgs) if m.get("role") == "system"), None)
    if k is None:
        return [{"role": "system", "content": text}] + msgs
    msgs[k] = dict(msgs[k], content=text)
    return msgs


def _render(msgs, think, reasoning_effort, json_out, model_dir):
    from dsv4.engine.runtime.chat import ChatFormatError, encode_messages

    if not msgs:
        raise UserError("--render needs a conversation: --messages FILE and/or -p \"...\"")
    try:
        text = encode_messages(msgs, "thinking" if think else "chat", reasoning_effort=reasoning_effort)
    except ChatFormatError as e:
        raise UserError(f"--messages: {e}") from None
    if json_out:
        from dsv4.engine.runtime.tokenizer import Tokenizer

        ids = Tokenizer.from_dir(model_dir).encode(text)
        print(json.dumps({"prompt": text, "prompt_token_ids": ids}, ensure_ascii=False))
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def load_conversation(model_dir, device, precision, max_context, messages, think, reasoning_effort, mtp=False,
                      prefill_chunk=None):
    from dsv4.engine.checkpoint.loader import load_model
    from dsv4.engine.runtime.conversation import Conversation
    from dsv4.engine.runtime.session import Session
    from dsv4.engine.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, mode=precision, device=device)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    max_context = min(max_context, model.cfg.max_position_embeddings)
    spec = None
    if mtp:
        from dsv4.engine.runtime.speculative import SpeculativeDecoder, mtp_session

        if not model.has_mtp:
            raise UserError(f"{model_dir}: this checkpoint has no MTP layer (mtp.0.*): run without --mtp")
        session = mtp_session(model, max_context, prefill_chunk=prefill_chunk)
        spec = SpeculativeDecoder(session)
    else:
        session = Session(model, max_context=max_context, prefill_chunk=prefill_chunk)
    info = (f"{Path(model_dir).name} · {model.cfg.num_hidden_layers} layers · {precision} · {device} · context "
            f"{max_context}" + (" · MTP drafts" if mtp else ""))
    conv = Conversation(session, tok, thinking=think, reasoning_effort=reasoning_effort, messages=messages,
                        speculative=spec)
    return conv, info


class PrefillProgress:
    """The progress line of a long prefill on stderr: tokens done / total and tok/s, shown once a
    prompt has taken more than ``after_s`` seconds (short prompts print nothing); Ctrl+C stops it
    between chunks (the conversation then drops the half-read prompt and stays usable)."""

    def __init__(self, after_s: float = 2.0, stream=None):
        self.after_s, self.stream = after_s, stream or sys.stderr
        self.t0, self.shown = None, False

    def __call__(self, done: int, total: int) -> None:
        import time

        now = time.perf_counter()
        if self.t0 is None or done <= 0:
            self.t0, self.shown = now, False
            if done <= 0:
                return
        elapsed = now - self.t0
        if done >= total:
            if self.shown:
                self.stream.write("\r\033[K" if self.stream.isatty() else "")
                self.stream.flush()
            self.t0 = None
            return
        if elapsed < self.after_s:
            return
        rate = done / elapsed if elapsed > 0 else 0.0
        line = f"prefill {done:,}/{total:,} tokens, {rate:,.0f} tok/s (Ctrl+C stops)"
        self.stream.write(("\r\033[K" + line) if self.stream.isatty() else line + "\n")
        self.stream.flush()
        self.shown = True


def finish_notice(turn, max_tokens: int, max_context: int) -> str | None:
    """One line saying why the answer is incomplete (None when it ended by itself)."""
    finish = turn.stats.finish_reason
    comp = turn.completion
    if finish == "length":
        return f"the answer was cut at --max-tokens {max_tokens}"
    if finish == "context":
        return f"the answer was cut: the context ({max_context} tokens) is full"
    if comp is not None and comp.incomplete_call:
        return f"the tool call to {comp.incomplete_call!r} was cut off and left out"
    if comp is not None and comp.error and finish == "stop":
        return f"the model's output is not well-formed ({comp.error}); kept what could be read"
    return None


def tool_call_line(call: dict) -> str:
    fn = call["function"]
    return f"[tool call {call.get('id', '')}] {fn['name']} {fn['arguments']}"


def context_full_message(prompt_tokens: int, max_context: int) -> str:
    return (f"the prompt is {prompt_tokens} tokens but the context holds {max_context}: shorten it or raise "
            "--max-context")


def one_shot(conv, prompt, params, seed, max_tokens, json_out, hide_reasoning, banner):
    from dsv4.engine.runtime.conversation import ContextFull
    from dsv4.engine.runtime.sampling import Sampler

    sampler = Sampler(params, seed)
    pending = conv.messages + ([{"role": "user", "content": prompt}] if prompt is not None else [])
    n = len(conv.prompt_ids(conv.render(pending)))
    if n >= conv.session.max_context:
        raise UserError(context_full_message(n, conv.session.max_context))
    if not json_out:
        sys.stderr.write(banner + "\n")
    previous = conv.last_turn  # a prefill cut by Ctrl+C leaves it in place
    gen = conv.send(prompt, sampler, max_tokens)
    try:
        for _, pieces in gen:
            if json_out:
                continue
            for p in pieces:
                if p.kind == "answer":
                    sys.stdout.write(p.text)
                    sys.stdout.flush()
                elif p.kind == "reasoning" and not hide_reasoning:
                    sys.stderr.write(p.text)
                    sys.stderr.flush()
    except ContextFull as e:
        raise UserError(context_full_message(e.prompt_tokens, e.max_context)) from None
    except KeyboardInterrupt:
        gen.close()
        if conv.last_turn is previous or not conv.last_turn.token_ids:
            raise  # before the answer began: "interrupted", exit 130
    turn = conv.last_turn
    st, msg = turn.stats, turn.message
    if json_out:
        print(json.dumps({
            "message": msg, "finish_reason": st.finish_reason, "text": msg["content"],
            "prompt_token_ids": turn.prompt_ids, "token_ids": turn.token_ids,
            "prompt_tokens": st.prompt_tokens, "generated_tokens": st.generated_tokens,
            "time_to_first_token_s": round(st.ttft_s, 6), "decode_s": round(st.decode_s, 6),
            "tokens_per_s": round(st.tokens_per_s, 3), "mtp": turn.mtp,
        }, ensure_ascii=False))
    else:
        for call in msg["tool_calls"]:
            sys.stdout.write("\n" + tool_call_line(call))
        sys.stdout.write("\n")
        sys.stdout.flush()
        note = finish_notice(turn, max_tokens, conv.session.max_context)
        if note and st.finish_reason != "interrupted":
            sys.stderr.write(f"note: {note}\n")
    if st.finish_reason == "interrupted":
        sys.stderr.write("interrupted: the answer is partial\n")
        raise typer.Exit(130)

"""The interactive chat REPL (prompt-toolkit input, rich output)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

COMMANDS = {
    "/help": "show this help",
    "/reset": "start a new conversation (clears the cache slot)",
    "/system TEXT": "set the system prompt (resets the conversation)",
    "/think, /nothink": "thinking mode on / off",
    "/temp X, /topp X": "sampling temperature / top-p",
    "/max N": "most tokens per answer",
    "/save FILE, /load FILE": "save / load the conversation as JSON",
    "/stats": "statistics of the last turn",
    "/quit": "exit (Ctrl+D works too)",
}
WARN_FRACTION = 0.9


def run_repl(conv, params, seed, max_tokens, banner, history_file: Path):
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    from dsv4.engine.runtime.sampling import Sampler

    console = Console(highlight=False)
    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event):  # Alt+Enter / Esc Enter: new line inside the message
        event.current_buffer.insert_text("\n")

    try:
        history = FileHistory(str(history_file))
    except OSError:
        history = InMemoryHistory()
    ps = PromptSession(history=history, key_bindings=kb)
    sampler = Sampler(params, seed)
    state = {"max": max_tokens, "last": None}
    console.print(f"[bold]{banner}[/]\nType a message, /help for commands, Alt+Enter for a new line, Ctrl+D to quit.")
    while True:
        try:
            text = ps.prompt("\n> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        text = text.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(text, conv, sampler, state, console) == "quit":
                break
            continue
        _turn(conv, text, sampler, state, console)
    console.print("bye")


def _turn(conv, text, sampler, state, console):
    from dsv4.engine.runtime.conversation import ContextFull

    gen = conv.send(text, sampler, state["max"])
    turn = None
    try:
        for turn, pieces in gen:
            for p in pieces:
                console.print(p.text, style="dim" if p.kind == "reasoning" else None, end="", soft_wrap=True)
    except KeyboardInterrupt:
        gen.close()
        console.print("\n[yellow]stopped[/]", end="")
    except ContextFull as e:
        console.print(f"[red]{e}[/]")
        return
    console.print()
    if turn is None:
        return
    state["last"] = turn.stats
    st = turn.stats
    used, limit = conv.session.seq_len, conv.session.max_context
    reason = "stopped by you" if st.stop_reason in ("interrupted", "") else st.stop_reason
    console.print(f"[dim]{st.prompt_tokens} prompt tokens ({st.prefilled_tokens} new) · {st.generated_tokens} generated"
                  f" · first token {st.ttft_s * 1000:.0f} ms · {st.tokens_per_s:.1f} tok/s · {reason}"
                  f" · context {used}/{limit}[/]")
    if st.stop_reason == "context":
        console.print("[red]The context is full: /reset to start over, or restart with a larger --max-context.[/]")
    elif used >= WARN_FRACTION * limit:
        console.print(f"[yellow]warning: the context is {used / limit:.0%} full[/]")


def _command(text, conv, sampler, state, console):
    cmd, _, arg = text.partition(" ")
    arg = arg.strip()
    p = sampler.params
    try:
        if cmd in ("/quit", "/exit"):
            return "quit"
        if cmd == "/help":
            for k, v in COMMANDS.items():
                console.print(f"  [bold]{k:<24}[/] {v}")
        elif cmd == "/reset":
            conv.reset()
            console.print("conversation reset")
        elif cmd == "/system":
            conv.system = arg or None
            conv.reset()
            console.print("system prompt set; conversation reset" if arg else "system prompt cleared")
        elif cmd in ("/think", "/nothink"):
            conv.thinking = cmd == "/think"
            console.print(f"thinking mode {'on' if conv.thinking else 'off'}")
        elif cmd in ("/temp", "/topp"):
            v = float(arg)
            old = (p.temperature, p.top_p)
            if cmd == "/temp":
                p.temperature = v
            else:
                p.top_p = v
            try:
                p.validate()
            except ValueError:
                p.temperature, p.top_p = old
                raise
            console.print(f"temperature {p.temperature} · top-p {p.top_p}")
        elif cmd == "/max":
            n = int(arg)
            if n < 1:
                raise ValueError("/max needs a positive number")
            state["max"] = n
            console.print(f"max tokens per answer: {n}")
        elif cmd == "/save":
            Path(arg).write_text(json.dumps({"system": conv.system, "thinking": conv.thinking,
                                             "messages": conv.messages}, ensure_ascii=False, indent=1))
            console.print(f"saved {len(conv.messages)} messages to {arg}")
        elif cmd == "/load":
            d = json.loads(Path(arg).read_text())
            conv.reset()
            conv.system, conv.thinking = d.get("system"), bool(d.get("thinking", False))
            conv.messages = list(d["messages"])
            console.print(f"loaded {len(conv.messages)} messages from {arg}")
        elif cmd == "/stats":
            st = state["last"]
            if st is None:
                console.print("no turn yet")
            else:
                console.print(f"prompt {st.prompt_tokens} (prefilled {st.prefilled_tokens}) · generated "
                              f"{st.generated_tokens} · TTFT {st.ttft_s * 1000:.1f} ms · {st.tokens_per_s:.2f} tok/s")
        else:
            console.print(f"[red]unknown command {cmd}[/] (try /help)")
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        console.print(f"[red]{cmd}: {e}[/]")

"""The interactive chat REPL (prompt-toolkit input, rich output).

``Repl`` does the work of one input line at a time (a message, a /command, a tool result) and never
lets an error end the session or lose the conversation; ``run_repl`` feeds it lines from a
prompt-toolkit prompt.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console

COMMANDS = {
    "/help": "show this help",
    "/reset": "start a new conversation (keeps the system prompt and tools; clears the cache slot)",
    "/system [TEXT]": "set the system prompt (resets the conversation); without TEXT: show it",
    "/think, /nothink": "thinking mode on / off",
    "/temp X, /topp X": "sampling temperature / top-p",
    "/max N": "most tokens per answer",
    "/save FILE, /load FILE": "save / load the conversation (JSON, the --messages format)",
    "/tools [FILE|off]": "give the model the tools in FILE (a JSON list); without FILE: list them",
    "/stats": "statistics of the last turn",
    "/quit": "exit (Ctrl+D works too)",
}
WARN_FRACTION = 0.9
SKIP = "/skip"


class ReplError(ValueError):
    """A command the REPL cannot carry out (shown in red; the session goes on)."""


class Repl:
    """One chat session. ``read(prompt_text) -> str`` reads a line (EOFError at the end,
    KeyboardInterrupt for Ctrl+C); output goes to ``console``."""

    def __init__(self, conv, sampler, max_tokens: int, console: Console, read):
        self.conv, self.sampler, self.max_tokens = conv, sampler, max_tokens
        self.console, self.read = console, read

    # ------------------------------------------------------------------ input
    def handle(self, text: str) -> bool:
        """Act on one input line; False when the user asked to quit."""
        text = text.strip()
        if not text:
            return True
        try:
            if text.startswith("/"):
                return self.command(text)
            self.turn(text)
        except ReplError as e:
            self.console.print(f"[red]{e}[/]", highlight=False)
        except KeyboardInterrupt:
            self.console.print("\n[yellow]interrupted[/]")
        except Exception as e:  # noqa: BLE001 - the REPL survives any failure of one turn or command
            self.console.print(f"[red]error: {type(e).__name__}: {e}[/]", highlight=False)
            self.console.print(f"[dim]the conversation is kept ({len(self.conv.messages)} messages)[/]")
        return True

    # ------------------------------------------------------------------ a turn
    def turn(self, text: str | None) -> None:
        """Send ``text`` (None: answer the conversation as it stands, e.g. after tool results),
        stream the reply, then run any tool calls it makes by asking for their results."""
        from dsv4.engine.runtime.chat import ChatFormatError
        from dsv4.engine.runtime.conversation import ContextFull, NothingToAnswer

        conv = self.conv
        previous = conv.last_turn  # a prefill cut by Ctrl+C leaves it in place
        gen = conv.send(text, self.sampler, self.max_tokens)
        shown_calls = False
        try:
            for _, pieces in gen:
                for p in pieces:
                    if p.kind == "tool_calls":
                        if not shown_calls:
                            self.console.print("\n[dim]calling tools…[/]", end="")
                            shown_calls = True
                        continue
                    self.console.print(p.text, style="dim" if p.kind == "reasoning" else None, end="",
                                       soft_wrap=True, markup=False, highlight=False)
        except ContextFull as e:
            raise ReplError(f"the prompt is {e.prompt_tokens} tokens and the context holds {e.max_context}: "
                            "/reset to start over, or restart with a larger --max-context") from None
        except (NothingToAnswer, ChatFormatError) as e:
            raise ReplError(str(e)) from None
        except KeyboardInterrupt:
            gen.close()
            if conv.last_turn is previous or not conv.last_turn.token_ids:
                self.console.print("\n[yellow]interrupted before the answer began: your message was not added "
                                   "to the conversation[/]")
                return
            self.console.print("\n[yellow]stopped[/]", end="")
        self.console.print()
        turn = conv.last_turn
        self.print_stats_line(turn)
        calls = turn.message["tool_calls"] if turn.message else []
        if calls and turn.stats.finish_reason == "stop":
            if self.answer_tool_calls(calls):
                self.turn(None)

    def print_stats_line(self, turn) -> None:
        from .chat import finish_notice

        st = turn.stats
        used, limit = self.conv.session.seq_len, self.conv.session.max_context
        reason = "stopped by you" if st.finish_reason == "interrupted" else st.finish_reason
        self.console.print(f"[dim]{st.prompt_tokens} prompt tokens ({st.prefilled_tokens} new) · "
                           f"{st.generated_tokens} generated · first token {st.ttft_s * 1000:.0f} ms · "
                           f"{st.tokens_per_s:.1f} tok/s · {reason} · context {used}/{limit}[/]")
        if turn.mtp is not None:
            m = turn.mtp
            self.console.print(f"[dim]MTP: drafted {m['drafted']}, accepted {m['accepted']} "
                               f"({m['acceptance_rate']:.0%}), {m['tokens_per_step']:.2f} tokens per step[/]")
        note = finish_notice(turn, self.max_tokens, limit)
        if st.finish_reason == "context":
            self.console.print("[red]The context is full: /reset to start over, or restart with a larger "
                               "--max-context.[/]")
        elif note and st.finish_reason != "interrupted":
            self.console.print(f"[yellow]{note}[/]", highlight=False)
        if st.finish_reason != "context" and used >= WARN_FRACTION * limit:
            self.console.print(f"[yellow]warning: the context is {used / limit:.0%} full[/]")

    def answer_tool_calls(self, calls: list[dict]) -> bool:
        """Show each call and ask for its result; True when at least one result was given."""
        from rich.panel import Panel

        answered = False
        for call in calls:
            fn = call["function"]
            try:
                body = json.dumps(json.loads(fn["arguments"]), ensure_ascii=False, indent=2)
            except ValueError:
                body = fn["arguments"]
            self.console.print(Panel(body, title=f"tool call: {fn['name']}", subtitle=call.get("id", ""),
                                     title_align="left", highlight=False))
            try:
                result = self.read(f"result of {fn['name']} ({SKIP} to leave it unanswered)> ")
            except (KeyboardInterrupt, EOFError):
                result = SKIP
            if result.strip() == SKIP:
                self.console.print("[dim]skipped[/]")
                continue
            self.conv.messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": result})
            answered = True
        return answered

    # ------------------------------------------------------------------ commands
    def command(self, text: str) -> bool:
        cmd, _, arg = text.partition(" ")
        arg = arg.strip()
        conv, p, say = self.conv, self.sampler.params, self.console.print
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            for k, v in COMMANDS.items():
                say(f"  [bold]{k:<24}[/] {v}", highlight=False)
        elif cmd == "/reset":
            conv.reset()
            say("conversation reset")
        elif cmd == "/system":
            if not arg:
                say(f"system prompt: {conv.system}" if conv.system else "no system prompt (set one with /system TEXT)",
                    markup=False, highlight=False)
            else:
                conv.system = arg
                conv.reset()
                say("system prompt set; conversation reset")
        elif cmd in ("/think", "/nothink"):
            conv.thinking = cmd == "/think"
            say(f"thinking mode {'on' if conv.thinking else 'off'}")
        elif cmd in ("/temp", "/topp"):
            v = _number(cmd, arg, float)
            old = (p.temperature, p.top_p)
            if cmd == "/temp":
                p.temperature = v
            else:
                p.top_p = v
            try:
                p.validate()
            except ValueError as e:
                p.temperature, p.top_p = old
                raise ReplError(f"{cmd}: {e}") from None
            say(f"temperature {p.temperature} · top-p {p.top_p}")
        elif cmd == "/max":
            n = _number(cmd, arg, int)
            if n < 1:
                raise ReplError(f"{cmd} needs a number >= 1, got {n}")
            self.max_tokens = n
            say(f"max tokens per answer: {n}")
        elif cmd == "/save":
            self.save(_needs(cmd, arg, "FILE"))
        elif cmd == "/load":
            self.load(_needs(cmd, arg, "FILE"))
        elif cmd == "/tools":
            self.tools(arg)
        elif cmd == "/stats":
            st = conv.last_turn.stats if conv.last_turn is not None else None
            if st is None:
                say("no turn yet")
            else:
                say(f"prompt {st.prompt_tokens} (prefilled {st.prefilled_tokens}) · generated {st.generated_tokens}"
                    f" · TTFT {st.ttft_s * 1000:.1f} ms · {st.tokens_per_s:.2f} tok/s · {st.finish_reason}")
                m = conv.last_turn.mtp
                if m is not None:
                    say(f"MTP: drafted {m['drafted']} · accepted {m['accepted']} ({m['acceptance_rate']:.0%}) · "
                        f"{m['tokens_per_step']:.2f} tokens per verify step")
        else:
            raise ReplError(f"unknown command {cmd} (try /help)")
        return True

    def save(self, path: str) -> None:
        from dsv4.engine.runtime.messages import ConversationFileError, write_conversation

        try:
            write_conversation(Path(path).expanduser(), self.conv.messages, self.conv.thinking)
        except ConversationFileError as e:
            raise ReplError(f"/save: {e}") from None
        self.console.print(f"saved {len(self.conv.messages)} messages to {path}", markup=False, highlight=False)

    def load(self, path: str) -> None:
        from dsv4.engine.runtime.chat import ChatFormatError
        from dsv4.engine.runtime.messages import ConversationFileError, read_conversation

        try:
            f = read_conversation(Path(path).expanduser())
            self.conv.load(f.messages)
        except (ConversationFileError, ChatFormatError) as e:
            raise ReplError(f"/load: {e} (the conversation is unchanged)") from None
        if f.thinking is not None:
            self.conv.thinking = f.thinking
        self.console.print(f"loaded {len(f.messages)} messages from {path}", markup=False, highlight=False)

    def tools(self, arg: str) -> None:
        from dsv4.engine.runtime.chat import ChatFormatError
        from dsv4.engine.runtime.messages import ConversationFileError, read_tools

        if not arg:
            names = [t["function"].get("name", "?") for t in self.conv.tools if isinstance(t.get("function"), dict)]
            self.console.print(f"tools: {', '.join(names)}" if names else "no tools (give some with /tools FILE)",
                               markup=False, highlight=False)
            return
        try:
            tools = [] if arg == "off" else read_tools(Path(arg).expanduser())
            self.conv.set_tools(tools)
        except (ConversationFileError, ChatFormatError) as e:
            raise ReplError(f"/tools: {e}") from None
        self.console.print(f"{len(tools)} tools given to the model" if tools else "tools removed")


def _needs(cmd: str, arg: str, what: str) -> str:
    if not arg:
        raise ReplError(f"usage: {cmd} {what}")
    return arg


def _number(cmd: str, arg: str, kind):
    try:
        v = kind(arg)
    except ValueError:
        raise ReplError(f"{cmd} needs a {'whole ' if kind is int else ''}number, got {arg!r}") from None
    if kind is float and not math.isfinite(v):
        raise ReplError(f"{cmd} needs a finite number, got {arg!r}")
    return v


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
    repl = Repl(conv, Sampler(params, seed), max_tokens, console, lambda text: ps.prompt(text))
    console.print(f"[bold]{banner}[/]\nType a message, /help for commands, Alt+Enter for a new line, Ctrl+D to quit.")
    if conv.messages:
        console.print(f"[dim]continuing a conversation of {len(conv.messages)} messages[/]")
    while True:
        try:
            text = repl.read("\n> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        if not repl.handle(text):
            break
    console.print("bye")

"""Model output -> an assistant message: reasoning_content, content, tool_calls (OpenAI shape).

The text is what the model wrote after the prompt, eos included (CHAT_ENCODING.md §12):
  thinking mode: reasoning ``</think>`` content, chat mode: content; then either eos, or
  ``\\n\\n<｜DSML｜tool_calls>\\n`` + invokes + ``</｜DSML｜tool_calls>`` (+ eos).

``parse_completion(text, thinking)`` is strict: it accepts what DeepSeek's parser accepts and raises
``CompletionError`` where it raises. Where that parser silently accepts a cut-off tool-call block
(text ending right after the block opener, an invoke header, a parameter line or ``</｜DSML｜invoke``),
the result says so (``truncated``, ``incomplete_call``) and only calls whose invoke was closed are
returned. ``strict=False`` never raises: it keeps what can be read and names the problem in ``error``
(for output cut by a token limit or Ctrl+C, or malformed by a small model).

``OutputParser`` splits streamed text into reasoning / answer / tool-call pieces for display.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .chat import DSML, INVOKE_OPEN, PARAM_OPEN, TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN, to_json
from .tokenizer import BOS, END_THINK, EOS, THINK

BLOCK_MARK = TOOL_CALLS_OPEN[:-1]  # "<｜DSML｜tool_calls" (the ">" is read with the block)
BLOCK_START = "\n\n" + BLOCK_MARK  # S: where content ends and tool calls begin
INVOKE_END = f"</{DSML}invoke"  # without ">": a block may end right after it
PARAM_END = f"/{DSML}parameter"
FORBIDDEN = (BOS, EOS, THINK, END_THINK, DSML)  # never inside reasoning or content
_HEADER = re.compile(r'\s*name="([^\n]*?)">\n\n?')
_PARAM = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.S)


class CompletionError(ValueError):
    """Model output that is not a well-formed V4 completion."""


@dataclass
class Completion:
    """message: {"role": "assistant", "content", "reasoning_content", "tool_calls": [...]}.
    ended: an eos was read. truncated: the text stops before its end (no eos, or a tool-call block
    that was never closed). incomplete_call: the name of a call cut off inside its invoke (left
    out of tool_calls). error: why the text is malformed (lenient parsing only). unparsed: the
    tool-call text that could not be read (lenient parsing only)."""

    message: dict
    ended: bool = False
    truncated: bool = False
    incomplete_call: str | None = None
    error: str | None = None
    unparsed: str = ""

    @property
    def tool_calls(self) -> list[dict]:
        return self.message["tool_calls"]


def _first(text: str, pos: int, stops) -> tuple[int, str | None]:
    """(index of the earliest stop string at or after pos, that stop) or (len(text), None)."""
    best, hit = len(text), None
    for s in stops:
        j = text.find(s, pos)
        if 0 <= j < best:
            best, hit = j, s
    return best, hit


@dataclass
class _Block:
    calls: list = field(default_factory=list)
    pos: int = 0
    closed: bool = False
    incomplete: str | None = None


def _read_block(text: str, pos: int, block: _Block) -> None:
    """Read invokes from ``pos`` (just after S) into ``block``; raises CompletionError on bad text."""
    while pos < len(text):
        j, stop = _first(text, pos, (INVOKE_OPEN, TOOL_CALLS_CLOSE))
        if text[pos:j] != ">\n":
            raise CompletionError(f"tool calls: expected '>\\n' before the next tag, got {text[pos:j][:40]!r}")
        if stop is None:
            raise CompletionError("tool calls: the block stops after '>\\n'")
        pos = block.pos = j + len(stop)
        if stop == TOOL_CALLS_CLOSE:
            block.closed = True
            return
        j, stop = _first(text, pos, (PARAM_OPEN, INVOKE_END))
        m = _HEADER.fullmatch(text, pos, j)
        if not m:
            raise CompletionError(f"tool calls: bad invoke header {text[pos:j][:60]!r}")
        name, args = m.group(1), {}
        block.incomplete = name
        pos = j + len(stop or "")
        while stop == PARAM_OPEN:
            j, end = _first(text, pos, (PARAM_END,))
            p = _PARAM.fullmatch(text, pos, j) if end else None
            if not p:
                raise CompletionError(f"tool calls: bad parameter of {name!r}: {text[pos:j][:60]!r}")
            if p.group(1) in args:
                raise CompletionError(f"tool calls: parameter {p.group(1)!r} of {name!r} given twice")
            args[p.group(1)] = (p.group(3), p.group(2) == "true")
            pos = j + len(end)
            j, stop = _first(text, pos, (PARAM_OPEN, INVOKE_END))
            if text[pos:j] != ">\n":
                raise CompletionError(f"tool calls: expected '>\\n' after a parameter of {name!r}")
            pos = j + len(stop or "")
        if stop == INVOKE_END:
            block.calls.append(_call(name, args))
            block.incomplete = None
        block.pos = pos


def _call(name: str, args: dict) -> dict:
    """OpenAI shape; arguments as the JSON text the encoder's parameters stand for."""
    items = [to_json(k) + ": " + (to_json(v) if is_str else v) for k, (v, is_str) in args.items()]
    return {"type": "function", "function": {"name": name, "arguments": "{" + ", ".join(items) + "}"}}


def _message(reasoning: str, content: str, calls: list) -> dict:
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}


def parse_completion(text: str, thinking: bool, strict: bool = True) -> Completion:
    """Model output after the prompt (eos included when it was generated) -> Completion.

    thinking: the prompt ended with ``<think>`` (the text starts with reasoning)."""
    try:
        return _parse_strict(text, thinking)
    except CompletionError as e:
        if strict:
            raise
        return _parse_lenient(text, thinking, str(e))


def _parse_strict(text: str, thinking: bool) -> Completion:
    pos, reasoning = 0, ""
    if thinking:
        j, stop = _first(text, 0, (END_THINK, BLOCK_START))
        if stop != END_THINK:
            raise CompletionError("the reasoning is not closed by </think>")
        reasoning, pos = text[:j], j + len(END_THINK)
    j, stop = _first(text, pos, (EOS, BLOCK_START))
    content = text[pos:j]
    for part, what in ((reasoning, "reasoning"), (content, "content")):
        bad = [t for t in FORBIDDEN if t in part]
        if bad:
            raise CompletionError(f"{bad[0]!r} inside the {what}")
    if stop is None:
        raise CompletionError("the text ends without an end-of-sentence token")
    if stop == EOS:
        if text[j + len(EOS):]:
            raise CompletionError("text after the end-of-sentence token")
        return Completion(_message(reasoning, content, []), ended=True)
    block = _Block(pos=j + len(BLOCK_START))
    _read_block(text, block.pos, block)
    tail = text[block.pos:] if block.closed else ""
    if tail not in ("", EOS):
        raise CompletionError(f"text after the tool calls: {tail[:40]!r}")
    return Completion(_message(reasoning, content, block.calls), ended=tail == EOS, truncated=not block.closed,
                      incomplete_call=block.incomplete)


def _strip_specials(s: str) -> str:
    for t in FORBIDDEN:
        s = s.replace(t, "")
    return s


def _parse_lenient(text: str, thinking: bool, error: str) -> Completion:
    """Best effort: split at the first </think>, eos and tool-call block; keep the calls that read."""
    ended = EOS in text
    body = text.split(EOS, 1)[0]
    reasoning, rest = "", body
    if thinking:
        reasoning, sep, rest = body.partition(END_THINK)
        if not sep:
            reasoning, rest = body, ""
    j = rest.find(BLOCK_MARK)
    content, block = (rest, None) if j < 0 else (rest[:j].removesuffix("\n\n"), _Block(pos=j + len(BLOCK_MARK)))
    unparsed = ""
    if block is not None:
        try:
            _read_block(rest, block.pos, block)
        except CompletionError as e:
            error = str(e)
            unparsed = rest[j:]
        else:
            unparsed = rest[block.pos:].strip() if block.closed else ""
    calls = block.calls if block else []
    truncated = not ended and not (block is not None and block.closed)
    return Completion(_message(_strip_specials(reasoning), _strip_specials(content), calls),
                      ended=ended, truncated=truncated, incomplete_call=block.incomplete if block else None,
                      error=error, unparsed=unparsed)


@dataclass
class Piece:
    kind: str  # "reasoning" | "answer" | "tool_calls" (the DSML text, for a "calling…" display)
    text: str


class OutputParser:
    """Splits streamed model text into pieces as it arrives; ``finish()`` parses the whole text.

    Starts in the reasoning when the prompt ended with ``<think>``; ``</think>`` switches to the
    answer; the tool-call block and eos never reach the answer. A tail that could be the start of
    one of those markers is held back until the next text decides it."""

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.state = "reasoning" if thinking else "answer"
        self.raw: list[str] = []
        self.reasoning, self.answer = [], []
        self._pending = ""

    def feed(self, text: str) -> list[Piece]:
        self.raw.append(text)
        text, self._pending = self._pending + text, ""
        pieces = []
        while text and self.state != "done":
            if self.state == "tool_calls":
                j = text.find(EOS)
                if j < 0:
                    keep = _partial_suffix(text, EOS)
                    text, self._pending = text[: len(text) - keep], text[len(text) - keep:]
                else:
                    text, self.state = text[:j], "done"
                pieces.append(Piece("tool_calls", text))
                break
            marks = (END_THINK, EOS) if self.state == "reasoning" else (BLOCK_START, BLOCK_MARK, EOS)
            j, stop = _first(text, 0, marks)
            if stop is None:
                keep = max(_partial_suffix(text, m) for m in marks)
                text, self._pending = text[: len(text) - keep], text[len(text) - keep:]
                pieces.append(Piece(self.state, text))
                break
            pieces.append(Piece(self.state, text[:j]))
            text = text[j + len(stop):]
            self.state = {END_THINK: "answer", EOS: "done"}.get(stop, "tool_calls")
            if self.state == "tool_calls":
                pieces.append(Piece("tool_calls", stop.lstrip("\n")))
        pieces = [p for p in pieces if p.text]
        for p in pieces:
            if p.kind == "reasoning":
                self.reasoning.append(p.text)
            elif p.kind == "answer":
                self.answer.append(p.text)
        return pieces

    @property
    def raw_text(self) -> str:
        return "".join(self.raw)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def answer_text(self) -> str:
        return "".join(self.answer)

    def finish(self) -> Completion:
        """The whole text so far, parsed leniently (never raises)."""
        return parse_completion(self.raw_text, self.thinking, strict=False)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


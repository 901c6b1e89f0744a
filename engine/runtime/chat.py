"""DeepSeek-V4 chat encoding (the published ``encoding_dsv4`` rules) and the output parser.

prompt = bos + [reasoning-effort prefix] + system text + per turn: <｜User｜> text, <｜Assistant｜> reply.
- Assistant turns before the last user message: </think> + answer + eos (reasoning dropped).
- Assistant turns after the last user message: <think> + reasoning + </think> + answer + eos.
- Generation prompt: <｜Assistant｜><think> (thinking mode) or <｜Assistant｜></think> (chat mode).
- reasoning_effort "max" (thinking mode only) puts a fixed instruction paragraph right after bos,
  before the first message. That placement is this project's reading of "prefixed to the first message".
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import ASSISTANT, BOS, END_THINK, EOS, THINK, USER

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)


def encode_chat(messages: list[dict], thinking: bool = True, reasoning_effort: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """messages: [{"role": "system"|"user"|"assistant", "content": str, "reasoning": str?}] -> prompt text."""
    if reasoning_effort not in (None, "high", "max"):
        raise ValueError(f"reasoning_effort must be 'high' or 'max', got {reasoning_effort!r}")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = [BOS]
    if thinking and reasoning_effort == "max":
        out.append(REASONING_EFFORT_MAX)
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content", "")
        if role == "system":
            out.append(content)
        elif role == "user":
            out.append(USER + content)
        elif role == "assistant":
            out.append(ASSISTANT)
            if i > last_user and m.get("reasoning") is not None:
                out.append(THINK + m["reasoning"] + END_THINK)
            else:
                out.append(END_THINK)
            out.append(content + EOS)
        else:
            raise ValueError(f"unknown role {role!r}")
    if add_generation_prompt:
        out.append(ASSISTANT + (THINK if thinking else END_THINK))
    return "".join(out)


@dataclass
class Piece:
    kind: str  # "reasoning" | "answer"
    text: str


class OutputParser:
    """Splits streamed model text into reasoning and answer. Starts in reasoning when the prompt
    ended with <think>; </think> switches to the answer; special tokens never reach the output."""

    def __init__(self, thinking: bool):
        self.in_reasoning = thinking
        self.reasoning, self.answer = [], []
        self._pending = ""

    def feed(self, text: str) -> list[Piece]:
        text = self._pending + text
        self._pending = ""
        pieces = []
        while text:
            if self.in_reasoning:
                j = text.find(END_THINK)
                if j < 0:
                    keep = _partial_suffix(text, END_THINK)
                    body, self._pending = text[: len(text) - keep], text[len(text) - keep:]
                    pieces.append(Piece("reasoning", body))
                    text = ""
                else:
                    pieces.append(Piece("reasoning", text[:j]))
                    self.in_reasoning = False
                    text = text[j + len(END_THINK):]
            else:
                pieces.append(Piece("answer", text.replace(EOS, "")))
                text = ""
        pieces = [p for p in pieces if p.text]
        for p in pieces:
            (self.reasoning if p.kind == "reasoning" else self.answer).append(p.text)
        return pieces

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def answer_text(self) -> str:
        return "".join(self.answer)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0

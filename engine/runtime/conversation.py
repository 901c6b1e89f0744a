"""A multi-turn conversation over one cache slot: encode, prefill only what is new, stream, stop.

The slot persists across turns. Before each turn the whole conversation is re-encoded; if the
tokens already in the cache are a prefix of it, only the remainder is prefilled, otherwise the
slot is reset (e.g. thinking mode drops earlier reasoning from the history) and all is prefilled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .chat import OutputParser, Piece, encode_chat
from .generate import Finish, decode_tokens
from .session import Session
from .tokenizer import ASSISTANT, END_THINK, USER, Tokenizer


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # tokens of the whole prompt
    prefilled_tokens: int = 0  # tokens actually run this turn (the new part)
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # "eos" | "max_tokens" | "context" | "interrupted"

    @property
    def tokens_per_s(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s > 0 and self.generated_tokens > 1 else 0.0


@dataclass
class Turn:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    stats: TurnStats = field(default_factory=TurnStats)
    parser: OutputParser | None = None


class Conversation:
    def __init__(self, session: Session, tokenizer: Tokenizer, system: str | None = None, thinking: bool = False,
                 reasoning_effort: str | None = None):
        self.session, self.tok = session, tokenizer
        self.system, self.thinking, self.reasoning_effort = system, thinking, reasoning_effort
        self.messages: list[dict] = []
        self.cached_ids: list[int] = []  # tokens in the cache slot
        self.history_ids: list[int] = []  # the conversation so far as exact token ids (chat mode)

    def reset(self) -> None:
        self.messages = []
        self.cached_ids = []
        self.history_ids = []
        self.session.reset()

    def prompt_ids(self, user_text: str) -> list[int]:
        """Token ids of the next prompt. In chat mode earlier turns are kept as the exact tokens that
        were generated (the encoding renders them unchanged), so the cache stays a prefix; thinking
        mode drops earlier reasoning, so the text is re-encoded."""
        if self.history_ids and not self.thinking:
            return self.history_ids + self.tok.encode(USER + user_text + ASSISTANT + END_THINK)
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        msgs = msgs + [{"role": "user", "content": user_text}]
        text = encode_chat(msgs, thinking=self.thinking, reasoning_effort=self.reasoning_effort)
        return self.tok.encode(text)

    def send(self, user_text: str, sample: Callable, max_new_tokens: int) -> Iterator[tuple[Turn, list[Piece]]]:
        """Run one user turn; yields (turn, new text pieces) after every generated token.

        The turn (and the assistant message, partial if interrupted by Ctrl+C or by closing the
        generator) is always recorded.
        """
        ids = self.prompt_ids(user_text)
        turn = Turn(ids, parser=OutputParser(self.thinking))
        st = turn.stats
        st.prompt_tokens = len(ids)
        if len(ids) >= self.session.max_context:
            raise ContextFull(f"the prompt ({len(ids)} tokens) does not fit the context of "
                              f"{self.session.max_context} tokens; use /reset or a larger --max-context")
        common = 0
        while common < min(len(ids), len(self.cached_ids)) and ids[common] == self.cached_ids[common]:
            common += 1
        if common < len(self.cached_ids) or common == len(ids):
            self.session.reset()
            self.cached_ids, common = [], 0
        self.messages.append({"role": "user", "content": user_text})
        stream = self.tok.stream()
        t0 = time.perf_counter()
        busy = True  # a forward interrupted midway leaves the slot half-written
        try:
            st.prefilled_tokens = len(ids) - common
            logits = self.session.prefill(ids[common:])
            busy = False
            self.cached_ids = list(ids)
            st.ttft_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            for tok, finish in decode_tokens(self.session, logits, sample, max_new_tokens, {self.tok.eos_id}):
                if busy:  # the step for the previous token finished
                    self.cached_ids.append(turn.token_ids[-1])
                    busy = False
                turn.token_ids.append(tok)
                st.generated_tokens += 1
                text = stream.push(tok) if tok != self.tok.eos_id else stream.flush()
                if finish is not None:
                    st.stop_reason = {Finish.STOP: "eos", Finish.LENGTH: "max_tokens"}.get(finish, str(finish))
                yield turn, turn.parser.feed(text)
                busy = finish is None  # resumed: the loop now steps the session for this token
            st.decode_s = time.perf_counter() - t1
        except KeyboardInterrupt:
            st.stop_reason = "interrupted"
        finally:
            if busy:
                self.session.reset()
                self.cached_ids = []
            tail = stream.flush()
            if tail:
                turn.parser.feed(tail)
            self.messages.append({"role": "assistant", "content": turn.parser.answer_text,
                                  "reasoning": turn.parser.reasoning_text})
            ended = turn.token_ids[-1:] == [self.tok.eos_id]
            self.history_ids = [] if self.thinking else ids + turn.token_ids + ([] if ended else [self.tok.eos_id])
        return turn


class ContextFull(RuntimeError):
    pass

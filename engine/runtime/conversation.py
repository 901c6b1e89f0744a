"""A multi-turn conversation over one cache slot: encode, prefill only what is new, stream, record.

``messages`` is the whole conversation in OpenAI chat-completions form (system messages, tools on
the first system message, user / assistant / tool messages; reasoning as ``reasoning_content``).
Before each turn it is rendered with the V4 encoding (chat.encode_messages). The text the model has
already seen (its prompts and its own tokens, eos added where it stopped early) is kept with its
token ids; when the new prompt text starts with it, those exact ids are reused and only the rest is
tokenised. The slot keeps the longest common prefix of the old and new ids when that is all of what
it holds; otherwise (e.g. thinking mode drops earlier reasoning) it is reset and all is prefilled.

A turn interrupted (Ctrl+C, or the caller closing the generator) after its first token is recorded
with its partial answer; one interrupted before that leaves the conversation and the cache as
they were (KeyboardInterrupt propagates). Any other error also leaves the conversation as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .chat import ChatFormatError, encode_messages
from .completion import Completion, OutputParser, Piece
from .generate import Finish, decode_tokens
from .tokenizer import EOS, Tokenizer


class ConversationError(ValueError):
    """A turn that cannot start; the engine's words, with the numbers as attributes."""


class ContextFull(ConversationError):
    """The prompt does not fit the cache slot (prompt_tokens >= max_context)."""

    def __init__(self, prompt_tokens: int, max_context: int):
        super().__init__(f"the prompt is {prompt_tokens} tokens and the context holds {max_context}")
        self.prompt_tokens, self.max_context = prompt_tokens, max_context


class NothingToAnswer(ConversationError):
    """The conversation does not end with a message the model answers (user, tool, developer,
    latest_reminder, or an assistant prefix marked ``wo_eos``)."""


@dataclass
class TurnStats:
    prompt_tokens: int = 0  # tokens of the whole prompt
    prefilled_tokens: int = 0  # tokens actually run this turn (the new part)
    generated_tokens: int = 0
    ttft_s: float = 0.0  # the prefill (until the logits of the first new token)
    decode_s: float = 0.0  # from the first token to the last
    finish: Finish | None = None

    @property
    def finish_reason(self) -> str:
        return str(self.finish) if self.finish is not None else ""

    @property
    def tokens_per_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0


@dataclass
class Turn:
    prompt_ids: list[int]
    parser: OutputParser
    token_ids: list[int] = field(default_factory=list)
    stats: TurnStats = field(default_factory=TurnStats)
    completion: Completion | None = None  # the parsed output, once the turn ended
    message: dict | None = None  # the assistant message recorded for it
    mtp: dict | None = None  # MTP drafts of this turn (SpeculativeStats.as_dict), None without MTP


ANSWERED_ROLES = ("user", "tool", "developer", "latest_reminder")


class Conversation:
    """speculative: a SpeculativeDecoder over ``session`` (engine/runtime/speculative.py): prefill and
    decode then go through it (MTP drafts verified by the main model; the same tokens under greedy
    sampling, the same distribution otherwise)."""

    def __init__(self, session, tokenizer: Tokenizer, system: str | None = None, thinking: bool = False,
                 reasoning_effort: str | None = None, messages: list[dict] | None = None, speculative=None):
        self.session, self.tok, self.speculative = session, tokenizer, speculative
        self.on_prefill = None  # progress(done, total) after each prefill chunk (the CLI's progress line)
        self.thinking, self.reasoning_effort = thinking, reasoning_effort
        self.messages: list[dict] = list(messages or [])
        if system is not None:
            self.system = system
        self.last_turn: Turn | None = None
        self.cached_ids: list[int] = []  # the tokens in the cache slot (session.seq_len of them)
        self._seen_text, self._seen_ids = "", []  # the conversation as the model saw it
        self._ids_memo = None  # (prompt text, seen text, its ids): prompt_ids' last answer

    # ------------------------------------------------------------------ the messages
    @property
    def mode(self) -> str:
        return "thinking" if self.thinking else "chat"

    def _system_index(self) -> int | None:
        return next((i for i, m in enumerate(self.messages) if m.get("role") == "system"), None)

    @property
    def system(self) -> str | None:
        k = self._system_index()
        return self.messages[k].get("content") or None if k is not None else None

    @system.setter
    def system(self, text: str | None) -> None:
        k = self._system_index()
        if k is None:
            if text:
                self.messages.insert(0, {"role": "system", "content": text})
            return
        m = dict(self.messages[k], content=text or "")
        if not text and not m.get("tools") and not m.get("response_format"):
            del self.messages[k]
        else:
            self.messages[k] = m

    @property
    def tools(self) -> list[dict]:
        k = self._system_index()
        return list(self.messages[k].get("tools") or []) if k is not None else []

    def set_tools(self, tools: list[dict], response_format=None) -> None:
        """Give the model ``tools`` (OpenAI entries with a ``function`` object; [] removes them), on
        the first system message (added when there is none). Checked by rendering first."""
        from .messages import attach_tools

        msgs = attach_tools(self.messages, tools, response_format)
        self.render(msgs)
        self.messages = msgs

    def load(self, messages: list[dict]) -> None:
        """Replace the conversation (checked by rendering it first; on error nothing changes). The
        cache is kept: the next turn reuses whatever prefix of it still matches."""
        self.render(list(messages))
        self.messages = list(messages)
        self._seen_text, self._seen_ids = "", []
        self.last_turn = None

    def reset(self) -> None:
        """Start over: keep the leading system messages (prompt and tools), empty the cache slot."""
        k = 0
        while k < len(self.messages) and self.messages[k].get("role") == "system":
            k += 1
        self.messages = self.messages[:k]
        self.session.reset()
        self.cached_ids = []
        self._seen_text, self._seen_ids = "", []
        self.last_turn = None

    def render(self, messages: list[dict] | None = None) -> str:
        """The prompt text of ``messages`` (default: the conversation) in the current mode."""
        return encode_messages(self.messages if messages is None else messages, self.mode,
                               reasoning_effort=self.reasoning_effort)

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of prompt ``text``: the ids the model already saw for the part it saw. The last
        answer is kept, so a caller that checks a prompt's length before ``send`` (chat -p) does
        not tokenize it twice."""
        memo = self._ids_memo
        if memo is not None and memo[0] == text and memo[1] == self._seen_text:
            return list(memo[2])
        if self._seen_text and text.startswith(self._seen_text):
            ids = self._seen_ids + self.tok.encode(text[len(self._seen_text):])
        else:
            ids = self.tok.encode(text)
        self._ids_memo = (text, self._seen_text, ids)
        return list(ids)

    # ------------------------------------------------------------------ a turn
    def send(self, user_text: str | None, sample: Callable, max_new_tokens: int
             ) -> Iterator[tuple[Turn, list[Piece]]]:
        """Add ``user_text`` (None: answer the conversation as it is) and generate the reply; yields
        (turn, new text pieces) after every token. Raises ContextFull, NothingToAnswer or
        ChatFormatError before anything changes; the reply is recorded in ``messages`` when the
        turn ends (turn.message, turn.completion, turn.stats.finish)."""
        msgs = self.messages + ([{"role": "user", "content": user_text}] if user_text is not None else [])
        continuing = answerable(msgs)
        text = self.render(msgs)
        ids = self.prompt_ids(text)
        if len(ids) >= self.session.max_context:
            raise ContextFull(len(ids), self.session.max_context)
        previous = self.last_turn
        turn = self.last_turn = Turn(ids, OutputParser(self.thinking and not continuing))
        st = turn.stats
        st.prompt_tokens = len(ids)
        common = 0
        while common < min(len(ids), len(self.cached_ids)) and ids[common] == self.cached_ids[common]:
            common += 1
        if common < len(self.cached_ids) or common == len(ids):
            self.session.reset()
            self.cached_ids, common = [], 0
        st.prefilled_tokens = len(ids) - common
        t0 = time.perf_counter()
        spec = self.speculative
        before = spec.stats.copy() if spec is not None else None
        try:
            kw = {}
            if self.on_prefill is not None:
                self.on_prefill(0, len(ids) - common)  # the prefill starts (progress(done, total) per chunk)
                kw["progress"] = self.on_prefill
            logits = (spec or self.session).prefill(ids[common:], **kw)
        except BaseException:  # a prefill cut midway leaves the slot half-written
            self.session.reset()
            self.cached_ids = []
            self.last_turn = previous  # no turn happened: /stats keeps describing the last one that did
            raise
        self.cached_ids = list(ids)
        st.ttft_s = time.perf_counter() - t0
        stream = self.tok.stream()
        t1 = time.perf_counter()
        try:
            steps = (spec.decode(logits, sample, max_new_tokens, {self.tok.eos_id}) if spec is not None
                     else decode_tokens(self.session, logits, sample, max_new_tokens, {self.tok.eos_id}))
            for tok, finish in steps:
                if spec is not None:
                    turn.mtp = (spec.stats - before).as_dict()
                turn.token_ids.append(tok)
                st.generated_tokens += 1
                st.finish = finish
                piece = stream.push(tok) if tok != self.tok.eos_id else stream.flush() + EOS
                yield turn, turn.parser.feed(piece)
        except GeneratorExit:  # the caller stopped reading: keep what was answered
            st.finish = st.finish or Finish.INTERRUPTED
            self._end_turn(turn, msgs, continuing, text, stream, t1)
            raise
        except KeyboardInterrupt:
            st.finish = Finish.INTERRUPTED
            if not turn.token_ids:  # nothing answered yet: as if the turn never started
                raise
            self._end_turn(turn, msgs, continuing, text, stream, t1)
            return
        except BaseException:
            self.session.reset()  # a step may have been cut midway
            self.cached_ids = []
            raise
        self._end_turn(turn, msgs, continuing, text, stream, t1)

    def _end_turn(self, turn: Turn, msgs: list[dict], continuing: bool, text: str, stream, t1: float) -> None:
        st = turn.stats
        st.decode_s = time.perf_counter() - t1
        tail = stream.flush()
        if tail:
            turn.parser.feed(tail)
        comp = turn.completion = turn.parser.finish()
        msg = dict(comp.message)
        msg["tool_calls"] = [dict(c, id=i) for c, i in zip(msg["tool_calls"], self._new_call_ids(len(msg["tool_calls"])))]
        if continuing:
            prefix = {k: v for k, v in msgs[-1].items() if k != "wo_eos"}
            msg = dict(prefix, content=(prefix.get("content") or "") + msg["content"],
                       reasoning_content=prefix.get("reasoning_content") or "",
                       tool_calls=(prefix.get("tool_calls") or []) + msg["tool_calls"])
            self.messages = msgs[:-1] + [msg]
        else:
            self.messages = msgs + [msg]
        turn.message = msg
        ended = comp.ended
        self._seen_text = text + turn.parser.raw_text + ("" if ended else EOS)
        self._seen_ids = turn.prompt_ids + turn.token_ids + ([] if ended else [self.tok.eos_id])
        self.cached_ids = (turn.prompt_ids + turn.token_ids)[: self.session.seq_len]

    def _new_call_ids(self, n: int) -> list[str]:
        """``n`` tool-call ids not used yet in this conversation: call_1, call_2, ..."""
        used = {c.get("id") for m in self.messages for c in (m.get("tool_calls") or []) if isinstance(c, dict)}
        out, k = [], 1
        while len(out) < n:
            if f"call_{k}" not in used:
                out.append(f"call_{k}")
            k += 1
        return out


def answerable(msgs: list[dict]) -> bool:
    """Check the conversation ends with something to answer; True when it ends with an assistant
    prefix (``wo_eos``) that the model continues."""
    if not msgs:
        raise NothingToAnswer("the conversation is empty: give a prompt")
    last = msgs[-1]
    role = last.get("role") if isinstance(last, dict) else None
    if role in ANSWERED_ROLES:
        return False
    if role == "assistant" and last.get("wo_eos"):
        return True
    raise NothingToAnswer(f"nothing to answer: the conversation ends with a message of role {role!r}; add a "
                          "user or tool message")


__all__ = ["ChatFormatError", "ContextFull", "Conversation", "ConversationError", "NothingToAnswer", "Turn",
           "TurnStats", "answerable"]

"""The one decode loop: sample a token, decide whether to stop, step the session, repeat.

Both entry points use it: ``Session.generate`` (prompt in, tokens out; tests and benchmarks) and
``Conversation.send`` (the chat product, which prefills only the new part of the prompt itself).
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Iterator

import torch


class Finish(str, Enum):
    """Why generation ended (the OpenAI-style ``finish_reason`` values, plus two of ours)."""

    STOP = "stop"  # a stop token (eos) was sampled
    LENGTH = "length"  # the max-new-tokens limit
    CONTEXT = "context"  # the cache slot is full
    INTERRUPTED = "interrupted"  # Ctrl+C (set by the caller that caught it)

    def __str__(self) -> str:
        return self.value


def decode_tokens(session, logits: torch.Tensor, sample: Callable[[torch.Tensor], int], max_new_tokens: int,
                  stop_ids=frozenset()) -> Iterator[tuple[int, Finish | None]]:
    """From the next-token logits [vocab] left by a prefill, yield (token, finish) per new token.

    finish is None while generation goes on, else the reason it ends with this token (a stop id is
    yielded too). Between two yields the session runs one decode step for the previous token, so a
    caller interrupted while waiting for the next token has a half-written step in the cache."""
    for n in range(1, max_new_tokens + 1):
        tok = int(sample(logits))
        finish = (Finish.STOP if tok in stop_ids else Finish.LENGTH if n == max_new_tokens
                  else Finish.CONTEXT if session.seq_len >= session.max_context else None)
        yield tok, finish
        if finish is not None:
            return
        logits = session.step(tok)

"""The one decode loop: sample a token, decide whether to stop, step the session, repeat.

Both entry points use it: ``Session.generate`` (prompt in, tokens out; tests and benchmarks) and
``Conversation.send`` (the chat product, which prefills only the new part of the prompt itself).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
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
    yielded too). Between two yields the session runs one decode step for the previous token; Ctrl+C
    during that step is held until it ends (``whole_step``), so an interrupt leaves the cache
    holding exactly ``session.seq_len`` tokens, never half a step."""
    for n in range(1, max_new_tokens + 1):
        tok = int(sample(logits))
        finish = (Finish.STOP if tok in stop_ids else Finish.LENGTH if n == max_new_tokens
                  else Finish.CONTEXT if session.seq_len >= session.max_context else None)
        yield tok, finish
        if finish is not None:
            return
        with whole_step():
            logits = session.step(tok)


@contextmanager
def whole_step():
    """Hold Ctrl+C (SIGINT) while the block runs, then raise KeyboardInterrupt after it: for work
    that must run whole (a decode step takes milliseconds). A no-op outside the main thread or
    when SIGINT has a handler other than Python's default."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt

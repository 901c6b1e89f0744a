"""Rank 0's session and the workers' loop: rank 0 owns sampling and output and tells the workers each
command (prefill ids, decode token, reset, stop) before running it; the workers run the same forward
in lockstep, their collectives meeting rank 0's.

Commands travel through a c10d store (``Channel``; TCP, so it works across hosts under torchrun):
workers poll for the next key, so an idle REPL never trips a collective's timeout and a worker
notices a lost rank 0 within a second. Errors travel back the same way: a
worker that fails writes one line under ``ERROR_KEY`` and exits; rank 0's watchdog (launch.py)
reads it and ends the run.
"""

from __future__ import annotations

import inspect
import pickle
import signal
import threading
import time
import traceback
from contextlib import contextmanager

import torch

from dsv4.engine.runtime.generate import whole_step
from dsv4.engine.runtime.session import Session

ERROR_KEY = "error"
SPIN_S, IDLE_S = 0.02, 0.02


class RankLost(RuntimeError):
    """The run cannot go on: another rank failed or rank 0 is gone (the message says which)."""


class Channel:
    """Commands from rank 0 to the workers, in order, over ``store`` (a c10d Store).

    rank 0: ``send(cmd)``; workers: ``recv() -> cmd`` (a tuple, first item the op name).
    ``alive()`` (workers): False once rank 0 is known gone; checked while waiting."""

    def __init__(self, store, alive=lambda: True):
        self.store, self.alive = store, alive
        self.seq = 0
        self.sent: list[str] = []

    def send(self, cmd: tuple) -> None:
        key = f"cmd/{self.seq}"
        self.store.set(key, pickle.dumps(cmd))
        self.sent.append(key)
        self.seq += 1

    def forget_sent(self) -> None:
        """Delete the commands every worker has read (rank 0 calls it after a forward: each worker
        joined its collectives, so it read every command up to that one)."""
        for k in self.sent:
            self.store.delete_key(k)
        self.sent.clear()

    def recv(self) -> tuple:
        """The next command. Polls the store: without pause for SPIN_S (a decode token follows the
        last within a millisecond), then every IDLE_S (c10d's blocking wait logs a line on each
        timeout, which an idle REPL would fill the terminal with)."""
        key = f"cmd/{self.seq}"
        t0 = time.monotonic()
        while True:
            try:
                if self.store.check([key]):
                    break
                if self.store.check([ERROR_KEY]):
                    raise RankLost(self.store.get(ERROR_KEY).decode())
            except RankLost:
                raise
            except Exception as e:  # the store lives in rank 0's process
                raise RankLost(f"rank 0 is gone ({type(e).__name__})") from None
            if time.monotonic() - t0 > SPIN_S:
                if not self.alive():
                    raise RankLost("rank 0 is gone")
                time.sleep(IDLE_S)
        self.seq += 1
        return pickle.loads(self.store.get(key))


class ParallelSession(Session):
    """Rank 0's Session over its part of the model (``model`` is rank 0's rank-local Model): every
    forward, decode step and reset is first sent to the workers, then run here. A forward or step
    runs whole under Ctrl+C (held until it ends, as decode steps are), so no rank is ever left
    waiting in a half-run forward; a prompt that does not fit fails here, before any rank is told."""

    def __init__(self, model, channel: Channel, max_context: int | None = None, cuda_graph: bool | None = None,
                 ranks: int = 1, stop=None):
        super().__init__(model, max_context=max_context, cuda_graph=cuda_graph)
        self.channel, self.ranks, self._stop = channel, ranks, stop
        self.closed, self._inner, self._defer, self._held = False, False, False, False

    def forward(self, token_ids, last_only: bool = False, **kw) -> torch.Tensor:
        """Session.forward on every rank (keyword options passed on as they are)."""
        if self._inner:
            return super().forward(token_ids, last_only=last_only, **kw)
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("no tokens to run")
        self.cache.prepare(self.slot, ids.numel())  # a context overflow stops here, on rank 0 alone
        with self._whole():
            self.channel.send(("forward", ids.tolist(), last_only, kw))
            logits = self._run(lambda: super(ParallelSession, self).forward(ids, last_only=last_only, **kw))
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Session.step on every rank."""
        self.cache.prepare(self.slot, 1)
        with self._whole():
            self.channel.send(("step", int(token)))
            self._inner = True  # Session.step may run self.forward: the workers do the same by themselves
            try:
                logits = self._run(lambda: super(ParallelSession, self).step(token))
            finally:
                self._inner = False
        return logits

    def prefill(self, token_ids, *args, **kw):
        """Session.prefill, whose chunks run on every rank. Ctrl+C during a chunk is held until the
        chunk is complete and then raised after it is counted (through prefill's progress callback),
        so every rank keeps the same complete chunks (Session.prefill rolls back an interrupted chunk
        on rank 0 only, which would leave the ranks apart)."""
        if "progress" not in inspect.signature(Session.prefill).parameters:
            return super().prefill(token_ids, *args, **kw)
        user = kw.pop("progress", None)

        def tick(done, total):
            if user is not None:
                user(done, total)
            if self._held:
                self._held = False
                raise KeyboardInterrupt

        self._defer, self._held = True, False
        try:
            return super().prefill(token_ids, *args, progress=tick, **kw)
        finally:
            self._defer = False

    @contextmanager
    def _whole(self):
        """Ctrl+C held while a forward or step runs on every rank; raised after it, or, inside a
        prefill, after the chunk is counted (``prefill``)."""
        if self._defer and threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, lambda signum, frame: setattr(self, "_held", True))
            try:
                yield
            finally:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        else:
            with whole_step():
                yield

    def _run(self, fn):
        """Run rank 0's half of a command; an error after the workers were told ends every rank (the
        error key: the watchdog prints it and exits), since they are now a step apart from rank 0."""
        try:
            out = fn()
        except BaseException as e:
            self.channel.store.set(ERROR_KEY, one_line(0, e))
            raise
        self.channel.forget_sent()
        return out

    def reset(self) -> None:
        self.channel.send(("reset",))
        super().reset()

    def close(self) -> None:
        """Tell the workers to stop, free the slot, and (launch.py) wait for them to exit."""
        if self.closed:
            return
        self.closed = True
        try:
            self.channel.send(("stop",))
        finally:
            super().close()
            if self._stop is not None:
                self._stop()


def serve(session: Session, channel: Channel) -> None:
    """A worker's loop: run rank 0's commands on this rank's session until "stop"."""
    while True:
        op, *args = channel.recv()
        if op == "forward":
            session.forward(args[0], last_only=args[1], **args[2])
        elif op == "step":
            session.step(args[0])
        elif op == "reset":
            session.reset()
        elif op == "stop":
            session.close()
            return
        else:
            raise ValueError(f"unknown command {op!r} from rank 0")


def one_line(rank: int, e: BaseException) -> str:
    """``rank r: Type: message (file:line)``: where a rank failed, in one line."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return f"rank {rank}: {type(e).__name__}{': ' + msg if msg else ''}{where}"

"""Start a run over several ranks: this process is rank 0 (the CLI: sampling, output) and spawns the
workers itself (torch.multiprocessing), or every rank was started by ``torchrun`` (read from its
environment). Ends cleanly: a normal close stops every worker; a worker that fails, at load or later,
ends the whole run within about a second with one line naming the rank and the error; Ctrl+C goes to
rank 0 only (workers ignore SIGINT); a worker whose rank 0 is gone exits by itself.

Start-up order: every rank loads its part first (errors come back to the caller as ParallelError),
then the process group is made (NCCL on GPUs, gloo on CPUs, with a timeout on every collective),
then the workers serve rank 0's commands (session.serve).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4.engine.model.config import DSV4Config

from .comm import RankCollectives
from .layout import plan_shares
from .rank import RankPart
from .session import ERROR_KEY, Channel, ParallelSession, RankLost, one_line, serve

WATCH_S = 0.2  # how often rank 0 looks for a failed worker


class ParallelError(RuntimeError):
    """A run over several ranks could not start or went on no longer (one line: which rank, why)."""


@dataclass(frozen=True)
class RunSpec:
    """What every rank loads and how it runs. model: checkpoint folder; ranks: processes; device:
    "cpu" (gloo) or "cuda" (NCCL, rank r on GPU r, under torchrun on LOCAL_RANK); mode: precision;
    threads: torch CPU threads per rank (cpu); timeout_s: the longest a collective may wait on another
    rank; cuda_graph: as Session's (None: on for CUDA). synthetic: instead of a checkpoint, random
    weights of this config in the published formats, each rank making only its own slices
    (simulate.rank_synthetic_stored: the ranks' parts are one model's); ``model`` is then unused."""

    model: str
    ranks: int
    device: str = "cpu"
    mode: str = "faithful"
    max_context: int = 4096
    threads: int | None = None
    timeout_s: float = 120.0
    cuda_graph: bool | None = None
    dtype: str = "float32"
    synthetic: DSV4Config | None = None

    def config(self) -> DSV4Config:
        """The whole model's config (the checkpoint's, or the synthetic one)."""
        from dsv4.engine.checkpoint.published import open_checkpoint

        return self.synthetic if self.synthetic is not None else open_checkpoint(self.model, validate=False).config


def start(spec: RunSpec, progress=None) -> ParallelSession:
    """Rank 0 here, ranks 1..R-1 spawned: -> rank 0's session (close() stops every rank).
    progress(tensor) is called for every tensor rank 0 reads (the one progress bar)."""
    if spec.synthetic is None:
        from dsv4.engine.checkpoint.published import open_checkpoint

        open_checkpoint(spec.model)  # a CheckpointError before any process starts
    plan_shares(spec.config(), spec.ranks)  # LayoutError before any process starts
    store = dist.TCPStore("127.0.0.1", 0, spec.ranks, True, timeout=timedelta(seconds=spec.timeout_s),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = []
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the workers inherit it: no c10d socket chatter
    for r in range(1, spec.ranks):
        p = ctx.Process(target=_worker, args=(r, spec, "127.0.0.1", store.port, os.getpid()), daemon=True)
        p.start()
        procs.append(p)
    return _rank0(spec, store, procs, progress)


def from_torchrun(spec: RunSpec, progress=None) -> ParallelSession | None:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment):
    rank 0 gets its session; every other rank serves it and exits the process when it stops (exit
    status 0, or 1 after a failure). The command channel is a store on MASTER_PORT + 1 (or
    DSV4_CONTROL_PORT), hosted by rank 0. None when not started by torchrun."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    spec = replace(spec, ranks=world)
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("DSV4_CONTROL_PORT", int(os.environ.get("MASTER_PORT", "29500")) + 1))
    if rank:
        _worker(rank, spec, host, port, None)  # exits
    store = dist.TCPStore(host, port, world, True, timeout=timedelta(seconds=spec.timeout_s), wait_for_workers=False)
    return _rank0(spec, store, [], progress)


# ------------------------------------------------------------------ rank 0
def _rank0(spec: RunSpec, store, procs, progress) -> ParallelSession:
    stop = _Stopper(store, procs)
    try:
        model, part = _load(0, spec, progress)
        _wait_ready(store, procs, spec.ranks)
        read = [part.bytes_read] + [int(store.get(f"ready/{r}")) for r in range(1, spec.ranks)]
        _join_group(0, spec, store)
    except BaseException:
        stop.abort()
        raise
    threading.Thread(target=_watch, args=(store, procs, stop), daemon=True, name="dsv4-watchdog").start()
    session = ParallelSession(model, Channel(store), max_context=spec.max_context, cuda_graph=spec.cuda_graph,
                              ranks=spec.ranks, stop=stop)
    session.bytes_read = read  # checkpoint bytes each rank read, by rank
    atexit.register(session.close)
    return session


class _Stopper:
    """Ends the workers: ``__call__`` after the stop command (waits, then terminates stragglers),
    ``abort`` when start-up failed (tells them through the error key, then terminates)."""

    def __init__(self, store, procs):
        self.store, self.procs, self.closing = store, procs, False

    def __call__(self, wait_s: float = 10.0) -> None:
        self.closing = True
        deadline = time.monotonic() + wait_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._terminate()
        if dist.is_initialized():
            dist.destroy_process_group()

    def abort(self) -> None:
        self.closing = True
        try:
            self.store.set(ERROR_KEY, "rank 0: start-up failed")
        except Exception:  # noqa: BLE001 (the store may be gone with the failure)
            pass
        for p in self.procs:
            p.join(2.0)
        self._terminate()

    def _terminate(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()


def _wait_ready(store, procs, ranks: int) -> None:
    """Until every worker has loaded (ParallelError with the first failure's line)."""
    keys = [f"ready/{r}" for r in range(1, ranks)]
    while not store.check(keys):
        if store.check([ERROR_KEY]):
            raise ParallelError(store.get(ERROR_KEY).decode())
        for r, p in enumerate(procs, 1):
            if not p.is_alive():
                raise ParallelError(f"rank {r} exited with code {p.exitcode} while loading")
        time.sleep(0.05)


def _watch(store, procs, stop: _Stopper) -> None:
    """Rank 0's watchdog: a failed worker ends the whole run (one line on stderr, exit status 1). Rank
    0 may be blocked in a collective that will never complete, so the process exits from here."""
    while not stop.closing:
        msg = None
        try:
            if store.check([ERROR_KEY]):
                msg = store.get(ERROR_KEY).decode()
        except Exception:  # noqa: BLE001
            msg = None
        for r, p in enumerate(procs, 1):
            if msg is None and not p.is_alive() and not stop.closing:
                msg = f"rank {r} exited with code {p.exitcode}"
        if msg and not stop.closing:
            sys.stderr.write(f"error: {msg}; stopping every rank\n")
            sys.stderr.flush()
            stop.closing = True
            stop._terminate()
            os._exit(1)
        time.sleep(WATCH_S)


# ------------------------------------------------------------------ every rank
def _load(rank: int, spec: RunSpec, progress=None):
    """This rank's part of the model: -> (Model, RankPart)."""
    from dsv4.engine.checkpoint.loader import load_model

    device = _device(rank, spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = spec.config()
    shares = plan_shares(cfg, spec.ranks)
    part = RankPart(shares[rank], RankCollectives(shares[rank].vocab_parts))
    if spec.synthetic is not None:
        from dsv4.engine.model.model import Model
        from dsv4.engine.model.weights import build_weights

        from .simulate import rank_synthetic_stored

        tensors = rank_synthetic_stored(cfg, part.share, device)
        part.bytes_read = sum(t.numel() * t.element_size() for t in tensors.values())  # bytes made, not read
        model = Model(part.config(cfg), build_weights(tensors, device), spec.mode, device,
                      getattr(torch, spec.dtype), part.comm)
        return model, part
    model = load_model(spec.model, mode=spec.mode, device=device, dtype=getattr(torch, spec.dtype),
                       progress=progress, part=part)
    return model, part


def _device(rank: int, spec: RunSpec) -> torch.device:
    if spec.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def _join_group(rank: int, spec: RunSpec, store) -> None:
    """The process group (after every rank loaded), and one collective so NCCL's communicator exists
    before the decode step's CUDA graph captures collectives."""
    dev = _device(rank, spec)
    extra = {"device_id": dev} if dev.type == "cuda" else {}  # NCCL's communicator made now, not lazily
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.PrefixStore("pg", store), rank=rank,
                            world_size=spec.ranks, timeout=timedelta(seconds=spec.timeout_s), **extra)
    probe = torch.ones(1, device=dev)
    dist.all_reduce(probe)
    if probe.item() != spec.ranks:
        raise ParallelError(f"rank {rank}: the process group's first all-reduce gave {probe.item()}")


def _worker(rank: int, spec: RunSpec, host: str, port: int, parent: int | None) -> None:
    """A worker process: load, join, serve rank 0 until "stop"; exit status 0, or 1 after writing one
    line under the store's error key."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is rank 0's to handle
    if parent is not None:
        threading.Thread(target=_orphan_watch, args=(parent,), daemon=True).start()
    store = None
    code = 0
    try:
        store = dist.TCPStore(host, port, spec.ranks, False, timeout=timedelta(seconds=spec.timeout_s))
        model, part = _load(rank, spec)
        store.set(f"ready/{rank}", str(part.bytes_read))
        _join_group(rank, spec, store)
        from dsv4.engine.runtime.session import Session

        session = Session(model, max_context=spec.max_context, cuda_graph=spec.cuda_graph)
        serve(session, Channel(store, alive=lambda: parent is None or os.getppid() == parent))
    except RankLost:
        code = 1
    except BaseException as e:  # noqa: BLE001 (every failure is reported, then the process ends)
        code = 1
        if store is not None:
            try:
                if not store.check([ERROR_KEY]):
                    store.set(ERROR_KEY, one_line(rank, e))
            except Exception:  # noqa: BLE001
                pass
        sys.stderr.write(f"dsv4 {one_line(rank, e)}\n")
    if dist.is_initialized() and code == 0:
        dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(code)


def _orphan_watch(parent: int) -> None:
    """A spawned worker whose parent (rank 0) is gone ends itself, even inside a collective."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)

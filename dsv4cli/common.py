"""Shared CLI plumbing: one-line errors, the precision and device at the edge, CPU threads, progress
on stderr, and the help rendering every command uses."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

if TYPE_CHECKING:
    from dsv4.kernels.formats import Precision



class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


def fail(msg: str, code: int = 2):
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True, markup=True)
    raise typer.Exit(code)


def warn(msg: str) -> None:
    """One line on stderr, for something the user should know before waiting on it."""
    sys.stderr.write(f"note: {msg}\n")
    sys.stderr.flush()


def check_precision(precision, option: str = "--precision") -> Precision:
    """The one validation of a precision name given on the command line -> Precision."""
    from dsv4.kernels.formats import Precision, PrecisionError  # lazily: it imports torch (--render needs none)

    try:
        return Precision.parse(precision)
    except PrecisionError:
        raise UserError(f"{option} {precision!r}: use exact or faithful") from None


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device!r}: use cpu, cuda or cuda:N")
    return device


# ----------------------------------------------------------------------- CPU threads
def physical_cores() -> int:
    """Physical cores this process may run on: distinct (package, core) pairs of the CPUs in its
    affinity mask (hyper-threads share a core), from sysfs; the logical count where sysfs is absent."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Torch CPU threads for a compute-bound run: one per physical core that other processes are not
    already using. ``load``: the 1-minute load average (runnable processes; read from the system
    when None). Oversubscribing a busy machine makes torch's threads wait on each other (measured:
    decode 20x slower on a loaded 2-core machine with 2 threads than with 1), so each whole unit of
    load takes one core away, never below 1."""
    cores = physical_cores() if cores is None else cores
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - int(load)))


def apply_threads(threads: int | None) -> int:
    """Set torch's CPU threads: ``threads`` when given (the --threads option; >= 1), else
    default_threads(). -> the number set. Commands that compute on the CPU call this before work."""
    import torch

    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: use 1 or more")
    n = default_threads() if threads is None else threads
    torch.set_num_threads(n)
    return n


THREADS_OPT_HELP = ("Torch CPU threads (default: one per physical core not already busy, from the load "
                    "average).")


# ----------------------------------------------------------------------- progress
class Progress:
    """Status lines on stderr for long work: the current phase or step (the last message given) is
    printed once ``after`` seconds have passed since the last line (or the start), so a run that is
    quiet for that long says what it is doing, at most one line per ``after`` seconds. A run shorter
    than ``after`` prints nothing.
    Use as a context manager; call it with a message at each phase or step."""

    def __init__(self, label: str, after: float = 2.0, stream=None):
        self.label, self.after = label, after
        self.stream = stream if stream is not None else sys.stderr
        self._msg, self._printed, self._last_out = None, True, time.monotonic()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def __call__(self, msg: str) -> None:
        with self._lock:
            self._msg, self._printed = msg, False

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                now = time.monotonic()
                if self._msg and not self._printed and now - self._last_out >= self.after:
                    self.stream.write(f"[{self.label} {now - self._t0:6.1f}s] {self._msg}\n")
                    self.stream.flush()
                    self._printed, self._last_out = True, now


# ----------------------------------------------------------------------- errors
def builtin_model_dir() -> Path:
    """The built-in default model shipped inside the package (engine/builtin): a 25M-parameter
    DeepSeek-V4 trained on Python standard-library documentation (see train/README.md)."""
    from dsv4 import engine

    d = Path(engine.__file__).parent / "builtin"
    if not (d / "config.json").exists():
        raise UserError(f"{d}: the built-in model's files are missing from this install (reinstall dsv4, "
                        "or pass --model DIR)")
    return d


def _known_errors() -> tuple:
    """Exception types that are user errors (printed as one line, exit 2)."""
    from dsv4.cache import CacheError
    from dsv4.engine.checkpoint.published import CheckpointError
    from dsv4.engine.model.config import ConfigError
    from dsv4.engine.runtime.tokenizer import TokenizerError
    from dsv4.engine.tools.bench import BenchError
    from dsv4.kernels.dispatch import KernelError
    from dsv4.kernels.formats import PrecisionError

    return (UserError, CheckpointError, ConfigError, TokenizerError, CacheError, BenchError, PrecisionError,
            KernelError)


def guard(fn):
    """Run a command body, turning known errors into one-line messages (exit 2)."""
    from functools import wraps

    @wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # the known types are imported only now: they pull in torch
            if isinstance(e, FileNotFoundError):
                fail(f"{e.filename}: no such file or directory")
            try:
                known = _known_errors()
            except Exception as inner:  # e.g. DSV4_KERNELS=bad makes the kernels' import itself fail
                fail(str(inner) if type(inner).__name__ == type(e).__name__ else str(e))
            if isinstance(e, known):
                fail(str(e))
            raise
        except KeyboardInterrupt:
            sys.stderr.write("\ninterrupted\n")
            raise typer.Exit(130)

    return wrapper


# ----------------------------------------------------------------------- help rendering
def _plain_help(params, ctx) -> None:
    """Typer (0.29) shows a type column for every option, also ``<bool>`` for flags that take no
    value (--json, --help): flags get an empty one. Arguments are named in capitals (SRC)."""
    for p in params:
        if getattr(p, "is_flag", False):
            p.metavar = ""
        elif isinstance(p, TyperArgument) and p.metavar is None and p.name:
            p.metavar = p.name.upper()


class Command(TyperCommand):
    """A command whose --help shows flags without a type and arguments as ``SRC DST`` in the usage
    line (typer 0.29 writes required arguments as ``{src}``)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        _plain_help(params, ctx)
        return params

    def collect_usage_pieces(self, ctx):
        params = self.get_params(ctx)
        pieces = [self.options_metavar or "[OPTIONS]"] if any(not isinstance(p, TyperArgument) for p in params) else []
        for p in params:
            if isinstance(p, TyperArgument):
                name = (p.metavar or p.name or "").upper() + ("..." if p.nargs != 1 else "")
                pieces.append(name if p.required else f"[{name}]")
        return pieces


class Group(TyperGroup):
    """A command group with the same help rendering as Command for its own --help."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        _plain_help(params, ctx)
        return params

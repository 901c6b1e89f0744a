"""The one dispatch point: for each call of an op, which implementation runs, decided once, recorded.

Every op has a torch ``reference`` implementation (the oracle). A faster implementation registers
for a device type (``register(op, "triton", fn, device="cuda", supports=pred)``); a call runs it
when its inputs live on that device and ``supports(*args)`` accepts them, else the reference. The
mode comes from ``DSV4_KERNELS`` (``auto``, the default, or ``reference``, which forces the oracle
everywhere) and can be changed for tests with ``use_backend``. ``DSV4_REFERENCE_OPS`` names ops
(separated by commas or colons) that run their reference whatever the mode: to isolate one kernel
when chasing a wrong result, or to time a kernel against its reference in the same process (read
at each call, so a CUDA graph captured after changing it follows it).

What ran is counted per op and implementation (``report``; ``dsv4 bench`` prints it), and a GPU
kernel module that failed to import is recorded with its cause (``unavailable``): on CUDA that is
an error when a model is built (``require_kernels``), never a silent ~48x slower decode.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable

MODES = ("auto", "reference")


class KernelError(RuntimeError):
    """The fast kernels a device needs are missing (the message names the cause and the way out)."""


@dataclass(frozen=True)
class Impl:
    name: str  # "reference", "triton", ...
    fn: Callable
    device: str | None  # device type it runs on (None: any, the reference)
    supports: Callable[..., bool] | None  # argument check; None: everything on that device


_REGISTRY: dict[str, list[Impl]] = {}
_COUNTS: dict[str, Counter] = {}
_UNAVAILABLE: dict[str, str] = {}  # device type -> why its kernels did not load
_OBSERVERS: dict[str, list[Callable]] = {}
_state = {"mode": os.environ.get("DSV4_KERNELS", "auto").strip().lower() or "auto"}
if _state["mode"] not in MODES:
    raise KernelError(f"DSV4_KERNELS={_state['mode']!r}: use auto or reference")


def register(op: str, name: str, fn: Callable, device: str | None = None,
             supports: Callable[..., bool] | None = None) -> None:
    """Add (or replace, by name) an implementation of ``op``; the reference is ``name="reference"``."""
    impls = [i for i in _REGISTRY.setdefault(op, []) if i.name != name]
    impls.append(Impl(name, fn, device, supports))
    _REGISTRY[op] = sorted(impls, key=lambda i: i.name == "reference")  # the reference last


def choose(op: str, device_type: str, args: tuple = (), kwargs: dict | None = None) -> Impl:
    """The implementation a call of ``op`` with these arguments runs (not recorded)."""
    impls = _REGISTRY[op]
    if _state["mode"] != "reference" and op not in forced_reference():
        for impl in impls[:-1]:
            if impl.device == device_type and (impl.supports is None or impl.supports(*args, **(kwargs or {}))):
                return impl
    return impls[-1]


def call(op: str, *args, **kwargs):
    """Run ``op``; the device is the first argument's."""
    impl = choose(op, args[0].device.type, args, kwargs)
    _COUNTS.setdefault(op, Counter())[impl.name] += 1
    out = impl.fn(*args, **kwargs)
    for fn in _OBSERVERS.get(op, ()):
        fn(args, out)
    return out


@contextlib.contextmanager
def observing(callbacks: dict[str, Callable]):
    """Within the block, call ``callbacks[op](args, result)`` after every call of each named op (the
    declared way for training to read values inside the forward: the indexer's scores, attention's
    queries and keys, the routers' picks), instead of patching the ops."""
    unknown = [op for op in callbacks if op not in _REGISTRY]
    if unknown:
        raise KernelError(f"unknown op {unknown[0]!r}")
    for op, fn in callbacks.items():
        _OBSERVERS.setdefault(op, []).append(fn)
    try:
        yield
    finally:
        for op, fn in callbacks.items():
            _OBSERVERS[op].remove(fn)


def implementation(op: str, device_type: str) -> Callable:
    """The fast implementation of ``op`` registered for ``device_type`` (the reference if none)."""
    for impl in _REGISTRY[op]:
        if impl.device == device_type:
            return impl.fn
    return _REGISTRY[op][-1].fn


def backends(op: str) -> list[str]:
    return sorted(i.name for i in _REGISTRY.get(op, []))


def ops() -> list[str]:
    return sorted(_REGISTRY)


def report() -> dict[str, dict[str, int]]:
    """Calls per op and implementation since the last ``reset_report``: {op: {impl: calls}}."""
    return {op: dict(c) for op, c in sorted(_COUNTS.items()) if c}


def reset_report() -> None:
    _COUNTS.clear()


def mark_unavailable(device_type: str, cause: str) -> None:
    _UNAVAILABLE[device_type] = cause


def unavailable() -> dict[str, str]:
    return dict(_UNAVAILABLE)


def forced_reference() -> set[str]:
    """The ops DSV4_REFERENCE_OPS sends to their reference."""
    names = os.environ.get("DSV4_REFERENCE_OPS", "").replace(":", ",").split(",")
    return {o.strip() for o in names if o.strip()}


def require_kernels(device_type: str) -> None:
    """Raise if the fast kernels for ``device_type`` failed to load and the mode wants them, or if
    DSV4_REFERENCE_OPS names an op that does not exist."""
    unknown = sorted(o for o in forced_reference() if o not in _REGISTRY)
    if unknown:
        raise KernelError(f"DSV4_REFERENCE_OPS names unknown op {unknown[0]!r}; ops: {', '.join(ops())}")
    if _state["mode"] != "reference" and device_type in _UNAVAILABLE:
        raise KernelError(f"the {device_type} kernels failed to load ({_UNAVAILABLE[device_type]}); fix the "
                          "install, or set DSV4_KERNELS=reference to run the (much slower) torch references")


def mode() -> str:
    return _state["mode"]


@contextlib.contextmanager
def use_backend(mode_name: str):
    """Temporarily force ``reference`` or ``auto`` dispatch."""
    if mode_name not in MODES:
        raise KernelError(f"unknown kernel mode {mode_name!r}: use auto or reference")
    old = _state["mode"]
    _state["mode"] = mode_name
    try:
        yield
    finally:
        _state["mode"] = old

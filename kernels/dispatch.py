"""The one dispatch point: op name -> implementation, per backend.

Every op has a torch ``reference`` implementation (the oracle). Faster implementations register
under another backend name (e.g. ``"cuda"``) with ``register``. The active backend is chosen once
from ``DSV4_KERNELS`` (``reference`` forces the oracle everywhere; ``auto``, the default, uses a
registered fast implementation when the inputs live on a device it supports) and can be changed
for tests with ``use_backend``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

_REGISTRY: dict[str, dict[str, Callable]] = {}
_DEVICE_OF_BACKEND = {"cuda": "cuda"}
_state = {"mode": os.environ.get("DSV4_KERNELS", "auto")}


def register(op: str, backend: str, fn: Callable) -> None:
    _REGISTRY.setdefault(op, {})[backend] = fn


def implementation(op: str, device_type: str) -> Callable:
    impls = _REGISTRY[op]
    if _state["mode"] != "reference":
        for backend, fn in impls.items():
            if backend != "reference" and _DEVICE_OF_BACKEND.get(backend) == device_type:
                return fn
    return impls["reference"]


def backends(op: str) -> list[str]:
    return sorted(_REGISTRY.get(op, {}))


def mode() -> str:
    return _state["mode"]


@contextlib.contextmanager
def use_backend(mode_name: str):
    """Temporarily force ``reference`` or ``auto`` dispatch."""
    old = _state["mode"]
    _state["mode"] = mode_name
    try:
        yield
    finally:
        _state["mode"] = old

"""Load a checkpoint directory (published or converted layout) into a runnable Model, whole or, on one
rank of several, only that rank's slices (``read_slices``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from dsv4.engine.model.model import Model
from dsv4.engine.model.weights import cache_dense
from dsv4.kernels.formats import FP8_BLOCK

from .formats import COMPANIONS, SCALE_2, WEIGHT
from .published import Checkpoint, open_checkpoint
from .shards import DTYPES, CheckpointError, ShardReader, short

CPU_DENSE_CACHE_BYTES = 2 << 30  # float32 copies of quantised linears kept on CPU when they fit


class PrecisionUnsupported(CheckpointError):
    """The checkpoint cannot run in the precision asked for. ``precision`` is the one refused,
    ``fallback`` the one that works, ``reason`` why (for the caller to word as its own option)."""

    def __init__(self, path, precision: str, fallback: str, reason: str):
        self.path, self.precision, self.fallback, self.reason = path, precision, fallback, reason
        super().__init__(f"{path}: {precision} precision cannot run this model ({reason}); "
                         f"use {fallback} precision")


def check_precision(ck, mode) -> None:
    """Raise PrecisionUnsupported when ``mode`` (faithful) cannot run checkpoint ``ck``'s config."""
    problem = ck.config.faithful_problem() if str(mode) == "faithful" else None
    if problem:
        raise PrecisionUnsupported(ck.path, "faithful", "exact", problem)


def load_model(path, mode: str = "faithful", device="cpu", dtype=torch.float32, progress=None,
               dense_cache_bytes: int | None = None, part=None) -> Model:
    """Open, validate and load a checkpoint; tensors stay in their stored formats on ``device``.

    On CPU, when the float32 dequantisation of all quantised linears fits in ``dense_cache_bytes``
    (default 2 GiB there, 0 elsewhere), it is made once at load (see weights.cache_dense).
    part: one rank's share of a model split over several (engine/runtime/parallel/rank.RankPart):
    only its slices are read (part.pick), the model runs its local config with its collectives
    (part.config, part.comm), and part.bytes_read counts what was read."""
    from dsv4.engine.model.weights import build_weights

    ck = open_checkpoint(path)
    check_precision(ck, mode)
    if part is None:
        tensors = ck.load(device, progress=progress)
        model = Model.from_state_dict(ck.config, tensors, mode=mode, device=device, dtype=dtype)
    else:
        tensors, part.bytes_read = read_slices(ck, lambda n: part.pick(ck.config, n), device, progress)
        model = Model(part.config(ck.config), build_weights(tensors, device), mode, device, dtype, part.comm)
    if dense_cache_bytes is None:
        dense_cache_bytes = CPU_DENSE_CACHE_BYTES if torch.device(device).type == "cpu" else 0
    cache_dense(model.w, dense_cache_bytes)
    return model


def generation_defaults(path) -> dict:
    """Sampling defaults from generation_config.json (temperature, top_p, top_k), if present."""
    f = Path(path) / "generation_config.json"
    if not f.exists():
        return {}
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}
    return {k: d[k] for k in ("temperature", "top_p", "top_k") if k in d}


# ------------------------------------------------------------------ one rank's slices
Pick = Callable[[str], object]  # logical name -> None (whole), "skip", or (dim, start, stop)


def read_slices(ck: Checkpoint, pick: Pick, device="cpu", progress=None) -> tuple[dict, int]:
    """Read, shard by shard, only the parts of the stored tensors that ``pick`` asks for.

    pick(logical name) for a weight ``X.weight`` (its scales follow it) or a plain tensor: None reads
    the whole tensor, "skip" nothing, (dim, start, stop) those rows (dim 0) or columns (dim 1) of the
    logical tensor, through safetensors' get_slice (the rest of the tensor is not read). The stored
    slices follow the formats: packed FP4 columns two per byte and their group scales; FP8 block
    scales by FP8_BLOCK rows/columns (the slice must start on a block or lie inside one, else
    CheckpointError). -> (stored name -> tensor on device, bytes read)."""
    names = set(ck.weight_map)
    by_shard: dict[str, list[str]] = {}
    for n in sorted(names):
        by_shard.setdefault(ck.weight_map[n], []).append(n)
    out, nbytes = {}, 0
    for shard, ns in sorted(by_shard.items()):
        f = ck.path / shard
        meta = ShardReader(f).meta
        try:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for n in ns:
                    logical, role = _logical(n, names)
                    want = pick(logical)
                    if want == "skip":
                        continue
                    if want is not None and role != SCALE_2:
                        want = _stored_slice(n, role, want, meta, logical, ck.weight_map, ck.path)
                    else:
                        want = None
                    t = _read(h, f, n, meta[n], want).to(device)
                    out[n] = t
                    nbytes += t.numel() * t.element_size()
                    if progress:
                        progress(t)
        except CheckpointError:
            raise
        except Exception as e:  # truncated or corrupt shard
            raise CheckpointError(f"{f}: cannot read tensors ({short(e)})") from None
    return out, nbytes


def _logical(name: str, names: set) -> tuple[str, str]:
    """(the logical tensor a stored name belongs to, its role: "weight", a companion suffix, or "")."""
    for c in COMPANIONS:
        if name.endswith(c) and name[: -len(c)] + WEIGHT in names:
            return name[: -len(c)] + WEIGHT, c
    return name, "weight" if name.endswith(WEIGHT) else ""


def _packed(dt: str) -> bool:
    return dt in ("F4", "U8", "I8")


def _stored_slice(name, role, want, meta, logical, weight_map, root):
    """The (dim, start, stop) of stored tensor ``name`` for the logical slice ``want``."""
    dim, a, b = want
    if role in ("weight", ""):
        wdt = meta[name][0]
        if role == "weight" and dim == 1 and _packed(wdt) and weight_map.get(logical[: -len(WEIGHT)] + ".scale"):
            if a % 2 or b % 2:
                raise CheckpointError(f"{root}: {name}: packed FP4 columns {a}..{b} are not whole bytes")
            return (1, a // 2, b // 2)
        return want
    w = _weight_meta(root, weight_map, logical, meta)
    wdt, wshape = w[0], w[1]
    if wdt == "F8_E4M3":  # FP8 128x128 block scales
        if a % FP8_BLOCK and a // FP8_BLOCK != (b - 1) // FP8_BLOCK:
            raise CheckpointError(f"{root}: {logical} is split at {a}, inside a {FP8_BLOCK}-wide scale block")
        return (dim, a // FP8_BLOCK, math.ceil(b / FP8_BLOCK))
    if dim == 0:
        return want
    cols = wshape[1] * (2 if _packed(wdt) else 1)
    group = cols // meta[name][1][1]
    if a % group or b % group:
        raise CheckpointError(f"{root}: {logical} columns {a}..{b} split a {group}-wide scale group")
    return (1, a // group, b // group)


def _weight_meta(root, weight_map, logical, meta):
    if logical in meta:
        return meta[logical]
    return ShardReader(root / weight_map[logical]).meta[logical]


def _read(h, path, name, m, want) -> torch.Tensor:
    """One stored tensor, whole (want None) or the (dim, start, stop) slice of it."""
    if want is None:
        return h.get_tensor(name)
    dim, a, b = want
    dt, shape, (off, _) = m
    if dt != "F4":
        sl = h.get_slice(name)
        return (sl[a:b] if dim == 0 else sl[:, a:b]).contiguous()
    if dim != 0:  # safetensors cannot slice F4; whole rows are contiguous bytes
        raise CheckpointError(f"{path}: {name}: F4 tensors are split by rows only")
    row = math.prod(shape[1:])
    data_start = 8 + int.from_bytes(open(path, "rb").read(8), "little")
    with open(path, "rb") as f:
        f.seek(data_start + off + a * row)
        buf = bytearray(f.read((b - a) * row))
    return torch.frombuffer(buf, dtype=torch.uint8).view(DTYPES[dt]).reshape((b - a,) + tuple(shape[1:]))

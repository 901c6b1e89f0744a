"""Convert a checkpoint (published layout, or BF16 with the same names) to this project's layout.

What is kept: FP8 dense linears bit for bit; MXFP4 experts converted to NVFP4 keep their e2m1 codes
and their values exactly (quant.mxfp4_to_nvfp4), except blocks whose power of two e4m3 cannot carry,
which are re-rounded and counted per tensor (in the manifest's ``rerounded_blocks`` and the result).

Streams weight by weight: peak resident memory stays under
    baseline + 2 x max_shard_bytes + 8 x (largest logical weight in float32)
(one output shard being filled and written, one weight and its dequantised/requantised copies),
whatever the checkpoint size.

Nothing is lost and nothing half-written looks valid:
- output goes to a hidden ``.NAME.partial-PID`` folder next to DST, renamed into place only when
  complete; on an exception, Ctrl+C or SIGTERM that folder is removed; partial folders of dead
  processes (SIGKILL, power loss) are removed by the next convert to the same DST;
- DST may only be replaced when it is an empty folder or a previous dsv4 output (it has the
  manifest), and never when it holds SRC or lies inside it.
Errors are CheckpointError subclasses carrying data (``ConvertError.option``/``value``/``choices``,
``DestinationExists.path``) so the command line can word them in its own option names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .encode import Transcoded, decode, stored_format, transcode
from .formats import published_format, stored_names
from .memory import limit_heap_retention
from .published import FORMAT_VERSION, MANIFEST, Checkpoint, CheckpointError, open_checkpoint
from .shapes import tensor_shapes
from .shards import ShardReader, ShardWriter, short

EXPERT_FORMATS = ("nvfp4", "mxfp4", "fp8", "bf16")
DENSE_FORMATS = ("fp8", "bf16")
# relative error limits (||b - a|| / ||a||) for conversions that round; lossless ones must be exact
VERIFY_LIMITS = {"nvfp4": 0.15, "mxfp4": 0.2, "fp8": 0.08, "bf16": 0.01, "f32": 1e-6, "int": 0.0}
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json")


class ConvertError(CheckpointError):
    """A convert request that cannot run. ``option``/``value``/``choices`` name the argument at
    fault (None when it is the destination or the source as a whole)."""

    def __init__(self, message: str, option: str | None = None, value=None, choices: tuple = ()):
        super().__init__(message)
        self.option, self.value, self.choices = option, value, choices


class DestinationExists(ConvertError):
    """DST is a previous dsv4 output and replacing it was not asked for."""

    def __init__(self, path: Path):
        super().__init__(f"{path}: already exists (a previous dsv4 convert output; ask to replace it)")
        self.path = path


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a convert; the partial output has been removed."""


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsv4")
    except PackageNotFoundError:
        return "0+unknown"


def target_format(name: str, experts: str, dense: str) -> str:
    """The format ``name`` is written in: routed experts -> ``experts``, FP8 linears -> ``dense``,
    everything else as published."""
    src = published_format(name)
    if src == "mxfp4":
        return experts
    if src == "fp8":
        return dense
    return src


# ------------------------------------------------------------------ planning
@dataclass
class ConvertPlan:
    """A checked convert request: every argument and the destination validated, nothing written.

    total_bytes: bytes of stored tensors the conversion reads (what ``progress`` adds up to).
    stale: partial folders of dead converts into the same DST (removed when the conversion starts).
    faithful_problem: why faithful precision cannot run this model, or None."""

    checkpoint: Checkpoint
    src: Path
    dst: Path
    experts: str
    dense: str
    total_bytes: int
    stale: list[Path] = field(default_factory=list)
    faithful_problem: str | None = None


def _partial_re(dst: Path) -> re.Pattern:
    return re.compile(r"^\." + re.escape(dst.name) + r"\.partial-(\d+)(\.old)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _partials(dst: Path) -> tuple[list[Path], list[tuple[Path, int]]]:
    """Hidden partial folders for ``dst``: (those of dead processes, (those of live ones, pid))."""
    if not dst.parent.is_dir():
        return [], []
    pat = _partial_re(dst)
    dead, live = [], []
    for p in sorted(dst.parent.iterdir()):
        m = pat.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            pid = int(m.group(1))
            (live.append((p, pid)) if pid != os.getpid() and _alive(pid) else dead.append(p))
    return dead, live


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise ConvertError(f"{dst}: destination is the source checkpoint")
    if s in d.parents:
        raise ConvertError(f"{dst}: destination is inside the source checkpoint {src}; choose a folder outside it")
    if d in s.parents:
        raise ConvertError(f"{dst}: destination holds the source checkpoint {src}; replacing it would delete the "
                           f"source: choose another folder")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ConvertError(f"{dst}: exists and is not a folder (a file or link); choose a folder path")
    if dst.is_dir():
        try:
            empty = not any(dst.iterdir())
        except OSError as e:
            raise ConvertError(f"{dst}: cannot read the destination ({e.strerror})") from None
        if empty:
            return
        if not (dst / MANIFEST).is_file():
            raise ConvertError(f"{dst}: a non-empty folder that is not a dsv4 convert output; refusing to replace "
                               f"it (choose a new or empty folder)")
        if not force:
            raise DestinationExists(dst)
    parent = next(p for p in (dst.absolute(), *dst.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise ConvertError(f"{parent}: is a file, cannot create {dst} under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConvertError(f"{parent}: cannot write here (permission denied); choose a writable destination")


def _read_bytes(ck: Checkpoint, names: list[str]) -> int:
    """Bytes of the stored tensors (weights and their companions) of ``names`` in ``ck``."""
    metas: dict = {}
    for shard in sorted({ck.weight_map[p] for n in names for p in _parts(ck.weight_map, n)}):
        metas.update(ShardReader(ck.path / shard).meta)
    return sum(metas[p][2][1] - metas[p][2][0] for n in names for p in _parts(ck.weight_map, n))


def plan_convert(src, dst, experts: str = "nvfp4", dense: str = "fp8", force: bool = False) -> ConvertPlan:
    """Check a convert request without writing anything: formats, the source checkpoint (opened and
    validated), the destination (see module docstring). Raises ConvertError / CheckpointError."""
    if experts not in EXPERT_FORMATS:
        raise ConvertError(f"expert format {experts!r} is not one of {', '.join(EXPERT_FORMATS)}",
                           "experts", experts, EXPERT_FORMATS)
    if dense not in DENSE_FORMATS:
        raise ConvertError(f"dense format {dense!r} is not one of {', '.join(DENSE_FORMATS)}",
                           "dense", dense, DENSE_FORMATS)
    src, dst = Path(src), Path(dst)
    ck = open_checkpoint(src)
    _check_destination(src, dst, force)
    dead, live = _partials(dst)
    if live:
        p, pid = live[0]
        raise ConvertError(f"{dst}: another dsv4 convert (process {pid}) is writing it ({p.name}); wait for it "
                           f"or stop it first")
    names = _logical_names(ck)
    return ConvertPlan(ck, src, dst, experts, dense, _read_bytes(ck, names), dead, ck.config.faithful_problem())


# ---------------------------------------------------------------- converting
@dataclass
class ConvertResult:
    """dst: the written folder. rerounded_blocks: tensor -> 16-value NVFP4 blocks re-rounded (only
    tensors with some). removed_stale: partial folders of dead converts that were removed.
    lossless: the tensors whose every value was kept exactly."""

    dst: Path
    formats: dict
    rerounded_blocks: dict
    removed_stale: list[Path]
    lossless: set = field(default_factory=set)


@contextlib.contextmanager
def _sigterm_raises():
    """Within: SIGTERM raises Terminated (so cleanup runs as for Ctrl+C), a second one is ignored
    while cleaning up. Signal handlers can only be set from the main thread; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def convert_checkpoint(src, dst, experts: str = "nvfp4", dense: str = "fp8", force: bool = False,
                       max_shard_bytes: int = 1 << 30, progress=None, plan: ConvertPlan | None = None) -> ConvertResult:
    """Convert SRC to DST (see module docstring). ``progress(nbytes)`` is called after each weight
    with the bytes of its stored tensors read; the calls add up to ``plan.total_bytes``.
    ``plan``: the result of plan_convert for these arguments (made here when None)."""
    plan = plan or plan_convert(src, dst, experts, dense, force)
    src, dst, ck = plan.src, plan.dst, plan.checkpoint
    limit_heap_retention()  # resident memory stays near what is live (memory.py)
    removed = []
    for p in plan.stale:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    with _sigterm_raises():
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise ConvertError(f"{dst.parent}: cannot write here ({e.strerror or short(e)})") from None
        try:
            formats, rerounded, lossless = _stream(ck, tmp, plan.experts, plan.dense, max_shard_bytes, progress)
            for f in COPY_FILES:
                if (src / f).exists():
                    shutil.copyfile(src / f, tmp / f)
            manifest = {
                "format_version": FORMAT_VERSION, "tool": "dsv4", "tool_version": tool_version(),
                "experts": plan.experts, "dense": plan.dense, "source_layout": ck.layout, "tensors": formats,
                "rerounded_blocks": rerounded,
                "source_shards": {s: _sha256(src / s) for s in sorted(set(ck.weight_map.values()))},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _move_into_place(tmp, dst)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            where = e.filename or tmp
            raise ConvertError(f"{where}: {e.strerror or short(e)} (convert stopped; nothing was written to "
                               f"{dst})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ConvertResult(dst, formats, rerounded, removed, lossless)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` to ``dst``; a previous output (checked by plan_convert) is moved
    aside first and removed after, so DST is at every moment either the old or the new output."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = Path(f"{tmp}.old")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _logical_names(ck: Checkpoint) -> list[str]:
    return list(tensor_shapes(ck.config, mtp=any(n.startswith("mtp.") for n in ck.weight_map)))


def _stream(ck: Checkpoint, out: Path, experts: str, dense: str, max_shard_bytes: int, progress) -> tuple[dict, dict, set]:
    """Write every logical tensor of ``ck`` in its target format into ``out``, reading shard by
    shard. -> (name -> format written, name -> re-rounded NVFP4 blocks for tensors with any)."""
    writer = ShardWriter(out, max_shard_bytes)
    formats, rerounded, lossless = {}, {}, set()
    by_shard: dict[str, list[str]] = {}
    for name in _logical_names(ck):
        by_shard.setdefault(ck.weight_map[name], []).append(name)
    readers: dict = {}
    for _shard, names in sorted(by_shard.items()):  # shard order: sequential reads
        for name in names:
            stored = _read_parts(ck, readers, name)
            fmt = target_format(name, experts, dense)
            t: Transcoded = transcode(name, stored, fmt)
            writer.add(t.tensors)
            formats[name] = fmt
            if t.lossless:
                lossless.add(name)
            if t.rerounded_blocks:
                rerounded[name] = t.rerounded_blocks
            if progress:
                progress(sum(x.numel() * x.element_size() for x in stored.values()))
            del stored, t
    writer.finish()
    return formats, rerounded, lossless


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _parts(weight_map: dict, name: str) -> list[str]:
    """The stored tensors of one logical tensor present in ``weight_map``: a linear's weight and its
    scales, else itself."""
    return [n for n in stored_names(name) if n in weight_map]


def _read_parts(ck: Checkpoint, readers: dict, name: str) -> dict:
    out = {}
    for part in _parts(ck.weight_map, name):
        shard = ck.weight_map[part]
        if shard not in readers:
            readers[shard] = ShardReader(ck.path / shard)
        out[part] = readers[shard].get(part)
    return out


# ----------------------------------------------------------------- verifying
@dataclass(frozen=True)
class VerifyRow:
    """One tensor of DST against SRC: ``max_abs`` = max |dst - src| of the logical values,
    ``rel`` = ||dst - src|| / ||src||; ``lossless`` whether the conversion promised exact values
    (then ``ok`` needs max_abs == 0, else rel within VERIFY_LIMITS)."""

    name: str
    fmt: str
    max_abs: float
    rel: float
    lossless: bool
    rerounded_blocks: int
    ok: bool


def verify(src, dst, report=None) -> list[VerifyRow]:
    """Reload DST and compare every tensor with SRC; ``report(row)`` is called per tensor."""
    a, b = open_checkpoint(src), open_checkpoint(dst)
    fmts = b.manifest.get("tensors", {})
    reround = b.manifest.get("rerounded_blocks", {})
    rows = []
    for name, fmt in fmts.items():
        sa = a.load(names=_parts(a.weight_map, name))
        sb = b.load(names=_parts(b.weight_map, name))
        n_re = int(reround.get(name, 0))
        src_fmt = stored_format(name, sa)
        lossless = src_fmt == stored_format(name, sb) or fmt in ("f32", "int") or \
            (src_fmt, fmt) == ("mxfp4", "nvfp4") and n_re == 0
        wa, wb = decode(name, sa).double(), decode(name, sb).double()
        diff = (wb - wa).abs()
        max_abs = diff.max().item() if diff.numel() else 0.0
        rel = ((wb - wa).norm() / wa.norm().clamp(min=1e-30)).item()
        ok = max_abs == 0 if lossless else rel <= VERIFY_LIMITS.get(fmt, 0.2)
        rows.append(VerifyRow(name, fmt, max_abs, rel, lossless, n_re, ok))
        if report:
            report(rows[-1])
    return rows


def verify_summary(rows: list[VerifyRow]) -> dict:
    """Per written format: tensors, max |difference| over them, how many were lossless, re-rounded
    blocks in total, and how many exceed their limit. format -> dict."""
    out: dict = {}
    for r in rows:
        s = out.setdefault(r.fmt, {"tensors": 0, "max_abs": 0.0, "lossless": 0, "rerounded_blocks": 0, "bad": 0})
        s["tensors"] += 1
        s["max_abs"] = max(s["max_abs"], r.max_abs)
        s["lossless"] += r.lossless
        s["rerounded_blocks"] += r.rerounded_blocks
        s["bad"] += not r.ok
    return out

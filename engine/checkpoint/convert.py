"""Convert a checkpoint (published layout, or BF16 with the same names) to this project's layout.

Streams weight by weight: peak resident memory stays under
    baseline + 2 x max_shard_bytes + 8 x (largest logical weight in float32)
(one output shard being filled and written, one weight and its dequantised/requantised copies),
whatever the checkpoint size. Output goes to a hidden temporary folder next to DST that is renamed
into place only when complete, so an interrupted run never leaves a DST that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from dsv4.kernels import quant

from .published import FORMAT_VERSION, MANIFEST, CheckpointError, open_checkpoint
from .formats import published_format
from .memory import limit_heap_retention
from .shards import ShardReader, ShardWriter
from dsv4.engine.tools.synthetic import tensor_shapes
from dsv4.engine.model.weights import qweight_from

EXPERT_FORMATS = ("nvfp4", "mxfp4", "fp8", "bf16")
DENSE_FORMATS = ("fp8", "bf16")
VERIFY_LIMITS = {"nvfp4": 0.15, "mxfp4": 0.2, "fp8": 0.08, "bf16": 0.01, "f32": 1e-6, "int": 0.0}
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json")


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsv4")
    except PackageNotFoundError:
        return "0+unknown"


def target_format(name: str, experts: str, dense: str) -> str:
    src = published_format(name)
    if src == "mxfp4":
        return experts
    if src == "fp8":
        return dense
    return src


def encode(name: str, w: torch.Tensor | None, stored: dict, fmt: str) -> dict:
    """Produce the stored tensors of ``name`` in ``fmt``; keep source bits when formats agree."""
    base = name[: -len(".weight")]
    src = stored[name]
    if fmt == "fp8" and src.dtype == torch.float8_e4m3fn:
        scale = stored.get(base + ".scale", stored.get(base + ".weight_scale_inv"))
        return {name: src, base + ".scale": scale}  # bit-exact
    if fmt == "mxfp4" and src.dtype in (torch.float4_e2m1fn_x2, torch.int8, torch.uint8) and \
            stored[base + ".scale"].dtype != torch.float8_e4m3fn:
        return {name: src.view(torch.float4_e2m1fn_x2), base + ".scale": stored[base + ".scale"]}
    if fmt == "nvfp4":
        q, s, g = quant.quant_nvfp4(w)
        return {name: q, base + ".scale": s, base + ".scale_2": g}
    if fmt == "mxfp4":
        q, s = quant.quant_mxfp4(w)
        return {name: q, base + ".scale": s}
    if fmt == "fp8":
        q, s = quant.quant_fp8_block(w)
        return {name: q, base + ".scale": s}
    if fmt == "bf16":
        return {name: w.to(torch.bfloat16)}
    return {name: src}  # "int" and "f32": as stored


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_checkpoint(src, dst, experts: str = "nvfp4", dense: str = "fp8", force: bool = False,
                       max_shard_bytes: int = 1 << 30, progress=None) -> Path:
    """Convert SRC to DST (see module docstring). ``progress(nbytes)`` is called per source weight."""
    if experts not in EXPERT_FORMATS:
        raise CheckpointError(f"--experts {experts!r}: use one of {', '.join(EXPERT_FORMATS)}")
    if dense not in DENSE_FORMATS:
        raise CheckpointError(f"--dense {dense!r}: use one of {', '.join(DENSE_FORMATS)}")
    src, dst = Path(src), Path(dst)
    limit_heap_retention()  # resident memory stays near what is live (engine/memory.py)
    ck = open_checkpoint(src)
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (use --force to replace it)")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: destination is the source checkpoint")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        formats = _stream(ck, tmp, experts, dense, max_shard_bytes, progress)
        for f in COPY_FILES:
            if (src / f).exists():
                shutil.copyfile(src / f, tmp / f)
        manifest = {
            "format_version": FORMAT_VERSION, "tool": "dsv4", "tool_version": tool_version(),
            "experts": experts, "dense": dense, "source_layout": ck.layout, "tensors": formats,
            "source_shards": {s: _sha256(src / s) for s in sorted(set(ck.weight_map.values()))},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _stream(ck, out: Path, experts: str, dense: str, max_shard_bytes: int, progress) -> dict:
    shapes = tensor_shapes(ck.config, mtp=any(n.startswith("mtp.") for n in ck.weight_map))
    writer = ShardWriter(out, max_shard_bytes)
    formats = {}
    by_shard: dict[str, list[str]] = {}
    for name in shapes:
        by_shard.setdefault(ck.weight_map[name], []).append(name)
    readers: dict = {}
    for _shard, names in sorted(by_shard.items()):  # shard order: sequential reads
        for name in names:
            stored = _read_parts(ck, readers, name)
            fmt = target_format(name, experts, dense)
            if fmt in ("int", "f32"):
                w = None
            elif name.endswith(".weight") and len(shapes[name][1]) == 2:
                w = qweight_from(stored, name[: -len(".weight")]).dequant()
            else:
                w = stored[name].float()
            writer.add(encode(name, w, stored, fmt))
            formats[name] = fmt
            if progress:
                progress(sum(t.numel() * t.element_size() for t in stored.values()))
            del stored, w
    writer.finish()
    return formats


def _parts(weight_map: dict, name: str) -> list[str]:
    """The stored tensors of one logical tensor: a linear's weight and its scales, else itself."""
    if not name.endswith(".weight"):
        return [name]
    base = name[: -len(".weight")]
    return [n for n in (name, base + ".scale", base + ".weight_scale_inv", base + ".scale_2") if n in weight_map]


def _read_parts(ck, readers: dict, name: str) -> dict:
    out = {}
    for part in _parts(ck.weight_map, name):
        shard = ck.weight_map[part]
        if shard not in readers:
            readers[shard] = ShardReader(ck.path / shard)
        out[part] = readers[shard].get(part)
    return out


def verify(src, dst, report=None) -> list[tuple[str, str, float, bool]]:
    """Reload DST and compare every weight with SRC: (name, format, relative error, ok)."""
    a, b = open_checkpoint(src), open_checkpoint(dst)
    fmts = b.manifest.get("tensors", {})
    rows = []
    for name, fmt in fmts.items():
        sa = a.load(names=_parts(a.weight_map, name))
        sb = b.load(names=_parts(b.weight_map, name))
        if name.endswith(".weight") and sa[name].dim() == 2:
            base = name[: -len(".weight")]
            wa, wb = qweight_from(sa, base).dequant(), qweight_from(sb, base).dequant()
        else:
            wa, wb = sa[name], sb[name]
        wa, wb = wa.double(), wb.double()
        err = ((wb - wa).norm() / wa.norm().clamp(min=1e-30)).item()
        ok = err <= VERIFY_LIMITS.get(fmt, 0.2)
        rows.append((name, fmt, err, ok))
        if report:
            report(rows[-1])
    return rows


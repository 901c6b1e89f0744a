"""Checkpoint I/O: open the published Hugging Face layout or this project's converted layout,
validate it against the config, and load tensors lazily (memory-mapped safetensors) onto a device
in their stored formats. Also writes synthetic checkpoints in exactly the published layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels import quant

from .config import ConfigError, DSV4Config
from .formats import published_format, stored_entries
from .synthetic import random_tensors, tensor_shapes

MANIFEST = "dsv4_manifest.json"
INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and tensor."""


@dataclass
class Checkpoint:
    path: Path
    layout: str  # "published" | "converted"
    config: DSV4Config
    weight_map: dict  # tensor name -> shard file name
    manifest: dict = field(default_factory=dict)

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def load(self, device="cpu", names=None, progress=None) -> dict:
        """Read tensors (default: all) shard by shard, memory-mapped, straight onto ``device``."""
        wanted = set(self.weight_map if names is None else names)
        by_shard: dict[str, list[str]] = {}
        for n in wanted:
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, ns in sorted(by_shard.items()):
            f = self.path / shard
            try:
                with safe_open(str(f), framework="pt", device="cpu") as h:
                    for n in ns:
                        out[n] = h.get_tensor(n).to(device)
                        if progress:
                            progress(out[n])
            except CheckpointError:
                raise
            except Exception as e:  # truncated or corrupt shard
                raise CheckpointError(f"{f}: cannot read tensors ({_short(e)})") from None
        return out


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__


def open_checkpoint(path: str | os.PathLike, validate: bool = True) -> Checkpoint:
    """Open a checkpoint directory in either layout; validate names, dtypes and shapes."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory (expected a checkpoint folder with config.json)")
    try:
        cfg = DSV4Config.from_pretrained(p)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    manifest = {}
    if (p / MANIFEST).exists():
        layout = "converted"
        try:
            manifest = json.loads((p / MANIFEST).read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{p / MANIFEST}: not valid JSON") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{p / MANIFEST}: unsupported format_version {manifest.get('format_version')!r}")
    elif (p / INDEX).exists() or (p / "model.safetensors").exists():
        layout = "published"
    else:
        raise CheckpointError(f"{p}: unknown layout (no {INDEX}, model.safetensors or {MANIFEST})")
    weight_map = _weight_map(p)
    ck = Checkpoint(p, layout, cfg, weight_map, manifest)
    if validate:
        _validate(ck)
    return ck


def _weight_map(p: Path) -> dict:
    if (p / INDEX).exists():
        try:
            wm = json.loads((p / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{p / INDEX}: not a valid safetensors index (no weight_map)") from None
    else:
        wm = {n: "model.safetensors" for n in _keys(p / "model.safetensors")}
    return dict(wm)


def _keys(f: Path) -> set:
    if not f.exists():
        raise CheckpointError(f"{f}: shard listed in the index is missing")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as h:
            return set(h.keys())
    except Exception as e:
        raise CheckpointError(f"{f}: cannot read safetensors header ({_short(e)})") from None


def _meta(f: Path) -> dict:
    """name -> (dtype, shape) from a shard's header, without reading data."""
    out = {}
    with safe_open(str(f), framework="pt", device="cpu") as h:
        for n in h.keys():
            sl = h.get_slice(n)
            dt, shape = sl.get_dtype(), tuple(sl.get_shape())
            if dt == "F4":  # the header counts e2m1 values; torch sees packed pairs
                shape = shape[:-1] + (shape[-1] // 2,)
            out[n] = (dt, shape)
    return out


_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "F4": torch.float4_e2m1fn_x2,
           "BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "I32": torch.int32,
           "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8}


def _validate(ck: Checkpoint) -> None:
    metas: dict = {}
    for shard in sorted(set(ck.weight_map.values())):
        f = ck.path / shard
        keys = _keys(f)
        metas.update({n: (shard, m) for n, m in _meta(f).items()})
        for n, s in ck.weight_map.items():
            if s == shard and n not in keys:
                raise CheckpointError(f"{f}: tensor {n} is listed in the index but absent from the shard")
        size = f.stat().st_size
        with open(f, "rb") as h:
            header_len = int.from_bytes(h.read(8), "little")
        ends = sum(_nbytes(*metas[n][1]) for n in keys)
        if 8 + header_len + ends > size:
            raise CheckpointError(f"{f}: file is truncated ({size} bytes, header promises {8 + header_len + ends})")
    fmts = ck.manifest.get("tensors", {})
    for name, (kind, shape) in tensor_shapes(ck.config, mtp=any(n.startswith("mtp.") for n in ck.weight_map)).items():
        fmt = fmts.get(name) or published_format(name)
        if fmt == "fp8" and ck.layout == "published" and name in metas and metas[name][1][0] != "F8_E4M3":
            fmt = "bf16"  # BF16 dumps with the same names are accepted too
        for sname, (sshape, dtypes) in stored_entries(name, shape, fmt).items():
            if sname not in metas and sname.endswith(".scale"):
                alt = sname[: -len(".scale")] + ".weight_scale_inv"
                sname = alt if alt in metas else sname
            if sname not in metas:
                raise CheckpointError(f"{ck.path}: tensor {sname} is missing (the config expects it)")
            shard, (dt, got) = metas[sname]
            if _DTYPES.get(dt) not in dtypes:
                raise CheckpointError(f"{ck.path / shard}: tensor {sname} has dtype {dt}, expected one of "
                                      f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")
            if tuple(got) != tuple(sshape):
                raise CheckpointError(f"{ck.path / shard}: tensor {sname} has shape {list(got)}, the config implies "
                                      f"{list(sshape)}")


def _nbytes(dt: str, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * {"F8_E4M3": 1, "F8_E8M0": 1, "F4": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8,
                "I8": 1, "U8": 1}.get(dt, 1)


# ------------------------------------------------------------------- writing
def to_published(name: str, t: torch.Tensor) -> dict:
    """One float tensor -> its stored tensors in the published formats."""
    fmt = published_format(name)
    if fmt == "fp8":
        q, s = quant.quant_fp8_block(t)
        return {name: q, name[:-7] + ".scale": s}
    if fmt == "mxfp4":
        q, s = quant.quant_mxfp4(t)
        return {name: q, name[:-7] + ".scale": s}
    if fmt == "bf16":
        return {name: t.to(torch.bfloat16)}
    if fmt == "int":
        return {name: t.to(torch.int32)}
    return {name: t.float()}


def write_shards(tensors: dict, out: Path, max_shard_bytes: int, prefix: str = "model") -> dict:
    """Write tensors into numbered shards + the index; returns the weight map."""
    groups, cur, size = [], {}, 0
    for n, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and size + nb > max_shard_bytes:
            groups.append(cur)
            cur, size = {}, 0
        cur[n] = t
        size += nb
    groups.append(cur)
    wm = {}
    for i, g in enumerate(groups):
        fname = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in g.items()}, str(out / fname), metadata={"format": "pt"})
        wm.update({k: fname for k in g})
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=1))
    return wm


def write_published_checkpoint(cfg: DSV4Config, out: str | os.PathLike, seed: int = 0, tensors: dict | None = None,
                               max_shard_bytes: int = 2 << 20, tokenizer: bool = True) -> Path:
    """Write a checkpoint in EXACTLY the published layout: config.json, sharded safetensors with an
    index, FP8 block-scaled linears, MXFP4 experts, BF16/F32 small tensors, mtp.*, tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(cfg, seed) if tensors is None else tensors
    stored = {}
    for n, t in tensors.items():
        stored.update(to_published(n, t))
    write_shards(stored, out, max_shard_bytes)
    d = cfg.to_dict()
    d.update({"torch_dtype": "bfloat16", "expert_dtype": "fp4",
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}})
    (out / "config.json").write_text(json.dumps(d, indent=1))
    if tokenizer:
        from .tokenizer import write_byte_tokenizer

        write_byte_tokenizer(out)
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
             "temperature": 1.0, "top_p": 1.0}))
    return out


def dequantized(tensors: dict) -> dict:
    """Stored tensors -> float32 logical weights (for tests and --verify)."""
    from .weights import build_weights
    from kernels import QWeight

    out = {}
    for n, v in build_weights(tensors).items():
        out[n + ".weight" if isinstance(v, QWeight) else n] = v.dequant() if isinstance(v, QWeight) else v
    return out

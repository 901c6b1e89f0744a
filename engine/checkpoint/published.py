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

from dsv4.kernels import quant

from dsv4.engine.model.config import ConfigError, DSV4Config
from .formats import published_format, stored_entries
from .shards import DTYPES, INDEX, CheckpointError, ShardReader, ShardWriter, short
from dsv4.engine.tools.synthetic import random_tensors, tensor_shapes

MANIFEST = "dsv4_manifest.json"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    layout: str  # "published" | "converted"
    config: DSV4Config
    weight_map: dict  # tensor name -> shard file name
    manifest: dict = field(default_factory=dict)

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
                raise CheckpointError(f"{f}: cannot read tensors ({short(e)})") from None
        return out


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
        wm = {n: "model.safetensors" for n in ShardReader(p / "model.safetensors").keys()}
    return dict(wm)


def _validate(ck: Checkpoint) -> None:
    metas: dict = {}  # name -> (shard, (dtype, shape, offsets))
    for shard in sorted(set(ck.weight_map.values())):
        r = ShardReader(ck.path / shard)
        metas.update({n: (shard, m) for n, m in r.meta.items()})
        for n, s in ck.weight_map.items():
            if s == shard and n not in r.meta:
                raise CheckpointError(f"{r.path}: tensor {n} is listed in the index but absent from the shard")
        if r.missing_bytes():
            size = r.path.stat().st_size
            raise CheckpointError(f"{r.path}: file is truncated ({size} bytes, header promises "
                                  f"{size + r.missing_bytes()})")
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
            shard, (dt, got, _) = metas[sname]
            if DTYPES.get(dt) not in dtypes:
                raise CheckpointError(f"{ck.path / shard}: tensor {sname} has dtype {dt}, expected one of "
                                      f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")
            if tuple(got) != tuple(sshape):
                raise CheckpointError(f"{ck.path / shard}: tensor {sname} has shape {list(got)}, the config implies "
                                      f"{list(sshape)}")


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


def write_published_checkpoint(cfg: DSV4Config, out: str | os.PathLike, seed: int = 0, tensors: dict | None = None,
                               max_shard_bytes: int = 2 << 20, tokenizer: bool = True) -> Path:
    """Write a checkpoint in EXACTLY the published layout: config.json, sharded safetensors with an
    index, FP8 block-scaled linears, MXFP4 experts, BF16/F32 small tensors, mtp.*, tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(cfg, seed) if tensors is None else tensors
    writer = ShardWriter(out, max_shard_bytes)
    for n, t in tensors.items():
        writer.add(to_published(n, t))
    writer.finish()
    d = cfg.to_dict()
    d.update({"torch_dtype": "bfloat16", "expert_dtype": "fp4",
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}})
    (out / "config.json").write_text(json.dumps(d, indent=1))
    if tokenizer:
        from dsv4.engine.runtime.tokenizer import write_byte_tokenizer

        write_byte_tokenizer(out)
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
             "temperature": 1.0, "top_p": 1.0}))
    return out


def dequantized(tensors: dict) -> dict:
    """Stored tensors -> float32 logical weights (for tests and --verify)."""
    from dsv4.engine.model.weights import build_weights, logical_tensors

    return logical_tensors(build_weights(tensors))

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

from dsv4.engine.model.config import ConfigError, DSV4Config
from dsv4.kernels.formats import FP8_BLOCK

from .encode import encode
from .formats import SCALE, SCALE_INV, is_companion, published_format, stored_entries, stored_names
from .shapes import tensor_shapes
from .shards import DTYPES, INDEX, CheckpointError, ShardReader, ShardWriter, short

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


def model_folder(path: str | os.PathLike) -> Path:
    """``path`` as a model folder, or CheckpointError saying why it is not one (missing, a file, or a
    folder without config.json). Every command checks this first, before tokenizer or weights."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such folder (expected a model folder with config.json)")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory (expected a model folder with config.json)")
    if not (p / "config.json").is_file():
        what = "an empty folder" if not any(p.iterdir()) else "a folder without config.json"
        raise CheckpointError(f"{p}: not a model folder ({what})")
    return p


def open_checkpoint(path: str | os.PathLike, validate: bool = True) -> Checkpoint:
    """Open a checkpoint directory in either layout; validate names, dtypes and shapes."""
    p = model_folder(path)
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
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{p / INDEX}: not a valid safetensors index (no weight_map)") from None
        if not isinstance(wm, dict):
            raise CheckpointError(f"{p / INDEX}: weight_map must map tensor names to shard file names, "
                                  f"got {type(wm).__name__}")
        for n, shard in wm.items():
            if not isinstance(shard, str) or not shard or Path(shard).name != shard:
                raise CheckpointError(f"{p / INDEX}: weight_map[{n!r}] must be a shard file name in this folder, "
                                      f"got {shard!r}")
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
            if sname not in metas and sname.endswith(SCALE):
                alt = sname[: -len(SCALE)] + SCALE_INV
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
    """One float tensor -> its stored tensors in the published formats (encode.encode)."""
    return encode(name, t, published_format(name))


def write_published_checkpoint(cfg: DSV4Config, out: str | os.PathLike, seed: int = 0, tensors: dict | None = None,
                               max_shard_bytes: int = 2 << 20, tokenizer: bool = True, stored: dict | None = None) -> Path:
    """Write a checkpoint in EXACTLY the published layout: config.json, sharded safetensors with an
    index, FP8 block-scaled linears, MXFP4 experts, BF16/F32 small tensors, mtp.*, tokenizer files.

    ``tensors``: logical float tensors (default: random, seeded), encoded here (to_published);
    ``stored``: instead, tensors already in their stored formats, written as they are."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tensors is None and stored is None:
        from dsv4.engine.tools.synthetic import random_tensors

        tensors = random_tensors(cfg, seed)
    writer = ShardWriter(out, max_shard_bytes)
    for n in stored or {}:  # one logical tensor (a weight with its scales) at a time, so shards fill evenly
        if not is_companion(n, stored):
            writer.add({p: stored[p] for p in stored_names(n) if p in stored})
    for n, t in (tensors or {}).items():
        writer.add(to_published(n, t))
    writer.finish()
    d = cfg.to_dict()
    d.update({"torch_dtype": "bfloat16", "expert_dtype": "fp4",
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "scale_fmt": "ue8m0", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}})
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

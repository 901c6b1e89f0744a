"""Published-layout loading, dsv4 convert (formats, losslessness, streaming, atomicity) and bad checkpoints."""

import json
import shutil
import signal
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.engine.checkpoint.published import dequantized, open_checkpoint, write_published_checkpoint
from dsv4.engine.checkpoint.loader import load_model
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import demo_config

from conftest import run_cli
# A hang guard, not a deadline: these commands take seconds; the guard only stops a test that would
# otherwise wait forever, so it is generous enough for a loaded 2-core machine.
HANG_S = 1800


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_published_checkpoint(demo_config(), tmp_path_factory.mktemp("pub") / "src", seed=9,
                                      max_shard_bytes=300_000)


def cli(*args):
    return run_cli(*args, timeout=HANG_S)


def _logits(model, n=200):
    ids = torch.arange(n) % model.cfg.vocab_size
    return Session(model, 256).prefill(ids, last_only=False)


def test_published_layout_formats_and_exact_logits(ckpt):
    ck = open_checkpoint(ckpt)
    t = ck.load()
    assert ck.layout == "published" and len(set(ck.weight_map.values())) > 1
    assert t["layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert t["layers.0.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert t["layers.0.ffn.experts.0.w1.weight"].dtype == torch.float4_e2m1fn_x2
    assert t["embed.weight"].dtype == torch.bfloat16 and any(n.startswith("mtp.0.") for n in t)
    a = _logits(load_model(ckpt, mode="exact"))
    b = _logits(Model.from_state_dict(ck.config, dequantized(t), mode="exact"))
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def _greedy(model, n=24):
    ids = list(range(2, 40))
    return list(Session(model, 256).generate(ids, lambda logits: int(logits.argmax()), n))


def test_convert_is_lossless_and_verify_reports_zero(ckpt, tmp_path):
    dst = tmp_path / "nv"
    r = cli("convert", str(ckpt), str(dst), "--verify", "--shard-size-mb", "1")
    assert r.returncode == 0, r.stderr
    assert "within limits, 0 above" in r.stderr
    # --verify: one line per written format with its max |difference|; every one is lossless here
    for fmt in ("nvfp4", "fp8", "bf16", "f32", "int"):
        assert any(ln.split()[:1] == [fmt] and "max |difference| 0 " in ln and "(lossless)" in ln
                   for ln in r.stderr.splitlines()), (fmt, r.stderr)
    assert "120 of 120 expert tensors bit-exact" in r.stderr
    man = json.loads((dst / "dsv4_manifest.json").read_text())
    assert man["tensors"]["layers.0.ffn.experts.0.w1.weight"] == "nvfp4" and man["source_shards"]
    assert man["rerounded_blocks"] == {}
    src_t, dst_t = open_checkpoint(ckpt).load(), open_checkpoint(dst).load()
    assert torch.equal(src_t["layers.0.attn.wq_a.weight"].view(torch.uint8), dst_t["layers.0.attn.wq_a.weight"].view(torch.uint8))
    assert dst_t["layers.0.ffn.experts.0.w1.scale"].dtype == torch.float8_e4m3fn
    # MXFP4 -> NVFP4 keeps every value, so the models are the same model: the bound is 0, not a tolerance
    a_model, b_model = load_model(ckpt, mode="exact"), load_model(dst, mode="exact")
    assert torch.equal(_logits(a_model), _logits(b_model))
    src_tokens = _greedy(a_model)
    assert _greedy(b_model) == src_tokens and len(src_tokens) == 24
    r = cli("convert", str(ckpt), str(dst))
    assert r.returncode == 2 and "already exists (use --force to replace it)" in r.stderr
    assert cli("convert", str(ckpt), str(dst), "--force", "--experts", "mxfp4").returncode == 0
    mx = open_checkpoint(dst).load()  # MXFP4 -> MXFP4 keeps the stored bits
    for n in ("layers.0.ffn.experts.0.w1.weight", "layers.0.ffn.experts.0.w1.scale"):
        assert torch.equal(mx[n].view(torch.uint8), src_t[n].view(torch.uint8)), n


def _broken(ckpt, tmp_path, how):
    d = tmp_path / how
    shutil.copytree(ckpt, d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = idx["weight_map"]["layers.0.attn.wq_a.weight"]
    if how == "missing_shard":
        (d / shard).unlink()
    elif how in ("absent_tensor", "wrong_dtype", "wrong_shape"):
        t = load_file(str(d / shard))
        if how == "absent_tensor":
            del t["layers.0.attn.wq_a.weight"]
        elif how == "wrong_dtype":
            t["layers.0.attn.wq_a.weight"] = t["layers.0.attn.wq_a.weight"].float().to(torch.int32)
        else:
            t["layers.0.attn.wq_a.weight"] = t["layers.0.attn.wq_a.weight"][:, :10].contiguous()
        save_file(t, str(d / shard))
    elif how == "truncated":
        data = (d / shard).read_bytes()
        (d / shard).write_bytes(data[: len(data) - 100])
    elif how == "config_mismatch":
        c = json.loads((d / "config.json").read_text())
        c["hidden_size"] = 80
        (d / "config.json").write_text(json.dumps(c))
    elif how == "unknown_layout":
        (d / "model.safetensors.index.json").unlink()
    return d


@pytest.mark.parametrize("how,message", [
    ("missing_shard", "shard listed in the index is missing"),
    ("absent_tensor", "layers.0.attn.wq_a.weight is listed in the index but absent"),
    ("wrong_dtype", "layers.0.attn.wq_a.weight has dtype I32"),
    ("wrong_shape", "layers.0.attn.wq_a.weight has shape"),
    ("truncated", "truncated"),
    ("config_mismatch", "the config implies"),
    ("unknown_layout", "unknown layout"),
])
def test_bad_checkpoints(ckpt, tmp_path, how, message):
    d = _broken(ckpt, tmp_path, how)
    dst = tmp_path / "out"
    r = cli("convert", str(d), str(dst))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not dst.exists() and not list(tmp_path.glob(".out.partial*"))
    r = cli("chat", "--model", str(d), "-p", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A checkpoint of ~190 MB (many large experts) for the streaming test. The experts are random
    MXFP4 bytes and scales made directly in their stored form (quantising 75M float values would
    take minutes on a loaded 2-core machine and adds nothing to a memory test)."""
    from dsv4.engine.checkpoint.encode import encode
    from dsv4.engine.checkpoint.formats import SCALE, linear_base, published_format
    from dsv4.engine.checkpoint.shapes import tensor_shapes
    from dsv4.engine.tools.synthetic import random_tensor
    from dsv4.kernels.formats import MXFP4_GROUP

    cfg = demo_config().replace(hidden_size=512, moe_intermediate_size=1024, n_routed_experts=48,
                                num_experts_per_tok=3, q_lora_rank=64, o_lora_rank=64)
    g = torch.Generator().manual_seed(1)
    stored = {}
    for name, (kind, shape) in tensor_shapes(cfg).items():
        fmt = published_format(name)
        if fmt == "mxfp4":
            out, inn = shape
            stored[name] = torch.randint(0, 256, (out, inn // 2), dtype=torch.uint8, generator=g).view(torch.float4_e2m1fn_x2)
            e = torch.randint(118, 124, (out, inn // MXFP4_GROUP), dtype=torch.uint8, generator=g)
            stored[linear_base(name) + SCALE] = e.view(torch.float8_e8m0fnu)
        elif fmt == "int":  # hash routing: distinct expert ids per token
            stored[name] = torch.argsort(torch.rand(shape[0], cfg.n_routed_experts, generator=g), -1)[:, :shape[1]] \
                .to(torch.int32)
        else:
            stored.update(encode(name, random_tensor(kind, shape, g, torch.bfloat16).float(), fmt))
    return write_published_checkpoint(cfg, tmp_path_factory.mktemp("big") / "src", stored=stored,
                                      max_shard_bytes=32 << 20)


def _size(d):
    return sum(f.stat().st_size for f in d.iterdir())


def test_convert_streams_with_bounded_peak_rss(big, tmp_path):
    # Bound (engine/convert.py): baseline + 2 x shard + 8 x largest weight in float32.
    # Here: shard 8 MiB, largest weight 1024x512 f32 = 2 MiB -> 32 MiB over the interpreter baseline.
    code = ("import re,sys;from dsv4.engine.checkpoint.convert import convert_checkpoint;import torch;"
            "hwm=lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1));"
            "rss=lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1));"
            "open('/proc/self/clear_refs','w').write('5');base=rss();"
            "convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_bytes=8<<20);"
            "print(base, hwm())")
    r = subprocess.run([sys.executable, "-c", code, str(big), str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=HANG_S)
    assert r.returncode == 0, r.stderr
    base_kib, peak_kib = map(int, r.stdout.split())
    grew = (peak_kib - base_kib) * 1024
    size = _size(big)
    bound = 2 * (8 << 20) + 8 * (2 << 20) + (48 << 20)  # + 48 MiB for the checkpoint-open/validation pass
    print(f"\ncheckpoint {size / 2**20:.0f} MiB, peak RSS growth {grew / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert size > 2 * bound and grew < bound


# `dsv4 convert` in a child that stops after writing its first output shard and says so on stdout:
# the test acts on that event (not on a clock), while the child is certainly mid-conversion.
PAUSED_CONVERT = """
import sys
from dsv4.engine.checkpoint import shards
flush = shards.ShardWriter.flush
def paused(self):
    flush(self)
    if self.files:
        print("wrote", self.out / self.files[-1], flush=True)
        sys.stdin.readline()  # waits here until the test signals
shards.ShardWriter.flush = paused
from dsv4.cli.main import app
app(sys.argv[1:], prog_name="dsv4")
"""


def paused_convert(*args):
    """Start ``dsv4 convert ARGS`` and return (process, first shard written) once that shard exists."""
    # SIGINT handled by default in the child (a test run started in the background inherits it ignored)
    p = subprocess.Popen([sys.executable, "-c", PAUSED_CONVERT, "convert", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = p.stdout.readline()
    assert line.startswith("wrote "), p.communicate(timeout=HANG_S)[1]
    return p, Path(line.split(" ", 1)[1].strip())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_convert_removes_its_partial_output(ckpt, tmp_path, sig):
    dst = tmp_path / "conv"
    p, shard = paused_convert(str(ckpt), str(dst), "--shard-size-mb", "1")
    assert shard.exists() and shard.parent.name == f".conv.partial-{p.pid}"
    p.send_signal(sig)
    _, err = p.communicate(timeout=HANG_S)
    assert p.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err
    assert not dst.exists() and not shard.parent.exists() and list(tmp_path.iterdir()) == []


def test_killed_convert_leaves_no_dst_and_rerun_removes_its_partial(ckpt, tmp_path):
    dst = tmp_path / "conv"
    p, shard = paused_convert(str(ckpt), str(dst), "--shard-size-mb", "1")
    p.kill()  # SIGKILL: no cleanup is possible, the partial folder stays behind
    p.communicate(timeout=HANG_S)
    assert shard.exists() and not dst.exists()
    r = cli("convert", str(ckpt), str(dst), "--shard-size-mb", "1")
    assert r.returncode == 0, r.stderr
    assert f"removing {shard.parent}: left by an interrupted convert" in r.stderr.replace("\n", "")
    assert not shard.parent.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["conv"]
    assert open_checkpoint(dst).layout == "converted"

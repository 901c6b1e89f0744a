"""dsv4 convert never loses data and refuses bad input with one line (rc 2): the destination rules,
a read-only destination, a malformed index or config, an empty model folder, the progress total, and
the faithful-precision warning."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dsv4.engine.checkpoint import convert as conv
from dsv4.engine.checkpoint.convert import ConvertError, DestinationExists, convert_checkpoint, plan_convert
from dsv4.engine.checkpoint.loader import PrecisionUnsupported, load_model
from dsv4.engine.checkpoint.published import CheckpointError, open_checkpoint, write_published_checkpoint
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import demo_config

from conftest import run_cli

HANG_S = 1800  # a hang guard only: each command takes seconds


def cli(*args):
    return run_cli(*args, timeout=HANG_S)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture(scope="module")
def src_ckpt(tmp_path_factory):
    return write_published_checkpoint(demo_config(), tmp_path_factory.mktemp("pub") / "src", seed=3,
                                      max_shard_bytes=300_000)


@pytest.fixture
def src(src_ckpt, tmp_path):
    """A private copy (some tests put things around or inside it)."""
    return shutil.copytree(src_ckpt, tmp_path / "models" / "src")


def tree(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_force_onto_the_folder_holding_src_deletes_nothing(src):
    parent = src.parent
    (parent / "notes.txt").write_text("mine")
    before = tree(parent)
    r = cli("convert", src, parent, "--force")
    one_line_error(r, "holds the source checkpoint")
    assert tree(parent) == before and (parent / "notes.txt").read_text() == "mine"


def test_destination_inside_src_is_refused(src):
    with pytest.raises(ConvertError, match="inside the source checkpoint"):
        plan_convert(src, src / "converted", force=True)
    with pytest.raises(ConvertError, match="destination is the source checkpoint"):
        plan_convert(src, src / ".." / "src", force=True)
    assert not (src / "converted").exists()


def test_force_refuses_a_folder_that_is_not_a_dsv4_output(src, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    r = cli("convert", src, other, "--force")
    one_line_error(r, "not a dsv4 convert output")
    assert tree(other) == ["cat.jpg"]


def test_force_refuses_a_regular_file(src, tmp_path):
    f = tmp_path / "out.bin"
    f.write_bytes(b"data")
    r = cli("convert", src, f, "--force")
    one_line_error(r, "is not a folder")
    assert f.read_bytes() == b"data"


def test_force_replaces_only_a_previous_output_and_an_empty_folder_is_fine(src, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(src, empty)  # nothing to lose: no --force needed
    assert open_checkpoint(empty).layout == "converted"
    with pytest.raises(DestinationExists):
        plan_convert(src, empty)
    res = convert_checkpoint(src, empty, experts="mxfp4", force=True)
    assert json.loads((empty / "dsv4_manifest.json").read_text())["experts"] == "mxfp4"
    assert res.dst == empty and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "models"]


def test_unwritable_destination_is_a_clear_error(src, tmp_path, monkeypatch):
    # a read-only folder, as the OS reports it (also when running as root, where chmod does not bite)
    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(conv.Path, "mkdir", refuse)
    with pytest.raises(ConvertError, match="cannot write here .Permission denied"):
        convert_checkpoint(src, tmp_path / "ro" / "out")
    assert not (tmp_path / "ro").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_cli(src, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(cli("convert", src, ro / "out"), "cannot write here")
    finally:
        ro.chmod(0o755)


def test_write_failure_midway_leaves_nothing(src, tmp_path, monkeypatch):
    from dsv4.engine.checkpoint import shards

    def full(self):
        raise OSError(28, "No space left on device", str(self.out / "part-00001.safetensors"))

    monkeypatch.setattr(shards.ShardWriter, "flush", full)
    with pytest.raises(ConvertError, match="No space left on device"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_stale_partials_of_dead_processes_are_removed_live_ones_refused(src, tmp_path):
    dst = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    stale.mkdir()
    (stale / "part-00001.safetensors").write_bytes(b"x" * 100)
    other = tmp_path / ".other.partial-1"  # another destination's: not ours to touch
    other.mkdir()
    plan = plan_convert(src, dst)
    assert plan.stale == [stale]
    res = convert_checkpoint(src, dst, plan=plan)
    assert res.removed_stale == [stale] and not stale.exists() and other.exists()
    live = tmp_path / f".again.partial-{os.getppid()}"  # a running process's partial
    live.mkdir()
    with pytest.raises(ConvertError, match=f"another dsv4 convert .process {os.getppid()}"):
        plan_convert(src, tmp_path / "again")
    assert live.exists()


def test_progress_adds_up_to_the_total(src, tmp_path):
    plan = plan_convert(src, tmp_path / "out")
    seen = []
    convert_checkpoint(src, tmp_path / "out", plan=plan, progress=seen.append)
    assert sum(seen) == plan.total_bytes > 0


def test_cli_progress_ends_at_100_percent_and_no_bar_before_an_argument_error(src, tmp_path):
    r = cli("convert", src, tmp_path / "out", "--shard-size-mb", "1")
    assert r.returncode == 0, r.stderr
    bar = [ln for ln in r.stderr.splitlines() if ln.startswith("converting")][-1]
    m = re.search(r"([\d.]+)/([\d.]+) ([kMG]?B)", bar)  # "converting ━━━ 910.9/910.9 kB 17.3 MB/s 0:00:00"
    assert m and m.group(1) == m.group(2), bar
    for bad in (["--experts", "int4"], ["--dense", "fp4"]):
        r = cli("convert", src, tmp_path / "out2", *bad)
        one_line_error(r, f"{bad[0]} '{bad[1]}': use one of")
        assert "converting" not in r.stderr
    r = cli("convert", src, tmp_path / "out")
    one_line_error(r, "already exists (use --force to replace it)")
    assert "converting" not in r.stderr


def test_index_with_non_string_shard_names(src):
    idx = src / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["embed.weight"] = 3
    idx.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"weight_map\['embed.weight'\] must be a shard file name.*got 3"):
        open_checkpoint(src)
    d["weight_map"]["embed.weight"] = "../elsewhere.safetensors"
    idx.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="must be a shard file name in this folder"):
        open_checkpoint(src)
    d["weight_map"] = [1, 2]
    idx.write_text(json.dumps(d))
    one_line_error(cli("convert", src, src.parent / "out"), "weight_map must map tensor names")


@pytest.mark.parametrize("content,needle", [
    ("[]", "must be a JSON object"),
    ("{}", "missing required keys vocab_size, hidden_size"),
])
def test_config_that_is_not_a_v4_config(src, content, needle):
    (src / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=needle):
        open_checkpoint(src)


def test_config_with_a_wrong_type_is_refused_by_name(src, tmp_path):
    c = json.loads((src / "config.json").read_text())
    c["hidden_size"] = "big"
    (src / "config.json").write_text(json.dumps(c))
    one_line_error(cli("convert", src, tmp_path / "out"), "hidden_size must be an integer, got 'big'")


def test_empty_folder_is_not_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(CheckpointError, match="not a model folder|no such folder"):
            load_model(bad)
    one_line_error(cli("convert", tmp_path / "empty", tmp_path / "out"), "not a model folder (an empty folder)")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a model folder .a folder without config.json"):
        open_checkpoint(tmp_path / "stuff")


@pytest.fixture(scope="module")
def odd_head(tmp_path_factory):
    """A checkpoint whose head_dim - rope dim (96 - 16 = 80) is not a multiple of the FP8 KV group."""
    cfg = demo_config().replace(qk_rope_head_dim=16)
    return write_published_checkpoint(cfg, tmp_path_factory.mktemp("odd") / "src", seed=2)


def test_faithful_on_an_odd_head_dim_says_use_exact(odd_head, tmp_path):
    with pytest.raises(PrecisionUnsupported) as e:
        load_model(odd_head, mode="faithful")
    assert (e.value.precision, e.value.fallback) == ("faithful", "exact")
    assert "head_dim - qk_rope_head_dim (96 - 16 = 80) is not a multiple of 64" in str(e.value)
    assert "use exact precision" in str(e.value)
    logits = Session(load_model(odd_head, mode="exact"), 64).prefill([5, 6, 7])  # exact precision runs it
    assert logits.shape == (262,) and bool(torch.isfinite(logits).all())
    r = cli("convert", odd_head, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "cannot run in faithful precision" in r.stderr and "--precision exact" in r.stderr


def test_checkpoint_modules_do_not_import_the_random_weight_module():
    code = ("import sys, dsv4.engine.checkpoint.published, dsv4.engine.checkpoint.convert, "
            "dsv4.engine.checkpoint.loader; print(sorted(m for m in sys.modules if m.startswith('dsv4.engine.tools')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_engine_errors_carry_data_not_cli_words(src, tmp_path):
    with pytest.raises(ConvertError) as e:
        plan_convert(src, tmp_path / "x", experts="int4")
    assert (e.value.option, e.value.value) == ("experts", "int4") and "nvfp4" in e.value.choices
    assert "--" not in str(e.value)

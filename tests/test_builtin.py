"""The built-in default model (engine/builtin): its format, that it answers on topic, and that
faithful mode and the NVFP4/FP8 converted checkpoint stay within 5% of exact-mode perplexity."""

from pathlib import Path

import pytest

from conftest import run_cli

from dsv4.cli.common import builtin_model_dir
from dsv4.engine.tools.bench import perplexity
from dsv4.engine.checkpoint.published import open_checkpoint
from dsv4.engine.checkpoint.convert import convert_checkpoint
from dsv4.engine.checkpoint.loader import load_model
from dsv4.engine.runtime.tokenizer import SPECIALS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "train" / "results" / "heldout_modules.txt"  # modules never trained on


def test_builtin_is_a_small_published_layout_v4():
    d = builtin_model_dir()
    ck = open_checkpoint(d)  # validates names, dtypes, shapes against config.json
    cfg = ck.config
    size = sum(f.stat().st_size for f in d.iterdir())
    assert size < 50e6
    assert cfg.compress_ratios[:2] == (0, 0) and set(cfg.compress_ratios[2:]) == {4, 128}
    assert cfg.sliding_window == 128 and cfg.hc_mult == 4 and cfg.num_hash_layers >= 1
    assert cfg.num_hash_layers < cfg.num_hidden_layers  # both hash and score routing
    assert cfg.num_nextn_predict_layers == 1
    assert (d / "model.safetensors.index.json").exists()
    tok = Tokenizer.from_dir(d)
    assert [tok.tk.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS)))
    assert tok.vocab_size == cfg.vocab_size
    assert len(tok.encode("What does json.dumps do?")) < 12  # a trained BPE, not bytes


def test_chat_answers_json_dumps_on_topic():
    r = run_cli("chat", "-p", "What does json.dumps do?", "--temperature", "0", "--max-tokens", "60",
                env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "built-in default model" in r.stderr  # the banner says which model answers
    text = r.stdout
    assert "json.dumps" in text and "JSON" in text, text


@pytest.fixture(scope="module")
def heldout_ids():
    tok = Tokenizer.from_dir(builtin_model_dir())
    return tok, tok.encode(HELDOUT.read_text(encoding="utf-8"))[:3000]


def _ppl(model_dir, mode, heldout_ids):
    tok, ids = heldout_ids
    return perplexity(load_model(model_dir, mode=mode), ids, tok.bos_id, max_context=1024)["perplexity"]


def test_faithful_and_converted_perplexity_within_5_percent_of_exact(heldout_ids, tmp_path):
    d = builtin_model_dir()
    exact = _ppl(d, "exact", heldout_ids)
    # a trained model: an untrained one scores about the vocabulary size (4096); this text is about modules
    # the model never saw (train/results/heldout_modules.txt), where the shipped model scores ~60
    assert exact < 120, exact
    faithful = _ppl(d, "faithful", heldout_ids)
    convert_checkpoint(d, tmp_path / "nvfp4")  # experts NVFP4, dense FP8
    converted = _ppl(tmp_path / "nvfp4", "exact", heldout_ids)
    for name, v in (("faithful", faithful), ("converted", converted)):
        assert abs(v / exact - 1) < 0.05, (name, v, exact)
    assert converted == exact  # MXFP4 -> NVFP4 keeps every expert value (issue #20), FP8 dense is copied

"""dsv4 inspect-cache numbers (against cache/ accounting and a hand count) and the bench commands on CPU."""

import json
import math
import subprocess
import sys

import pytest
import torch

from dsv4.cache import CacheSchema
from dsv4.cli.inspect_cache import longest_context, parse_bytes, parse_contexts
from dsv4.engine.tools.bench import perplexity
from dsv4.engine.checkpoint.published import write_published_checkpoint
from dsv4.engine.model.config import DSV4Config
from dsv4.engine.checkpoint.loader import load_model
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import demo_config
from dsv4.engine.runtime.tokenizer import Tokenizer

CLI = [sys.executable, "-m", "dsv4.cli.main"]


def cli(*args):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300)


def test_inspect_cache_json_matches_accounting_and_hand_count(tmp_path):
    r = cli("inspect-cache", "--preset", "flash", "--context", "8k,1m", "--json", "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["context_tokens"] for x in rows] == [8192, 1 << 20]
    schema = CacheSchema.from_config(DSV4Config.flash(), "faithful")
    for x in rows:
        assert x["total_bytes"] == schema.bytes_for_context(x["context_tokens"])["total"]
    one_m = rows[1]["by_type"]
    nb = 8192
    # one layer of each type by hand: CSA 32 entries x (448 FP8 + 128 BF16 + 7 scales + 64 FP4 + 4 scales)
    assert one_m["csa"]["total"] == 21 * (nb * 32 * (448 + 128 + 7 + 64 + 4) + 128 * 583 + 51200)
    assert one_m["hca"]["total"] == 20 * (nb * 583 + 128 * 583 + 4 * 127 * 2 * 512)
    assert one_m["swa"]["total"] == 2 * 128 * 583
    assert abs(rows[1]["ratio_to_v32"] - rows[1]["total_bytes"] / (656 * 61 * (1 << 20))) < 1e-12
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_budget_search():
    schema = CacheSchema.from_config(DSV4Config.flash(), "faithful")
    budget = parse_bytes("40GiB")
    n = longest_context(schema, budget)
    assert schema.bytes_for_context(n)["total"] <= budget < schema.bytes_for_context(n + 1)["total"]
    assert parse_contexts("8k, 128k,1m,100") == [8192, 131072, 1048576, 100]
    r = cli("inspect-cache", "--context", "abc")
    assert r.returncode == 2 and "use token counts" in r.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_published_checkpoint(demo_config(), tmp_path_factory.mktemp("b") / "ck", seed=2)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_bench_runs_on_cpu(ckpt, kind, tmp_path):
    out = tmp_path / "r.json"
    args = ["--prompt-len", "150", "--steps", "4"] if kind == "decode" else ["--prompt-len", "150", "--runs", "2"]
    r = cli("bench", kind, "--model", str(ckpt), "--device", "cpu", "--json", str(out), *args)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["median_s"] > 0 and d["p10_s"] <= d["median_s"] <= d["p90_s"] and d["environment"]["command"]
    if kind == "decode":
        assert d["weight_bytes_per_token"] > 0 and d["kv_bytes_per_token"] > 0 and d["measured_bandwidth_bytes_per_s"] > 0
    else:
        assert d["flops"] > 0 and 0 < d["matmul_rate_fraction"]


def test_perplexity_matches_direct_computation(ckpt, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "t.txt").write_text(text)
    r = cli("bench", "perplexity", "--model", str(ckpt), "--text", str(tmp_path / "t.txt"), "--max-context", "100",
            "--device", "cpu", "--precision", "exact", "--json", "-")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    tok = Tokenizer.from_dir(ckpt)
    ids = tok.encode(text)
    model = load_model(ckpt, mode="exact")
    nll, n = 0.0, 0
    for i in range(0, len(ids), 99):  # windows of 100: bos + 99 tokens
        w = [tok.bos_id] + ids[i:i + 99]
        logits = Session(model, 100).prefill(w, last_only=False)
        logp = torch.log_softmax(logits[:-1].double(), -1)
        nll -= logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
        n += len(w) - 1
    assert d["tokens"] == n == len(ids)
    assert math.isclose(d["perplexity"], math.exp(nll / n), rel_tol=1e-4)
    assert perplexity(model, ids, tok.bos_id, 100)["tokens"] == n


def test_bench_compare_transformers_runs_the_same_weights(ckpt):
    pytest.importorskip("transformers")
    r = cli("bench", "decode", "--model", str(ckpt), "--device", "cpu", "--precision", "exact", "--prompt-len", "140",
            "--steps", "3", "--warmup", "1", "--compare", "transformers", "--json", "-")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["compare_against"] == "transformers" and d["compare_median_s"] > 0
    assert math.isclose(d["compare_speed_ratio"], d["compare_median_s"] / d["median_s"], rel_tol=1e-9)
    # same weights, same prompt: transformers' last-token logits equal ours
    assert d["compare_max_abs_logit_diff_on_prompt"] <= 1e-4 * d["compare_max_abs_logit"]


def test_bench_compare_reference_and_bad_value(ckpt):
    r = cli("bench", "prefill", "--model", str(ckpt), "--device", "cpu", "--prompt-len", "64", "--runs", "2",
            "--compare", "reference", "--json", "-")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["compare_against"] == "reference" and d["compare_median_s"] > 0 and d["compare_speed_ratio"] > 0
    r = cli("bench", "prefill", "--model", str(ckpt), "--device", "cpu", "--compare", "vllm")
    assert r.returncode == 2 and "use reference, transformers or eager" in r.stderr and "Traceback" not in r.stderr
    r = cli("bench", "prefill", "--model", str(ckpt), "--device", "cpu", "--compare", "eager")
    assert r.returncode == 2 and "applies to decode" in r.stderr
    r = cli("bench", "decode", "--model", str(ckpt), "--device", "cpu", "--compare", "eager")
    assert r.returncode == 2 and "needs a CUDA device" in r.stderr and "Traceback" not in r.stderr

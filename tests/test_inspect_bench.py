"""dsv4 inspect-cache numbers (against cache/ accounting and a hand count), the bench commands on CPU
(bytes per token against the closed form, the per-layer and projected figures against their
definitions), and the CLI's edge: threads, progress, help, one-line errors."""

import io
import json
import math
import time

import pytest
import torch

from dsv4.cache import CacheSchema
from dsv4.cache.budget import budget_report, context_report, longest_context, plain_bf16_bytes
from dsv4.cli.common import Progress, default_threads, physical_cores
from dsv4.cli.inspect_cache import parse_bytes, parse_contexts
from dsv4.engine.checkpoint.loader import load_model
from dsv4.engine.model.config import DSV4Config
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.engine.runtime.tokenizer import Tokenizer
from dsv4.engine.tools import bench as B
from dsv4.engine.tools.synthetic import demo_config, tensor_shapes

FLASH_MAX = 1 << 20


def _one_line_error(r, text):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert text in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------- inspect-cache
def test_inspect_cache_json_matches_accounting_and_hand_count(cli_inprocess, tmp_path):
    r = cli_inprocess("inspect-cache", "--preset", "flash", "--context", "8k,1m,128k", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x["context_tokens"] for x in rows] == [8192, 1 << 20, 128 << 10]  # in the order asked
    schema = CacheSchema.from_config(DSV4Config.flash(), "faithful")
    for x in rows:
        assert x["total_bytes"] == schema.bytes_for_context(x["context_tokens"])["total"]
        assert x["precision"] == "faithful"
    one_m = rows[1]["by_type"]
    nb = 8192
    # one layer of each type by hand: CSA 32 entries x (448 FP8 + 128 BF16 + 7 scales + 64 FP4 + 4 scales)
    assert one_m["csa"]["total"] == 21 * (nb * 32 * (448 + 128 + 7 + 64 + 4) + 128 * 583 + 51200)
    assert one_m["hca"]["total"] == 20 * (nb * 583 + 128 * 583 + 4 * 127 * 2 * 512)
    assert one_m["swa"]["total"] == 2 * 128 * 583
    assert rows[1]["total_bytes"] == 3_693_977_216  # cache/schema.py's closed form for Flash at 1M
    assert abs(rows[1]["ratio_to_v32"] - rows[1]["total_bytes"] / (656 * 61 * (1 << 20))) < 1e-12
    assert rows[1]["plain_bf16_bytes"] == 2 * 4096 * 2 * 43 * (1 << 20)
    # bytes per token fall with context (fixed window and state amortised) toward the per-block cost
    per_tok = {x["context_tokens"]: x["total_bytes"] / x["context_tokens"] for x in rows}
    assert per_tok[8192] > per_tok[128 << 10] > per_tok[1 << 20] > (21 * 20832 + 20 * 583) / 128


def test_inspect_cache_exact_precision_closed_form(cli_inprocess):
    """exact: float32 entries (4 x head_dim, 4 x index_head_dim); the hidden --mode alias still works."""
    r = cli_inprocess("inspect-cache", "--preset", "flash", "--context", "1m", "--precision", "exact", "--json")
    r2 = cli_inprocess("inspect-cache", "--preset", "flash", "--context", "1m", "--mode", "exact", "--json")
    assert r.returncode == 0 == r2.returncode, r.stderr + r2.stderr
    x = json.loads(r.stdout)[0]
    assert json.loads(r2.stdout)[0] == x
    nb, W, state_csa, state_hca = 8192, 128, 51200, 4 * 127 * 2 * 512
    assert x["precision"] == "exact"
    assert x["total_bytes"] == (21 * (nb * 32 * (2048 + 512) + W * 2048 + state_csa)
                                + 20 * (nb * 2048 + W * 2048 + state_hca) + 2 * W * 2048)


def test_context_and_budget_limits(cli_inprocess):
    _one_line_error(cli_inprocess("inspect-cache", "--context", "0.1"), "at least 1 token")
    _one_line_error(cli_inprocess("inspect-cache", "--context", "99999999999"), "holds at most 1,048,576")
    _one_line_error(cli_inprocess("inspect-cache", "--context", "abc"), "use token counts")
    _one_line_error(cli_inprocess("inspect-cache", "--precision", "fp8"), "use exact or faithful")
    r = cli_inprocess("inspect-cache", "--budget", "40GiB", "--context", "1m")
    assert r.returncode == 0, r.stderr
    assert "1,048,576 tokens" in r.stdout and "model's maximum" in r.stdout
    r = cli_inprocess("inspect-cache", "--budget", "40GiB", "--context", "1m", "--json")
    fit = json.loads(r.stdout)[-1]
    assert fit["longest_context_tokens"] == FLASH_MAX and fit["capped_at_model_maximum"]
    assert fit["uncapped_tokens"] > FLASH_MAX


def test_budget_search_is_the_largest_context_that_fits():
    schema = CacheSchema.from_config(DSV4Config.flash(), "faithful")
    for text in ("2GiB", "500MiB", "3GB"):
        budget = parse_bytes(text)
        n = longest_context(schema, budget)
        assert 0 < n < FLASH_MAX
        assert schema.bytes_for_context(n)["total"] <= budget < schema.bytes_for_context(n + 1)["total"]
    fixed = schema.bytes_for_context(1)["total"]  # window + state + one block: the smallest cache
    assert longest_context(schema, fixed - 1) == 0
    assert longest_context(schema, 1 << 50, max_tokens=FLASH_MAX) == FLASH_MAX
    small = budget_report(schema, parse_bytes("2GiB"), FLASH_MAX)
    assert not small["capped_at_model_maximum"] and small["longest_context_tokens"] == small["uncapped_tokens"]
    assert parse_contexts("8k, 128k,1m,100,1.5k") == [8192, 131072, 1048576, 100, 1536]
    assert parse_bytes("1.5kB") == 1500 and parse_bytes("2MiB") == 2 << 20


def test_context_report_components_sum_and_plain_bf16():
    cfg = DSV4Config.pro()
    schema = CacheSchema.from_config(cfg, "faithful")
    rep = context_report(cfg, schema, 100_000)
    parts = ("fp8", "bf16", "scales", "fp4", "f32", "window", "state")
    assert rep["total_bytes"] == sum(sum(t[k] for k in parts) for t in rep["by_type"].values())
    assert sum(t["layers"] for t in rep["by_type"].values()) == cfg.num_hidden_layers
    assert rep["plain_bf16_bytes"] == plain_bf16_bytes(cfg, 100_000) == 4 * cfg.hidden_size * 61 * 100_000
    with pytest.raises(ValueError):
        context_report(cfg, schema, 0)


def test_plot_has_title_human_units_and_marks_context_and_budget(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from dsv4.cli import inspect_cache

    saved = {}
    real = Figure.savefig

    def keep(fig, path, **kw):
        saved["fig"] = fig
        return real(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    out = tmp_path / "p.png"
    inspect_cache._inspect("flash", None, "8k,200k", "faithful", "2GiB", out, True)
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    ax = saved["fig"].axes[0]
    assert "DeepSeek-V4-Flash" in ax.get_title() and "faithful" in ax.get_title()
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("8k:") for t in texts) and any(t.startswith("200k:") for t in texts)
    fit = longest_context(CacheSchema.from_config(DSV4Config.flash(), "faithful"), 2 << 30)
    assert any(f"{fit:,} tokens" in t and "2.0 GiB" in t for t in texts)
    fmt = ax.yaxis.get_major_formatter()
    assert fmt(3 << 30, 0) == "3.0 GiB" and ax.xaxis.get_major_formatter()(131072, 0) == "128k"
    lo, hi = ax.get_xlim()
    assert lo <= 8192 and hi >= FLASH_MAX


def test_plot_says_where_it_was_written(cli_inprocess, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    r = cli_inprocess("inspect-cache", "--context", "8k", "--plot", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stderr and out.stat().st_size > 5000


# ----------------------------------------------------------------- bench: closed forms
def _hand_weight_bytes(cfg) -> tuple[int, int]:
    """(layers, head+embedding) weight bytes one token reads, counted from the published formats."""
    d, V, n = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    head = 2 * d + 2 * V * d + 4 * d + 4 * (n * n * d + n + 1)  # embed row, head, norm, hc head fn/base/scale
    layers = 0
    for name, (_, shape) in tensor_shapes(cfg, mtp=False).items():
        if not name.startswith("layers.") or name.endswith("tid2eid"):
            continue
        numel = math.prod(shape)
        if ".ffn.experts." in name:  # MXFP4: half a byte per value + one scale byte per 32
            b = numel // 2 + numel // 32
            b = b * cfg.num_experts_per_tok / cfg.n_routed_experts
        elif any(k in name for k in ("wq_a", "wq_b", "wkv.", "wo_a", "wo_b", "shared_experts")) \
                and "compressor" not in name:  # FP8 + one byte per 128x128 block
            b = numel + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
        elif len(shape) == 2 and name.endswith(".weight") and "norm" not in name:  # BF16 linears
            b = 2 * numel
        else:  # F32 norms, hc tensors, ape, sinks, biases
            b = 4 * numel
        layers += b
    return int(round(layers)), head


def test_published_weight_bytes_closed_form():
    for cfg in (demo_config(), DSV4Config.flash()):
        w = B.published_weight_bytes(cfg)
        layers, head = _hand_weight_bytes(cfg)
        assert w["head_embed"] == head
        assert abs(w["layers"] - layers) <= cfg.num_hidden_layers  # integer division of the expert share
    cfg = demo_config()
    m = Model.from_state_dict(cfg, B.synthetic_stored(cfg, "cpu"), mode="faithful")
    assert B.weight_bytes_split(m) == B.published_weight_bytes(cfg)  # the closed form is what the tensors hold


def _hand_kv_bytes(n: int) -> int:
    """Cache bytes one decode step of the demo model reads at n cached tokens (faithful): layers
    SWA, CSA, HCA, CSA; D=96 (64 FP8 + 1 scale + 32 BF16 RoPE = 129 B), indexer keys 32 + 2 = 34 B,
    window 128, index_topk 8."""
    kv, key = 64 + 1 + 2 * 32, 64 // 2 + 64 // 32
    window = 4 * min(n, 128) * kv
    csa = 2 * ((n // 4) * key + min(n // 4, 8) * kv)
    hca = (n // 128) * kv
    return window + csa + hca


def test_decode_roofline_and_projection_follow_their_definitions():
    full = DSV4Config.flash()
    r = {"layers": 4, "median_s": 0.002, "head_embed_s": 0.0004, "weight_bytes_per_token": 3_000_000_000,
         "layer_weight_bytes_per_token": 2_000_000_000, "head_embed_bytes_per_token": 1_000_000_000,
         "kv_bytes_per_token": 1_000_000, "kv_seq_len": 1027}
    bw = 4e12
    x = B.decode_roofline(r, bw, full, "faithful")
    assert math.isclose(x["ms_per_layer"], (0.002 - 0.0004) / 4 * 1000)
    assert math.isclose(x["layer_floor_ms"], 2_001_000_000 / 4 / bw * 1000)
    assert math.isclose(x["layer_floor_ratio"], x["ms_per_layer"] / x["layer_floor_ms"])
    assert math.isclose(x["head_embed_floor_ratio"], 0.0004 / (1e9 / bw))
    assert math.isclose(x["projected_full_model_ms_per_token"], 0.4 + 0.4 * 43)
    w = B.published_weight_bytes(full)
    kv = B.kv_read_bytes(CacheSchema.from_config(full, "faithful").layers, 1027, full.index_topk)
    assert math.isclose(x["full_model_floor_ms_per_token"], (w["layers"] + w["head_embed"] + kv) / bw * 1000)
    assert math.isclose(x["projected_full_model_floor_ratio"],
                        x["projected_full_model_ms_per_token"] / x["full_model_floor_ms_per_token"])
    whole = B.decode_roofline({**r, "layers": 43}, bw, full, "faithful")
    assert "projected_full_model_ms_per_token" not in whole  # nothing to project when the model ran whole


# ----------------------------------------------------------------- bench: CLI runs
def test_bench_decode_on_cpu(cli_inprocess, demo_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setenv("DSV4_OVERLAP", "0")  # recorded with the result, as every DSV4_* setting
    r = cli_inprocess("bench", "decode", "--model", demo_checkpoint, "--device", "cpu", "--prompt-len", "150", "--steps", "4",
            "--warmup", "2", "--threads", "1", "--json-out", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "ms_per_layer" in r.stdout
    d = json.loads(out.read_text())
    assert d["p10_s"] <= d["median_s"] <= d["p90_s"] and d["runs"] == 4
    assert d["environment"]["torch_threads"] == 1 and d["environment"]["command"].startswith("dsv4 bench decode")
    assert d["environment"]["dsv4_settings"].get("DSV4_OVERLAP") == "0"
    layers, head = _hand_weight_bytes(demo_config())
    assert d["head_embed_bytes_per_token"] == head
    assert abs(d["layer_weight_bytes_per_token"] - layers) <= 4
    assert d["kv_seq_len"] == 152 and d["kv_bytes_per_token"] == _hand_kv_bytes(152)
    assert math.isclose(d["ms_per_layer"], (d["median_s"] - d["head_embed_s"]) * 1000 / 4, rel_tol=1e-9)
    bw = d["measured_bandwidth_bytes_per_s"]
    layer_bytes = d["layer_weight_bytes_per_token"] + d["kv_bytes_per_token"]
    assert math.isclose(d["layer_floor_ratio"], (d["median_s"] - d["head_embed_s"]) / (layer_bytes / bw),
                        rel_tol=1e-9)
    assert math.isclose(d["floor_ratio"], d["median_s"] / ((layer_bytes + head) / bw), rel_tol=1e-9)
    assert "projected_full_model_ms_per_token" not in d  # a checkpoint is timed whole
    # which implementation ran per op over the 2 warm-up + 4 timed steps: on the CPU the torch
    # references; the hc head once per step, mHC pre twice per layer (attention, FFN) per step
    assert all(set(v) == {"reference"} for v in d["kernels"].values())
    assert d["kernels"]["hc_head"] == {"reference": 6} and d["kernels"]["mhc_pre"] == {"reference": 2 * 4 * 6}
    assert {"linear", "routed_experts"} <= set(d["kernels"])


def test_bench_prefill_json_flag_and_flops(cli_inprocess, demo_checkpoint):
    r = cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--prompt-len", "64", "--runs", "2",
            "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)  # --json: nothing but the JSON on stdout
    cfg = demo_config()
    macs = 0  # the linears every token runs (the head: the last token only; the indexer's in its own count)
    for name, (kind, shape) in tensor_shapes(cfg, mtp=False).items():
        if kind in ("lin", "hc") and name not in ("head.weight", "hc_head_fn") and ".indexer.w" not in name:
            share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1
            macs += shape[0] * shape[1] * share
    parts = d["flops_breakdown"]
    assert parts["linear"] + parts["routed_experts"] == 2 * round(macs) * 64
    assert parts["head"] == 2 * cfg.vocab_size * cfg.hidden_size + 2 * cfg.hc_mult ** 2 * cfg.hidden_size
    assert d["flops"] == sum(parts.values()) and parts["attention"] > 0
    assert math.isclose(d["flop_per_s"], d["flops"] / d["median_s"], rel_tol=1e-9)
    assert math.isclose(d["matmul_rate_fraction"], d["flop_per_s"] / d["measured_matmul_flop_per_s"], rel_tol=1e-9)


def test_perplexity_matches_direct_computation(cli_inprocess, demo_checkpoint, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "t.txt").write_text(text)
    r = cli_inprocess("bench", "perplexity", "--model", demo_checkpoint, "--text", tmp_path / "t.txt", "--max-context", "100",
            "--device", "cpu", "--precision", "exact", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    tok = Tokenizer.from_dir(demo_checkpoint)
    ids = tok.encode(text)
    model = load_model(demo_checkpoint, mode="exact")
    nll, n = 0.0, 0
    for i in range(0, len(ids), 99):  # windows of 100: bos + 99 tokens
        w = [tok.bos_id] + ids[i:i + 99]
        logits = Session(model, 100).prefill(w, last_only=False)
        logp = torch.log_softmax(logits[:-1].double(), -1)
        nll -= logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
        n += len(w) - 1
    assert d["tokens"] == n == len(ids)
    assert math.isclose(d["perplexity"], math.exp(nll / n), rel_tol=1e-4)
    assert B.perplexity(model, ids, tok.bos_id, 100)["tokens"] == n


def test_perplexity_refuses_binary_and_non_utf8_text(cli, cli_inprocess, demo_checkpoint, tmp_path):
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    # in a real process: one line, exit 2, no traceback
    _one_line_error(cli("bench", "perplexity", "--model", demo_checkpoint, "--text", tmp_path / "b.bin"),
                    "binary file")
    _one_line_error(cli_inprocess("bench", "perplexity", "--model", demo_checkpoint, "--text", tmp_path / "latin1.txt"),
                    "not UTF-8 text (byte 3 is 0xe9)")


def test_bench_compare_transformers_runs_the_same_weights(cli_inprocess, demo_checkpoint):
    pytest.importorskip("transformers")
    r = cli_inprocess("bench", "decode", "--model", demo_checkpoint, "--device", "cpu", "--precision", "exact",
            "--prompt-len", "140", "--steps", "3", "--warmup", "1", "--compare", "transformers", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["compare_against"] == "transformers" and d["compare_median_s"] > 0
    assert math.isclose(d["compare_speed_ratio"], d["compare_median_s"] / d["median_s"], rel_tol=1e-9)
    # same weights, same prompt: transformers' last-token logits equal ours
    assert d["compare_max_abs_logit_diff_on_prompt"] <= 1e-4 * d["compare_max_abs_logit"]


def test_bench_compare_reference_and_bad_values(cli_inprocess, demo_checkpoint):
    r = cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--prompt-len", "64", "--runs", "2",
            "--compare", "reference", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["compare_against"] == "reference"
    assert math.isclose(d["compare_speed_ratio"], d["compare_median_s"] / d["median_s"], rel_tol=1e-9)
    _one_line_error(cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--compare", "vllm"),
                    "use reference, transformers or eager")
    _one_line_error(cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--compare", "eager"),
                    "applies to decode")
    _one_line_error(cli_inprocess("bench", "decode", "--model", demo_checkpoint, "--device", "cpu", "--compare", "eager"),
                    "needs a CUDA device")
    _one_line_error(cli_inprocess("bench", "decode", "--model", demo_checkpoint, "--device", "cpu", "--threads", "0"),
                    "--threads 0")
    _one_line_error(cli_inprocess("bench", "decode", "--model", demo_checkpoint, "--layers", "2"), "applies to --preset")
    _one_line_error(cli_inprocess("bench", "decode", "--preset", "flash", "--synthetic", "--layers", "44", "--device", "cpu"),
                    "between 1 and 43")


# ----------------------------------------------------------------- CLI edge
def test_default_threads_leave_busy_cores_alone():
    assert default_threads(cores=2, load=0.4) == 2
    assert default_threads(cores=2, load=1.3) == 1  # one core busy elsewhere
    assert default_threads(cores=2, load=6.0) == 1  # never below one
    assert default_threads(cores=16, load=3.0) == 13
    import os

    assert 1 <= physical_cores() <= os.cpu_count()


def test_progress_speaks_only_when_quiet_for_long():
    quiet = io.StringIO()
    with Progress("t", after=5.0, stream=quiet) as p:
        p("prefill 10 tokens")
        p("decode step 1/2")
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    with Progress("t", after=0.3, stream=loud) as p:
        p("prefill 512 tokens")
        deadline = time.monotonic() + 30
        while "prefill" not in loud.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        p("decode step 1/32")
        while "step 1/32" not in loud.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = loud.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("prefill 512 tokens") and lines[1].endswith("decode step 1/32")


def test_cpu_slow_warning_for_real_dimensions_only():
    assert "minutes" in B.cpu_slow_warning(DSV4Config.flash().layer_range(0, 1), "cpu")
    assert B.cpu_slow_warning(demo_config(), "cpu") is None
    assert B.cpu_slow_warning(DSV4Config.flash().layer_range(0, 1), "cuda") is None


def test_help_shows_no_type_for_flags_and_every_bench_option_has_help(cli_inprocess):
    import typer.main

    from dsv4.cli.main import app

    root = typer.main.get_command(app)
    bench = root.commands["bench"]
    for name, cmd in bench.commands.items():
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option" and p.name != "help":
                assert p.help, f"bench {name} {p.opts} has no help"
    for args in (["bench", "decode", "--help"], ["inspect-cache", "--help"], ["convert", "--help"], ["--help"]):
        r = cli_inprocess(*args, env={"COLUMNS": "160"})
        assert r.returncode == 0, r.stderr
        assert "<bool>" not in r.stdout and "{src}" not in r.stdout, r.stdout
    r = cli_inprocess("convert", "--help", env={"COLUMNS": "160"})
    assert "convert [OPTIONS] SRC DST" in r.stdout
    r = cli_inprocess("bench", "decode", "--help", env={"COLUMNS": "160"})
    assert "--json-out" in r.stdout and "--threads" in r.stdout


def test_missing_test_dependency_skips_locally_and_fails_in_ci(monkeypatch):
    from conftest import import_or_skip

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        import_or_skip("dsv4_no_such_test_dependency")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        import_or_skip("dsv4_no_such_test_dependency")
    assert import_or_skip("json") is json


def test_inspect_cache_model_faithful_rule_names_the_way_out(cli_inprocess, tmp_path):
    cfg = demo_config().replace(head_dim=80)  # 80 - 32 RoPE = 48 channels: not FP8 64-groups
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg.to_dict()))
    _one_line_error(cli_inprocess("inspect-cache", "--model", tmp_path / "m", "--context", "1k"),
                    "use --precision exact for this model")
    r = cli_inprocess("inspect-cache", "--model", tmp_path / "m", "--context", "1k", "--precision", "exact", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["by_type"]["swa"]["bytes_per_entry"]["f32"] == 4 * 80


def test_bench_decode_mtp_reports_identical_tokens_and_draft_counts(cli_inprocess):
    """--mtp on the built-in model (it has a trained MTP layer): plain and MTP greedy decoding in one
    run give the same tokens; every round emits accepted + 1 tokens."""
    from dsv4.cli.common import builtin_model_dir

    r = cli_inprocess("bench", "decode", "--model", str(builtin_model_dir()), "--device", "cpu", "--prompt-len", "24",
                      "--steps", "6", "--warmup", "1", "--mtp", "--mtp-acceptance", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["identical"] is True and out["new_tokens"] == 6
    assert out["mtp_steps"] + out["mtp_accepted"] >= 5 and out["mtp_accepted"] <= out["mtp_drafted"]
    assert out["projected_acceptance"] == 0.5
    v, m, f = out["verify_ms"], out["mtp_step_ms"], out["mtp_feed_ms"] or out["mtp_step_ms"]
    assert out["projected_tokens_per_s"] == pytest.approx(1.5 / ((v + m + 0.5 * f) / 1000), rel=1e-6)
    bad = cli_inprocess("bench", "decode", "--model", str(builtin_model_dir()), "--mtp-acceptance", "0.5")
    assert bad.returncode == 2 and "needs --mtp" in bad.stderr


@pytest.mark.parametrize("args,message", [
    (["--compare", "DSV4_PDL"], "is not VAR=VALUE"),
    (["--compare", "DSV4_PDL=0+=1"], "is not VAR=VALUE"),
    (["--compare", "DSV4_PDL=0", "--trace"], "--compare and --trace are two separate runs"),
])
def test_profile_decode_refuses_bad_settings_before_any_work(args, message, tmp_path):
    """bench/profile_decode.py --compare: a malformed setting (or --trace beside it) is one usage
    line and exit 2, before a model is built or a GPU is asked for (so it runs here on the CPU)."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "profile_decode.py"
    r = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr

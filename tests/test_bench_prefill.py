"""dsv4 bench prefill (#15 items 1/5, #18 item 4): the FLOP count against a hand count, the chunked path
and the memory and profile fields on the CPU, the one-line errors of its option combinations, and on a
GPU the peak memory beyond the weights and the cache and the per-kernel profile. The run over two gloo
ranks is in tests/test_parallel.py."""

import json
import math

import pytest

from dsv4.engine.model.model import Model
from dsv4.engine.tools import bench as B
from dsv4.engine.tools.synthetic import demo_config, random_tensors, tiny_configs

TINY = tiny_configs()["swa-csa-hca"]  # layers SWA, CSA (m 4), HCA (m 128), CSA; W 128, topk 8


def _one_line_error(r, text):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert text in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_prefill_flops_hand_count():
    """300 tokens of the tiny config (x = t + 1 = 1..300 tokens seen by query t), counted by hand:
    window keys per layer: 1 + ... + 128 + 172 x 128 = 8256 + 22016 = 30272, 4 layers;
    HCA (m 128): x = 128..255 see 1 entry, 256..300 see 2: 128 + 90 = 218;
    CSA (m 4, topk 8): x = 4k..4k+3 see k entries for k = 1..7 (4 x 28 = 112), x = 32..300 see 8
    (269 x 8 = 2152): 2264 per CSA layer, 2 layers;
    indexer: the queries seeing more than 8 entries, x = 36..300 (265 queries): entries 4 x (9 + ... +
    74) + 75 = 10956 + 75 = 11031 per CSA layer."""
    c, P = TINY, 300
    f = B.prefill_flops(c, P)
    assert f["attended_keys"] == {"window": 4 * 30272, "hca": 218, "csa": 2 * 2264}
    assert f["indexer_scored_entries"] == 2 * 11031
    H, D, Hi, Di, q, d = 4, 96, 2, 64, 32, 64
    assert f["attention"] == 4 * H * D * (4 * 30272 + 218 + 2 * 2264)
    assert f["indexer"] == 2 * Hi * Di * 2 * 11031 + 2 * (2 * 265) * (Hi * Di * q + Hi * d)
    # the linears one token runs, by hand from the config (d 64, q_lora 32, H x D 4 x 96, 2 groups x 16,
    # 8 experts of 32 (3 per token) + 1 shared, hc 4: the mHC mixing matrices (2 + 4) x 4 by 4 x 64)
    G, R, E, I, n = 2, 16, 8, 32, 4
    per_layer = (q * d + H * D * q + D * d + G * R * (H * D // G) + d * G * R + E * d + 3 * I * d
                 + 2 * (2 + n) * n * n * d)
    compressors = 2 * (2 * D * d) * 2 + 2 * (D * d) + 2 * (2 * Di * d) * 2  # CSA x2 (+ indexer's), HCA
    assert f["linear"] == 2 * P * (4 * per_layer + compressors)
    assert f["routed_experts"] == 2 * P * 4 * 3 * (3 * I * d)
    assert f["head"] == 2 * (97 * d + n * n * d)  # the last token only
    assert f["total"] == sum(f[k] for k in ("linear", "routed_experts", "head", "attention", "indexer"))


@pytest.mark.parametrize("P", [1, 3, 4, 31, 35, 36, 127, 128, 129, 300, 515, 1000])
def test_prefill_flops_closed_forms_equal_a_loop(P):
    for cfg in tiny_configs().values():
        cfg = cfg.replace(sliding_window=7)
        f = B.prefill_flops(cfg, P)
        keys, scored = {"window": 0, "hca": 0, "csa": 0}, 0
        for spec in cfg.schedule():
            for x in range(1, P + 1):
                keys["window"] += min(x, 7)
                n = x // spec.ratio if spec.ratio else 0
                if spec.attn == "hca":
                    keys["hca"] += n
                elif spec.attn == "csa":
                    keys["csa"] += min(n, cfg.index_topk)
                    scored += n if n > cfg.index_topk else 0
        assert f["attended_keys"] == keys and f["indexer_scored_entries"] == scored


def test_prefill_linear_count_is_the_models_weights():
    """The closed form's per-token linear and expert weights are those the loaded model holds (its
    linears and mHC matrices, k of the routed experts), less the head, the indexer's projections and
    the MTP layer (not run by a prefill)."""
    from dsv4.kernels import QWeight

    m = Model.from_state_dict(TINY, random_tensors(TINY, seed=1), mode="exact")
    dense = experts = 0
    for name, v in m.w.items():
        if name == "head" or name.startswith("mtp.") or name.endswith(("indexer.wq_b", "indexer.weights_proj")):
            continue
        if isinstance(v, QWeight):
            if ".ffn.experts." in name:
                experts += v.shape[0] * v.shape[1]
            else:
                dense += v.shape[0] * v.shape[1]
        elif name.endswith(("hc_attn_fn", "hc_ffn_fn")):
            dense += v.numel()
    f = B.prefill_flops(TINY, 10)
    assert f["linear"] == 2 * 10 * dense
    assert f["routed_experts"] == 2 * 10 * experts * 3 // 8


def test_bench_prefill_chunk_memory_and_profile_on_cpu(cli_inprocess, demo_checkpoint):
    r = cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--prompt-len", "200",
                      "--runs", "2", "--warmup", "0", "--threads", "1", "--prefill-chunk", "64", "--profile", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["prefill_chunk"] == 64 and d["prefill_chunks"] == 4 and d["prefill_chunk_source"] == "--prefill-chunk"
    f = B.prefill_flops(demo_config(), 200)
    assert d["flops"] == f["total"] and d["flops_breakdown"]["attention"] == f["attention"]
    assert "4 x H x D" in d["flops_formula"] and "topk=8" in d["flops_formula"]
    assert math.isclose(d["matmul_rate_fraction"], d["flops"] / d["median_s"] / d["measured_matmul_flop_per_s"],
                        rel_tol=1e-9)
    assert d["peak_device_bytes"] is None and d["peak_beyond_weights_and_cache_bytes"] is None  # CPU
    assert d["weight_bytes"] > 10 * d["cache_bytes"] > 0
    assert d["profile_by"] == "cpu ops" and 0 < len(d["profile"]) <= B.PROFILE_ROWS
    shares = [p["share"] for p in d["profile"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert any(p["name"] in ("aten::mm", "aten::bmm", "aten::matmul") for p in d["profile"])
    # the same prompt through one whole chunk: the same next token (chunked prefill == unchunked)
    whole = cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--prompt-len", "200",
                          "--runs", "1", "--warmup", "0", "--threads", "1", "--prefill-chunk", "256", "--json")
    w = json.loads(whole.stdout)
    assert w["prefill_chunks"] == 1 and w["greedy_next_token"] == d["greedy_next_token"]
    assert "profile" not in w
    # the default: the engine's own choice (a multiple of 128 within its bounds)
    auto = cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--prompt-len", "16",
                         "--runs", "1", "--warmup", "0", "--threads", "1")
    assert auto.returncode == 0, auto.stderr
    assert "default_prefill_chunk" in auto.stdout and "where the time goes" not in auto.stdout
    assert "flops_breakdown linear" in auto.stdout


def test_bench_prefill_profile_table_in_human_output(cli_inprocess, demo_checkpoint):
    r = cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--prompt-len", "16",
                      "--runs", "1", "--warmup", "0", "--threads", "1", "--profile")
    assert r.returncode == 0, r.stderr
    assert "where the time goes (cpu ops" in r.stdout and "aten::" in r.stdout


def test_bench_prefill_option_errors(cli_inprocess, demo_checkpoint):
    d = str(demo_checkpoint)
    for args, msg in (
            (("--model", d, "--device", "cpu", "--prefill-chunk", "0"), "--prefill-chunk must be >= 1"),
            (("--preset", "flash", "--synthetic", "--gpus", "auto"), "plans a checkpoint"),
            (("--preset", "flash", "--device", "cpu", "--ranks", "2"), "--preset flash|pro --synthetic"),
            (("--model", d, "--device", "cpu", "--ranks", "2", "--compare", "reference"), "drop it, or drop"),
            (("--model", d, "--device", "cpu", "--ranks", "2", "--layers", "2"), "not both"),
            (("--model", d, "--ranks", "2"), "add --device cpu"),
            (("--model", d, "--device", "cpu", "--gpus", "2"), "drop --device cpu"),
            (("--model", d, "--device", "cpu", "--ranks", "0"), "use 1 or more"),
            (("--model", d + "-missing", "--device", "cpu", "--ranks", "2"), "no such folder")):
        _one_line_error(cli_inprocess("bench", "prefill", *args), msg)


def test_bench_prefill_one_rank_is_the_single_device_path(cli_inprocess, demo_checkpoint):
    r = cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cpu", "--ranks", "1",
                      "--prompt-len", "8", "--runs", "1", "--warmup", "0", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert "ranks" not in json.loads(r.stdout)


@pytest.mark.gpu
def test_bench_prefill_gpu_memory_and_kernel_profile(cli_inprocess, demo_checkpoint):
    """On a GPU: the peak during the prefill is at least the weights + cache resident before it, the
    part beyond them is positive and bounded by the raw peak, and the profile names device kernels."""
    r = cli_inprocess("bench", "prefill", "--model", demo_checkpoint, "--device", "cuda", "--prompt-len", "600",
                      "--runs", "2", "--prefill-chunk", "256", "--profile", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    beyond, peak = d["peak_beyond_weights_and_cache_bytes"], d["peak_device_bytes"]
    assert 0 < beyond < peak and peak - beyond >= d["weight_bytes"] + d["cache_bytes"]
    assert d["profile_by"] == "device kernels" and d["profile"] and d["profile_total_s"] > 0
    assert not any(p["name"].startswith("aten::") for p in d["profile"]), d["profile"][:3]


@pytest.mark.gpu
def test_simulate_rank_takes_warmup_and_no_cuda_graph(cli_inprocess):
    r = cli_inprocess("bench", "decode", "--preset", "flash", "--synthetic", "--layers", "1", "--simulate-rank", "0/2",
                      "--steps", "2", "--warmup", "1", "--prompt-len", "16", "--no-cuda-graph", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["cuda_graph"] is False and d["decode_tokens"] == 2 and d["kv_seq_len"] == 17  # 16 + 1 warm-up

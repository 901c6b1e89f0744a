"""Argument errors of the bench scripts that need a GPU to run: caught before any device work,
one error line, exit 2 (argparse's)."""

import subprocess
import sys
from pathlib import Path

import pytest

PROFILE = Path(__file__).resolve().parents[1] / "bench" / "profile_decode.py"


@pytest.mark.parametrize("args,message", [(["--tokens", "0"], "--tokens: 1 to 16"),
                                          (["--tokens", "17"], "--tokens: 1 to 16"),
                                          (["--tokens", "2", "--trace"], "--tokens goes with the default table only")])
def test_profile_decode_refuses_bad_token_counts(tmp_path, args, message):
    r = subprocess.run([sys.executable, str(PROFILE), *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == f"profile_decode.py: error: {message}"


def test_profile_decode_refuses_a_bad_table_setting_before_building(tmp_path):
    r = subprocess.run([sys.executable, str(PROFILE), "--compare", "DSV4_PDL=1,mhc.DECODE.nope=2"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith("profile_decode.py: error: --compare: mhc.DECODE has no key 'nope'")


@pytest.mark.parametrize("args,message", [
    (["--compare", "base"], "compare_prefill.py: --compare: 'base' is not VAR=VALUE[+VAR=VALUE...]"),
    (["--compare", "mhc.TILE.nope=1"], "compare_prefill.py: --compare: mhc.TILE has no key 'nope'"),
    (["--compare", "base=0", "--runs", "0"], "compare_prefill.py: --runs, --prompt-len and --layers must be at least 1"),
    (["--compare", "base=0", "--layers", "0"], "compare_prefill.py: --runs, --prompt-len and --layers must be at least 1")])
def test_compare_prefill_refuses_bad_settings_first(tmp_path, args, message):
    r = subprocess.run([sys.executable, str(PROFILE.with_name("compare_prefill.py")), *args], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.strip().splitlines()[-1].startswith(message)


@pytest.mark.parametrize("args,message", [(["--chunk", "6400,x"], "--chunk '6400,x': give positive token counts or auto"),
                                          (["--chunk", "0"], "--chunk '0': give positive token counts or auto"),
                                          (["--chunk", ""], "--chunk '': give positive token counts or auto"),
                                          (["--runs", "0"], "--runs must be at least 1"),
                                          (["--prompt-lens", "8k"], "--prompt-lens '8k': give token counts"),
                                          (["--layers", "0"], "--layers and every --prompt-lens must be at least 1")])
def test_prefill_long_refuses_bad_chunks_and_runs_first(tmp_path, args, message):
    r = subprocess.run([sys.executable, str(PROFILE.with_name("prefill_long.py")), *args], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith(f"prefill_long.py: error: {message}")


@pytest.mark.parametrize("args", [["--only", "attention", "--rows", "64"], ["--only", "gemm", "--rows", "0"]])
def test_tune_prefill_refuses_bad_rows_first(tmp_path, args):
    r = subprocess.run([sys.executable, str(PROFILE.with_name("tune_prefill.py")), *args], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == "tune_prefill.py: error: --rows: a positive count, for gemm / dense / experts / staged / mhc / router"


def test_prefill_long_reads_chunk_lists():
    sys.path.insert(0, str(PROFILE.parent))
    try:
        from prefill_long import parse_chunks
    finally:
        sys.path.remove(str(PROFILE.parent))
    assert parse_chunks(None) == [None] and parse_chunks("auto, 8192,16384") == [None, 8192, 16384]


@pytest.mark.parametrize("script", ["sync_points.py", "prefill_long.py", "tune_prefill.py"])
def test_gpu_scripts_need_cuda(tmp_path, script):
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = subprocess.run([sys.executable, str(PROFILE.with_name(script))], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"{script}: needs a CUDA device"]


def test_sync_points_refuses_zero_layers(tmp_path):
    r = subprocess.run([sys.executable, str(PROFILE.with_name("sync_points.py")), "--layers", "0"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == "sync_points.py: --layers and --prompt-len must be at least 1"


def _run_tuned():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_tuned", PROFILE.with_name("run_tuned.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_tuned_picks_the_least_summed_gemv_setting_within_the_bound():
    rt = _run_tuned()
    rows = [{"weight": w, "N": 1, "K": 1, **alt, "us": us, "GB_per_s": 1.0, "max_rel_err": err}
            for w, alt, us, err in [("a", {}, 10.0, 0.0), ("b", {}, 10.0, 0.0),
                                    ("a", {"warps": 8}, 4.0, 1e-7), ("b", {"warps": 8}, 12.0, 1e-7),
                                    ("a", {"prefetch": 1}, 5.0, 0.0), ("b", {"prefetch": 1}, 9.0, 0.0),
                                    ("a", {"programs": 9}, 1.0, 0.0), ("b", {"programs": 9}, 1.0, 1e-3)]]
    # warps=8 sums to 16, prefetch to 14; programs=9 is fastest but out of bound on one weight
    assert rt.best_gemv(rows) == {"prefetch": 1}
    assert rt.best_gemv([]) == {}
    # an alternative not run on weight "c" counts the defaults' time there (here 20): warps=8 16 + 20
    rows += [{"weight": "c", "N": 1, "K": 1, **alt, "us": us, "GB_per_s": 1.0, "max_rel_err": 0.0}
             for alt, us in [({}, 20.0), ({"prefetch": 1}, 30.0)]]
    assert rt.best_gemv(rows) == {"warps": 8}


@pytest.mark.parametrize("flag", ["--gemv", "--mhc"])
def test_run_tuned_refuses_a_missing_result(tmp_path, flag):
    r = subprocess.run([sys.executable, str(PROFILE.with_name("run_tuned.py")), flag, "nope.json", "--", "--help"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "run_tuned: cannot read a tune result" in r.stderr


def test_run_tuned_merge_width_by_summed_time_within_bound():
    rt = _run_tuned()
    rows = [{"merge": m, "entries": T, "us": us, "rel_err": err}
            for m, T, us, err in [(512, 512, 8.0, 1e-7), (512, 16, 4.0, 1e-7), (128, 512, 5.0, 1e-7),
                                  (128, 16, 4.5, 1e-7), (64, 512, 3.0, 1e-7), (64, 16, 3.0, 1e-3)]]
    assert rt.best_merge(rows) == {"merge": 128}


@pytest.mark.parametrize("value,message", [
    ("mhc.TILE.rows", "run_tuned: --set wants MODULE.TABLE.KEY=JSON"),
    ("mhc.rows=64", "run_tuned: --set wants MODULE.TABLE.KEY=JSON"),
    ("nomodule.TILE.rows=64", "run_tuned: --set: no kernel module"),
    ("mhc.MAX_ROWS.x=1", "run_tuned: --set: mhc.MAX_ROWS is not a settings table"),
    ("mhc.TILE.nope=1", "run_tuned: --set: mhc.TILE has no key 'nope'"),
    ("mhc.TILE.rows={bad", "run_tuned: --set mhc.TILE.rows: the value is not JSON"),
    ("mhc.TILE.rows=true", "run_tuned: --set mhc.TILE.rows: int wanted")])
def test_run_tuned_refuses_a_bad_setting(tmp_path, value, message):
    r = subprocess.run([sys.executable, str(PROFILE.with_name("run_tuned.py")), "--set", value, "--", "--help"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.strip().splitlines()[-1].startswith(message)


def test_run_tuned_best_tile_fastest_within_bound():
    rt = _run_tuned()
    table = {"rows": 32, "k": 128, "warps": 4}
    rows = [{"op": "x", "ms": 0.5, "max_rel_diff": 1e-7},
            {"op": "x", "rows": 64, "k": 64, "warps": 8, "ms": 0.2, "max_rel_diff": 1e-3},  # fast but wrong
            {"op": "x", "rows": 128, "k": 32, "warps": 8, "ms": 0.3, "max_rel_diff": 2e-6},
            {"op": "x", "rows": 16, "error": "OutOfResources"}]
    assert rt.best_tile(rows, table) == {"rows": 128, "k": 32, "warps": 8}
    assert rt.best_tile(rows[:1], table) == {} and rt.best_tile([], table) == {}


def test_run_tuned_setting_names_a_table_entry():
    rt = _run_tuned()
    from dsv4.kernels.triton import linear, mhc

    table, key, value = rt.parse_setting("mhc.TILE.rows=64")
    assert table is mhc.TILE and key == "rows" and value == 64
    table, key, value = rt.parse_setting("linear.GEMV.prefetch_below=12582912")
    assert table is linear.GEMV and key == "prefetch_below" and value == 12582912


def test_run_tuned_best_attention_least_summed_over_kinds():
    rt = _run_tuned()
    table = {"heads_bf16": 64, "keys": 64, "warps": 8, "stages_bf16": 1}
    base = dict(table)
    small = dict(table, keys=16, stages_bf16=2)
    mid = dict(table, keys=32, stages_bf16=2)
    broken = dict(table, keys=16, warps=4)
    rows = [{"attn": a, **alt, "ms": ms, "tflops": 1.0, "max_rel_diff": 1e-3}
            for alt, times in [(base, (4.0, 1.0, 0.8)), (small, (2.0, 1.2, 0.9)), (mid, (1.5, 2.5, 1.5))]
            for a, ms in zip(("csa", "hca", "swa"), times)]
    # broken is fastest where it ran but failed on swa; mid is fastest on csa alone
    rows += [{"attn": "csa", **broken, "ms": 0.1}, {"attn": "hca", **broken, "ms": 0.1},
             {"attn": "swa", **broken, "error": "OutOfResources: shared memory"}]
    assert rt.best_attention(rows, table) == small
    # an alternative that never ran on one kind is out too (then mid's 5.5 beats base's 5.8)
    assert rt.best_attention([r for r in rows if not (r["keys"] == 16 and r["attn"] == "hca")], table) == mid
    assert rt.best_attention([], table) == {}


def test_run_tuned_print_gives_the_changed_settings(tmp_path):
    from dsv4.kernels.triton import prefill_attention, prefill_experts

    committed = dict(prefill_experts.TILE)
    other = dict(committed, m=committed["m"] * 2)
    (tmp_path / "experts.json").write_text(__import__("json").dumps({"results": [
        {"op": "experts mxfp4", **committed, "ms": 12.0, "max_rel_diff": 0.0},
        {"op": "experts mxfp4", **other, "ms": 10.0, "max_rel_diff": 0.0}]}))
    att = dict(prefill_attention.TILE)
    (tmp_path / "attention.json").write_text(__import__("json").dumps({"results": [
        {"attn": a, **att, "ms": 1.0, "max_rel_diff": 0.0} for a in ("csa", "hca", "swa")]}))
    r = subprocess.run([sys.executable, str(PROFILE.with_name("run_tuned.py")), "--experts", "experts.json",
                        "--attention", "attention.json", "--print"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"prefill_experts.TILE.m={committed['m'] * 2}"
    r = subprocess.run([sys.executable, str(PROFILE.with_name("run_tuned.py")), "--attention", "attention.json",
                        "--print"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "base=1"


def test_kernel_registers_refuses_zero_layers(tmp_path):
    r = subprocess.run([sys.executable, str(PROFILE.with_name("kernel_registers.py")), "--layers", "0"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == \
        "kernel_registers.py: --layers and --prompt-len must be at least 1, --steps at least 0"

"""bench/pick_tile.py: the tune's winner (chosen as bench/run_tuned.py chooses) goes into a module's
TILE assignment; bad inputs give one line on stderr, a non-zero exit and leave the module as it was."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "pick_tile.py"
MODULE = 'X = 1\nTILE = {"m": 128, "k": 32, "asm": False}\nY = 2\n'


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_fastest_alternative_goes_into_tile(tmp_path):
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"results": [
        {"m": 64, "k": 64, "asm": True, "ms": 5.0, "tflops": 1.0, "max_rel_diff": 0.0},
        {"m": 32, "k": 32, "asm": True, "ms": 3.0, "tflops": 2.0, "warps": 4, "max_rel_diff": 1e-7},
        {"m": 8, "k": 32, "asm": True, "ms": 1.0, "tflops": 6.0, "max_rel_diff": 1e-3},  # fast, out of bound
        {"m": 16, "error": "OutOfResources"}]}))
    mod = tmp_path / "m.py"
    mod.write_text(MODULE)
    r = _run(res, mod, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert mod.read_text() == 'X = 1\nTILE = {"m": 32, "k": 32, "asm": True}\nY = 2\n'


def test_bad_inputs_one_line_and_module_unchanged(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text(MODULE)
    failed = tmp_path / "f.json"
    failed.write_text(json.dumps({"results": [{"m": 16, "error": "OutOfResources"}]}))
    no_tile = tmp_path / "n.py"
    no_tile.write_text("X = 1\n")
    good = tmp_path / "g.json"
    good.write_text(json.dumps({"results": [{"m": 64, "ms": 1.0, "tflops": 1.0, "max_rel_diff": 0.0}]}))
    for args, words in [((tmp_path / "missing.json", mod), "cannot read"), ((failed, mod), "no alternative"),
                        ((good, no_tile), "no TILE assignment"), ((good,), "usage")]:
        r = _run(*args, cwd=tmp_path)
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert mod.read_text() == MODULE and no_tile.read_text() == "X = 1\n"


def test_multi_line_tile_and_attention_tune(tmp_path):
    """A TILE written over several lines is replaced whole (wrapped again at 120 columns); an attention
    tune's winner is the least time summed over the attention kinds."""
    mod = tmp_path / "m.py"
    mod.write_text('X = 1\nTILE = {"heads_bf16": 64, "keys": 64,\n        "stages_bf16": 1, "warps": 8}\nY = 2\n')
    res = tmp_path / "a.json"
    res.write_text(json.dumps({"results": [
        {"attn": a, "heads_bf16": 64, "keys": keys, "stages_bf16": st, "warps": 8, "ms": ms, "max_rel_diff": 1e-3}
        for keys, st, times in [(64, 1, (4.0, 1.0, 1.0)), (16, 2, (2.0, 1.5, 1.2)), (32, 2, (1.0, 3.0, 3.0))]
        for a, ms in zip(("csa", "hca", "swa"), times)]}))
    r = _run(res, mod, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert mod.read_text() == 'X = 1\nTILE = {"heads_bf16": 64, "keys": 16, "stages_bf16": 2, "warps": 8}\nY = 2\n'
    long = {f"key_number_{i}": i for i in range(12)}
    mod.write_text("TILE = " + repr(long) + "\n")
    res.write_text(json.dumps({"results": [{**long, "key_number_3": 33, "ms": 1.0, "max_rel_diff": 0.0}]}))
    r = _run(res, mod, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = mod.read_text()
    assert all(len(line) <= 120 for line in text.splitlines()) and len(text.splitlines()) > 1
    ns = {}
    exec(text, ns)
    assert ns["TILE"] == {**long, "key_number_3": 33}

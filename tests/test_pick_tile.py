"""bench/pick_tile.py: the fastest tune result goes into a module's TILE line; bad inputs give one
line on stderr, a non-zero exit and leave the module as it was."""

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
    res.write_text(json.dumps({"results": [{"m": 64, "k": 64, "asm": True, "ms": 5.0, "tflops": 1.0},
                                           {"m": 32, "k": 32, "asm": True, "ms": 3.0, "tflops": 2.0, "warps": 4},
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
    good.write_text(json.dumps({"results": [{"m": 64, "ms": 1.0, "tflops": 1.0}]}))
    for args, words in [((tmp_path / "missing.json", mod), "cannot read"), ((failed, mod), "no alternative ran"),
                        ((good, no_tile), "no TILE line"), ((good,), "usage")]:
        r = _run(*args, cwd=tmp_path)
        assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert mod.read_text() == MODULE and no_tile.read_text() == "X = 1\n"

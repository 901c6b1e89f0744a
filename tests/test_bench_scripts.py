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

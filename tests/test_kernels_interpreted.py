"""The Triton kernels, checked on the CPU through Triton's interpreter (skipped without triton).

CI has no GPU; this keeps every kernel's arithmetic under test there. The GPU tests
(tests/test_gpu_kernels.py) check the same kernels compiled, on the device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import import_or_skip

import_or_skip("triton")  # skipped without it, a failure in CI (CI=true)
SCRIPT = Path(__file__).with_name("interpreted_kernels.py")
ROOT = SCRIPT.parents[1]


@pytest.mark.parametrize("group", ["gemv", "router", "experts", "attention", "compress", "elementwise", "engine",
                                   "prefill", "indexer"])
def test_triton_kernels_match_references_in_the_interpreter(group):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(SCRIPT), group], capture_output=True, text=True, env=env, timeout=1800)  # a hang guard
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") >= 1

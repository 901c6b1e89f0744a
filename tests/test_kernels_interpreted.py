"""The Triton kernels, checked on the CPU through Triton's interpreter (skipped without triton).

CI has no GPU; this keeps every kernel's arithmetic under test there. The GPU tests
(tests/test_gpu_kernels.py) check the same kernels compiled, on the device. Each group runs in a
process of its own (tests/interpreted_kernels.py GROUP); the groups start together, as many at a
time as there are CPUs, so the interpreter's single-threaded work uses every core."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import import_or_skip

import_or_skip("triton")  # skipped without it, a failure in CI (CI=true)
SCRIPT = Path(__file__).with_name("interpreted_kernels.py")
ROOT = SCRIPT.parents[1]
# the slowest first, so the last to finish is a short one
GROUPS = ["experts", "engine", "prefill", "gemv", "elementwise", "indexer", "attention", "compress", "router"]


def _run(group: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), group], capture_output=True, text=True, env=env,
                          timeout=1800)  # a hang guard


@pytest.fixture(scope="module")
def runs():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, min(len(GROUPS), cpus))) as pool:
        yield {g: pool.submit(_run, g) for g in GROUPS}


@pytest.mark.parametrize("group", GROUPS)
def test_triton_kernels_match_references_in_the_interpreter(runs, group):
    r = runs[group].result()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") >= 1

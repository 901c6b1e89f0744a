"""kernels/triton/staged_experts.stageable (torch ops only, CPU): which expert sets the FP8 staging
takes (their values exact in e4m3 after staging) and which stay on the grouped GEMM. The staging
kernels themselves run in the interpreter checks (tests/interpreted_kernels.py staged_experts_checks)
and on the GPU (tests/test_gpu_prefill.py)."""

import pytest
import torch

from kernel_cases import expert_set

st = pytest.importorskip("dsv4.kernels.triton.staged_experts")


def _set(fmt="mxfp4", inter=128, d=256):
    return expert_set(fmt, 3, inter, d, torch.Generator().manual_seed(1))


def test_quantised_weights_stage():
    assert st.stageable(_set())


@pytest.mark.parametrize("fmt,inter,d", [("nvfp4", 128, 256), ("mxfp4", 96, 256), ("mxfp4", 128, 192)])
def test_other_formats_and_shapes_do_not(fmt, inter, d):
    assert not st.stageable(_set(fmt, inter, d))


@pytest.mark.parametrize("below,zero,ok", [(14, False, True), (15, False, False), (15, True, True), (60, True, True)])
def test_a_group_far_below_its_block(below, zero, ok):
    """A 32-column group `below` binades under the largest MX byte of its 128 x 128 block: exact down to
    14 (e4m3's least subnormal); further only when the group holds no non-zero value."""
    es = _set()
    w = es.w3[1]
    sc = w.scale.view(torch.uint8)
    sc[0:128, 4:8] = 120
    sc[3, 4] = 120 + below if below <= 14 else 120
    sc[9, 6] = 120 - (0 if below <= 14 else below)
    if zero:
        w.data.view(torch.uint8)[9, 96:112] = 0
    assert st.stageable(es) is ok


def test_the_answer_is_kept_per_set():
    es = _set()
    assert st.stageable(es)
    es.w1[0].scale.view(torch.uint8)[0, 0] -= 40  # after the first answer: not looked at again
    assert st.stageable(es) and es.tables["staged_ok"] is True


def test_w1_and_w3_keep_their_own_exponents():
    """w1 and w3 stage side by side (rows interleaved) but each block with its own exponent: blocks 20
    binades apart still stage."""
    es = _set()
    es.w1[2].scale.view(torch.uint8)[:128, :4] = 110
    es.w3[2].scale.view(torch.uint8)[:128, :4] = 130
    assert st.stageable(es)


def test_staged_only_for_faithful_chunks_of_min_rows(monkeypatch):
    es = _set()
    x = torch.zeros(50, 256)
    monkeypatch.setitem(st.TILE, "on", True)
    monkeypatch.setitem(st.TILE, "min_rows", 50)
    assert st.staged_supported(x, es, True)
    assert not st.staged_supported(x, es, False)  # exact mode: the activations are not e4m3
    assert not st.staged_supported(x[:49], es, True)
    monkeypatch.setitem(st.TILE, "on", False)
    assert not st.staged_supported(x, es, True)

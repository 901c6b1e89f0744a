"""kernels/dispatch.py: one decision per call, recorded; a failed GPU kernel import is an error."""

import pytest
import torch

from dsv4 import kernels
from dsv4.kernels import dispatch


@pytest.fixture
def fake_cpu_kernel():
    """A 'fast' rms_norm registered for the CPU that only takes rows of width 8 (and says so)."""
    calls = []

    def fast(x, weight, eps):
        calls.append(x.shape)
        return torch.full_like(x, 7.0)

    dispatch.register("rms_norm", "fake", fast, device="cpu", supports=lambda x, w, eps: x.shape[-1] == 8)
    dispatch.reset_report()
    yield calls
    dispatch._REGISTRY["rms_norm"] = [i for i in dispatch._REGISTRY["rms_norm"] if i.name != "fake"]
    dispatch.reset_report()


def test_the_supported_call_runs_the_kernel_else_the_reference_and_both_are_recorded(fake_cpu_kernel):
    x8, x5 = torch.randn(3, 8), torch.randn(3, 5)
    assert torch.equal(kernels.rms_norm(x8, None, 1e-6), torch.full_like(x8, 7.0))
    ref = x5 * torch.rsqrt(x5.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(kernels.rms_norm(x5, None, 1e-6), ref)
    assert fake_cpu_kernel == [(3, 8)]
    assert dispatch.report()["rms_norm"] == {"fake": 1, "reference": 1}
    with dispatch.use_backend("reference"):
        kernels.rms_norm(x8, None, 1e-6)
    assert dispatch.report()["rms_norm"] == {"fake": 1, "reference": 2}
    assert dispatch.choose("rms_norm", "cuda", (x8, None, 1e-6)).name == "reference"  # registered for cpu only


def test_reference_ops_env_sends_named_ops_to_their_reference(fake_cpu_kernel, monkeypatch, tiny_cfg, tiny_tensors):
    x8 = torch.randn(3, 8)
    monkeypatch.setenv("DSV4_REFERENCE_OPS", "swiglu: rms_norm")
    assert not torch.equal(kernels.rms_norm(x8, None, 1e-6), torch.full_like(x8, 7.0))
    monkeypatch.setenv("DSV4_REFERENCE_OPS", "swiglu")
    assert torch.equal(kernels.rms_norm(x8, None, 1e-6), torch.full_like(x8, 7.0))
    assert dispatch.report()["rms_norm"] == {"reference": 1, "fake": 1}
    from dsv4.engine.model.model import Model

    monkeypatch.setenv("DSV4_REFERENCE_OPS", "rms_norm,rms_nrom")
    with pytest.raises(dispatch.KernelError, match="unknown op 'rms_nrom'"):
        Model.from_state_dict(tiny_cfg, tiny_tensors)


def test_unknown_kernel_mode_is_refused():
    with pytest.raises(dispatch.KernelError, match="use auto or reference"):
        with dispatch.use_backend("fast"):
            pass


def test_kernels_that_failed_to_load_stop_a_model_on_that_device(tiny_cfg, tiny_tensors):
    from dsv4.engine.model.model import Model

    dispatch.mark_unavailable("cpu", "ImportError: no module named triton.language")
    try:
        with pytest.raises(dispatch.KernelError, match="failed to load .*DSV4_KERNELS=reference"):
            Model.from_state_dict(tiny_cfg, tiny_tensors)
        with dispatch.use_backend("reference"):
            Model.from_state_dict(tiny_cfg, tiny_tensors)  # the references were asked for: fine
    finally:
        dispatch._UNAVAILABLE.pop("cpu")


def test_observing_sees_each_call_and_leaves_nothing_behind():
    seen = []
    x = torch.randn(2, 4)
    with dispatch.observing({"rms_norm": lambda args, out: seen.append((args[0], out))}):
        y = kernels.rms_norm(x, None, 1e-6)
    kernels.rms_norm(x, None, 1e-6)
    assert len(seen) == 1 and seen[0][0] is x and seen[0][1] is y
    with pytest.raises(dispatch.KernelError, match="unknown op"):
        with dispatch.observing({"no_such_op": print}):
            pass


def test_every_gpu_kernel_names_a_registered_op_and_a_support_check():
    pytest.importorskip("triton")
    from dsv4.kernels.triton import KERNELS

    assert set(KERNELS) <= set(dispatch.ops())
    assert all(callable(fn) and callable(ok) for fn, ok in KERNELS.values())

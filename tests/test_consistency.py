"""Full prefill == chunked prefill == token-by-token decode, in both precision modes; faithful gap."""

import pytest
import torch

from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session

# exact: float rounding only, so every logit agrees to 1e-5 of the largest.
# faithful: the same rounding differences, but one ulp can move a value across an FP8/FP4 rounding
# boundary, and a near-tie in the FP4 indexer's or a router's choice can flip, moving that token a
# lot (the discrete effects the faithful-vs-exact test below describes). How often that happens
# depends on the CPU's kernels: with vectorised kernels (AVX2/AVX-512) the worst token here moves
# 3e-4 of the largest logit, with ATEN_CPU_CAPABILITY=default 1.3% (median 4e-4, 10 of 200 tokens
# past 1e-3). So faithful mode bounds the typical token tightly and the rare flipped one loosely;
# a chunking bug (a wrong position, a missed cache entry) moves most tokens by far more than either.
TOL = {"exact": 1e-5, "faithful": 5e-3}
FAITHFUL_MEDIAN = 2e-3  # median token; measured <= 4.4e-4
FAITHFUL_SHARE = 0.85  # share of tokens within TOL["faithful"]; measured >= 0.95
FAITHFUL_WORST = 0.05  # a flipped near-tie; measured <= 1.3% (CI-like CPU kernels), 0.7% on CI itself


@pytest.fixture(scope="module")
def ids(tiny_cfg):
    return torch.randint(0, tiny_cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(11))


# tokens: 200 cross the window ring's wrap and the first HCA close (128) with more CSA entries (50)
# than index_topk (8), in every chunking; the long version (300: a second HCA close) is `slow`
@pytest.mark.parametrize("n", [200, pytest.param(300, marks=pytest.mark.slow)])
@pytest.mark.parametrize("mode", ["exact", "faithful"])
def test_chunked_prefill_equals_full(tiny_cfg, tiny_tensors, ids, mode, n):
    ids = ids[:n]
    model = Model.from_state_dict(tiny_cfg, tiny_tensors, mode=mode)
    full = Session(model, 512).prefill(ids, last_only=False)
    scale = full.abs().max().item()
    for chunk in (1, 3, 128):
        out = Session(model, 512).prefill(ids, chunk=chunk, last_only=False)
        rel = (out - full).abs().amax(-1) / scale  # [tokens]
        if mode == "exact":
            assert rel.max() <= TOL[mode], (chunk, rel.max().item())
            continue
        within = (rel <= TOL[mode]).float().mean().item()
        assert rel.median() <= FAITHFUL_MEDIAN, (chunk, rel.median().item())
        assert within >= FAITHFUL_SHARE, (chunk, within)
        assert rel.max() <= FAITHFUL_WORST, (chunk, rel.max().item())


def test_faithful_differs_from_exact_and_gap_is_bounded(tiny_cfg, tiny_tensors, ids):
    """How far faithful mode's logits may move from exact mode's, token by token (relative to that
    token's max |logit|), and why:
    - FP8 e4m3 keeps 3 mantissa bits, so every stored KV channel is within half an ulp, 2^-4 = 6.25%,
      of its value (2^-4 / sqrt(3) = 3.6% RMS); the typical token (median) moves less than that
      (measured here: median 1.9%, 90th percentile 4.1%);
    - the FP4 indexer (e2m1, 1 mantissa bit) and the routers make discrete choices: where a near-tie
      flips which entries or experts a token uses, that token moves by a large fraction (measured
      here: worst token 27%; 13-33% on two other random models), so the worst token is bounded
      only by 1/2, and the argmax may change for a few tokens (measured 96.3%; 96-97% elsewhere).
    The faithful points themselves are pinned in tests/test_faithful_points.py."""
    exact = Session(Model.from_state_dict(tiny_cfg, tiny_tensors, mode="exact"), 512).prefill(ids, last_only=False)
    faith = Session(Model.from_state_dict(tiny_cfg, tiny_tensors, mode="faithful"), 512).prefill(ids, last_only=False)
    gap = (faith - exact).abs()
    rel_tok = gap.amax(-1) / exact.abs().amax(-1)  # [tokens]
    agree = (faith.argmax(-1) == exact.argmax(-1)).float().mean().item()
    print(f"\nfaithful vs exact: per-token max |dlogit| / max |logit|: median {rel_tok.median():.2%}, "
          f"p90 {rel_tok.quantile(0.9):.2%}, max {rel_tok.max():.2%}; argmax agreement {agree:.1%}")
    assert rel_tok.min() > 0  # every token sees quantised keys
    assert rel_tok.median() <= 2 ** -4
    assert rel_tok.max() < 0.5
    assert agree >= 0.9

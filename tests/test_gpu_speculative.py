"""MTP speculative decoding on a CUDA device: the verify pair and the MTP step as CUDA graphs.

- Tiny model (faithful): greedy output equals plain graph decoding token for token across the ring
  wrap and the HCA close, with drafts accepted and rejected, and the cache afterwards is
  byte-identical to plain decoding's (the batched verify gives each token its one-token bits; the
  rollback inside/after the graphs is exact).
- Built-in model: greedy identity over 96 tokens from real text, drafts accepted; the plain and MTP
  decode rates are printed (``-s`` shows them).
- Sampled decoding runs through the graphs and is reproducible with a seed.
"""

import json

import pytest
import torch

from dsv4.engine.model.model import Model
from dsv4.engine.runtime.sampling import SamplingParams
from dsv4.engine.runtime.session import Session
from dsv4.engine.runtime.speculative import SpeculativeDecoder, mtp_session
from dsv4.engine.tools.synthetic import random_tensors, tiny_configs
from test_speculative import (GREEDY, NEW, PROMPT, GuidedDrafts, _cache_bytes, builtin_heldout,
                              mtp_greedy_matches_plain)

pytestmark = pytest.mark.gpu


def _plain_graph(model, prompt, n):
    s = Session(model, 256, cuda_graph=True)
    logits = s.prefill(prompt)
    out = [int(logits.argmax())]
    while len(out) < n:
        out.append(int(s.step(out[-1]).argmax()))
    return out, s


def test_gpu_graph_verify_greedy_identical_and_rollback_exact():
    cfg = tiny_configs()["swa-csa-hca"]
    model = Model.from_state_dict(cfg, random_tensors(cfg, 1), mode="faithful", device="cuda")
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(3))
    ref, plain = _plain_graph(model, prompt, NEW)
    dec = GuidedDrafts(mtp_session(model, 256, cuda_graph=True), prompt.tolist() + ref)
    assert dec.static and dec.graph and dec.batched  # the verify is one step of both tokens
    out = list(dec.generate(prompt, GREEDY, NEW))
    assert out == ref
    assert set(dec._graphs) == {"verify", "mtp", "mtp-feed", "restore"}
    st = dec.stats
    assert st.accepted >= 3 and st.drafted - st.accepted >= 3, st
    torch.cuda.synchronize()
    a = _cache_bytes(dec.mgr, cfg.num_hidden_layers)
    b = _cache_bytes(plain.cache, cfg.num_hidden_layers)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def builtin_cuda():
    return builtin_heldout("cuda")


def test_gpu_builtin_greedy_identical_and_rates(builtin_cuda):
    from dsv4.engine.tools.mtp_bench import bench_mtp_decode

    model, ids = builtin_cuda
    mtp_greedy_matches_plain(model, ids[700:764], 96, cuda_graph=True)
    r = bench_mtp_decode(model, ids[1000:1064], 128)
    print(json.dumps(r, indent=1))
    assert r["identical"] and r["cuda_graph"]


def test_gpu_sampled_is_seeded(builtin_cuda):
    model, ids = builtin_cuda
    params = SamplingParams(temperature=0.8, top_p=0.95)
    runs = []
    for _ in range(2):
        dec = SpeculativeDecoder(mtp_session(model, 256, cuda_graph=True))
        runs.append(list(dec.generate(ids[:32], params, 48, seed=11)))
        assert dec.stats.drafted > 0
    assert runs[0] == runs[1] and len(runs[0]) == 48

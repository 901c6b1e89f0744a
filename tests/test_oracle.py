"""The exact-mode engine equals transformers' DeepseekV4ForCausalLM (stable top-k patch) in float32."""

import pytest
import torch
from conftest import import_or_skip

from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import random_tensors, tiny_configs
from dsv4.engine.tools.hf import build_hf_model, stable_topk, transformers_names

import_or_skip("transformers")  # skipped without it, a failure in CI (CI=true)
CONFIGS = tiny_configs()


def _setup(name):
    cfg = CONFIGS[name]
    tensors = random_tensors(cfg, seed=7)
    return cfg, Model.from_state_dict(cfg, tensors, mode="exact"), build_hf_model(cfg, tensors)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_matches_transformers(name):
    cfg, model, hf = _setup(name)
    ids = torch.randint(0, cfg.vocab_size, (613,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), stable_topk():
        ref = hf(ids[None]).logits[0]
    ours = Session(model, max_context=1024).prefill(ids, last_only=False)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


# (prompt, decode steps): the default prefills 100 tokens and decodes positions 100..139, so inside
# the decode loop the first HCA entry closes (128), the 128-entry window ring wraps, ten CSA windows
# close, and the CSA layers hold more entries (25-35) than any config's index_topk (5, 8, 16): the
# paths the 510-step version crosses, in 40 steps. The long version (positions 37..546, four HCA
# closes and wraps) is `slow`.
DECODE_LENGTHS = [pytest.param(100, 41, id="40steps"),
                  pytest.param(37, 510, id="510steps", marks=pytest.mark.slow)]


@pytest.mark.parametrize("prompt,steps", DECODE_LENGTHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_transformers(name, prompt, steps):
    (DynamicCache,) = transformers_names("DynamicCache")
    cfg, model, hf = _setup(name)
    ids = torch.randint(0, cfg.vocab_size, (prompt + steps,), generator=torch.Generator().manual_seed(5))
    refs, ours = [], []
    with torch.no_grad(), stable_topk():
        cache = DynamicCache(config=hf.config)
        refs.append(hf(ids[None, :prompt], cache=cache, use_cache=True).logits[0, -1])
        for i in range(prompt, prompt + steps - 1):
            refs.append(hf(ids[None, i:i + 1], cache=cache, use_cache=True).logits[0, -1])
    s = Session(model, max_context=1024)
    ours.append(s.prefill(ids[:prompt]))
    for i in range(prompt, prompt + steps - 1):
        ours.append(s.step(int(ids[i])))
    ref, out = torch.stack(refs), torch.stack(ours)
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err
    # the compressed paths really were used: entries exist in every compressed layer, and decode
    # steps closed some (the prompt alone had fewer)
    for h in s.cache.handles(s.slot):
        if h.layer.ratio:
            assert h.n_entries == (prompt + steps - 1) // h.layer.ratio > prompt // h.layer.ratio

"""The exact-mode engine equals transformers' DeepseekV4ForCausalLM (stable top-k patch) in float32."""

import pytest
import torch

from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import random_tensors, tiny_configs
from dsv4.engine.tools.hf import build_hf_model, stable_topk

pytest.importorskip("transformers")
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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_transformers(name):
    from transformers import DynamicCache

    cfg, model, hf = _setup(name)
    prompt, steps = 37, 510
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
    # the compressed paths really were used: entries exist in every compressed layer
    for h in s.cache.handles(s.slot):
        if h.layer.ratio:
            assert h.n_entries == (prompt + steps - 1) // h.layer.ratio > 0

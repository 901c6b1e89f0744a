"""The built-in model's training code: it runs the engine's own forward, its fake quantisation is
the published encoding, a few steps learn, and the data split keeps held-out objects unseen."""

import re

import torch

from dsv4.engine.checkpoint.published import dequantized, to_published
from dsv4.engine.model.model import Model
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import random_tensors, tiny_configs
from dsv4.train import data
from dsv4.train.trainer import Capture, lm_losses, sequence_handles, stored_roundtrip, weights_for_step

CFG = tiny_configs()["swa-csa-hca"]  # SWA, CSA (top-k below the visible entries), HCA, hash + score routing


def _params(seed=0):
    t = random_tensors(CFG, seed)
    params = {n: v.clone().requires_grad_(True) for n, v in t.items() if v.is_floating_point()}
    fixed = {n: v for n, v in t.items() if not v.is_floating_point()}
    return t, params, fixed


def test_training_forward_is_the_engine_forward():
    t, params, fixed = _params()
    ids = torch.randint(0, CFG.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    model = Model(CFG, weights_for_step(params, fixed, False, "cpu"), "exact")
    layers, _ = sequence_handles(model, "cpu")
    with torch.no_grad():
        train_logits = model.forward(ids, layers, 0)
    ref = Session(Model.from_state_dict(CFG, t, "exact"), 512).prefill(ids.tolist(), last_only=False)
    assert (train_logits - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_fake_quant_is_the_published_encoding():
    t, _, _ = _params(3)
    names = ["layers.0.attn.wq_b.weight", "layers.2.ffn.experts.1.w2.weight", "head.weight",
             "layers.1.attn.compressor.wkv.weight"]  # fp8, mxfp4, bf16, bf16
    for n in names:
        assert torch.equal(stored_roundtrip(n, t[n]), dequantized(to_published(n, t[n]))[n]), n


def test_a_few_steps_learn_and_reach_every_part():
    _, params, fixed = _params(5)
    ids = torch.randint(6, CFG.vocab_size, (260,), generator=torch.Generator().manual_seed(2))
    model = Model(CFG, weights_for_step(params, fixed, False, "cpu"), "exact")
    opt = torch.optim.AdamW(params.values(), lr=3e-3)
    bias0 = params["layers.2.ffn.gate.bias"].detach().clone()
    losses = []
    for step in range(6):
        model.w = weights_for_step(params, fixed, qat=step >= 3, device="cpu")
        with Capture() as cap:
            main, mtp = lm_losses(model, ids, 0.3)
            idx = cap.indexer_loss()
        opt.zero_grad()
        (main + 0.3 * mtp + 0.1 * idx).backward()
        grads = {n: p.grad for n, p in params.items()}
        opt.step()
        cap.balance_bias(CFG.n_routed_experts, 1e-2)
        losses.append(main.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n in ("layers.0.hc_attn_fn", "layers.1.attn.compressor.wkv.weight", "layers.2.attn.compressor.ape",
              "layers.1.attn.indexer.wq_b.weight", "mtp.0.e_proj.weight", "embed.weight"):
        assert grads[n] is not None and grads[n].abs().sum() > 0, n  # the indexer learns through the KL term
    assert idx.item() > 0
    assert not torch.equal(params["layers.2.ffn.gate.bias"].detach(), bias0)  # load balancing moved the bias


def test_data_split_and_rendering():
    train, held = data.conversations(0)
    assert len(train) > 5000 and len(held) > 100
    q = lambda c: c[0]["content"]  # noqa: E731
    assert any(q(c) == "What does json.dumps do?" for c in train)
    asked = lambda convs: {m.group(1) for c in convs if (m := re.match(r"What does (\S+) do\?$", q(c)))}  # noqa: E731
    held_names, train_names = asked(held), asked(train)
    assert len(held_names) > 20 and "json.dumps" in train_names
    assert not (held_names & train_names)  # held-out objects never appear in training questions
    assert {n.split(".")[0] for n in held_names} <= {m.split(".")[0] for m in data.HELDOUT_MODULES}  # held out by module
    text = data.render(train[0])
    assert text.startswith("<｜begin▁of▁sentence｜><｜User｜>") and text.endswith("<｜end▁of▁sentence｜>")


def test_time_budget_plans_plain_and_qat_steps():
    from types import SimpleNamespace

    from dsv4.train.run import plan_steps

    _, params, fixed = _params(7)
    args = SimpleNamespace(qat_from=1.0, held_every=100, minutes=1.0)
    per = 0.5 + 4 * 0.5 / 3 / 100  # plain steps and the held-out evaluations' share
    assert plan_steps(args, torch.device("cpu"), params, fixed, 0.5, 10.0, 100.0) == 20 + int(90 / (per * 1.05))
    args.qat_from = 0.5  # QAT steps also pay the fake quantisation, measured: fewer steps fit
    assert 40 <= plan_steps(args, torch.device("cpu"), params, fixed, 0.5, 10.0, 1e4) < 20 + int(9990 / (per * 1.05))
    assert plan_steps(args, torch.device("cpu"), params, fixed, 0.5, 100.0, 100.0) == 40  # the floor

"""MTP speculative decoding (engine/runtime/speculative.py) on the CPU.

- Greedy output equals plain decoding token for token, through both verify paths (the one-token
  chunk forward and the static step), across the window ring's wrap and the first HCA close
  (position 128), and the cache afterwards is byte-identical to plain decoding's: a rejected
  draft leaves nothing behind. A random model's MTP block rarely agrees with it, so a test decoder
  drafts the reference token on two rounds of three (the MTP block still runs every step).
- Rejection sampling keeps the target distribution (chi-square on a 6-token vocabulary).
- The built-in model (trained MTP block): the same greedy identity, and its drafts are accepted
  on real text.
"""

import pytest
import torch

from dsv4.engine.model.model import Model
from dsv4.engine.runtime.decode import DecodeRunner
from dsv4.engine.runtime.sampling import Sampler, SamplingParams, distribution
from dsv4.engine.runtime.session import Session
from dsv4.engine.runtime.speculative import (SpeculativeDecoder, SpeculativeStats, accept_or_resample,
                                             mtp_session)
from dsv4.engine.tools.synthetic import random_tensors, tiny_configs

GREEDY = SamplingParams(temperature=0)
PROMPT, NEW = 118, 14  # decoding crosses position 128: the ring wraps, the HCA window closes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second thread
    makes each step ~20x slower (measured: 1.15 s vs 0.044 s per tiny-model step under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class GuidedDrafts(SpeculativeDecoder):
    """Drafts the reference continuation ``seq`` (tokens by position) on rounds whose MTP position
    is not a multiple of 3, the MTP block's own draft otherwise (mostly rejected on a random model)."""

    def __init__(self, session, seq, **kw):
        super().__init__(session, **kw)
        self.seq = seq

    def _mtp_step(self, streams, next_id, s, head=True):
        logits = super()._mtp_step(streams, next_id, s, head)
        if head and s % 3 and s + 2 < len(self.seq):
            logits = torch.full_like(logits, -10.0)
            logits[self.seq[s + 2]] = 10.0
        return logits


def _plain(model, prompt, n, static):
    """Greedy plain decoding -> (tokens, session). static: steps through DecodeRunner (eager)."""
    s = Session(model, 256, cuda_graph=False)
    logits = s.prefill(prompt)
    runner = DecodeRunner(model, s.cache.handles(s.slot), graph=False)
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        if len(out) == n:
            break
        if static:
            s.cache.prepare(s.slot, 1)
            logits = runner.step(out[-1], s.seq_len)
            s.cache.commit(s.slot, 1)
        else:
            logits = s.step(out[-1])
    return out, s


def _cache_tensors(mgr, layers: int) -> list[torch.Tensor]:
    """Every stored tensor of the first ``layers`` cache layers (all slots)."""
    out = []
    for st in mgr.layer_state[:layers]:
        for v in st.values():
            out += list(v.values() if isinstance(v, dict) else v.tensors.values() if hasattr(v, "tensors") else [v])
    return out


def _cache_bytes(mgr, layers: int) -> list[torch.Tensor]:
    """Every stored tensor of the first ``layers`` cache layers (all slots), as bytes."""
    return [t.contiguous().view(torch.uint8) for t in _cache_tensors(mgr, layers)]


@pytest.mark.parametrize("static,mode", [(False, "exact"), (True, "faithful"), (True, "exact"), (False, "faithful")],
                         ids=["chunk-verify-exact", "static-verify-faithful", "static-verify-exact",
                              "chunk-verify-faithful"])
def test_greedy_identical_and_rollback_exact_tiny(static, mode):
    cfg = tiny_configs()["swa-csa-hca"]
    model = Model.from_state_dict(cfg, random_tensors(cfg, 1), mode=mode)
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(3))
    ref, plain = _plain(model, prompt, NEW, static)
    dec = GuidedDrafts(mtp_session(model, 256, cuda_graph=False), prompt.tolist() + ref, static=static)
    out = list(dec.generate(prompt, GREEDY, NEW))
    assert out == ref
    st = dec.stats
    assert st.accepted >= 3 and st.drafted - st.accepted >= 3, st  # both branches ran, repeatedly
    assert len(out) == 1 + st.steps + st.accepted  # every round emits 1 + accepted (no early stop here)
    assert dec.seq_len == plain.seq_len == PROMPT + NEW - 1
    a = _cache_bytes(dec.mgr, cfg.num_hidden_layers)
    b = _cache_bytes(plain.cache, cfg.num_hidden_layers)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_unguided_greedy_identical_with_stop_and_a_second_turn(tiny_cfg, tiny_tensors):
    """The MTP block's own drafts; generation stops at a stop id; a second prompt continues the
    conversation (the MTP layer is fed the positions in between) and still matches plain decoding."""
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    g = torch.Generator().manual_seed(7)
    p1 = torch.randint(0, tiny_cfg.vocab_size, (20,), generator=g)
    p2 = torch.randint(0, tiny_cfg.vocab_size, (6,), generator=g)
    plain = Session(model, 256, cuda_graph=False)
    first = list(plain.generate(p1, Sampler(GREEDY), 10))
    stop = {first[6]}
    plain.reset()
    greedy = Sampler(GREEDY)
    ref1 = list(plain.generate(p1, greedy, 10, stop_ids=stop))
    ref2 = list(plain.generate(torch.cat([torch.tensor(ref1[-1:]), p2]), greedy, 8))
    dec = SpeculativeDecoder(mtp_session(model, 256, cuda_graph=False))
    out1 = list(dec.generate(p1, GREEDY, 10, stop_ids=stop))
    out2 = list(dec.generate(torch.cat([torch.tensor(out1[-1:]), p2]), GREEDY, 8))
    assert out1 == ref1 and out1[-1] in stop and len(out1) < 10
    assert out2 == ref2 and dec.seq_len == plain.seq_len
    assert dec.stats.drafted > 0


def test_rejection_sampling_keeps_the_target_distribution():
    """Drafts x ~ q, then accept_or_resample: the outputs are distributed as p (chi-square, 5 dof,
    bound 25: p-value about 1e-4), the acceptance rate is sum(min(p, q)); emitting the draft as is
    (no correction) fails the same test."""
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])
    q = torch.tensor([0.05, 0.30, 0.30, 0.05, 0.20, 0.10])
    gen = torch.Generator().manual_seed(0)
    N = 20000
    drafts = torch.multinomial(q, N, replacement=True, generator=gen).tolist()
    results = [accept_or_resample(p, q, d, gen) for d in drafts]
    counts = torch.bincount(torch.tensor([t for t, _ in results]), minlength=6).float()

    def chi2(c):
        return float(((c - N * p) ** 2 / (N * p)).sum())

    assert chi2(counts) < 25, counts / N
    assert chi2(torch.bincount(torch.tensor(drafts), minlength=6).float()) > 1000
    rate = sum(a for _, a in results) / N
    assert abs(rate - float(torch.minimum(p, q).sum())) < 0.015


def test_greedy_rule_is_the_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    p = distribution(logits, GREEDY)
    assert p.tolist() == [0, 1, 0, 0]
    gen = torch.Generator().manual_seed(0)
    assert accept_or_resample(p, distribution(torch.tensor([0.0, 5.0, 0.0, 0.0]), GREEDY), 1, gen) == (1, True)
    assert accept_or_resample(p, distribution(torch.tensor([0.0, 0.0, 0.0, 5.0]), GREEDY), 3, gen) == (1, False)
    # sampled parameters: the masks of Sampler apply (top-k 2 leaves tokens 1 and 3)
    pk = distribution(logits, SamplingParams(temperature=1.0, top_k=2))
    assert pk[0] == 0 and pk[2] == 0 and abs(float(pk.sum()) - 1) < 1e-6


def test_sampled_decoding_is_seeded_and_counts(tiny_cfg, tiny_tensors):
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    prompt = torch.arange(12) % tiny_cfg.vocab_size
    params = SamplingParams(temperature=1.0)
    runs = []
    for _ in range(2):
        dec = SpeculativeDecoder(mtp_session(model, 128, cuda_graph=False))
        runs.append((list(dec.generate(prompt, params, 10, seed=5)), dec.stats.as_dict()))
    assert runs[0] == runs[1]
    out, st = runs[0]
    assert len(out) == 10 and 1 + st["steps"] + st["accepted"] >= 10 and st["drafted"] == st["steps"]


def test_mtp_step_equals_mtp_forward(tiny_cfg, tiny_tensors):
    """The static MTP step (device position, fixed shapes) computes what the chunk forward computes."""
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    ids = torch.randint(0, tiny_cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(4))
    s = mtp_session(model, 64, cuda_graph=False)
    s.cache.prepare(s.slot, 11)
    _, streams = model.forward(ids[:11], s.cache.handles(s.slot), 0, return_streams=True)
    mtp = s.cache.handles(s.slot)[tiny_cfg.num_hidden_layers]
    ref = model.mtp_forward(streams, ids[1:], mtp, 0)  # writes the MTP ring for positions 0..10
    s.cache.reset_slot(s.slot)
    s.cache.prepare(s.slot, 11)
    for i in range(11):
        out = model.mtp_step(streams[i:i + 1], ids[i + 1:i + 2], torch.tensor([i]), mtp)
        assert torch.allclose(out[0], ref[i], atol=1e-5, rtol=1e-5), i


def test_stats_and_errors(tiny_cfg, tiny_tensors):
    st = SpeculativeStats(drafted=10, accepted=7, steps=10)
    assert st.as_dict() == {"drafted": 10, "accepted": 7, "steps": 10, "acceptance_rate": 0.7, "tokens_per_step": 1.7}
    turn = st - SpeculativeStats(drafted=4, accepted=1, steps=4)  # one turn's counts
    assert (turn.drafted, turn.accepted, turn.steps) == (6, 6, 6) and turn.tokens_per_step == 2.0
    assert SpeculativeStats().as_dict()["acceptance_rate"] == 0.0
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    with pytest.raises(ValueError, match="no MTP layer"):
        SpeculativeDecoder(Session(model, 64, cuda_graph=False))
    with pytest.raises(ValueError, match="batched verify is a static step"):
        SpeculativeDecoder(mtp_session(model, 64, cuda_graph=False), static=False, batched=True)
    no_mtp = Model.from_state_dict(tiny_cfg, random_tensors(tiny_cfg, 1, mtp=False))
    with pytest.raises(ValueError, match="has no MTP layer"):
        SpeculativeDecoder(mtp_session(no_mtp, 64, cuda_graph=False))


def builtin_heldout(device: str = "cpu"):
    """The built-in model (faithful) on ``device`` and the token ids of its held-out text."""
    from pathlib import Path

    from dsv4.cli.common import builtin_model_dir
    from dsv4.engine.checkpoint.loader import load_model
    from dsv4.engine.runtime.tokenizer import Tokenizer

    d = builtin_model_dir()
    text = (Path(__file__).resolve().parents[1] / "train" / "results" / "heldout_modules.txt").read_text(encoding="utf-8")
    return load_model(d, mode="faithful", device=device), Tokenizer.from_dir(d).encode(text)


def mtp_greedy_matches_plain(model, prompt, new_tokens: int, cuda_graph: bool) -> SpeculativeDecoder:
    """Greedy decoding with MTP drafts gives plain greedy decoding's tokens, and a trained MTP
    block on real text has more than 30% of its drafts accepted. -> the decoder (its stats)."""
    ref = list(Session(model, 256, cuda_graph=cuda_graph).generate(prompt, Sampler(GREEDY), new_tokens))
    dec = SpeculativeDecoder(mtp_session(model, 256, cuda_graph=cuda_graph))
    assert list(dec.generate(prompt, GREEDY, new_tokens)) == ref
    assert dec.stats.acceptance_rate > 0.3, dec.stats
    return dec


@pytest.fixture(scope="module")
def builtin():
    return builtin_heldout("cpu")


def test_builtin_greedy_identical_and_drafts_accepted(builtin):
    model, ids = builtin
    mtp_greedy_matches_plain(model, ids[700:748], 32, cuda_graph=False)


def test_bench_mtp_decode_reports(tiny_cfg, tiny_tensors):
    from dsv4.engine.tools.mtp_bench import bench_mtp_decode, projected_tokens_per_s

    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    r = bench_mtp_decode(model, list(range(10)), 8, cuda_graph=False, acceptance=0.5)
    assert r["identical"] and r["mtp_drafted"] >= 1 and r["cuda_graph"] is False
    feed = None if r["mtp_feed_ms"] is None else r["mtp_feed_ms"] / 1e3
    assert r["projected_tokens_per_s"] == pytest.approx(
        projected_tokens_per_s(r["verify_ms"] / 1e3, r["mtp_step_ms"] / 1e3, 0.5, feed))
    assert projected_tokens_per_s(0.01, 0.001, 1.0) == pytest.approx(2 / 0.012)
    assert projected_tokens_per_s(0.01, 0.002, 0.5, 0.001) == pytest.approx(1.5 / 0.0125)


@pytest.mark.parametrize("batched", [False, True], ids=["pair", "batched"])
def test_graph_bookkeeping_with_an_eager_stand_in(monkeypatch, tiny_cfg, tiny_tensors, batched):
    """The graph path's logic on the CPU: capture_graph replaced by a stand-in that 'captures' by
    running the body and undoing it, and 'replays' by running it again into the same outputs.
    Catches a body that reads host values fixed at capture, or warm-up writes left in the cache."""
    from dsv4.engine.runtime import speculative

    def eager_capture(body, undo):
        out = body()
        undo()
        def listed(o):
            return [] if o is None else [o] if isinstance(o, torch.Tensor) else list(o)
        outs = listed(out)

        def replay():
            for o, n in zip(outs, listed(body())):
                o.copy_(n)
        return replay, out

    monkeypatch.setattr(speculative, "capture_graph", eager_capture)
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(3))
    ref, plain = _plain(model, prompt, NEW, static=True)
    dec = GuidedDrafts(mtp_session(model, 256, cuda_graph=False), prompt.tolist() + ref, static=True, batched=batched)
    dec.graph = True
    assert list(dec.generate(prompt, GREEDY, NEW)) == ref
    assert set(dec._graphs) == {"verify", "mtp", "mtp-feed", "restore"} and dec.stats.accepted >= 3
    if not batched:  # (the batched verify rounds rows differently on the CPU: the tokens are the check)
        a, b = _cache_bytes(dec.mgr, tiny_cfg.num_hidden_layers), _cache_bytes(plain.cache, tiny_cfg.num_hidden_layers)
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_context_limit_chunked_prefill_and_reset(tiny_cfg, tiny_tensors):
    """A 40-token context: the last rounds have no room for a draft (one plain step), generation
    ends with the same tokens and finish reason as plain decoding; a chunked prompt feeds the MTP
    layer chunk by chunk; after a session reset the decoder starts over (a Sampler is accepted)."""
    from dsv4.engine.runtime.generate import decode_tokens

    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (31,), generator=torch.Generator().manual_seed(9))
    plain = Session(model, 40, cuda_graph=False)
    ref = list(decode_tokens(plain, plain.prefill(prompt, chunk=7), Sampler(GREEDY), 30))
    s = mtp_session(model, 40, cuda_graph=False)
    dec = SpeculativeDecoder(s)
    for _ in range(2):
        before = dec.stats.steps + dec.stats.accepted
        out = list(dec.decode(dec.prefill(prompt, chunk=7), Sampler(GREEDY), 30))
        assert out == ref and ref[-1][1] == "context" and dec.seq_len == plain.seq_len == 40
        assert len(out) == 2 + dec.stats.steps + dec.stats.accepted - before  # the first token, one plain step
        s.reset()


def test_closing_at_an_accepted_draft_rolls_it_back(tiny_cfg, tiny_tensors):
    """A consumer that stops reading right after an accepted draft was yielded (close(), as the chat
    does on Ctrl+C) leaves the cache as plain decoding leaves it: every emitted token but the last."""
    model = Model.from_state_dict(tiny_cfg, tiny_tensors)
    prompt = torch.randint(0, tiny_cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(8))
    ref, _ = _plain(model, prompt, 12, static=False)
    dec = GuidedDrafts(mtp_session(model, 256, cuda_graph=False), prompt.tolist() + ref)
    it = dec.decode(dec.prefill(prompt), GREEDY, 12)
    emitted = []
    for tok, _ in it:
        emitted.append(tok)
        if dec.held is not None and len(emitted) > 3:
            break
    assert dec.held is not None
    it.close()
    assert dec.held is None and dec.seq_len == len(prompt) + len(emitted) - 1
    assert emitted == ref[:len(emitted)]
    _, plain = _plain(model, prompt, len(emitted), static=False)
    a, b = _cache_bytes(dec.mgr, tiny_cfg.num_hidden_layers), _cache_bytes(plain.cache, tiny_cfg.num_hidden_layers)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the conversation goes on: the next prompt starts with the last emitted token
    more = torch.tensor([emitted[-1], 5, 6])
    assert list(dec.generate(more, GREEDY, 4)) == list(plain.generate(more, Sampler(GREEDY), 4))


def test_sampled_decoder_keeps_the_target_distribution_end_to_end():
    """Through the whole decoder on an 8-token model: the first token forced (prefill logits one-hot),
    the second comes from a real draft-verify round (the random MTP block's q is far from p: about
    half the drafts are rejected); over 300 seeded runs its counts match the main model's target
    p(. | prompt, first) (chi-square, 7 dof, bound 30: p-value about 1e-4; emitting the draft
    unchecked measured ~500)."""
    cfg = tiny_configs()["swa-csa-hca"].replace(vocab_size=8, num_hidden_layers=1, compress_ratios=(0,),
                                                num_hash_layers=0)
    model = Model.from_state_dict(cfg, random_tensors(cfg, 2))
    prompt, first, params, N = [5], 6, SamplingParams(temperature=1.0), 300
    plain = Session(model, 16, cuda_graph=False)
    plain.prefill(prompt)
    p = torch.softmax(plain.step(first), -1)
    forced = torch.full((8,), -1e9)
    forced[first] = 0
    s = mtp_session(model, 16, cuda_graph=False)
    dec = SpeculativeDecoder(s)
    counts = torch.zeros(8)
    for i in range(N):
        s.reset()
        dec.prefill(prompt)
        out = [t for t, _ in dec.decode(forced, params, 2, seed=i)]
        assert out[0] == first
        counts[out[1]] += 1
    chi2 = float(((counts - N * p) ** 2 / (N * p)).sum())
    assert chi2 < 30, (counts / N, p)
    assert 0.2 < dec.stats.acceptance_rate < 0.9  # both branches, often


def test_conversation_through_the_decoder_answers_like_plain_and_reports_drafts(builtin):
    """The chat product's path (Conversation.send) with MTP: the same greedy answers over two turns,
    and each turn's draft counts."""
    from dsv4.cli.common import builtin_model_dir
    from dsv4.engine.runtime.conversation import Conversation
    from dsv4.engine.runtime.tokenizer import Tokenizer

    model, _ = builtin
    tok = Tokenizer.from_dir(builtin_model_dir())

    def run(spec: bool):
        session = mtp_session(model, 512, cuda_graph=False) if spec else Session(model, 512, cuda_graph=False)
        conv = Conversation(session, tok, speculative=SpeculativeDecoder(session) if spec else None)
        turns = []
        for q in ("What does json.dumps do?", "What does os.path.join do?"):
            for turn, _ in conv.send(q, Sampler(GREEDY), 24):
                pass
            turns.append(turn)
        return turns

    plain, mtp = run(False), run(True)
    assert [t.token_ids for t in mtp] == [t.token_ids for t in plain]
    assert all(t.mtp is None for t in plain)
    for t in mtp:
        assert t.mtp["drafted"] > 0 and 0 <= t.mtp["accepted"] <= t.mtp["drafted"]
        assert t.mtp["steps"] + t.mtp["accepted"] >= len(t.token_ids) - 1  # every token after the first


# ------------------------------------------------------------------ the batched verify (one step of 2)
def _cache_snapshot(mgr) -> list[torch.Tensor]:
    """Copies of every cache tensor (all layers, the MTP layer's too)."""
    return [t.clone() for t in _cache_bytes(mgr, len(mgr.layer_state))]


def _session_at(model, prompt):
    s = Session(model, 256, cuda_graph=False)
    s.prefill(prompt)
    return s


@pytest.mark.parametrize("mode", ["exact", "faithful"])
def test_batched_static_step_equals_two_one_token_steps(mode):
    """Model.static_step on [tok, d] gives both positions the logits and streams two one-token
    static steps give (to float rounding: the CPU's matmuls round a row differently beside
    another), at positions that wrap the window ring (128) and close CSA and HCA windows. Token
    order matters there: if d's ring row were written before tok's attention, tok at P would lose
    the key at P + 1 - W it still sees, and its logits would move far past rounding."""
    cfg = tiny_configs()["swa-csa-hca"]
    model = Model.from_state_dict(cfg, random_tensors(cfg, 1), mode=mode)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (125,), generator=g)
    one, two = _session_at(model, prompt), _session_at(model, prompt)
    h1, h2 = one.cache.handles(one.slot), two.cache.handles(two.slot)
    for P in range(125, 133):  # P = 127: tok closes the HCA window; the ring wraps at 128
        toks = torch.randint(0, cfg.vocab_size, (2,), generator=g)
        pos = torch.tensor([P])
        for s in (one, two):
            s.cache.prepare(s.slot, 2)
        l0, s0 = model.static_step(toks[:1], pos, h1)
        l1, s1 = model.static_step(toks[1:], pos + 1, h1)
        lb, sb = model.static_step(toks, pos, h2)
        ref = torch.cat([l0, l1])
        assert lb.shape == ref.shape and (lb - ref).abs().max() <= 1e-4 * ref.abs().max(), P
        assert torch.allclose(sb, torch.cat([s0, s1]), rtol=1e-4, atol=1e-4), P
        for s in (one, two):
            s.cache.commit(s.slot, 1)  # keep tok only; d's writes are overwritten by the next tok
        for a, b in zip(h1, h2):  # the window rings agree (to rounding) after every step
            ra, rb = a.read_window(), b.read_window()
            assert torch.equal(ra[1], rb[1]) and torch.allclose(ra[0].float(), rb[0].float(), rtol=2e-2, atol=2e-2)


def test_batched_verify_greedy_identical(tiny_cfg, tiny_tensors):
    """The batched verify (forced on the CPU) decodes plain greedy decoding's tokens, with drafts
    accepted and rejected, across the ring wrap and the HCA close."""
    cfg = tiny_configs()["swa-csa-hca"]
    model = Model.from_state_dict(cfg, random_tensors(cfg, 1), mode="faithful")
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(3))
    ref, _ = _plain(model, prompt, NEW, static=True)
    dec = GuidedDrafts(mtp_session(model, 256, cuda_graph=False), prompt.tolist() + ref, static=True, batched=True)
    assert dec.batched and not SpeculativeDecoder(mtp_session(model, 64, cuda_graph=False), static=True).batched
    assert list(dec.generate(prompt, GREEDY, NEW)) == ref
    st = dec.stats
    assert st.accepted >= 3 and st.drafted - st.accepted >= 3 and dec.seq_len == PROMPT + NEW - 1, st


@pytest.mark.parametrize("P", [126, 127, 131])
def test_batched_verify_rollback_keeps_exactly_what_tok_wrote(P):
    """After a batched verify of (tok, d) and the rollback of d, the cache holds exactly what tok
    wrote, whatever d was (two drafts, byte-equal caches), and differs from the cache before the
    rollback (d's writes were there). P = 126: d closes the HCA window (entry written, compressor
    state reset); 127: d starts a window and wraps the ring; 131: d closes a CSA window."""
    cfg = tiny_configs()["swa-csa-hca"]
    model = Model.from_state_dict(cfg, random_tensors(cfg, 1), mode="faithful")
    prompt = torch.randint(0, cfg.vocab_size, (P,), generator=torch.Generator().manual_seed(P))
    tok, n = int(prompt[-1]), cfg.num_hidden_layers
    one = _session_at(model, prompt[:-1])  # tok by a one-token static step: the reference
    one.cache.prepare(one.slot, 1)
    model.static_step(prompt[-1:], torch.tensor([P - 1]), one.cache.handles(one.slot))
    after = []
    for d in (3, 11):
        dec = SpeculativeDecoder(mtp_session(model, 256, cuda_graph=False), static=True, batched=True)
        dec.prefill(prompt[:-1])
        dec.mgr.prepare(dec.slot, 2)
        assert dec.seq_len == P - 1
        dec._verify(tok, d, P - 1)
        written = _cache_snapshot(dec.mgr)
        dec.ckpt.restore()
        after.append(_cache_snapshot(dec.mgr))
        assert any(not torch.equal(a, b) for a, b in zip(written, after[-1]))
        # the float tensors (compressor state, BF16 RoPE parts, scales) hold what tok wrote, to rounding
        for a, b in zip(_cache_tensors(dec.mgr, n), _cache_tensors(one.cache, n)):
            if a.dtype.is_floating_point and a.element_size() > 1:
                tol = 1e-3 if a.element_size() > 2 else 2e-2  # bf16: a rounding is 2^-8 relative
                assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
    assert all(torch.equal(a, b) for a, b in zip(*after))

"""Chat encoding (the DSV4.md summary), output splitting, streaming detokenisation, sampling filters.
The complete encoding is tested in test_chat_encoding.py, the parser in test_chat_completion.py."""

import pytest
import torch

from dsv4.engine.runtime.chat import REASONING_EFFORT_MAX, encode_chat
from dsv4.engine.runtime.completion import OutputParser
from dsv4.engine.runtime import sampling
from dsv4.engine.runtime.sampling import Sampler, SamplingParams, draw, min_p_mask, top_k_mask, top_p_mask
from dsv4.engine.runtime.tokenizer import Tokenizer, build_byte_tokenizer

B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


def test_encoding_thinking_mode_matches_spec_example():
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there!", "reasoning_content": "greet back"},
            {"role": "user", "content": "What is 2+2?"}]
    assert encode_chat(msgs, thinking=True) == (
        f"{B}You are a helpful assistant.{U}Hello{A}</think>Hi there!{E}{U}What is 2+2?{A}<think>")


def test_encoding_chat_mode_multi_turn_and_no_system():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}]
    assert encode_chat(msgs, thinking=False) == f"{B}{U}a{A}</think>b{E}{U}c{A}</think>d{E}{U}e{A}</think>"


def test_encoding_keeps_reasoning_after_last_user_and_max_effort_prefix():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans", "reasoning_content": "why"}]
    assert encode_chat(msgs, thinking=True, add_generation_prompt=False) == f"{B}{U}q{A}<think>why</think>ans{E}"
    s = encode_chat([{"role": "user", "content": "q"}], thinking=True, reasoning_effort="max")
    assert s == B + REASONING_EFFORT_MAX + f"{U}q{A}<think>"
    assert REASONING_EFFORT_MAX not in encode_chat([{"role": "user", "content": "q"}], thinking=False,
                                                   reasoning_effort="max")


def test_output_parser_splits_streamed_reasoning_and_answer():
    p = OutputParser(thinking=True)
    pieces = []
    for chunk in ["I think", " hard</th", "ink>The ans", "wer", E]:
        pieces += p.feed(chunk)
    assert p.reasoning_text == "I think hard" and p.answer_text == "The answer"
    assert [x.kind for x in pieces][0] == "reasoning" and pieces[-1].kind == "answer"
    assert p.finish().message == {"role": "assistant", "content": "The answer", "reasoning_content": "I think hard",
                                  "tool_calls": []}
    q = OutputParser(thinking=False)
    q.feed("plain answer")
    assert q.answer_text == "plain answer" and q.reasoning_text == ""


def test_streaming_detokenization_never_splits_characters():
    tok = Tokenizer(build_byte_tokenizer())
    text = "naïve 世界 🎉👍🏽 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    s = tok.stream()
    out = []
    for i in ids:
        piece = s.push(i)
        assert "\ufffd" not in piece
        out.append(piece)
    out.append(s.flush())
    assert "".join(out) == text


def test_sampling_masks():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert top_k_mask(logits, 2).tolist() == [False, True, True, False]
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert top_p_mask(probs, 0.7).tolist() == [False, True, True, False]
    assert top_p_mask(probs, 0.5).tolist() == [False, True, False, False]
    assert min_p_mask(probs, 0.5).tolist() == [False, True, True, False]


def _top_p_by_full_sort(probs, p):
    sp, order = torch.sort(probs, descending=True)
    mask = torch.zeros(probs.numel(), dtype=torch.bool)
    mask[order] = torch.cumsum(sp, 0) - sp < p
    return mask


def test_top_p_from_candidates_equals_the_full_sort():
    """top-p over the most likely TOP_P_CANDIDATES tokens keeps the set the full sort keeps, whether
    the set lies inside the candidates (peaked distributions, small p) or not (the fallback)."""
    g = torch.Generator().manual_seed(1)
    sizes = []
    for spread in (8.0, 4.0, 0.01):
        probs = torch.softmax(torch.randn(50000, generator=g) * spread, -1)
        for p in (0.05, 0.5, 0.9, 0.99):
            got = top_p_mask(probs, p)
            assert torch.equal(got, _top_p_by_full_sort(probs, p)), (spread, p)
            sizes.append(int(got.sum()))
    assert min(sizes) <= sampling.TOP_P_CANDIDATES < max(sizes)  # both paths ran


def test_draw_follows_the_distribution_and_never_a_zero():
    """The inverse-CDF draw: frequencies match probs (chi-square, 5 cells) over 20000 draws of a
    vector with zeros between, at the ends, and unnormalised; a zero-probability token never comes."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.0, 1.0, 0.25, 0.0, 2.0, 0.25, 0.0])
    g = torch.Generator().manual_seed(3)
    n = 20000
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(n)]), minlength=10).float()
    assert counts[probs == 0].sum() == 0
    expected = probs / probs.sum() * n
    nz = probs > 0
    chi2 = float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    assert draw(torch.nn.functional.one_hot(torch.tensor(7), 129280).float(), g) == 7


@pytest.mark.parametrize("u,want", [(0.0, 2), (0.5, 4), (1.0 - 2 ** -53, 4)])
def test_draw_at_the_ends_of_the_unit_interval(monkeypatch, u, want):
    """A uniform draw of exactly 0 picks the first token with mass, not a zero before it; one just
    below 1 the last token with mass, not a zero after it; all zeros is an error."""
    monkeypatch.setattr(sampling.torch, "rand", lambda *a, **k: torch.tensor(u, dtype=torch.float64))
    probs = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="no token has a positive probability"):
        draw(torch.zeros(4), torch.Generator())
    assert draw(probs, torch.Generator()) == want


def test_greedy_is_argmax_and_seeded_sampling_reproducible():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams(temperature=0))(logits) == int(logits.argmax())
    s1, s2 = Sampler(SamplingParams(top_k=10), seed=5), Sampler(SamplingParams(top_k=10), seed=5)
    seq1, seq2 = [s1(logits) for _ in range(20)], [s2(logits) for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1
    top10 = set(torch.topk(logits, 10).indices.tolist())
    assert set(seq1) <= top10
    s3 = Sampler(SamplingParams(min_p=0.5), seed=1)
    allowed = set(torch.nonzero(torch.softmax(logits, -1) >= 0.5 * torch.softmax(logits, -1).max()).flatten().tolist())
    assert {s3(logits) for _ in range(30)} <= allowed


@pytest.mark.parametrize("kw", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(temperature=-0.5), dict(top_p=float("nan")), dict(min_p=float("nan")),
                                dict(top_k=-1)])
def test_sampling_params_refuse_non_finite_and_out_of_range(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw).validate()
    SamplingParams().validate()  # the defaults are valid

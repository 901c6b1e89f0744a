"""Figures for MTP speculative decoding (engine/runtime/speculative.py), for ``dsv4 bench decode --mtp``.

- ``mtp_acceptance``: greedy speculative generation from windows of real text (the built-in model
  on train/results/heldout_modules.txt): drafted / accepted counts, acceptance rate, tokens per verify step.
- ``bench_mtp_decode``: plain greedy decoding and MTP decoding of the same prompt, timed per step
  in the same run: ms per token for both (MTP: wall time of all rounds / tokens emitted), the
  verify round and the MTP steps (drafting; cache update only) timed on their own, and whether the
  outputs were identical.
- ``projected_tokens_per_s``: the effective rate at a stated acceptance rate from those two
  component times (for a synthetic model, whose random MTP block is never right).
"""

from __future__ import annotations

import statistics

from dsv4.engine.runtime.sampling import SamplingParams
from dsv4.engine.runtime.session import Session
from dsv4.engine.runtime.speculative import SpeculativeDecoder, SpeculativeStats, mtp_session

from .bench import Timer, sync

GREEDY = SamplingParams(temperature=0)


def mtp_acceptance(model, token_ids: list[int], prompts: int = 4, prompt_len: int = 64, new_tokens: int = 64,
                   cuda_graph: bool | None = None) -> dict:
    """Greedy MTP generation of ``new_tokens`` after each of ``prompts`` evenly spaced windows of
    ``prompt_len`` tokens of ``token_ids`` (real text). -> SpeculativeStats.as_dict() over all."""
    total = SpeculativeStats()
    span = max(1, (len(token_ids) - prompt_len) // prompts)
    for i in range(prompts):
        prompt = token_ids[i * span:i * span + prompt_len]
        s = mtp_session(model, prompt_len + new_tokens + 8, cuda_graph=cuda_graph)
        dec = SpeculativeDecoder(s)
        for _ in dec.generate(prompt, GREEDY, new_tokens):
            pass
        s.close()
        total.drafted += dec.stats.drafted
        total.accepted += dec.stats.accepted
        total.steps += dec.stats.steps
    return {**total.as_dict(), "prompts": prompts, "prompt_tokens": prompt_len, "new_tokens": new_tokens}


def projected_tokens_per_s(verify_s: float, mtp_step_s: float, acceptance: float,
                           mtp_feed_s: float | None = None) -> float:
    """Tokens/s of MTP decoding at acceptance rate ``acceptance`` (0..1): a round emits 1 + a tokens
    and costs one verify, one drafting MTP step and, for an accepted draft, one MTP cache update
    without the vocabulary head (mtp_feed_s; default: a drafting step's time)."""
    feed = mtp_step_s if mtp_feed_s is None else mtp_feed_s
    return (1 + acceptance) / (verify_s + mtp_step_s + acceptance * feed)


class _Timed:
    """Wraps a decoder method: calls it and records (its arguments, its seconds), CUDA events on a GPU."""

    def __init__(self, fn, device):
        self.fn, self.timer, self.calls = fn, Timer(device), []

    def __call__(self, *args):
        out = []
        self.calls.append((args, self.timer(lambda: out.append(self.fn(*args)))))
        return out[0]

    def median(self, keep=lambda args: True) -> float | None:
        """Median seconds of the calls whose arguments pass ``keep``, less the first (graph capture)."""
        times = [t for a, t in self.calls if keep(a)]
        return statistics.median(times[1:] or times) if times else None


def bench_mtp_decode(model, prompt_ids, new_tokens: int, cuda_graph: bool | None = None,
                     acceptance: float | None = None) -> dict:
    """Greedy decoding of ``new_tokens`` after ``prompt_ids``, plain and with MTP, in one run.

    cuda_graph: as Session's (None: the default for the device). acceptance: the rate to project
    the effective tokens/s at (default: the measured one). -> a dict of seconds and rates."""
    dev = model.device
    timer = Timer(dev)
    plain = Session(model, len(prompt_ids) + new_tokens + 8, cuda_graph=cuda_graph)
    logits = plain.prefill(prompt_ids)
    ref, steps = [int(logits.argmax())], []
    for _ in range(new_tokens - 1):
        out = []
        steps.append(timer(lambda: out.append(plain.step(ref[-1]))))
        ref.append(int(out[0].argmax()))
    plain.close()

    s = mtp_session(model, len(prompt_ids) + new_tokens + 8, cuda_graph=cuda_graph)
    dec = SpeculativeDecoder(s)
    dec._verify, dec._mtp_step = _Timed(dec._verify, dev), _Timed(dec._mtp_step, dev)
    it = dec.decode(dec.prefill(prompt_ids), GREEDY, new_tokens)
    toks = [next(it)[0]]
    sync(dev)
    rounds = []
    while True:
        out = []
        t = timer(lambda: out.append(next(it, None)))
        if out[0] is None:
            break
        rounds.append(t)
        toks.append(out[0][0])
    s.close()
    st = dec.stats
    verify_s = dec._verify.median()
    mtp_s = dec._mtp_step.median(lambda a: len(a) < 4 or a[3])  # drafting steps (with the head)
    feed_s = dec._mtp_step.median(lambda a: len(a) >= 4 and not a[3])  # cache updates only (None: none ran)
    plain_s = statistics.median(steps)
    timed = rounds[1:] or rounds  # the first token's round is warm-up when there are others
    mtp_per_token = sum(timed) / len(timed)
    a = st.acceptance_rate if acceptance is None else acceptance
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "identical": toks == ref,
            **{"mtp_" + k: v for k, v in st.as_dict().items()},
            "plain_ms_per_token": plain_s * 1000, "plain_tokens_per_s": 1 / plain_s,
            "mtp_ms_per_token": mtp_per_token * 1000, "effective_tokens_per_s": 1 / mtp_per_token,
            "verify_ms": verify_s * 1000, "mtp_step_ms": mtp_s * 1000,
            "mtp_feed_ms": None if feed_s is None else feed_s * 1000,
            "projected_acceptance": a, "projected_tokens_per_s": projected_tokens_per_s(verify_s, mtp_s, a, feed_s),
            "cuda_graph": dec.graph}

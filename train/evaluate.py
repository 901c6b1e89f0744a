"""Evaluate a built-in-model candidate on the CPU (issue #21): what it knows, how it answers.

    python -m dsv4.train.evaluate --model engine/builtin --name builtin_before

Runs the model folder through the engine (``load_model``, ``Session``, greedy decoding, chat mode:
what ``dsv4 chat --temperature 0`` does) on a fixed evaluation set and writes
``train/results/eval_<name>.json``. The set (``train/results/evalset.json``) is built once from the
installed Python's documentation by ``build_evalset`` (seeded) and then read back, so two models are
compared on the same questions. Metrics:

- ``heldout_perplexity``: on the held-out-module conversations (train/data.py HELDOUT_MODULES, never
  trained on; ``results/heldout_modules.txt``), exact, faithful, and exact on a ``convert_checkpoint``
  copy (NVFP4 experts, FP8 dense); first ``--ppl-tokens`` tokens.
- ``heldout_names``: "What does X do?" about held-out-module functions and classes: exact-match rate
  of the function (the answer's first backticked name is X) and of the module (the answer's
  "`m` module" is X's module).
- ``first_sentence``: 100 sampled "What does X do?" questions about trained objects, checked against
  X's docstring: the answer's intro (kind and module) and the docstring's first sentence. Scored
  teacher-forced: one forward over question + reference; the greedy answer begins with the
  reference exactly when every reference token is the argmax at its position (so this is greedy
  decoding's exact match, computed in one forward instead of one per token). Token agreement too.
- ``howto``: how-to questions from train/howto.py in phrasings never trained on; right when the
  answer's first backticked name is the table's function; ``which_module``: the module named.
- ``followup``: a second turn ("Which arguments does it accept?" ...) after a "What does X do?"
  answer; right when the answer's first backticked name is X (and, for parameters, a real
  parameter of X is named).
- ``off_topic``: refusal rate on off-topic questions never trained on (the reply says it only knows
  Python's standard library / can't help), and the false-refusal rate on the how-to questions.
- ``mtp``: greedy agreement of the MTP layer's next-next-token prediction with the main model's
  greedy next token one position later (what MTP speculative decoding accepts at temperature 0),
  teacher-forced on held-out text; and the MTP top-1 accuracy against the text.
- ``examples``: a few full greedy answers, verbatim.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dsv4.engine.checkpoint.convert import convert_checkpoint
from dsv4.engine.checkpoint.loader import load_model
from dsv4.engine.runtime.chat import encode_chat
from dsv4.engine.runtime.session import Session
from dsv4.engine.runtime.tokenizer import Tokenizer
from dsv4.engine.tools.bench import perplexity

from . import data, howto
from .trainer import sequence_handles

RESULTS = Path(__file__).resolve().parent / "results"
EVALSET = RESULTS / "evalset.json"
HELDOUT_TEXT = RESULTS / "heldout_modules.txt"
BOS = "<｜begin▁of▁sentence｜>"

EVAL_WHICH_MODULE = ("What module would you use to {t}?",)
EVAL_FOLLOWUPS = {
    "params": "Which arguments does it accept?",
    "example": "Could you show some example code?",
    "returns": "And what does it give back?",
    "module": "What do I import to use it?",
}
REFUSAL = re.compile(r"only know Python|can(?:'|no)t (?:help|answer)|not able to answer|outside (?:of )?Python",
                     re.IGNORECASE)
_NAME = re.compile(r"`([A-Za-z_][\w.]*)")


# ------------------------------------------------------------------ the evaluation set
def build_evalset(seed: int = 0, n_heldout: int = 30, n_first: int = 100, n_howto: int = 30,
                  n_which: int = 10, n_followup: int = 20) -> dict:
    rng = random.Random(seed)
    held = [o for o in data.heldout_objects() if o["kind"] in ("function", "class")]
    trained = [o for o in data.training_objects() if o["kind"] in ("function", "class", "method")
               and o["module"] in data.MODULES]
    hows = data.howto_objects()

    def what(o):
        return {"name": o["name"], "module": o["module"], "kind": o["kind"],
                "question": data.WHAT[0].format(q=o["name"]), "intro": data.intro(o),
                "first_sentence": data.first_sentence(o["doc"])}

    howto_items = []
    for task, o, _ in rng.sample(hows, min(n_howto, len(hows))):
        howto_items.append({"question": rng.choice(howto.EVAL_HOWTO_TEMPLATES).format(t=task), "name": o["name"],
                            "module": o["module"]})
    with_module = [h for h in hows if h[1]["module"] != "builtins"]
    which = [{"question": EVAL_WHICH_MODULE[0].format(t=task), "module": o["module"], "name": o["name"]}
             for task, o, _ in rng.sample(with_module, min(n_which, len(with_module)))]
    followups = []
    pool = [h[1] for h in hows] + rng.sample(trained, 60)
    rng.shuffle(pool)
    kinds = list(EVAL_FOLLOWUPS)
    for o in pool:
        if len(followups) >= n_followup:
            break
        k = kinds[len(followups) % len(kinds)]
        if not data.followup_answer(o, k):
            continue
        params = [p for p, _ in (data._parameters(o["obj"]) or [])]
        followups.append({"name": o["name"], "module": o["module"], "kind": k, "params": params,
                          "messages": [{"role": "user", "content": data.WHAT[0].format(q=o["name"])},
                                       {"role": "assistant", "content": data.what_answer(o)},
                                       {"role": "user", "content": EVAL_FOLLOWUPS[k]}]})
    return {
        "python": __import__("sys").version.split()[0], "seed": seed,
        "heldout_modules": list(data.HELDOUT_MODULES),
        "heldout_what": [what(o) for o in rng.sample(held, min(n_heldout, len(held)))],
        "first_sentence": [what(o) for o in rng.sample(trained, min(n_first, len(trained)))],
        "howto": howto_items, "which_module": which, "followup": followups,
        "off_topic": list(data.EVAL_OFF_TOPIC),
    }


def heldout_text(seed: int = 0) -> str:
    """The held-out-module conversations as one text (bos left out: perplexity prepends it), in a
    seeded random order so that its first tokens cover every held-out module."""
    _, held = data.conversations(seed)
    random.Random(seed).shuffle(held)
    return "".join(data.render(c) for c in held)[len(BOS):]


def load_evalset(path: Path = EVALSET) -> dict:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(build_evalset(), indent=1, ensure_ascii=False))
    if not HELDOUT_TEXT.exists():
        HELDOUT_TEXT.write_text(heldout_text(), encoding="utf-8")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ running the model
class Runner:
    """Greedy chat-mode answers and teacher-forced checks through one engine Session."""

    def __init__(self, model, tok: Tokenizer, max_context: int = 1024):
        self.model, self.tok = model, tok
        self.session = Session(model, max_context)
        self.tokens = 0

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.tok.encode(encode_chat(messages, thinking=False))

    def answer(self, messages: list[dict], max_new: int, stop=None) -> str:
        """Greedy answer to the conversation, stopped at eos, ``max_new`` tokens, or ``stop(text)``."""
        s = self.session
        s.reset()
        logits = s.prefill(self.prompt(messages))
        out, text = [], ""
        for _ in range(max_new):
            t = int(logits.argmax())
            if t == self.tok.eos_id:
                break
            out.append(t)
            text = self.tok.decode(out)
            if stop is not None and stop(text):
                break
            logits = s.step(t)
        self.tokens += len(out)
        return text

    def forced(self, messages: list[dict], target: str) -> tuple[bool, float, list[int]]:
        """(greedy reproduces ``target`` exactly, fraction of its tokens that are the argmax, the
        positions of the target's tokens that are not) after the conversation's prompt."""
        return self.forced_ids(messages, self.tok.encode(target))

    def forced_ids(self, messages: list[dict], t: list[int]) -> tuple[bool, float, list[int]]:
        s = self.session
        s.reset()
        p = self.prompt(messages)
        logits = s.prefill(p + t, last_only=False)
        pred = logits[len(p) - 1: len(p) - 1 + len(t)].argmax(-1).tolist()
        wrong = [i for i, (a, b) in enumerate(zip(pred, t)) if a != b]
        return not wrong, 1 - len(wrong) / len(t), wrong


def first_name(text: str) -> str:
    """The first backticked name of an answer (a call's name without its arguments)."""
    m = _NAME.search(text)
    return m.group(1) if m else ""


def named_module(text: str) -> str:
    m = re.search(r"`([\w.]+)` module", text)
    return m.group(1) if m else ""


def _closed_names(n: int):
    """A stop rule: n backticked spans completed (or a call's '(' reached in the last one)."""
    def stop(text: str) -> bool:
        ticks = text.count("`")
        return ticks >= 2 * n or (ticks == 2 * n - 1 and "(" in text[text.rfind("`"):])
    return stop


def _rate(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def eval_names(r: Runner, items: list[dict]) -> dict:
    rows = []
    for it in items:
        a = r.answer([{"role": "user", "content": it["question"]}], 28, _closed_names(2))
        rows.append({"name": it["name"], "answer": a, "function_ok": first_name(a) == it["name"],
                     "module_ok": named_module(a) == it["module"]})
    return {"n": len(rows), "function_exact_match": _rate(x["function_ok"] for x in rows),
            "module_exact_match": _rate(x["module_ok"] for x in rows),
            "both": _rate(x["function_ok"] and x["module_ok"] for x in rows), "rows": rows}


def eval_first_sentence(r: Runner, items: list[dict]) -> dict:
    rows = []
    for it in items:
        msgs = [{"role": "user", "content": it["question"]}]
        # the intro, then the sentence after it; each scored with the reference before it
        ok_all, agree, wrong = r.forced(msgs, f"{it['intro']} {it['first_sentence']}")
        n_intro = len(r.tok.encode(it["intro"]))
        intro_ok = all(w >= n_intro for w in wrong)
        sent_ok = all(w < n_intro for w in wrong)
        rows.append({"name": it["name"], "exact": ok_all, "intro_ok": intro_ok, "sentence_ok": sent_ok,
                     "token_agreement": round(agree, 4)})
    return {"n": len(rows), "exact": _rate(x["exact"] for x in rows),
            "intro_exact": _rate(x["intro_ok"] for x in rows),
            "sentence_exact_given_intro": _rate(x["sentence_ok"] for x in rows),
            "token_agreement": _rate(x["token_agreement"] for x in rows), "rows": rows}


def eval_howto(r: Runner, items: list[dict], which: list[dict]) -> dict:
    rows = []
    for it in items:
        a = r.answer([{"role": "user", "content": it["question"]}], 20, _closed_names(1))
        rows.append({"question": it["question"], "expected": it["name"], "answer": a,
                     "ok": first_name(a) == it["name"], "refused": bool(REFUSAL.search(a))})
    wrows = []
    for it in which:
        a = r.answer([{"role": "user", "content": it["question"]}], 20, _closed_names(1))
        wrows.append({"question": it["question"], "expected": it["module"], "answer": a,
                      "ok": bool(re.search(rf"`{re.escape(it['module'])}[`.]", a))})
    return {"howto": {"n": len(rows), "names_right_function": _rate(x["ok"] for x in rows),
                      "false_refusal": _rate(x["refused"] for x in rows), "rows": rows},
            "which_module": {"n": len(wrows), "names_right_module": _rate(x["ok"] for x in wrows), "rows": wrows}}


def eval_followups(r: Runner, items: list[dict]) -> dict:
    rows = []
    for it in items:
        n = 2 if it["kind"] == "module" else 1
        a = r.answer(it["messages"], 40 if it["kind"] == "params" else 24,
                     None if it["kind"] == "params" else _closed_names(n))
        ok = first_name(a) == it["name"]
        if it["kind"] == "params" and it["params"]:
            ok = ok and any(f"`{p.lstrip('*')}" in a or f"{p.lstrip('*')}=" in a or f"({p.lstrip('*')}" in a
                            or f" {p.lstrip('*')}," in a for p in it["params"])
        if it["kind"] == "module" and it["module"] != "builtins":
            ok = ok and it["module"] in a
        rows.append({"name": it["name"], "kind": it["kind"], "question": it["messages"][-1]["content"],
                     "answer": a, "ok": ok})
    by = {k: _rate(x["ok"] for x in rows if x["kind"] == k) for k in EVAL_FOLLOWUPS}
    return {"n": len(rows), "accuracy": _rate(x["ok"] for x in rows), "by_kind": by, "rows": rows}


def eval_off_topic(r: Runner, questions: list[str]) -> dict:
    rows = []
    for q in questions:
        a = r.answer([{"role": "user", "content": q}], 16)
        rows.append({"question": q, "answer": a, "refused": bool(REFUSAL.search(a))})
    return {"n": len(rows), "refusal_rate": _rate(x["refused"] for x in rows), "rows": rows}


def eval_mtp(model, ids: list[int], bos: int, window: int) -> dict:
    """Teacher-forced MTP agreement on ``ids`` (one window from position 0)."""
    if not model.has_mtp:
        return {"available": False}
    seq = torch.tensor([bos] + ids[: window - 1])
    layers, mtp = sequence_handles(model, model.device)
    with torch.inference_mode():
        logits, streams = model.forward(seq, layers, 0, return_streams=True)
        mlog = model.mtp_forward(streams[:-1], seq[1:], mtp, 0)  # row t predicts token t+2
    main_next = logits.argmax(-1)  # row t: greedy token t+1
    draft = mlog[:-1].argmax(-1)  # rows 0..S-3: drafts of tokens 2..S-1
    agree = (draft == main_next[1:-1]).float().mean().item()
    acc = (draft == seq[2:]).float().mean().item()
    main_acc = (main_next[:-1] == seq[1:]).float().mean().item()
    return {"available": True, "tokens": int(seq.numel()), "greedy_acceptance": agree, "mtp_top1_accuracy": acc,
            "main_top1_accuracy": main_acc}


def heldout_perplexities(model_dir: Path, tok: Tokenizer, ids: list[int], max_context: int) -> dict:
    out = {}
    for mode in ("exact", "faithful"):
        out[mode] = perplexity(load_model(model_dir, mode=mode), ids, tok.bos_id, max_context)["perplexity"]
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "converted"
        convert_checkpoint(model_dir, dst)
        out["converted"] = perplexity(load_model(dst, mode="exact"), ids, tok.bos_id, max_context)["perplexity"]
        shutil.rmtree(dst, ignore_errors=True)
    out["tokens"] = len(ids)
    out["max_context"] = max_context
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="model folder (published or converted layout)")
    ap.add_argument("--name", required=True, help="writes train/results/eval_<name>.json")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored for perplexity")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=None, help="at most this many items per metric (a quick run)")
    ap.add_argument("--skip", default="", help="comma-separated metrics to leave out (ppl,names,first,howto,"
                                              "followup,offtopic,mtp,examples)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: batch-1 decoding is launch-bound, and on a shared machine "
                         "extra threads only wait on each other)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    es = load_evalset()
    lim = (lambda xs: xs[: args.limit]) if args.limit else (lambda xs: xs)  # noqa: E731
    t0 = time.time()
    tok = Tokenizer.from_dir(args.model)
    model = load_model(args.model, mode="exact")
    r = Runner(model, tok, args.max_context)
    held_ids = tok.encode(HELDOUT_TEXT.read_text(encoding="utf-8"))[: args.ppl_tokens]
    res: dict = {"model": str(args.model), "evalset": str(EVALSET.name), "evalset_python": es["python"],
                 "heldout_modules": es["heldout_modules"], "limit": args.limit, "threads": args.threads,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    timing = {}

    def run(key, fn):
        if key in skip:
            return
        t = time.time()
        res.update(fn())
        timing[key] = round(time.time() - t, 1)
        print(f"{key}: {timing[key]} s", flush=True)

    run("mtp", lambda: {"mtp": eval_mtp(model, held_ids, tok.bos_id, min(args.max_context, len(held_ids) + 1))})
    run("first", lambda: {"first_sentence": eval_first_sentence(r, lim(es["first_sentence"]))})
    run("names", lambda: {"heldout_names": eval_names(r, lim(es["heldout_what"]))})
    run("howto", lambda: eval_howto(r, lim(es["howto"]), lim(es["which_module"])))
    run("followup", lambda: {"followup": eval_followups(r, lim(es["followup"]))})
    run("offtopic", lambda: {"off_topic": eval_off_topic(r, lim(es["off_topic"]))})
    run("examples", lambda: {"examples": {q: r.answer([{"role": "user", "content": q}], 60) for q in (
        "What does json.dumps do?", "How do I read a file line by line?", "Who won the football world cup in 2018?")}})
    run("ppl", lambda: {"heldout_perplexity": heldout_perplexities(args.model, tok, held_ids, args.max_context)})
    res["seconds"] = timing
    res["generated_tokens"] = r.tokens
    res["total_seconds"] = round(time.time() - t0, 1)
    summary = summarize(res)
    res["summary"] = summary
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"eval_{args.name}.json"
    path.write_text(json.dumps(res, indent=1, ensure_ascii=False))
    print(json.dumps(summary, indent=1))
    print(f"wrote {path} ({res['total_seconds']} s)")
    return res


def summarize(res: dict) -> dict:
    """The headline numbers of one evaluation (NaN-free: missing metrics are left out)."""
    picks = {
        "heldout_ppl_exact": ("heldout_perplexity", "exact"), "heldout_ppl_faithful": ("heldout_perplexity", "faithful"),
        "heldout_ppl_converted": ("heldout_perplexity", "converted"),
        "heldout_function_exact_match": ("heldout_names", "function_exact_match"),
        "heldout_module_exact_match": ("heldout_names", "module_exact_match"),
        "first_sentence_exact": ("first_sentence", "exact"), "first_sentence_intro": ("first_sentence", "intro_exact"),
        "first_sentence_token_agreement": ("first_sentence", "token_agreement"),
        "howto_right_function": ("howto", "names_right_function"), "howto_false_refusal": ("howto", "false_refusal"),
        "which_module_right": ("which_module", "names_right_module"), "followup_accuracy": ("followup", "accuracy"),
        "off_topic_refusal": ("off_topic", "refusal_rate"), "mtp_greedy_acceptance": ("mtp", "greedy_acceptance"),
    }
    out = {}
    for k, (a, b) in picks.items():
        v = res.get(a, {}).get(b)
        if isinstance(v, float) and not math.isnan(v):
            out[k] = round(v, 4)
    return out


if __name__ == "__main__":
    main()

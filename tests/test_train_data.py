"""The issue-#21 training data (train/data.py, train/howto.py) and the evaluation's scoring rules
(train/evaluate.py): held out by module, answers grounded in the docstrings, follow-ups that refer
back, off-topic refusals, reproducible; the teacher-forced check equals greedy decoding."""

import dataclasses
import re

import pytest
import torch

from dsv4.engine.model.model import Model
from dsv4.engine.runtime.tokenizer import Tokenizer, build_byte_tokenizer
from dsv4.engine.tools.synthetic import random_tensors, tiny_configs
from dsv4.train import data, evaluate, howto


@pytest.fixture(scope="module")
def convs():
    return data.conversations(0)


def _texts(c):
    return [m["content"] for m in c]


def test_held_out_modules_never_appear_in_training(convs):
    train, held = convs
    assert len(train) > 10000 and len(held) > 100
    mods = "|".join(re.escape(m) for m in data.HELDOUT_MODULES)
    named = re.compile(rf"`(?:{mods})(?:[.`(])")  # a held-out module or one of its objects, as an answer names it
    asked = re.compile(rf"\b(?:{mods})\.\w")
    for c in train:
        for m in c:
            assert not named.search(m["content"]), m["content"]
            if m["role"] == "user":
                assert not asked.search(m["content"]), m["content"]
    assert not {n.split(".")[0] for _, n, _ in howto.TASKS} & set(data.HELDOUT_MODULES)
    # every held-out conversation is about a held-out module
    for c in held:
        assert named.search(c[1]["content"]), c
    assert not set(data.HELDOUT_MODULES) & set(data.MODULES)


def test_data_is_reproducible(convs):
    again = data.conversations(0)
    assert again == convs


def test_first_sentence_skips_signature_lines_and_keeps_abbreviations():
    assert data.first_sentence("Return the square root of x.") == "Return the square root of x."
    doc = "getattr(object, name[, default]) -> value\n\nGet a named attribute from an object; getattr(x, 'y') is\n" \
          "equivalent to x.y.\nWhen a default argument is given, it is returned."
    assert data.first_sentence(doc) == "Get a named attribute from an object; getattr(x, 'y') is equivalent to x.y."
    assert data.first_sentence("Split text, e.g. on commas. Then more.") == "Split text, e.g. on commas."
    assert data.first_sentence(">>> f(1)\n2") == ""
    long = "Word " * 100 + "end."
    assert len(data.first_sentence(long)) <= data.MAX_SENTENCE + 3


def test_what_does_answers_are_the_intro_first_sentence_and_signature(convs):
    train, _ = convs
    by_q = {c[0]["content"]: c[1]["content"] for c in train if len(c) == 2}
    a = by_q["What does json.dumps do?"]
    assert a.startswith("`json.dumps` is a function in the `json` module. Serialize ``obj`` to a JSON formatted ``str``.")
    assert a.endswith("\n\nSignature: `json.dumps(obj, ...)`")
    assert len(a) < 400


def test_howto_answers_name_the_function_first_grounded_in_its_docstring(convs):
    rows = data.howto_objects()
    assert len(rows) >= 150  # the table resolves in this Python
    for task, o, example in rows:
        a = data.howto_answer(o, example)
        assert evaluate.first_name(a) == o["name"], (task, a)
        assert data.first_sentence(o["doc"]) in a and "```python\n" in a
    train, _ = convs
    qs = {c[0]["content"]: c for c in train}
    c = qs["How do I read a file line by line?"]
    assert evaluate.first_name(c[1]["content"]) == "open"
    c = qs["Which module should I use to parse JSON?"]
    assert evaluate.named_module(c[1]["content"]) == "json" and "`json.loads`" in c[1]["content"]
    # the evaluation's phrasings are never trained on
    trained_q = {c[0]["content"] for c in train}
    for t in howto.EVAL_HOWTO_TEMPLATES + evaluate.EVAL_WHICH_MODULE:
        assert not any(t.format(t=task) in trained_q for task, _, _ in howto.TASKS)


def test_followups_refer_back_to_the_first_answer(convs):
    train, _ = convs
    multi = [c for c in train if len(c) == 4 and c[2]["content"] in {q for qs in data.FOLLOWUPS.values() for q in qs}]
    assert len(multi) > 1000
    kinds = set()
    for c in multi:
        first = evaluate.first_name(c[1]["content"])
        if c[1]["content"].startswith("Use ") or c[1]["content"].startswith("`"):
            assert evaluate.first_name(c[3]["content"]) == first, c
        kinds |= {k for k, qs in data.FOLLOWUPS.items() if c[2]["content"] in qs}
    assert kinds == set(data.FOLLOWUPS)
    trained_q = {m["content"] for c in train for m in c if m["role"] == "user"}
    assert not set(evaluate.EVAL_FOLLOWUPS.values()) & trained_q


def test_off_topic_is_refused_and_modes_are_mixed(convs):
    train, _ = convs
    off = [c for c in train if data.REFUSAL_MARK.lower() in c[-1]["content"].lower()]
    assert len(off) > 500
    assert all(evaluate.REFUSAL.search(c[-1]["content"]) for c in off)
    trained_q = {c[0]["content"] for c in train}
    assert not set(data.EVAL_OFF_TOPIC) & trained_q
    texts = [data.render(c) for c in train[:400]]
    thinking = sum("<think>" in t for t in texts)
    assert 40 < thinking < 200  # about a quarter in thinking mode, the rest chat mode
    assert all(t.startswith("<｜begin▁of▁sentence｜><｜User｜>") and t.endswith("<｜end▁of▁sentence｜>") for t in texts)
    # no how-to or what-does answer carries the refusal
    assert not any(evaluate.REFUSAL.search(c[1]["content"]) for c in train if c[1]["content"].startswith("`"))


def test_scoring_rules():
    assert evaluate.first_name("Use `json.loads` from the `json` module.") == "json.loads"
    assert evaluate.first_name("`json.dumps(obj, *, skipkeys=False)` takes:") == "json.dumps"
    assert evaluate.named_module("`x.y` is a class in the `x` module.") == "x"
    stop = evaluate._closed_names(1)
    assert not stop("Use `json.lo") and stop("Use `json.loads`") and stop("`f(a")
    assert evaluate.REFUSAL.search("Sorry, I can't help with that") and not evaluate.REFUSAL.search("Use `open`.")


def test_teacher_forced_check_is_greedy_decoding():
    tok = Tokenizer(build_byte_tokenizer())
    cfg = dataclasses.replace(tiny_configs()["swa-csa-hca"], vocab_size=tok.vocab_size)
    model = Model.from_state_dict(cfg, random_tensors(cfg, 4), "exact")
    r = evaluate.Runner(model, tok, 512)
    msgs = [{"role": "user", "content": "What does json.dumps do?"}]
    s = r.session  # greedy decoding, token by token
    s.reset()
    logits = s.prefill(r.prompt(msgs))
    ids = []
    for _ in range(6):
        ids.append(int(logits.argmax()))
        logits = s.step(ids[-1])
    assert r.forced_ids(msgs, ids) == (True, 1.0, [])
    other = ids[:3] + [(ids[3] + 1) % tok.vocab_size] + ids[4:]
    ok, agree, wrong = r.forced_ids(msgs, other)
    assert not ok and wrong[0] == 3 and agree < 1


def test_mtp_agreement_is_measured_on_the_main_models_greedy_tokens():
    cfg = tiny_configs()["swa-csa-hca"]
    model = Model.from_state_dict(cfg, random_tensors(cfg, 6), "exact")
    ids = torch.randint(6, cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    m = evaluate.eval_mtp(model, ids, 0, 150)
    assert m["available"] and m["tokens"] == 150
    assert 0 <= m["greedy_acceptance"] <= 1 and 0 <= m["mtp_top1_accuracy"] <= 1

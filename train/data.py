"""Conversations about the Python standard library, built from the installed Python's own documentation.

Sources (PSF licence, available offline in every Python install): the docstrings, signatures and
doctest examples of the public functions, classes and methods of a fixed list of standard-library
modules (``MODULES``), their module docstrings, and the language-reference topics that ``help()``
shows (``pydoc_data.topics``). Nothing is downloaded; the same Python gives the same data (seeded).

Kinds of conversation (all rendered with the DeepSeek-V4 chat encoding, engine/runtime/chat.py, in
chat mode, a quarter in thinking mode with a short reasoning):
- "What does X do?" (and other phrasings): X's kind and module, then the FIRST SENTENCE of its
  docstring and its signature; answers are kept short so a small model can learn them exactly;
- parameters ("What arguments does X take?", from the signature), return values (the docstring's
  "Return ..." sentence), examples (the doctest examples inside the docstring, else the curated
  example of train/howto.py);
- how-to and which-module questions from the curated task table of train/howto.py, each answer
  naming the function first and grounded in its docstring;
- multi-turn follow-ups that refer back ("What arguments does it take?", "Show an example.") after a
  "What does X do?" or how-to answer;
- off-topic questions (sports, history, weather, cooking, ...) answered with a short, honest "I only
  know Python's standard library" reply, and greetings.

Held out BY MODULE: the modules of ``HELDOUT_MODULES`` are never trained on (no question, answer or
how-to row names them); their conversations are the held-out text (perplexity) and the source of the
held-out questions of train/evaluate.py.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import random
import re
import textwrap
import warnings

from dsv4.engine.runtime.chat import encode_chat

from . import howto

MODULES = (
    "abc argparse array ast asyncio base64 binascii bisect builtins bz2 calendar cmath codecs collections "
    "collections.abc colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "email email.message email.utils enum errno fnmatch fractions ftplib functools gc getopt getpass gettext "
    "glob graphlib gzip hashlib heapq hmac html html.parser http http.client http.server imaplib importlib "
    "inspect io ipaddress itertools json keyword linecache locale logging logging.handlers lzma mailbox "
    "marshal math mimetypes mmap multiprocessing numbers operator os os.path pathlib pickle pkgutil "
    "platform plistlib poplib pprint queue quopri random re reprlib sched secrets select selectors shelve "
    "shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct subprocess "
    "sys sysconfig tarfile tempfile textwrap threading time timeit token tokenize tomllib trace traceback "
    "types typing unicodedata unittest unittest.mock urllib.error urllib.parse urllib.request uuid warnings "
    "wave weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib zoneinfo concurrent.futures"
).split()

# Never trained on (neither the first built-in model nor this data names them): the evaluation's
# held-out modules. All exist in Python 3.11 and 3.12.
HELDOUT_MODULES = ("fileinput filecmp pty codeop zipapp netrc bdb pstats py_compile compileall pyclbr runpy "
                   "optparse copyreg rlcompleter wsgiref.util xmlrpc.client symtable").split()

WHAT = (
    "What does {q} do?", "What is {q}?", "Explain {q}.", "Tell me about {q}.",
    "What is {q} used for?", "Can you describe {q}?", "What does {q} do in Python?",
)
PARAMS_Q = ("What arguments does {q} take?", "What are the parameters of {q}?", "How do I call {q}?",
            "What is the signature of {q}?")
RETURNS_Q = ("What does {q} return?", "What is the return value of {q}?")
EXAMPLE_Q = ("Show an example of {q}.", "Can you give me an example using {q}?", "How is {q} used? Show code.")
MODULE_Q = ("What is the {m} module?", "What is the {m} module for?", "Tell me about the {m} module.",
            "What does the {m} module do?")
TOPIC_Q = ("Explain {t} in Python.", "How does {t} work in Python?", "What is {t}?", "Tell me about {t}.")

# follow-ups that refer back to the function of the previous answer, by what they ask for
FOLLOWUPS = {
    "params": ("What arguments does it take?", "What parameters does it have?", "What are its arguments?",
               "How do I call it?"),
    "example": ("Show an example.", "Can you show me an example?", "Give me an example.", "Show me some code."),
    "returns": ("What does it return?", "What is its return value?"),
    "module": ("Which module is it in?", "Where is it defined?"),
}

MAX_SENTENCE = 240  # characters of a first sentence (longer ones are cut at a clause)

REFUSAL_MARK = "I only know Python's standard library"

_HOWTO_EXAMPLES: dict[str, str] = {}
for _task, _name, _example in howto.TASKS:
    _HOWTO_EXAMPLES.setdefault(_name, _example)


# ------------------------------------------------------------------ reading the documentation
def _paragraphs(doc: str) -> list[str]:
    doc = inspect.cleandoc(doc or "")
    out = []
    for para in re.split(r"\n\s*\n", doc):
        para = " ".join(line.strip() for line in para.splitlines()).strip()
        if para:
            out.append(para)
    return out


_SIG_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_SENT_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)\.(\s+(?=[A-Z`(\"'])|$)")


def _prose(doc: str) -> list[str]:
    """The docstring's paragraphs without signature lines (C functions start with ``f(x) -> y``)
    and without doctest examples."""
    return [p for p in _paragraphs(doc) if not _SIG_LINE.match(p) and not p.startswith(">>>")]


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring: what the evaluation checks answers against."""
    paras = _prose(doc)
    if not paras:
        return ""
    para = paras[0]
    m = _SENT_END.search(para)
    s = para[: m.start() + 1] if m else para
    if len(s) > MAX_SENTENCE:
        cut = s[:MAX_SENTENCE]
        k = max(cut.rfind("; "), cut.rfind(", "))
        s = (cut[:k] if k > 80 else cut.rsplit(" ", 1)[0]) + "..."
    return s.strip()


def returns_sentence(doc: str) -> str:
    """The docstring's first sentence that says what is returned ('Return ...'), or ''."""
    for para in _prose(doc)[:3]:
        pos = 0
        while pos < len(para):
            m = _SENT_END.search(para, pos)
            end = m.start() + 1 if m else len(para)
            s = para[pos:end].strip()
            if re.match(r"(Return|Returns|Get|Gets) ", s) and 15 < len(s) <= MAX_SENTENCE:
                return s
            pos = m.end() if m else len(para)
    return ""


def doctest_example(doc: str, max_lines: int = 5) -> str:
    """The first doctest examples of a docstring as plain code (expected output as a comment)."""
    try:
        examples = doctest.DocTestParser().get_examples(inspect.cleandoc(doc or ""))
    except ValueError:
        return ""
    lines = []
    for ex in examples:
        src = ex.source.rstrip("\n").splitlines()
        want = ex.want.strip().splitlines()
        if len(lines) + len(src) > max_lines:
            break
        if want and len(src) == 1 and len(want) == 1 and len(src[0]) + len(want[0]) < 90:
            lines.append(f"{src[0]}  # {want[0]}")
        else:
            lines += src
    return "\n".join(lines)


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    sig = re.sub(r" at 0x[0-9a-f]+", "", sig)  # reprs with memory addresses would differ per run
    if len(sig) > 90:
        sig = sig[:sig.find(",") if sig.find(",") > 0 else 1] + ", ...)"
    return name + sig


def _short_repr(v) -> str:
    try:
        r = repr(v)
    except Exception:
        r = type(v).__name__
    return re.sub(r" at 0x[0-9a-f]+", "", r)[:30]  # reprs with memory addresses would differ per run


def _parameters(obj) -> list[tuple[str, str]] | None:
    """[(name, description)] from the signature (None when it has none)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    out = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        if p.kind is p.VAR_POSITIONAL:
            out.append((f"*{p.name}", "any number of positional arguments"))
        elif p.kind is p.VAR_KEYWORD:
            out.append((f"**{p.name}", "any keyword arguments"))
        else:
            d = "required" if p.default is p.empty else f"default `{_short_repr(p.default)}`"
            if p.kind is p.KEYWORD_ONLY:
                d += ", keyword-only"
            elif p.kind is p.POSITIONAL_ONLY:
                d += ", positional-only"
            out.append((p.name, d))
    return out


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    if inspect.ismethod(obj) or inspect.ismethoddescriptor(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return ""


def _import(mname: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(mname)


def documented_objects(modules=MODULES) -> list[dict]:
    """[{name, module, kind, signature, doc, obj}] for the public documented API of ``modules``."""
    seen, out = set(), []
    for mname in modules:
        try:
            mod = _import(mname)
        except Exception:
            continue
        if mod.__doc__ and mname not in seen:
            seen.add(mname)
            out.append({"name": mname, "module": mname, "kind": "module", "signature": "", "doc": mod.__doc__,
                        "obj": mod})
        public = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for attr in sorted(set(public)):
            obj = getattr(mod, attr, None)
            kind = _kind(obj)
            if not kind or not getattr(obj, "__doc__", None):
                continue
            home = getattr(obj, "__module__", mname) or mname
            if mname != "builtins" and home.split(".")[0] not in (mname.split(".")[0], "_" + mname.split(".")[0], "posixpath", "_io", "_collections_abc"):
                continue
            q = attr if mname == "builtins" else f"{mname}.{attr}"
            if q in seen:
                continue
            seen.add(q)
            out.append({"name": q, "module": mname, "kind": kind, "signature": _signature(q, obj), "doc": obj.__doc__,
                        "obj": obj})
            if kind == "class":
                for mn, meth in sorted(vars(obj).items()):
                    if mn.startswith("_") or not getattr(meth, "__doc__", None) or not _kind(meth):
                        continue
                    mq = f"{q}.{mn}"
                    if mq not in seen:
                        seen.add(mq)
                        bound = getattr(obj, mn, meth)
                        out.append({"name": mq, "module": mname, "kind": "method",
                                    "signature": _signature(mq, bound), "doc": meth.__doc__, "obj": bound})
    return out


def resolve(name: str) -> dict | None:
    """The object dict for a qualified name ('os.path.exists', 'str.split', 'open'), or None."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        mname = ".".join(parts[:k])
        try:
            obj = _import(mname)
        except Exception:
            continue
        rest = parts[k:]
        break
    else:
        mname, obj, rest = "builtins", _import("builtins"), parts
    if not rest:
        return None
    parent = None
    for attr in rest:
        parent, obj = obj, getattr(obj, attr, None)
        if obj is None:
            return None
    kind = _kind(obj)
    if inspect.isclass(parent) and kind == "function":
        kind = "method"
    if not kind or not obj.__doc__:
        return None
    return {"name": name, "module": mname, "kind": kind, "signature": _signature(name, obj), "doc": obj.__doc__,
            "obj": obj}


def topic_objects() -> list[dict]:
    """Language-reference topics from pydoc (e.g. 'assert', 'for', 'exceptions')."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    out = []
    for key, text in sorted(topics.items()):
        first = text.strip().splitlines()[0].strip()
        title = first if 3 < len(first) < 60 and not first.endswith(".") else key
        label = f"the {key} statement" if key in {"assert", "assignment", "break", "continue", "del", "for", "global",
                                                  "if", "import", "nonlocal", "pass", "raise", "return", "try",
                                                  "while", "with", "yield", "match", "class", "function"} else title
        body = "\n\n".join(_paragraphs(text)[1:]) or text
        out.append({"name": label, "module": "", "kind": "topic", "signature": "", "doc": body, "obj": None})
    return out


# ------------------------------------------------------------------ answers
def intro(o: dict) -> str:
    n, m, k = o["name"], o["module"], o["kind"]
    if k == "module":
        return f"`{n}` is a module of the Python standard library."
    if k == "class":
        return f"`{n}` is a class in the `{m}` module."
    if k == "method":
        return f"`{n}` is a method of `{n.rsplit('.', 1)[0]}`."
    if m == "builtins":
        return f"`{n}` is a built-in function."
    return f"`{n}` is a function in the `{m}` module."


def what_answer(o: dict) -> str:
    """The answer to "What does X do?": kind and module, the docstring's first sentence, signature."""
    if o["kind"] == "topic":
        return topic_answer(o)
    sig = f"\n\nSignature: `{o['signature']}`" if o["signature"] else ""
    return f"{intro(o)} {first_sentence(o['doc'])}{sig}"


def topic_answer(o: dict) -> str:
    sents, text = [], ""
    for para in _prose(o["doc"])[:2]:
        text = (text + " " + para).strip()
        if len(text) > 300:
            break
    cut = text[:320]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 60 else cut.rstrip() + "..."


def params_answer(o: dict) -> str:
    ps = _parameters(o["obj"]) if o.get("obj") is not None else None
    if ps is None or not o["signature"]:
        return ""
    if not ps:
        return f"`{o['signature']}` takes no arguments."
    listed = "\n".join(f"- `{n}`: {d}" for n, d in ps[:8])
    more = f"\n- and {len(ps) - 8} more" if len(ps) > 8 else ""
    return f"`{o['signature']}` takes:\n{listed}{more}"


def returns_answer(o: dict) -> str:
    r = returns_sentence(o["doc"]) if o["kind"] != "class" else ""
    return f"`{o['name']}`: {r}" if r else ""


def example_answer(o: dict, example: str = "") -> str:
    code = example or _HOWTO_EXAMPLES.get(o["name"]) or doctest_example(o["doc"])
    return f"An example of `{o['name']}`:\n\n```python\n{code}\n```" if code else ""


def module_answer(o: dict) -> str:
    return f"{intro(o)} {first_sentence(o['doc'])}"


def _uses(o: dict) -> str:
    if o["module"] == "builtins":
        return f"the built-in `{o['name']}`"
    return f"`{o['name']}` from the `{o['module']}` module"


def howto_answer(o: dict, example: str) -> str:
    """How-to answer: the function first, then its docstring's first sentence, then an example
    (the table's, which imports what it uses; the docstring's own doctest when the row has none)."""
    code = doctest_example(o["doc"], max_lines=3) if not example else example
    return f"Use {_uses(o)}. {first_sentence(o['doc'])}\n\n```python\n{code}\n```"


def which_module_answer(o: dict) -> str:
    if o["module"] == "builtins":
        return f"No module is needed: use the built-in `{o['name']}`. {first_sentence(o['doc'])}"
    return f"The `{o['module']}` module: use `{o['name']}`. {first_sentence(o['doc'])}"


def followup_answer(o: dict, what: str, example: str = "") -> str:
    if what == "params":
        return params_answer(o)
    if what == "example":
        return example_answer(o, example)
    if what == "returns":
        return returns_answer(o)
    if o["module"] == "builtins":
        return f"`{o['name']}` is a built-in: it needs no import."
    return f"`{o['name']}` is in the `{o['module']}` module: `import {o['module']}`."


# ------------------------------------------------------------------ off-topic and small talk
OFF_TOPIC_SUBJECTS = {
    "sports": ("Who won the football World Cup in {y}?", "Who won the Tour de France in {y}?",
               "How many players are on a basketball team?", "Who is the best tennis player ever?",
               "When are the next Olympic Games?", "What are the rules of cricket?"),
    "history": ("When did the Roman Empire fall?", "Who was Napoleon?", "What caused the First World War?",
                "Who built the pyramids?", "What happened in {y}?", "Who was the first president of {c}?"),
    "weather": ("What's the weather like in {city} today?", "Will it rain tomorrow in {city}?",
                "How cold does it get in {city} in winter?", "Is it sunny in {city}?"),
    "cooking": ("How do I cook {dish}?", "What's a good recipe for {dish}?", "How long should I boil an egg?",
                "What wine goes with {dish}?"),
    "geography": ("What is the capital of {c}?", "How tall is Mount Everest?", "What is the longest river in {c}?",
                  "How many people live in {city}?"),
    "people": ("Who is the president of {c}?", "How old is the Pope?", "Who is the richest person in the world?"),
    "entertainment": ("Can you recommend a good movie?", "What's the best book of {y}?", "Who sings this song?",
                      "Tell me a joke about cats.", "What should I watch tonight?"),
    "health": ("How do I lose weight?", "What should I take for a headache?", "How much sleep do I need?"),
    "money": ("Should I buy bitcoin?", "What is the stock price of Apple?", "How do I do my taxes?"),
    "other languages": ("How do I center a div in CSS?", "How do I declare a variable in JavaScript?",
                        "What is a pointer in C?", "How do I install numpy?", "How do I use pandas dataframes?"),
}
OFF_TOPIC_FILL = {
    "y": ("1966", "1998", "2006", "2010", "2014", "2018", "2022", "1989", "1945"),
    "c": ("France", "Brazil", "Japan", "Kenya", "Canada", "India", "Germany", "Mexico"),
    "city": ("Paris", "Tokyo", "London", "Lagos", "Sydney", "Chicago", "Lima", "Oslo"),
    "dish": ("lasagna", "pancakes", "risotto", "curry", "a steak", "sushi", "paella"),
}
# the evaluation's off-topic questions: subjects and fillers never used in training
EVAL_OFF_TOPIC = (
    "Who won the Super Bowl in 2019?", "What's the weather forecast for Madrid this weekend?",
    "How do I bake sourdough bread?", "When was the Berlin Wall built?", "What is the capital of Australia?",
    "Who painted the Mona Lisa?", "How many moons does Jupiter have?", "What's a good exercise for back pain?",
    "Which team won the NBA finals last year?", "How do I make a cocktail with gin?",
    "Who wrote Pride and Prejudice?", "What time is it in New York?", "How do I fix a flat bicycle tire?",
    "What is the population of Nigeria?", "Who invented the telephone?", "How do I write a loop in Rust?",
    "What's the best phone to buy?", "Can you translate 'hello' into Italian?", "How far is the Moon?",
    "Who won the Eurovision song contest?",
)
OFF_TOPIC_ANSWERS = (
    REFUSAL_MARK + ", from its own documentation, so I can't answer that. Ask me about a module or a "
    "function, for example \"How do I parse JSON?\"",
    "Sorry, I can't help with that: " + REFUSAL_MARK[0].lower() + REFUSAL_MARK[1:] + ". I can explain its "
    "modules and functions, for example \"What does json.dumps do?\"",
    REFUSAL_MARK + " (its modules, functions and classes), not {topic}. Try a question like \"How do I read a "
    "file line by line?\"",
)
GREETINGS = ("Hi", "Hello", "Hello!", "Hey there", "Good morning", "Who are you?", "What can you do?",
             "What do you know?", "Help")
GREETING_ANSWER = ("Hello! I answer questions about Python's standard library: what a function does, its "
                   "arguments, which module to use for a task, and short examples. For example: \"How do I "
                   "read a CSV file?\"")
THANKS = ("Thanks!", "Thank you.", "Great, thanks.")
THANKS_ANSWER = "You're welcome. Ask me anything else about Python's standard library."


def off_topic_questions(rng: random.Random) -> list[tuple[str, str]]:
    """[(question, subject)] for training, every template with a few fillers."""
    out = []
    for subject, templates in sorted(OFF_TOPIC_SUBJECTS.items()):
        for t in templates:
            keys = re.findall(r"\{(\w+)\}", t)
            n = 4 if keys else 1
            for _ in range(n):
                out.append((t.format(**{k: rng.choice(OFF_TOPIC_FILL[k]) for k in keys}), subject))
    return out


def off_topic_answer(subject: str, rng: random.Random) -> str:
    return rng.choice(OFF_TOPIC_ANSWERS).format(topic=subject)


# ------------------------------------------------------------------ conversations
def _turn(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _reason(msgs: list[dict], text: str, rng: random.Random, p: float = 0.25) -> list[dict]:
    """Give the final answer a short reasoning (thinking mode) with probability p."""
    if rng.random() < p:
        msgs[-1]["reasoning"] = text
    return msgs


def _object_conversations(o: dict, rng: random.Random, per_object: int, followups: float) -> list[list[dict]]:
    """Single- and multi-turn conversations about one documented object."""
    out = []
    if o["kind"] == "topic":
        for q in rng.sample(TOPIC_Q, min(per_object, len(TOPIC_Q))):
            out.append(_reason(_turn(q.format(t=o["name"]), topic_answer(o)), f"The user is asking about {o['name']}. "
                               "I will summarise the language reference.", rng))
        return out
    if o["kind"] == "module":
        for q in rng.sample(MODULE_Q, min(per_object, len(MODULE_Q))):
            out.append(_reason(_turn(q.format(m=o["name"]), module_answer(o)),
                               f"The user is asking about the {o['name']} module.", rng))
        return out
    name, ans = o["name"], what_answer(o)
    why = f"The user is asking about {name}. I will say what it does, from its documentation."
    qs = [WHAT[0].format(q=name)] + [t.format(q=name) for t in rng.sample(WHAT[1:], per_object - 1)]
    for q in qs:
        out.append(_reason(_turn(q, ans), why, rng))
    extra = {"params": (PARAMS_Q, params_answer(o)), "returns": (RETURNS_Q, returns_answer(o)),
             "example": (EXAMPLE_Q, example_answer(o))}
    for what, (templates, a) in extra.items():
        if a and (what == "example" or rng.random() < 0.5):
            out.append(_reason(_turn(rng.choice(templates).format(q=name), a),
                               f"The user wants the {what} of {name}.", rng))
    if rng.random() < followups:
        kinds = [k for k in ("params", "example", "returns", "module") if followup_answer(o, k)]
        k = rng.choice(kinds)
        msgs = _turn(rng.choice(qs), ans) + _turn(rng.choice(FOLLOWUPS[k]), followup_answer(o, k))
        out.append(_reason(msgs, f"\"It\" is {name}, from my previous answer. The user wants its {k}.", rng))
    return out


def _howto_conversations(o: dict, task: str, example: str, rng: random.Random) -> list[list[dict]]:
    out = []
    ans = howto_answer(o, example)
    why = f"The user wants to {task}. In the standard library, {o['name']} does that."
    for t in howto.HOWTO_TEMPLATES:
        out.append(_reason(_turn(t.format(t=task), ans), why, rng, 0.3))
    for t in howto.WHICH_MODULE_TEMPLATES:
        out.append(_reason(_turn(t.format(t=task), which_module_answer(o)), why, rng, 0.3))
    for k in ("params", "example", "returns", "module"):
        a = followup_answer(o, k, example)
        if a:
            msgs = _turn(rng.choice(howto.HOWTO_TEMPLATES).format(t=task), ans) + _turn(rng.choice(FOLLOWUPS[k]), a)
            out.append(_reason(msgs, f"\"It\" is {o['name']}, from my previous answer. The user wants its {k}.", rng))
    return out


def howto_objects() -> list[tuple[str, dict, str]]:
    """[(task, object, example)] for the rows of train/howto.py that resolve in this Python."""
    out = []
    for task, name, example in howto.TASKS:
        o = resolve(name)
        if o is not None:
            out.append((task, o, example))
    return out


def training_objects() -> list[dict]:
    """Documented objects of MODULES, the how-to table's objects and the pydoc topics."""
    objs = documented_objects()
    names = {o["name"] for o in objs}
    for _, o, _ in howto_objects():
        if o["name"] not in names:
            names.add(o["name"])
            objs.append(o)
    objs += topic_objects()
    return [o for o in objs if first_sentence(o["doc"]) and o["module"] not in HELDOUT_MODULES]


def heldout_objects() -> list[dict]:
    return [o for o in documented_objects(HELDOUT_MODULES) if first_sentence(o["doc"])]


def conversations(seed: int = 0, per_object: int = 2, followups: float = 0.3,
                  howto_repeat: int = 2) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, heldout) lists of conversations (lists of messages, V4 roles). Held out by module."""
    rng = random.Random(seed)
    hows = howto_objects()
    train = []
    for o in training_objects():
        train += _object_conversations(o, rng, per_object, followups)
    for _ in range(howto_repeat):
        for task, o, example in hows:
            train += _howto_conversations(o, task, example, rng)
    for _ in range(6):
        for q, subject in off_topic_questions(rng):
            train.append(_reason(_turn(q, off_topic_answer(subject, rng)),
                                 f"This is a question about {subject}, not about Python's standard library.", rng))
    for _ in range(6):
        for q in GREETINGS:
            train.append(_turn(q, GREETING_ANSWER))
        for q in THANKS:
            task, o, example = rng.choice(howto_objects())
            msgs = _turn(rng.choice(howto.HOWTO_TEMPLATES).format(t=task), howto_answer(o, example)) + _turn(q, THANKS_ANSWER)
            train.append(msgs)
    hrng = random.Random(seed + 1)
    held = []
    for o in heldout_objects():
        held += _object_conversations(o, hrng, 1, followups)
    rng.shuffle(train)
    return train, held


def render(msgs: list[dict]) -> str:
    """One conversation as V4 prompt text: bos, turns, eos after each answer.

    The final answer carries its reasoning (thinking mode) when the example has one; otherwise chat
    mode (``</think>`` then the answer), exactly what ``dsv4 chat`` prompts with."""
    return encode_chat(msgs, thinking=any(m.get("reasoning") for m in msgs), add_generation_prompt=False)


def describe(train_text: list[str], held_text: list[str]) -> str:
    """One line each for the number of rendered conversations and their characters."""
    return textwrap.dedent(f"""\
        conversations: train {len(train_text)}, held-out {len(held_text)}
        characters: train {sum(map(len, train_text)):,}, held-out {sum(map(len, held_text)):,}""")

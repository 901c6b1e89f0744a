"""Question-and-answer conversations built from the Python standard library's own documentation.

Sources (PSF licence, available offline in every Python install): the docstrings of the public
functions, classes and methods of a fixed list of standard-library modules, their module docstrings,
and the language-reference topics that ``help()`` shows (``pydoc_data.topics``). Each documented
object gets several question phrasings; answers are the object's signature and the first paragraphs
of its documentation. Conversations are rendered with the DeepSeek-V4 chat encoding (engine/runtime/chat.py),
in chat mode, some in thinking mode with a short reasoning, some multi-turn.

The split into train and held-out is by object (a stable hash of its qualified name), so held-out
perplexity measures text the model never saw.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
import textwrap
import warnings

from dsv4.engine.runtime.chat import encode_chat

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

WHAT = (
    "What does {q} do?", "What is {q}?", "Explain {q}.", "How do I use {q}?", "Tell me about {q}.",
    "What is {q} used for?", "Can you describe {q}?", "What does {q} do in Python?",
)
MODULE_Q = ("What is the {m} module?", "What is the {m} module for?", "Tell me about the {m} module.",
            "What does the {m} module do?", "Which module should I use for {topic}?")
TOPIC_Q = ("Explain {t} in Python.", "How does {t} work in Python?", "What is {t}?", "Tell me about {t}.")

MAX_ANSWER = 700  # characters of documentation per answer


def _paragraphs(doc: str) -> list[str]:
    doc = inspect.cleandoc(doc)
    out = []
    for para in re.split(r"\n\s*\n", doc):
        para = " ".join(line.strip() for line in para.splitlines()).strip()
        if para:
            out.append(para)
    return out


def _answer_text(doc: str, limit: int = MAX_ANSWER) -> str:
    """The first paragraphs of ``doc`` up to ``limit`` characters, cut at a sentence end."""
    text = ""
    for para in _paragraphs(doc):
        candidate = (text + "\n\n" + para) if text else para
        if len(candidate) > limit:
            if not text:
                cut = candidate[:limit]
                end = max(cut.rfind(". "), cut.rfind(".\n"))
                text = cut[: end + 1] if end > 80 else cut.rstrip() + "..."
            break
        text = candidate
    return text


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    sig = re.sub(r" at 0x[0-9a-f]+", "", sig)  # reprs with memory addresses would differ per run
    if len(sig) > 90:
        sig = sig[:sig.find(",") if sig.find(",") > 0 else 1] + ", ...)"
    return name + sig


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    if inspect.ismethod(obj) or inspect.ismethoddescriptor(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return ""


def documented_objects() -> list[dict]:
    """[{name, module, kind, signature, doc}] for the public documented API of MODULES."""
    seen, out = set(), []
    for mname in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(mname)
        except Exception:
            continue
        if mod.__doc__ and mname not in seen:
            seen.add(mname)
            out.append({"name": mname, "module": mname, "kind": "module", "signature": "", "doc": mod.__doc__})
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
            out.append({"name": q, "module": mname, "kind": kind, "signature": _signature(q, obj), "doc": obj.__doc__})
            if kind == "class":
                for mn, meth in sorted(vars(obj).items()):
                    if mn.startswith("_") or not getattr(meth, "__doc__", None) or not _kind(meth):
                        continue
                    mq = f"{q}.{mn}"
                    if mq not in seen:
                        seen.add(mq)
                        out.append({"name": mq, "module": mname, "kind": "method",
                                    "signature": _signature(mq, getattr(obj, mn, meth)), "doc": meth.__doc__})
    return out


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
        out.append({"name": label, "module": "", "kind": "topic", "signature": "", "doc": body})
    return out


def _intro(o: dict) -> str:
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


def answer_for(o: dict) -> str:
    body = _answer_text(o["doc"])
    if o["kind"] == "topic":
        return body
    sig = f"\n\nSignature: `{o['signature']}`" if o["signature"] else ""
    return f"{_intro(o)} {body}{sig}"


def questions_for(o: dict, rng: random.Random, k: int) -> list[str]:
    if o["kind"] == "topic":
        return [t.format(t=o["name"]) for t in rng.sample(TOPIC_Q, min(k, len(TOPIC_Q)))]
    if o["kind"] == "module":
        first = _paragraphs(o["doc"])[0].rstrip(".").lower() if _paragraphs(o["doc"]) else o["name"]
        qs = [t.format(m=o["name"], topic=first[:80]) for t in MODULE_Q]
        return rng.sample(qs, min(k, len(qs)))
    # the canonical phrasing always, then k-1 others
    return [WHAT[0].format(q=o["name"])] + [t.format(q=o["name"]) for t in rng.sample(WHAT[1:], k - 1)]


def is_heldout(name: str, fraction: float = 0.03) -> bool:
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return h < fraction * 0x100000000


ALWAYS_TRAIN = {"json.dumps", "json.loads", "os.path.join", "len", "print", "re.sub", "math.sqrt"}


def conversations(seed: int = 0, per_object: int = 3) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, heldout) lists of conversations (lists of messages, V4 roles)."""
    rng = random.Random(seed)
    objs = [o for o in documented_objects() + topic_objects() if _answer_text(o["doc"])]
    train, held = [], []
    by_module: dict[str, list[dict]] = {}
    for o in objs:
        split = held if (is_heldout(o["name"]) and o["name"] not in ALWAYS_TRAIN) else train
        for q in questions_for(o, rng, per_object):
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": answer_for(o)}]
            if rng.random() < 0.25:
                msgs[1]["reasoning"] = (f"The user is asking about {o['name']}. "
                                        f"I will explain what it does, using its documentation.")
            split.append(msgs)
        if split is train and o["module"]:
            by_module.setdefault(o["module"], []).append(o)
    # multi-turn: follow-up questions on the same module
    for mname, group in sorted(by_module.items()):
        for _ in range(len(group) // 4):
            a, b = rng.sample(group, 2) if len(group) > 1 else (group[0], group[0])
            msgs = []
            for o in (a, b):
                msgs += [{"role": "user", "content": questions_for(o, rng, 1)[0]},
                         {"role": "assistant", "content": answer_for(o)}]
            train.append(msgs)
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

"""dsv4 chat end to end: one-shot JSON equals the engine's greedy loop; errors; the REPL in a pty."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch

from dsv4.engine.runtime.chat import encode_chat
from dsv4.engine.checkpoint.published import write_published_checkpoint
from dsv4.engine.checkpoint.loader import load_model
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import demo_config
from dsv4.engine.runtime.tokenizer import Tokenizer

CLI = [sys.executable, "-m", "dsv4.cli.main"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_published_checkpoint(demo_config(), tmp_path_factory.mktemp("tiny") / "ck", seed=5)


def run(args, **kw):
    env = dict(os.environ)
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_one_shot_json_equals_engine_greedy_loop(ckpt):
    r = run(["chat", "--model", str(ckpt), "-p", "What does json.dumps do?", "--temperature", "0", "--json",
             "--max-tokens", "16", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tok = Tokenizer.from_dir(ckpt)
    prompt = tok.encode(encode_chat([{"role": "user", "content": "What does json.dumps do?"}], thinking=False))
    assert out["prompt_token_ids"] == prompt
    s = Session(load_model(ckpt, mode="faithful"), 4096)
    ids = list(s.generate(prompt, lambda logits: int(torch.argmax(logits)), 16, stop_ids={tok.eos_id}))
    assert out["token_ids"] == ids
    for key in ("text", "reasoning", "time_to_first_token_s", "tokens_per_s", "decode_s"):
        assert key in out


def test_prompt_from_stdin_and_text_output(ckpt):
    r = run(["chat", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "4", "--device", "cpu"],
            input="hello from stdin\n")
    assert r.returncode == 0, r.stderr
    assert "demo" not in r.stderr and "ck" in r.stderr  # banner names the model, on stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir", "-p", "x"], "no such folder"),
    (["-p", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["-p", "x", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["-p", "x", "--precision", "fp4"], "use exact or faithful"),
    (["-p", "x", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["-p", "x", "--device", "tpu"], "use cpu, cuda or cuda:N"),
])
def test_bad_options_one_line_no_traceback(ckpt, args, message):
    if "--model" not in args:
        args = args + ["--model", str(ckpt)]
    r = run(["chat"] + args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_tokenizer_is_a_clear_error(ckpt, tmp_path):
    import shutil

    d = tmp_path / "notok"
    shutil.copytree(ckpt, d)
    (d / "tokenizer.json").unlink()
    r = run(["chat", "--model", str(d), "-p", "x"])
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr and "Traceback" not in r.stderr


ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[=>])")
PROMPT = r"\n[^\n>]*>[^\n]*$"


def _controlling_tty():
    """In the child: a new session whose controlling terminal is the pty, so Ctrl+C sends SIGINT."""
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Pty:
    def __init__(self, args, env):
        self.master, slave = pty.openpty()
        self.p = subprocess.Popen(CLI + args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                  preexec_fn=_controlling_tty)
        os.close(slave)
        self.buf = ""

    def read_until(self, pattern, timeout=60):
        end = time.time() + timeout
        rx = re.compile(pattern)
        while time.time() < end:
            m = rx.search(ANSI.sub("", self.buf))
            if m:
                return m
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    self.buf += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:
                    break
        raise AssertionError(f"timed out waiting for {pattern!r}; screen tail:\n{self.buf[-2000:]}")

    def send(self, text):
        os.write(self.master, text.encode())

    def mark(self):
        self.buf = ""


def test_repl_two_turns_slash_command_and_ctrl_c(ckpt, tmp_path):
    env = dict(os.environ, TERM="xterm", COLUMNS="200", LINES="50", PROMPT_TOOLKIT_NO_CPR="1")
    t = Pty(["chat", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "6", "--device", "cpu",
             "--history-file", str(tmp_path / "hist")], env)
    try:
        t.read_until(r"/help for commands")
        t.read_until(PROMPT)
        t.mark()
        t.send("hello there\r")
        m1 = t.read_until(r"(\d+) prompt tokens \((\d+) new\) · (\d+) generated")
        first_total, first_new = int(m1.group(1)), int(m1.group(2))
        assert first_total == first_new  # first turn prefills everything
        t.read_until(PROMPT)
        t.mark()
        t.send("/max 3000\r")
        t.read_until(r"max tokens per answer: 3000")
        t.read_until(PROMPT)
        t.mark()
        t.send("tell me more\r")
        time.sleep(3.0)  # generating (3000 tokens take far longer): interrupt it
        t.send("\x03")
        t.read_until(r"stopped")
        m2 = t.read_until(r"(\d+) prompt tokens \((\d+) new\) · (\d+) generated .*stopped by you")
        total2, new2 = int(m2.group(1)), int(m2.group(2))
        # the second turn prefilled only the new tokens: the cache kept turn one's prompt and the 5
        # generated tokens that were fed back (the 6th was sampled, never run)
        assert total2 > first_total and new2 == total2 - (first_total + 5)
        t.read_until(PROMPT)
        t.mark()
        t.send("/stats\r")
        t.read_until(r"prompt \d+ \(prefilled \d+\)")
        t.read_until(PROMPT)
        t.send("\x04")  # Ctrl+D exits
        t.read_until(r"bye")
        assert t.p.wait(timeout=30) == 0
        assert "hello there" in (tmp_path / "hist").read_text()
    finally:
        if t.p.poll() is None:
            t.p.kill()

"""dsv4 chat end to end: one-shot JSON equals the engine's greedy loop, text output, --render,
--messages (an agent loop with tool results), one-line errors, Ctrl+C (one-shot and REPL, each waited
on through output seen on a pty, never a clock)."""

import json
import os
import pty
import re
import select
import subprocess
import time

import pytest
import torch

from dsv4.engine.runtime.chat import encode_chat, encode_messages
from dsv4.engine.runtime.completion import OutputParser
from dsv4.engine.checkpoint.published import write_published_checkpoint
from dsv4.engine.checkpoint.loader import load_model
from dsv4.engine.runtime.session import Session
from dsv4.engine.tools.synthetic import demo_config
from dsv4.engine.runtime.tokenizer import Tokenizer

from conftest import CLI, run_cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_published_checkpoint(demo_config(), tmp_path_factory.mktemp("tiny") / "ck", seed=5)


def greedy(ckpt, prompt_ids, n):
    tok = Tokenizer.from_dir(ckpt)
    s = Session(load_model(ckpt, mode="faithful"), 4096)
    return list(s.generate(prompt_ids, lambda logits: int(torch.argmax(logits)), n, stop_ids={tok.eos_id}))


def test_one_shot_json_equals_engine_greedy_loop(ckpt):
    r = run_cli(*["chat", "--model", str(ckpt), "-p", "What does json.dumps do?", "--temperature", "0", "--json",
             "--max-tokens", "16", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tok = Tokenizer.from_dir(ckpt)
    prompt = tok.encode(encode_chat([{"role": "user", "content": "What does json.dumps do?"}], thinking=False))
    assert out["prompt_token_ids"] == prompt
    ids = greedy(ckpt, prompt, 16)
    assert out["token_ids"] == ids
    parser = OutputParser(thinking=False)
    parser.feed(tok.decode(ids))
    msg = out["message"]
    assert msg == {"role": "assistant", "content": parser.finish().message["content"], "reasoning_content": "",
                   "tool_calls": []}
    assert out["text"] == msg["content"]
    assert out["finish_reason"] == ("stop" if ids[-1] == tok.eos_id else "length")
    assert out["generated_tokens"] == len(ids) and out["prompt_tokens"] == len(prompt)


def test_prompt_from_stdin_prints_the_answer_and_says_it_was_cut(cli_inprocess, ckpt):
    r = cli_inprocess("chat", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "4", "--device", "cpu",
                      input="hello from stdin\n")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_dir(ckpt)
    ids = greedy(ckpt, tok.encode(encode_chat([{"role": "user", "content": "hello from stdin"}], thinking=False)), 4)
    parser = OutputParser(thinking=False)
    parser.feed(tok.decode(ids))
    assert r.stdout == parser.answer_text + "\n"
    lines = r.stderr.splitlines()
    assert lines[0].startswith("dsv4 · ck · ") and "demo" not in lines[0]  # the banner names the model
    cut = ids[-1] != tok.eos_id
    assert ("note: the answer was cut at --max-tokens 4" in r.stderr) == cut


def test_render_prints_the_exact_prompt_without_weights(cli_inprocess, ckpt, tmp_path):
    conv = tmp_path / "conv.json"
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "reasoning_content": "Need it.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "-3°C"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    conv.write_text(json.dumps({"messages": msgs, "tools": tools}))
    tok_only = tmp_path / "tok_only"  # a folder with a tokenizer and no weights at all
    tok_only.mkdir()
    (tok_only / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
    want = encode_messages([{"role": "system", "content": "", "tools": tools}] + msgs, "thinking",
                           reasoning_effort="max")
    r = run_cli("chat", "--messages", str(conv), "--render", "--think", "--reasoning-effort", "max")  # a real process
    assert r.returncode == 0, r.stderr
    assert r.stdout == want and "Need it.</think>" in want  # tools present: the reasoning is kept
    r = cli_inprocess("chat", "--model", str(tok_only), "--messages", str(conv), "--render", "--json", "-p", "Thanks")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = encode_messages([{"role": "system", "content": "", "tools": tools}] + msgs +
                           [{"role": "user", "content": "Thanks"}], "chat")
    assert out == {"prompt": want, "prompt_token_ids": Tokenizer.from_dir(ckpt).encode(want)}


def test_messages_json_continues_a_conversation_for_an_agent_loop(cli_inprocess, ckpt, tmp_path):
    conv = tmp_path / "conv.json"
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "12:00"}]
    conv.write_text(json.dumps(msgs))
    r = cli_inprocess("chat", "--model", str(ckpt), "--messages", str(conv), "--json", "--temperature", "0",
                      "--max-tokens", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    tok = Tokenizer.from_dir(ckpt)
    assert out["prompt_token_ids"] == tok.encode(encode_messages(msgs, "chat"))
    assert set(out["message"]) == {"role", "content", "reasoning_content", "tool_calls"}
    assert out["message"]["role"] == "assistant" and out["finish_reason"] in ("stop", "length")
    # the loop appends the message and asks again; an assistant-ended file has nothing to answer
    conv.write_text(json.dumps(msgs + [out["message"]]))
    r = cli_inprocess("chat", "--model", str(ckpt), "--messages", str(conv), "--json")
    assert r.returncode == 2 and "ends with a message of role 'assistant'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir", "-p", "x"], "no such folder"),
    (["-p", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["-p", "x", "--temperature", "nan"], "--temperature nan: use a finite number"),
    (["-p", "x", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["-p", "x", "--precision", "fp4"], "use exact or faithful"),
    (["-p", "x", "--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["-p", "x", "--device", "tpu"], "use cpu, cuda or cuda:N"),
    (["-p", "word " * 40, "--max-context", "32", "--device", "cpu"], "but the context holds 32"),
    (["--messages", "/no/such.json"], "--messages /no/such.json: no such file"),
    (["--messages", "BAD", "--render"], "messages[0]: a message must be an object, got int"),
    (["--messages", "TOOLCALL", "--render"], "messages[1]: tool_calls[0].function.arguments must be a JSON object"),
])
def test_bad_options_one_line_no_traceback(cli_inprocess, ckpt, tmp_path, args, message):
    (tmp_path / "bad.json").write_text("[1, 2]")
    (tmp_path / "call.json").write_text(json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "1", "function": {"name": "f", "arguments": "[1]"}}]}]))
    args = [{"BAD": str(tmp_path / "bad.json"), "TOOLCALL": str(tmp_path / "call.json")}.get(a, a) for a in args]
    if "--model" not in args:
        args = args + ["--model", str(ckpt)]
    r = cli_inprocess("chat", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_not_a_model_folder_is_said_before_the_tokenizer_is_looked_for(cli_inprocess, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli_inprocess("chat", "--model", str(tmp_path / "empty"), "-p", "x")
    assert r.returncode == 2 and "not a model folder (an empty folder)" in r.stderr and "tokenizer" not in r.stderr


def test_mtp_answers_the_same_greedy_tokens_and_reports_its_drafts(cli_inprocess, ckpt):
    """--mtp: the checkpoint's MTP layer drafts, the main model verifies: the same greedy answer."""
    args = ("chat", "--model", str(ckpt), "-p", "What does json.dumps do?", "--temperature", "0", "--json",
            "--max-tokens", "12", "--device", "cpu")
    plain, mtp = cli_inprocess(*args), cli_inprocess(*args, "--mtp")
    assert plain.returncode == 0 and mtp.returncode == 0, mtp.stderr
    a, b = json.loads(plain.stdout), json.loads(mtp.stdout)
    assert b["token_ids"] == a["token_ids"] and a["mtp"] is None
    assert b["mtp"]["drafted"] >= 1 and b["mtp"]["steps"] + b["mtp"]["accepted"] >= len(b["token_ids"]) - 1


def test_missing_tokenizer_is_a_clear_error(cli_inprocess, ckpt, tmp_path):
    import shutil

    d = tmp_path / "notok"
    shutil.copytree(ckpt, d)
    (d / "tokenizer.json").unlink()
    r = cli_inprocess("chat", "--model", str(d), "-p", "x")
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr and "Traceback" not in r.stderr


ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[=>])")
PROMPT = r"\n[^\n>]*>[^\n]*$"


def _controlling_tty():
    """In the child: a new session whose controlling terminal is the pty, so Ctrl+C sends SIGINT, and
    SIGINT handled by default (a test run started in the background inherits it ignored)."""
    import fcntl
    import signal
    import termios

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Pty:
    def __init__(self, args, env):
        self.master, slave = pty.openpty()
        self.p = subprocess.Popen(CLI + args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                  preexec_fn=_controlling_tty)
        os.close(slave)
        self.buf = ""

    def read_until(self, pattern, timeout=float(os.environ.get("DSV4_TEST_PTY_TIMEOUT", 600))):  # hang guard
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


PTY_ENV = dict(os.environ, TERM="xterm", COLUMNS="200", LINES="50", PROMPT_TOOLKIT_NO_CPR="1")


def test_json_in_a_terminal_without_a_prompt_is_an_error_not_a_wait(ckpt):
    t = Pty(["chat", "--model", str(ckpt), "--json"], PTY_ENV)
    try:
        t.read_until(r"--json answers one prompt: pass -p")
        assert t.p.wait(timeout=60) == 2
    finally:
        if t.p.poll() is None:
            t.p.kill()


def test_ctrl_c_during_one_shot_prints_the_partial_answer_and_exits_130(ckpt):
    t = Pty(["chat", "--model", str(ckpt), "-p", "hello", "--temperature", "0", "--max-tokens", "3000",
             "--device", "cpu"], PTY_ENV)
    try:
        t.read_until(r"dsv4 · ck · [^\n]*\n")  # the banner; the answer follows it
        t.mark()
        t.read_until(r"\S")  # answer text is arriving: generating
        t.send("\x03")
        t.read_until(r"interrupted: the answer is partial")
        assert t.p.wait(timeout=60) == 130
        partial = ANSI.sub("", t.buf).split("interrupted: the answer is partial")[0]
        assert partial.strip() and "Traceback" not in t.buf
    finally:
        if t.p.poll() is None:
            t.p.kill()


def test_repl_two_turns_slash_command_and_ctrl_c(ckpt, tmp_path):
    t = Pty(["chat", "--model", str(ckpt), "--temperature", "0", "--max-tokens", "6", "--device", "cpu",
             "--history-file", str(tmp_path / "hist")], PTY_ENV)
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
        t.read_until(r"tell me more\r*\n")
        t.mark()
        t.read_until(r"\S")  # the answer is streaming (3000 tokens take far longer): interrupt it
        t.send("\x03")
        t.read_until(r"stopped")
        m2 = t.read_until(r"(\d+) prompt tokens \((\d+) new\) · (\d+) generated · first token \d+ ms · "
                          r"([\d.]+) tok/s · stopped by you · context (\d+)/")
        total2, new2, gen2, rate, used = (int(m2.group(1)), int(m2.group(2)), int(m2.group(3)), float(m2.group(4)),
                                          int(m2.group(5)))
        # the second turn prefilled only the new tokens: the cache kept turn one's prompt and the 5
        # generated tokens that were fed back (the 6th was sampled, never run)
        assert total2 > first_total and new2 == total2 - (first_total + 5)
        # after Ctrl+C the cache is intact: the prompt and the tokens generated (the last one too when
        # the interrupt came during its decode step, which then ran to its end)
        assert used in (total2 + gen2 - 1, total2 + gen2) and (rate > 0 or gen2 < 2)
        t.read_until(PROMPT)
        t.mark()
        t.send("/stats\r")
        t.read_until(r"prompt \d+ \(prefilled \d+\) · generated \d+ .* interrupted")
        t.read_until(PROMPT)
        t.send("\x04")  # Ctrl+D exits
        t.read_until(r"bye")
        assert t.p.wait(timeout=30) == 0
        assert "hello there" in (tmp_path / "hist").read_text()
    finally:
        if t.p.poll() is None:
            t.p.kill()


def test_prefill_progress_line_and_chunk_option(cli_inprocess, ckpt):
    """A long prefill shows done/total tokens and tok/s on stderr (after a delay; none for the finished
    prompt), and --prefill-chunk is checked."""
    import io

    from dsv4.cli.chat import PrefillProgress

    class Pipe(io.StringIO):
        def isatty(self):
            return False

    out = Pipe()
    p = PrefillProgress(after_s=0.0, stream=out)
    for done in (0, 128, 256, 300):
        p(done, 300)
    lines = out.getvalue().splitlines()
    assert [ln.split(" tokens")[0] for ln in lines] == ["prefill 128/300", "prefill 256/300"]
    assert all(ln.endswith("tok/s (Ctrl+C stops)") for ln in lines)
    r = cli_inprocess("chat", "--model", str(ckpt), "-p", "x", "--prefill-chunk", "0")
    assert r.returncode == 2 and "--prefill-chunk must be >= 1" in r.stderr
    r = cli_inprocess("chat", "--model", str(ckpt), "-p", "hello " * 40, "--prefill-chunk", "7", "--temperature", "0",
                      "--max-tokens", "3", "--device", "cpu", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["generated_tokens"] >= 1


def test_text_piped_with_a_conversation_file_is_the_next_user_turn(cli_inprocess, ckpt, tmp_path):
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))
    r = cli_inprocess("chat", "--model", str(ckpt), "--messages", str(conv), "--json", "--temperature", "0",
                      "--max-tokens", "2", "--device", "cpu", input="and now?\n")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.from_dir(ckpt)
    want = encode_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": "and now?"}], "chat")
    assert json.loads(r.stdout)["prompt_token_ids"] == tok.encode(want)


def test_a_bad_kernel_mode_is_one_line(cli):
    r = cli("chat", "-p", "x", env={"DSV4_KERNELS": "fast"})
    assert r.returncode == 2 and r.stderr.strip() == "error: DSV4_KERNELS='fast': use auto or reference"

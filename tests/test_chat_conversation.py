"""Conversation turns over a recording session (tokens in the cache are checked against the
encoding), conversation files, interrupts and errors that never lose the conversation, and the
REPL's commands and tool-call loop (driven line by line, output captured)."""

import io
import json
import os
import signal

import pytest
import torch
from rich.console import Console

from dsv4.engine.runtime.chat import ChatFormatError, encode_messages
from dsv4.engine.runtime.conversation import ContextFull, Conversation, NothingToAnswer
from dsv4.engine.runtime.generate import Finish, decode_tokens
from dsv4.engine.runtime.messages import (ConversationFileError, parse_conversation, read_conversation,
                                          write_conversation)
from dsv4.engine.runtime.tokenizer import EOS, Tokenizer, build_byte_tokenizer

TOK = Tokenizer(build_byte_tokenizer())
S = "\n\n<｜DSML｜tool_calls>\n"
CALL = (S + '<｜DSML｜invoke name="weather">\n<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")


class RecordingSession:
    """Stands in for Session: the cache is the list of ids run; logits are zeros (a script samples)."""

    def __init__(self, max_context=4096, fail_step_at=None, interrupt_prefill=False):
        self.ids, self.max_context = [], max_context
        self.fail_step_at, self.interrupt_prefill = fail_step_at, interrupt_prefill
        self.prefills = []

    @property
    def seq_len(self):
        return len(self.ids)

    def prefill(self, ids):
        self.prefills.append(list(ids))
        self.ids += list(ids)[: len(ids) // 2]
        if self.interrupt_prefill:
            raise KeyboardInterrupt
        self.ids += list(ids)[len(ids) // 2:]
        return torch.zeros(8)

    def step(self, tok):
        if self.fail_step_at is not None and len(self.ids) >= self.fail_step_at:
            raise RuntimeError("device lost")
        self.ids.append(tok)
        return torch.zeros(8)

    def reset(self):
        self.ids = []


class Script:
    """A sampler that writes ``text`` (then eos), or raises KeyboardInterrupt at call ``interrupt_at``."""

    def __init__(self, *texts, interrupt_at=None, eos=True):
        self.queue = [TOK.encode(t) + ([TOK.eos_id] if eos else []) for t in texts]
        self.n, self.interrupt_at = 0, interrupt_at

    def __call__(self, logits):
        self.n += 1
        if self.interrupt_at is not None and self.n == self.interrupt_at:
            raise KeyboardInterrupt
        tok = self.queue[0].pop(0)
        if not self.queue[0]:
            self.queue.pop(0)
        return tok


def run(conv, text, sampler, max_new=1000):
    for _ in conv.send(text, sampler, max_new):
        pass
    return conv.last_turn


def test_turns_reuse_the_cache_and_the_cache_holds_exactly_the_encoded_conversation():
    s = RecordingSession()
    conv = Conversation(s, TOK, system="Be brief.")
    t1 = run(conv, "Hi", Script("Hello!"))
    assert t1.stats.finish is Finish.STOP and t1.message["content"] == "Hello!"
    t2 = run(conv, "More?", Script("Sure."))
    assert t2.stats.prefilled_tokens == t2.stats.prompt_tokens - len(t1.prompt_ids) - len(t1.token_ids) + 1
    assert conv.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!", "reasoning_content": "", "tool_calls": []},
                             {"role": "user", "content": "More?"},
                             {"role": "assistant", "content": "Sure.", "reasoning_content": "", "tool_calls": []}]
    # what the model has seen is the encoding of the conversation (its last token, eos, was sampled, not run)
    assert TOK.decode(s.ids) + EOS == encode_messages(conv.messages, "chat")
    assert s.ids == conv.cached_ids


def test_thinking_mode_records_reasoning_content_and_reprefills_when_reasoning_is_dropped():
    s = RecordingSession()
    conv = Conversation(s, TOK, thinking=True)
    t1 = run(conv, "2+2?", Script("Add.</think>4"))
    assert t1.message["reasoning_content"] == "Add." and t1.message["content"] == "4"
    t2 = run(conv, "3+3?", Script("Add again.</think>6"))
    assert t2.stats.prefilled_tokens == t2.stats.prompt_tokens  # earlier reasoning dropped: not a prefix
    assert TOK.decode(s.ids) + EOS == encode_messages(conv.messages, "thinking")


def test_tool_calls_get_ids_results_continue_the_conversation_and_sort_by_call():
    s = RecordingSession()
    conv = Conversation(s, TOK)
    conv.set_tools([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}])
    assert conv.messages[0]["role"] == "system" and conv.tools[0]["function"]["name"] == "weather"
    t = run(conv, "Weather in Oslo?", Script("Checking." + CALL))
    assert t.message["tool_calls"] == [{"type": "function", "id": "call_1",
                                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    assert t.completion.ended and not t.completion.truncated
    conv.messages.append({"role": "tool", "tool_call_id": "call_1", "content": "-3°C"})
    t2 = run(conv, None, Script("It is -3°C."))
    assert t2.stats.prefilled_tokens < t2.stats.prompt_tokens  # the call's own tokens were reused
    assert t2.message["content"] == "It is -3°C."
    assert TOK.decode(s.ids) + EOS == encode_messages(conv.messages, "chat")
    t3 = run(conv, "And again?", Script(CALL))
    assert t3.message["tool_calls"][0]["id"] == "call_2"  # never reuses an id of the conversation


def test_continuing_an_assistant_prefix():
    conv = Conversation(RecordingSession(), TOK, messages=[
        {"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "Gre", "wo_eos": True}])
    t = run(conv, None, Script("en."))
    assert conv.messages[-1] == {"role": "assistant", "content": "Green.", "reasoning_content": "", "tool_calls": []}
    assert t.prompt_ids == TOK.encode(encode_messages(conv.messages, "chat")[: -len("en." + EOS)])


def test_nothing_to_answer_and_context_full_carry_data_and_change_nothing():
    conv = Conversation(RecordingSession(max_context=40), TOK)
    with pytest.raises(NothingToAnswer):
        next(conv.send(None, Script("x"), 5))
    with pytest.raises(ContextFull) as e:
        next(conv.send("x" * 50, Script("x"), 5))
    assert e.value.max_context == 40 and e.value.prompt_tokens > 40
    assert "/reset" not in str(e.value) and "--" not in str(e.value)  # the engine does not speak CLI
    assert conv.messages == []
    with pytest.raises(ChatFormatError):
        conv.load([{"role": "user", "content": "q"}, {"role": "bot"}])
    assert conv.messages == []


def test_interrupt_during_prefill_leaves_no_trace():
    s = RecordingSession()
    conv = Conversation(s, TOK)
    first = run(conv, "first", Script("one"))
    before = list(conv.messages)
    s.interrupt_prefill = True
    with pytest.raises(KeyboardInterrupt):
        run(conv, "second", Script("two"))
    assert conv.messages == before and s.ids == [] and conv.cached_ids == []  # half-written slot emptied
    assert conv.last_turn is first  # /stats still describes the last turn that happened
    s.interrupt_prefill = False
    t = run(conv, "third", Script("three"))
    assert conv.messages[-2]["content"] == "third" and "second" not in TOK.decode(t.prompt_ids)


def test_interrupt_during_decode_keeps_the_partial_answer_and_an_intact_cache():
    s = RecordingSession()
    conv = Conversation(s, TOK)
    t = run(conv, "count", Script("1 2 3 4 5 6", interrupt_at=5))
    assert t.stats.finish is Finish.INTERRUPTED and t.stats.generated_tokens == 4
    assert conv.messages[-1]["content"] == "1 2 " and s.seq_len == len(t.prompt_ids) + 4
    assert t.stats.decode_s > 0
    t2 = run(conv, "go on", Script("ok"))
    assert t2.prompt_ids[: len(t.prompt_ids) + 4] == t.prompt_ids + t.token_ids
    assert t2.stats.prefilled_tokens == len(t2.prompt_ids) - (len(t.prompt_ids) + 4)  # all four tokens reused


def test_closing_the_stream_records_the_partial_answer():
    conv = Conversation(RecordingSession(), TOK)
    gen = conv.send("count", Script("abcdef"), 50)
    for _ in range(3):
        next(gen)
    gen.close()
    assert conv.last_turn.stats.finish is Finish.INTERRUPTED and conv.messages[-1]["content"] == "abc"


def test_a_crash_inside_a_turn_keeps_the_conversation_as_it_was():
    s = RecordingSession()
    conv = Conversation(s, TOK)
    run(conv, "first", Script("one"))
    before = list(conv.messages)
    s.fail_step_at = s.seq_len + 20
    with pytest.raises(RuntimeError):
        run(conv, "second", Script("two two two two"))
    assert conv.messages == before and s.ids == []


def test_length_and_context_finish_reasons():
    conv = Conversation(RecordingSession(), TOK)
    t = run(conv, "q", Script("abcdefgh"), max_new=3)
    assert t.stats.finish is Finish.LENGTH and t.completion.truncated and conv.messages[-1]["content"] == "abc"
    conv = Conversation(RecordingSession(max_context=20), TOK)
    t = run(conv, "q", Script("abcdefghijklmnopqrstuvwxyz"), max_new=100)
    assert t.stats.finish is Finish.CONTEXT and conv.session.seq_len == 20


def test_a_decode_step_is_never_cut_by_ctrl_c():
    # as in a terminal, Python's own SIGINT handler (a test run started in the background inherits
    # SIGINT ignored, and whole_step leaves a handler it did not install alone)
    keep = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _decode_step_not_cut()
    finally:
        signal.signal(signal.SIGINT, keep)


def _decode_step_not_cut():
    class SelfInterrupting(RecordingSession):
        def step(self, tok):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C arrives in the middle of the step
            return super().step(tok)

    s = SelfInterrupting()
    s.ids = [1, 2]
    got = []
    with pytest.raises(KeyboardInterrupt):
        for tok, _ in decode_tokens(s, torch.zeros(8), Script("abc", eos=False), 10):
            got.append(tok)
    assert s.ids == [1, 2] + got[:1] and len(got) == 1  # the step finished, then the interrupt was raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------- conversation files
def test_conversation_file_forms_tools_attach_to_the_first_system_message(tmp_path):
    tools = [{"type": "function", "function": {"name": "f"}}]
    f = parse_conversation({"messages": [{"role": "user", "content": "q"}], "tools": tools,
                            "response_format": {"type": "json_object"}, "model": "ignored"})
    assert f.messages == [{"role": "system", "content": "", "tools": tools, "response_format": {"type": "json_object"}},
                          {"role": "user", "content": "q"}]
    f = parse_conversation({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "S"}],
                            "tools": tools})
    assert f.messages[1] == {"role": "system", "content": "S", "tools": tools}
    assert parse_conversation([{"role": "user", "content": "q"}]).messages == [{"role": "user", "content": "q"}]


def test_old_files_reasoning_and_system_are_read_and_saved_as_reasoning_content(tmp_path):
    old = {"system": "Be brief.", "thinking": True, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]}
    p = tmp_path / "old.json"
    p.write_text(json.dumps(old))
    f = read_conversation(p)
    assert f.thinking is True and f.messages == [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    write_conversation(tmp_path / "new.json", f.messages, f.thinking)
    saved = json.loads((tmp_path / "new.json").read_text())
    assert saved == {"messages": f.messages, "thinking": True}
    assert read_conversation(tmp_path / "new.json").messages == f.messages


@pytest.mark.parametrize("data,words", [
    ([1, 2], "messages[0]: a message must be an object, got int"),
    ({"messages": "abc"}, "'messages' must be a list, got str"),
    ({"msgs": []}, "needs a 'messages' list"),
    ("hi", "expected a list of messages"),
    ([{"content": "x"}], "messages[0]: 'role' must be a string"),
    ([{"role": "user", "content": 3}], "messages[0]: 'content' must be a string"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}], "tool_calls[0] needs"),
    ({"messages": [], "tools": {"a": 1}}, "'tools' must be a list"),
])
def test_bad_conversation_files_are_one_line_errors(tmp_path, data, words):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ConversationFileError) as e:
        read_conversation(p)
    assert words in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_conversation_files(tmp_path):
    for path, words in ((tmp_path / "missing.json", "no such file"), (tmp_path, "is a folder")):
        with pytest.raises(ConversationFileError, match=words):
            read_conversation(path)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConversationFileError, match="not valid JSON"):
        read_conversation(tmp_path / "bad.json")


# ---------------------------------------------------------------- the REPL
class Lines:
    def __init__(self, *lines):
        self.lines = list(lines)

    def __call__(self, prompt):
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def repl(conv, *replies, max_tokens=1000):
    from dsv4.cli.repl import Repl
    from dsv4.engine.runtime.sampling import SamplingParams

    class Sampler(Script):
        params = SamplingParams(temperature=0.7)

    out = io.StringIO()
    r = Repl(conv, Sampler(*replies), max_tokens, Console(file=out, width=200, highlight=False), Lines())
    return r, out


def test_repl_commands_give_clear_errors_and_keep_the_conversation(tmp_path):
    conv = Conversation(RecordingSession(), TOK, system="Be brief.")
    r, out = repl(conv, "Hello!")
    r.handle("hi")
    kept = list(conv.messages)
    bad_list, bad_obj = tmp_path / "a.json", tmp_path / "b.json"
    bad_list.write_text("[1, 2]")
    bad_obj.write_text('{"messages": "abc"}')
    for line in (f"/load {bad_list}", f"/load {bad_obj}", "/temp nan", "/temp inf", "/topp nan", "/max x", "/max 0",
                 "/save", "/load", "/nosuch"):
        out.truncate(0), out.seek(0)
        assert r.handle(line) is True
        said = out.getvalue().strip()
        assert said and "Traceback" not in said, line
        assert conv.messages == kept, line
    assert r.sampler.params.temperature == 0.7 and r.max_tokens == 1000
    out.truncate(0), out.seek(0)
    r.handle("/max x")
    assert "/max needs a whole number, got 'x'" in out.getvalue()
    out.truncate(0), out.seek(0)
    r.handle("/save")
    assert "usage: /save FILE" in out.getvalue()
    out.truncate(0), out.seek(0)
    r.handle("/system")
    assert "system prompt: Be brief." in out.getvalue() and conv.messages == kept  # shown, not reset


def test_repl_save_load_round_trip_and_stats_after_reset(tmp_path):
    conv = Conversation(RecordingSession(), TOK)
    r, out = repl(conv, "Hello!")
    r.handle("hi")
    f = tmp_path / "conv.json"
    r.handle(f"/save {f}")
    saved = json.loads(f.read_text())
    assert saved["messages"][-1] == {"role": "assistant", "content": "Hello!", "reasoning_content": "",
                                     "tool_calls": []}
    r.handle("/reset")
    assert conv.messages == []
    out.truncate(0), out.seek(0)
    r.handle("/stats")
    assert out.getvalue().strip() == "no turn yet"
    r.handle(f"/load {f}")
    assert conv.messages == saved["messages"]


def test_repl_tool_call_panel_result_and_continuation(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "weather", "parameters": {}}}]))
    conv = Conversation(RecordingSession(), TOK)
    r, out = repl(conv, "Let me check." + CALL, "It is -3°C in Oslo.")
    r.handle(f"/tools {tools}")
    r.read = Lines("-3°C")
    r.handle("Weather in Oslo?")
    text = out.getvalue()
    assert "tool call: weather" in text and '"city": "Oslo"' in text and "｜DSML｜" not in text
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert conv.messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "-3°C"}
    assert conv.messages[4]["content"] == "It is -3°C in Oslo."


def test_repl_skip_leaves_the_call_unanswered():
    conv = Conversation(RecordingSession(), TOK)
    r, out = repl(conv, CALL)
    r.read = Lines("/skip")
    r.handle("Weather?")
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] and "skipped" in out.getvalue()


def test_repl_survives_a_crash_and_an_interrupt_without_losing_the_conversation():
    s = RecordingSession()
    conv = Conversation(s, TOK)
    r, out = repl(conv, "one", "two two two two two")
    r.handle("first")
    kept = list(conv.messages)
    s.fail_step_at = s.seq_len + 15
    out.truncate(0), out.seek(0)
    assert r.handle("second") is True
    assert "device lost" in out.getvalue() and "conversation is kept (2 messages)" in out.getvalue()
    assert conv.messages == kept
    s.fail_step_at, s.interrupt_prefill = None, True
    out.truncate(0), out.seek(0)
    r.handle("third")
    assert "interrupted before the answer began" in out.getvalue() and conv.messages == kept


def test_repl_stats_line_after_ctrl_c_shows_the_intact_cache():
    s = RecordingSession()
    conv = Conversation(s, TOK)
    r, out = repl(conv, "1 2 3 4 5 6 7 8")
    r.sampler.interrupt_at = 6
    r.handle("count")
    text = out.getvalue()
    assert "stopped by you" in text and f"context {s.seq_len}/4096" in text and s.seq_len > 0
    assert " 0.0 tok/s" not in text

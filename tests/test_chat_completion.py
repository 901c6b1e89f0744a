"""Model output -> assistant message (CHAT_ENCODING.md §12): whole and streamed, strict and lenient,
truncated tool calls reported, and round trips render -> tokens -> parse."""

import json

import pytest

from dsv4.engine.runtime.chat import encode_messages
from dsv4.engine.runtime.completion import CompletionError, OutputParser, parse_completion
from dsv4.engine.runtime.tokenizer import Tokenizer, build_byte_tokenizer

B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
S = "\n\n<｜DSML｜tool_calls>\n"
INV = '<｜DSML｜invoke name="{}">\n'
PAR = '<｜DSML｜parameter name="{}" string="{}">{}</｜DSML｜parameter>\n'
END_INV, END_BLOCK = "</｜DSML｜invoke>\n", "</｜DSML｜tool_calls>"
TWO_CALLS = (S + INV.format("weather") + PAR.format("city", "true", "Oslo") + PAR.format("days", "false", "[1, 2]")
             + END_INV + INV.format("now") + "\n" + END_INV + END_BLOCK)


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_thinking_answer():
    c = parse_completion("I think.</think>Hello!" + E, thinking=True)
    assert c.message == {"role": "assistant", "content": "Hello!", "reasoning_content": "I think.", "tool_calls": []}
    assert c.ended and not c.truncated and c.error is None


def test_chat_answer_and_tool_calls_in_openai_shape():
    c = parse_completion("Let me check." + TWO_CALLS + E, thinking=False)
    assert c.message["content"] == "Let me check." and c.message["reasoning_content"] == ""
    assert c.tool_calls == [call("weather", '{"city": "Oslo", "days": [1, 2]}'), call("now", "{}")]
    assert json.loads(c.tool_calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": [1, 2]}
    assert c.ended and not c.truncated


def test_the_eos_is_optional_after_a_closed_block():
    c = parse_completion("r</think>" + TWO_CALLS, thinking=True)
    assert len(c.tool_calls) == 2 and not c.ended and not c.truncated


def test_string_values_are_json_encoded_and_other_values_kept_raw():
    text = S + INV.format("f") + PAR.format("q", "true", 'say "hi"\nnow') + PAR.format("n", "false", "1e3") + END_INV + END_BLOCK + E
    assert parse_completion(text, False).tool_calls == [call("f", '{"q": "say \\"hi\\"\\nnow", "n": 1e3}')]


@pytest.mark.parametrize("cut_after,complete,incomplete", [
    ("\n\n<｜DSML｜tool_calls", 0, None),
    ('<｜DSML｜invoke name="weather">\n', 0, "weather"),
    ('"Oslo</｜DSML｜parameter>\n'[1:], 0, "weather"),
    ("</｜DSML｜invoke", 1, None),
])
def test_truncated_blocks_pass_as_the_published_parser_does_but_are_reported(cut_after, complete, incomplete):
    text = "r</think>" + TWO_CALLS
    cut = text.index(cut_after) + len(cut_after)
    c = parse_completion(text[:cut], thinking=True)
    assert c.truncated and not c.ended
    assert len(c.tool_calls) == complete and c.incomplete_call == incomplete


@pytest.mark.parametrize("text,thinking,words", [
    ("no close" + E, True, "</think>"),
    ("r" + S + "x</think>", True, "</think>"),
    ("answer", False, "end-of-sentence"),
    ("a" + E + "more", False, "after the end-of-sentence"),
    ("a<think>b" + E, False, "<think>"),
    ("a" + B + E, False, "begin"),
    ("<think>r</think>a" + E, True, "<think>"),
    ("a <｜DSML｜invoke" + E, False, "DSML"),
    ("a" + S.replace(">\n", ">") + INV.format("f") + END_INV + END_BLOCK, False, "'>\\n'"),
    ("a" + S + INV.format("f") + PAR.format("k", "maybe", "v") + END_INV + END_BLOCK, False, "bad parameter"),
    ("a" + S + INV.format("f") + PAR.format("k", "true", "1") + PAR.format("k", "true", "2") + END_INV + END_BLOCK, False,
     "given twice"),
    ("a" + S + '<｜DSML｜invoke nom="f">\n' + END_INV + END_BLOCK, False, "invoke header"),
    ("a" + S + INV.format("f") + END_INV + END_BLOCK + "tail", False, "after the tool calls"),
    ("a" + S + INV.format("f") + PAR.format("k", "true", "v")[:-1], False, "'>\\n'"),
    ("a" + S, False, "after '>\\n'"),
])
def test_malformed_text_raises_in_strict_mode_and_is_read_leniently(text, thinking, words):
    with pytest.raises(CompletionError) as e:
        parse_completion(text, thinking)
    assert words in str(e.value)
    c = parse_completion(text, thinking, strict=False)
    assert c.error and c.message["role"] == "assistant"
    for part in (c.message["content"], c.message["reasoning_content"]):
        assert E not in part and "<think>" not in part and "</think>" not in part and "｜DSML｜" not in part


def test_lenient_keeps_reasoning_of_a_cut_off_thought_and_the_complete_calls():
    c = parse_completion("still thinking", thinking=True, strict=False)
    assert c.message["reasoning_content"] == "still thinking" and c.message["content"] == "" and c.truncated
    text = "ok</think>x" + TWO_CALLS.replace(END_BLOCK, "</｜DSML｜tool_cal")
    c = parse_completion(text, thinking=True, strict=False)
    assert [t["function"]["name"] for t in c.tool_calls] == ["weather", "now"] and c.truncated and c.error
    # a block written without the blank line before it is still read, not leaked into the content
    c = parse_completion("See:\n" + TWO_CALLS.lstrip("\n") + E, thinking=False, strict=False)
    assert c.message["content"] == "See:\n" and len(c.tool_calls) == 2 and c.ended


def _stream(text, thinking, size):
    p = OutputParser(thinking)
    pieces = []
    for i in range(0, len(text), size):
        pieces += p.feed(text[i:i + size])
    return p, pieces


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_streamed_pieces_split_reasoning_answer_and_hide_markup(size):
    text = "Two calls.</think>Checking the weather\n\nnow." + TWO_CALLS + E
    p, pieces = _stream(text, True, size)
    assert p.reasoning_text == "Two calls." and p.answer_text == "Checking the weather\n\nnow."
    assert "".join(x.text for x in pieces if x.kind == "tool_calls") == TWO_CALLS.lstrip("\n")
    assert p.finish().message == parse_completion(text, True).message


def test_streamed_chat_answer_holds_back_only_possible_markers():
    p, pieces = _stream("plain answer\n\nwith lines" + E + "ignored", False, 3)
    assert p.answer_text == "plain answer\n\nwith lines" and p.reasoning_text == ""
    assert all(x.kind == "answer" for x in pieces)


# ---------------------------------------------------------------- round trips
ROUND_TRIP = [
    ("thinking", {"role": "assistant", "content": "", "reasoning_content": "Two calls.", "tool_calls": [
        call("weather", '{"city": "Oslo", "days": [1, 2]}'), call("weather", '{"city": "Lima"}')]}),
    ("thinking", {"role": "assistant", "content": "Noon.", "reasoning_content": "Ok.", "tool_calls": []}),
    ("chat", {"role": "assistant", "content": "Calling:", "reasoning_content": "", "tool_calls": [
        call("now", "{}"), call("search", '{"q": "naïve \\"x\\"\\n", "k": {"a": [true, null, 2.5]}}')]}),
]


@pytest.mark.parametrize("mode,message", ROUND_TRIP)
def test_round_trip_render_tokenise_parse(mode, message):
    """The assistant's render (what the model writes after the prompt) -> ids -> text -> parse ->
    the same message."""
    tok = Tokenizer(build_byte_tokenizer())
    user = {"role": "user", "content": "q"}
    prompt = encode_messages([user], mode)
    full = encode_messages([user, message], mode)
    assert full.startswith(prompt)
    ids = tok.encode(full[len(prompt):])
    stream = tok.stream()  # decoded one token at a time, as during generation
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    c = parse_completion(text, thinking=mode == "thinking")
    assert c.message == message and c.ended and not c.truncated

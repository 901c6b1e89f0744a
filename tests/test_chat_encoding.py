"""The V4 chat encoder against CHAT_ENCODING.md: every worked example byte for byte, the fixed
strings, the reasoning keep/drop table, merging and ordering of tool results, tasks, context, DSML
tool calls, JSON formatting, and the error cases (one line naming the message and field)."""

import json

import pytest

from dsv4.engine.runtime import chat
from dsv4.engine.runtime.chat import ChatFormatError, encode_chat, encode_messages

# The fixed strings of CHAT_ENCODING.md §1, §7, §9, copied from the fact sheet (not from the code under test).
SPEC_FIXED = ['<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>', '<｜User｜>', '<｜Assistant｜>', '<｜latest_reminder｜>', '<think>', '</think>', '｜DSML｜', '<tool_result>', '</tool_result>', '<｜action｜>', '<｜query｜>', '<｜authority｜>', '<｜domain｜>', '<｜title｜>', '<｜read_url｜>']
SPEC_TOOLS = ('## Tools\n'
    '\n'
    'You have access to a set of tools to help answer the user\'s question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:\n'
    '\n'
    '<｜DSML｜tool_calls>\n'
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    '...\n'
    '</｜DSML｜invoke>\n'
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    '...\n'
    '</｜DSML｜invoke>\n'
    '</｜DSML｜tool_calls>\n'
    '\n'
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n'
    '\n'
    'If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n'
    '\n'
    'Otherwise, output directly after </think> with tool calls or final response.\n'
    '\n'
    '### Available Tool Schemas\n'
    '\n'
    '{SCHEMAS}\n'
    '\n'
    'You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n'
)
SPEC_RF = ('## Response Format:\n'
    '\n'
    'You MUST strictly adhere to the following schema to reply:\n'
    '{SCHEMA}'
)
SPEC_MAX = ('Reasoning Effort: Absolute maximum with no shortcuts permitted.\n'
    'You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n'
    'Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n'
    '\n'
    ''
)
TOOLS_HEAD = SPEC_TOOLS[:SPEC_TOOLS.index('### Available Tool Schemas\n\n') + len('### Available Tool Schemas\n\n')]

# CHAT_ENCODING.md §13: (encode_messages arguments, expected text with ⟦TOOLS_HEAD⟧ / ⟦MAX⟧)
SPEC_EXAMPLES = [
    ({'thinking_mode': 'thinking', 'messages': [{'role': 'developer', 'content': 'Oslo and Lima?', 'response_format': {'type': 'json_object'}, 'tools': [{'function': {'name': 'weather', 'parameters': {'type': 'object'}}}]}, {'role': 'assistant', 'reasoning_content': 'Two calls.', 'tool_calls': [{'id': 'c1', 'function': {'name': 'weather', 'arguments': '{"city": "Oslo", "days": [1,2]}'}}, {'id': 'c2', 'function': {'name': 'weather', 'arguments': '{"city": "Lima"}'}}]}, {'role': 'tool', 'tool_call_id': 'c2', 'content': 'Lima 19°C'}, {'role': 'tool', 'tool_call_id': 'c1', 'content': 'Oslo -3°C'}]},
     '<｜begin▁of▁sentence｜><｜User｜>Oslo and Lima?\n'
     '\n'
     '⟦TOOLS_HEAD⟧{"name": "weather", "parameters": {"type": "object"}}\n'
     '\n'
     'You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n'
     '\n'
     '\n'
     '## Response Format:\n'
     '\n'
     'You MUST strictly adhere to the following schema to reply:\n'
     '{"type": "json_object"}<｜Assistant｜><think>Two calls.</think>\n'
     '\n'
     '<｜DSML｜tool_calls>\n'
     '<｜DSML｜invoke name="weather">\n'
     '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
     '<｜DSML｜parameter name="days" string="false">[1, 2]</｜DSML｜parameter>\n'
     '</｜DSML｜invoke>\n'
     '<｜DSML｜invoke name="weather">\n'
     '<｜DSML｜parameter name="city" string="true">Lima</｜DSML｜parameter>\n'
     '</｜DSML｜invoke>\n'
     '</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>Oslo -3°C</tool_result>\n'
     '\n'
     '<tool_result>Lima 19°C</tool_result><｜Assistant｜><think>'),
    ({'thinking_mode': 'thinking', 'messages': [{'role': 'developer', 'content': 'Reply in French.'}, {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'reasoning_content': 'A greeting.', 'content': 'Salut !'}, {'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]},
     '<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>Salut !<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think></think>4<｜end▁of▁sentence｜>'),
    ({'thinking_mode': 'chat', 'messages': [{'role': 'user', 'content': 'A color?'}, {'role': 'assistant', 'reasoning_content': 'ignored', 'content': 'Blue.'}, {'role': 'user', 'content': 'Another.'}, {'role': 'user', 'content': 'Not blue.'}, {'role': 'assistant', 'content': 'Gre', 'wo_eos': True}]},
     '<｜begin▁of▁sentence｜><｜User｜>A color?<｜Assistant｜></think>Blue.<｜end▁of▁sentence｜><｜User｜>Another.\n'
     '\n'
     'Not blue.<｜Assistant｜></think>Gre'),
    ({'thinking_mode': 'thinking', 'reasoning_effort': 'max', 'messages': [{'role': 'system', 'content': 'Math tutor.'}, {'role': 'latest_reminder', 'content': 'Paris, 2026'}, {'role': 'user', 'content': 'Prove it.'}]},
     '<｜begin▁of▁sentence｜>⟦MAX⟧Math tutor.<｜latest_reminder｜>Paris, 2026<｜User｜>Prove it.<｜Assistant｜><think>'),
    ({'thinking_mode': 'thinking', 'messages': [{'role': 'user', 'content': 'Kyoto tips?', 'task': 'title'}, {'role': 'assistant', 'content': 'Kyoto Tips'}, {'role': 'user', 'content': 'Mars news?', 'task': 'action'}, {'role': 'assistant', 'content': 'Search'}]},
     '<｜begin▁of▁sentence｜><｜User｜>Kyoto tips?<｜title｜>Kyoto Tips<｜end▁of▁sentence｜><｜User｜>Mars news?<｜Assistant｜><think><｜action｜>Search<｜end▁of▁sentence｜>'),
    ({'thinking_mode': 'thinking', 'messages': [{'role': 'user', 'content': 'Time?'}, {'role': 'assistant', 'reasoning_content': 'Need clock.', 'tool_calls': [{'id': 't1', 'function': {'name': 'now', 'arguments': '{}'}}]}, {'role': 'tool', 'tool_call_id': 't1', 'content': '12:00'}, {'role': 'assistant', 'reasoning_content': 'Ok.', 'content': 'Noon.'}]},
     '<｜begin▁of▁sentence｜><｜User｜>Time?<｜Assistant｜></think>\n'
     '\n'
     '<｜DSML｜tool_calls>\n'
     '<｜DSML｜invoke name="now">\n'
     '\n'
     '</｜DSML｜invoke>\n'
     '</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>12:00</tool_result><｜Assistant｜><think>Ok.</think>Noon.<｜end▁of▁sentence｜>'),
]

B, E, U, A = SPEC_FIXED[0], SPEC_FIXED[1], SPEC_FIXED[2], SPEC_FIXED[3]


def spec_text(text: str) -> str:
    return text.replace("⟦TOOLS_HEAD⟧", TOOLS_HEAD).replace("⟦MAX⟧", SPEC_MAX)


def test_fixed_strings_and_templates_are_the_fact_sheets():
    from dsv4.engine.runtime.tokenizer import ASSISTANT, BOS, END_THINK, EOS, THINK, USER

    assert [BOS, EOS, USER, ASSISTANT, chat.REMINDER, THINK, END_THINK, chat.DSML, chat.TOOL_RESULT,
            chat.END_TOOL_RESULT] == SPEC_FIXED[:10]
    assert [f"<｜{t}｜>" for t in chat.TASKS] == SPEC_FIXED[10:]
    assert chat.TOOLS_TEMPLATE == SPEC_TOOLS and SPEC_TOOLS.endswith("tool calls.\n")
    assert chat.RESPONSE_FORMAT_TEMPLATE == SPEC_RF
    assert chat.REASONING_EFFORT_MAX == SPEC_MAX and SPEC_MAX.endswith("unchecked.\n\n")


@pytest.mark.parametrize("n", range(1, len(SPEC_EXAMPLES) + 1))
def test_worked_example(n):
    args, text = SPEC_EXAMPLES[n - 1]
    assert encode_messages(**json.loads(json.dumps(args))) == spec_text(text)


def test_example_2_without_drop_thinking_keeps_developer_and_reasoning():
    args, text = SPEC_EXAMPLES[1]
    got = encode_messages(**args, drop_thinking=False)
    rest = text[text.index("Salut !"):]
    assert got == f"{B}{U}Reply in French.{U}Hi{A}<think>A greeting.</think>" + rest


def test_example_1_does_not_modify_its_input():
    args, _ = SPEC_EXAMPLES[0]
    before = json.dumps(args)
    encode_messages(**args)
    assert json.dumps(args) == before


# ---------------------------------------------------------------- reasoning keep/drop (§3, §6)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("tools", [False, True])
@pytest.mark.parametrize("given", [True, False])
def test_reasoning_keep_drop_table(mode, drop, tools, given):
    system = {"role": "system", "content": "S", **({"tools": [TOOL]} if tools else {})}
    r1, r2 = ({"reasoning_content": "r1"}, {"reasoning_content": "r2"}) if given else ({}, {})
    msgs = [system, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", **r1},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", **r2}]
    thinking = mode == "thinking"
    keep_before = thinking and (not drop or tools)  # before the last user turn
    keep_after = thinking  # after it
    first = (f"<think>{'r1' if given else ''}</think>" if keep_before else "</think>") + "a1" + E
    last = (f"<think>{'r2' if given else ''}</think>" if keep_after else "</think>") + "a2" + E
    tp = "\n\n" + SPEC_TOOLS.replace("{SCHEMAS}", json.dumps(TOOL["function"], ensure_ascii=False)) if tools else ""
    want = f"{B}S{tp}{U}q1{A}{first}{U}q2{A}{last}"
    assert encode_messages(msgs, mode, drop_thinking=drop) == want


def test_tools_on_a_user_message_do_not_keep_reasoning():
    msgs = [{"role": "user", "content": "q1", "tools": [TOOL]}, {"role": "assistant", "reasoning_content": "r",
            "content": "a"}, {"role": "user", "content": "q2"}]
    assert encode_messages(msgs, "thinking") == f"{B}{U}q1{A}</think>a{E}{U}q2{A}<think>"


def test_consecutive_assistants_get_no_marker():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
            {"role": "assistant", "reasoning_content": "r2", "content": "a2"}]
    assert encode_messages(msgs, "thinking") == f"{B}{U}q{A}<think>r1</think>a1{E}r2</think>a2{E}"
    assert encode_messages(msgs, "chat") == f"{B}{U}q{A}</think>a1{E}a2{E}"


def test_assistant_prefix_with_wo_eos_ends_the_prompt_at_its_content():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "r", "content": "Par",
                                               "wo_eos": True}]
    assert encode_messages(msgs, "thinking") == f"{B}{U}q{A}<think>r</think>Par"


# ---------------------------------------------------------------- merging and ordering (§3)
def test_tool_results_merge_and_sort_by_call_position_with_text_blocks_in_place():
    calls = [{"id": "a", "function": {"name": "f", "arguments": "{}"}},
             {"function": {"id": "b", "name": "f", "arguments": "{}"}},
             {"id": "c", "function": {"name": "f", "arguments": "{}"}}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c", "content": "C"}, {"role": "user", "content": "note"},
            {"role": "tool", "tool_call_id": "zz", "content": "Z"}, {"role": "tool", "tool_call_id": "b", "content": "B"},
            {"role": "tool", "tool_call_id": "a", "content": "A"}]
    out = encode_messages(msgs, "chat")
    tail = out[out.rindex(U) + len(U):]
    # unknown id "zz" counts as position 0 (stable: it stays before "a"); the text block keeps slot 1
    assert tail == ("<tool_result>Z</tool_result>\n\nnote\n\n<tool_result>A</tool_result>\n\n"
                    "<tool_result>B</tool_result>\n\n<tool_result>C</tool_result>" + A + "</think>")


def test_tool_results_not_sorted_without_call_ids():
    calls = [{"function": {"name": "f", "arguments": "{}"}}, {"function": {"name": "g", "arguments": "{}"}}]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "2", "content": "two"}, {"role": "tool", "tool_call_id": "1", "content": "one"}]
    assert encode_messages(msgs, "chat").endswith("<tool_result>two</tool_result>\n\n<tool_result>one</tool_result>"
                                                  f"{A}</think>")


def test_sort_uses_the_latest_assistant_with_calls_including_context():
    ctx = [{"role": "user", "content": "q"},
           {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f", "arguments": "{}"}},
                                                {"id": "y", "function": {"name": "f", "arguments": "{}"}}]}]
    msgs = [{"role": "tool", "tool_call_id": "y", "content": "Y"}, {"role": "tool", "tool_call_id": "x", "content": "X"}]
    assert encode_messages(msgs, "chat", context=ctx) == \
        f"{U}<tool_result>X</tool_result>\n\n<tool_result>Y</tool_result>{A}</think>"


def test_tool_result_contents():
    msgs = [{"role": "user", "content": "q"}, {"role": "tool"}, {"role": "tool", "content": None},
            {"role": "tool", "content": [{"type": "text", "text": "t1"}, {"type": "image_url", "image_url": {}},
                                         {"type": "text", "text": "t2"}]}]
    assert encode_messages(msgs, "chat") == (
        f"{B}{U}q\n\n<tool_result></tool_result>\n\n<tool_result>None</tool_result>\n\n"
        f"<tool_result>t1\n\n[Unsupported image_url]\n\nt2</tool_result>{A}</think>")


def test_a_text_block_does_not_join_a_turn_with_a_task_but_a_tool_block_does():
    msgs = [{"role": "user", "content": "a", "task": "query"}, {"role": "tool", "content": "T"},
            {"role": "user", "content": "b"}]
    assert encode_messages(msgs, "chat") == f"{B}{U}a\n\n<tool_result>T</tool_result>{U}b{A}</think>"


def test_a_task_before_a_user_message_is_ignored_unvalidated():
    msgs = [{"role": "user", "content": "a", "task": "bogus"}, {"role": "user", "content": "b"}]
    assert encode_messages(msgs, "thinking") == f"{B}{U}a{U}b{A}<think>"


@pytest.mark.parametrize("task,mode,want", [
    ("action", "chat", f"{A}</think><｜action｜>"), ("action", "thinking", f"{A}<think><｜action｜>"),
    ("query", "thinking", "<｜query｜>"), ("authority", "chat", "<｜authority｜>"), ("domain", "chat", "<｜domain｜>"),
    ("read_url", "thinking", "<｜read_url｜>"),
])
def test_task_suffixes(task, mode, want):
    assert encode_messages([{"role": "user", "content": "x", "task": task}], mode) == f"{B}{U}x{want}"


# ---------------------------------------------------------------- other roles and options
def test_thinking_drop_deletes_developers_and_unknown_roles_before_the_last_user_without_error():
    msgs = [{"role": "developer", "content": ""}, {"role": "robot", "content": "?"}, {"role": "user", "content": "q"}]
    assert encode_messages(msgs, "thinking") == f"{B}{U}q{A}<think>"
    with pytest.raises(ChatFormatError):
        encode_messages(msgs, "chat")


def test_system_reminder_and_response_format():
    msgs = [{"role": "system", "content": None, "response_format": {"type": "json_object"}},
            {"role": "user", "content": "q"}, {"role": "latest_reminder"}]
    assert encode_messages(msgs, "chat") == (f"{B}\n\n" + SPEC_RF.replace("{SCHEMA}", '{"type": "json_object"}')
                                             + f"{U}q{A}</think><｜latest_reminder｜>None")


def test_a_system_message_mid_conversation_has_no_marker():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "S2"},
            {"role": "user", "content": "r"}]
    assert encode_messages(msgs, "chat") == f"{B}{U}q{A}</think>a{E}S2{U}r{A}</think>"


def test_reasoning_effort_max_only_in_thinking_mode_without_context():
    msgs = [{"role": "user", "content": "q"}]
    assert encode_messages(msgs, "thinking", reasoning_effort="max") == f"{B}{SPEC_MAX}{U}q{A}<think>"
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == f"{B}{U}q{A}<think>"
    assert encode_messages(msgs, "chat", reasoning_effort="max") == f"{B}{U}q{A}</think>"
    ctx = [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}]
    assert SPEC_MAX not in encode_messages(msgs, "thinking", context=ctx, reasoning_effort="max")


def test_empty_conversation_is_bos_and_bos_can_be_left_out():
    assert encode_messages([], "chat") == B
    assert encode_messages([{"role": "user", "content": "q"}], "chat", add_default_bos_token=False) == f"{U}q{A}</think>"


def test_context_is_counted_not_rendered():
    ctx = [{"role": "user", "content": "q"}]
    assert encode_messages([{"role": "assistant", "reasoning_content": "r", "content": "a"}], "thinking",
                           context=ctx) == f"r</think>a{E}"


def test_context_quirk_a_context_developer_dropped_in_the_full_list_hides_a_leading_new_message():
    # CHAT_ENCODING.md §10: the developer is the context's own last user/developer message, so the
    # context alone keeps it; in the full list it is before L and deleted, and the first new message vanishes
    ctx = [{"role": "user", "content": "u"}, {"role": "developer", "content": "d"}]
    msgs = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "x"}]
    assert encode_messages(msgs, "thinking", context=ctx) == f"{U}x{A}<think>"
    assert encode_messages(msgs, "thinking", context=ctx, drop_thinking=False) == f"</think>a{E}{U}x{A}<think>"


# ---------------------------------------------------------------- DSML and JSON (§7, §8)
def _call(arguments, name="f"):
    return [{"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": name, "arguments": arguments}}]}]


def _params(out: str) -> str:
    start = out.index('name="f">\n') + len('name="f">\n')
    return out[start:out.index("\n</｜DSML｜invoke>")]


P = '<｜DSML｜parameter name="{}" string="{}">{}</｜DSML｜parameter>'


@pytest.mark.parametrize("arguments,want", [
    ('{"s": "a\\nb \\"q\\" é", "n": 3, "x": 2.5, "b": true, "z": null, "o": {"k": [1,2]}}',
     [("s", "true", 'a\nb "q" é'), ("n", "false", "3"), ("x", "false", "2.5"), ("b", "false", "true"),
      ("z", "false", "null"), ("o", "false", '{"k": [1, 2]}')]),
    ("not json", [("arguments", "true", "not json")]),
    ({"a": 1}, [("arguments", "false", '{"a": 1}')]),
])
def test_dsml_parameters(arguments, want):
    out = encode_messages(_call(arguments), "chat")
    assert _params(out) == "\n".join(P.format(*w) for w in want)


def test_json_formatting_matches_python_json_dumps_with_raw_non_ascii():
    tool = {"function": {"name": "t", "d": 'é/"\\\n\x01', "f": [2.5, 100000.0, 1e-07, float("nan"), float("inf")]}}
    out = encode_messages([{"role": "system", "content": "", "tools": [tool]}], "chat")
    assert '{"name": "t", "d": "é/\\"\\\\\\n\\u0001", "f": [2.5, 100000.0, 1e-07, NaN, Infinity]}\n' in out


# ---------------------------------------------------------------- errors (§11)
@pytest.mark.parametrize("msgs,kw,words", [
    ([{"role": "user", "content": "q"}], {"thinking_mode": "fast"}, ["thinking_mode", "'fast'"]),
    ([{"role": "user", "content": "q"}], {"reasoning_effort": "low"}, ["reasoning_effort", "'low'"]),
    ([{"role": "developer", "content": ""}], {}, ["messages[0]", "developer", "non-empty"]),
    ([{"role": "developer"}], {}, ["messages[0]", "developer"]),
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "x"}], {}, ["messages[1]", "unknown role 'bot'"]),
    ([{"content": "x"}], {}, ["messages[0]", "no role"]),
    ([{"role": "user", "content": "q"}, {"role": "direct_search_results", "content": "x"}], {},
     ["messages[1]", "direct_search_results"]),
    ([{"role": "user", "content": "q", "task": "summarise"}], {}, ["messages[0]", "unknown task 'summarise'"]),
    ([{"role": "user", "content": None}], {}, ["messages[0]", "content", "null"]),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": ["x"]}], {}, ["messages[1]", "content", "list"]),
    ([{"role": "system", "content": "", "tools": [{"name": "f"}]}], {}, ["messages[0]", "tools[0]", "function"]),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], {},
     ["messages[1]", "tool_calls[0].function.name"]),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "1"}]}], {},
     ["messages[1]", "tool_calls[0].function"]),
    (_call("[1, 2]"), {}, ["messages[1]", "tool_calls[0].function.arguments", "JSON object"]),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}], {}, ["messages[1]", "content", "int"]),
    ("hello", {}, ["messages must be a list"]),
    ([["user", "hi"]], {}, ["messages[0]", "object"]),
])
def test_errors_are_one_line_and_name_the_message_and_field(msgs, kw, words):
    args = {"thinking_mode": "chat", **kw}
    with pytest.raises(ChatFormatError) as e:
        encode_messages(msgs, **args)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert isinstance(e.value, ValueError)


# ---------------------------------------------------------------- the boolean-mode wrapper
def test_encode_chat_reads_the_old_reasoning_key_and_can_leave_out_the_generation_prompt():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "why"}]
    assert encode_chat(msgs, thinking=True) == f"{B}{U}q{A}<think>why</think>a{E}"
    assert encode_chat(msgs[:1], thinking=False) == f"{B}{U}q{A}</think>"
    assert encode_chat(msgs[:1], thinking=True, add_generation_prompt=False) == f"{B}{U}q"


def test_training_data_renders_as_the_built_in_model_was_trained():
    from dsv4.train import data

    with_r = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "r"}]
    without = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
               {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert data.render(with_r) == f"{B}{U}q{A}<think>r</think>a{E}"
    assert data.render(without) == f"{B}{U}q{A}</think>a{E}{U}q2{A}</think>a2{E}"

"""The DeepSeek-V4 chat encoding: messages -> prompt text (the published ``encoding_dsv4`` rules).

The complete rules are in spec/CHAT_ENCODING.md; this module follows them byte for byte. In short:
1. merge: ``tool`` messages become ``<tool_result>`` blocks and ``user`` messages text blocks of one
   user turn (a text block does not join a turn that has a ``task``); tool results are ordered like
   the calls of the latest assistant that made calls;
2. D = drop_thinking, off when a non-user message carries tools; L = the last user/developer turn;
   in thinking mode with D, messages before L other than system/user/assistant/latest_reminder go;
3. render: bos, the reasoning-effort paragraph (``max``, thinking mode), then every message:
   system text, ``<｜User｜>`` turns, ``<｜latest_reminder｜>``, assistant = reasoning + ``</think>``
   (kept only in thinking mode after L or without D) + content + DSML tool calls + eos; after a
   user/developer turn followed by an assistant (or at the end) the generation prompt
   ``<｜Assistant｜><think>`` (thinking, at L or without D) or ``<｜Assistant｜></think>``; a task
   replaces it with its token.

Errors (bad arguments, bad messages) raise ``ChatFormatError``: one line naming the message
(``messages[3]``) and the field.
"""

from __future__ import annotations

import json

from .tokenizer import ASSISTANT, BOS, END_THINK, EOS, THINK, USER

REMINDER = "<｜latest_reminder｜>"
DSML = "｜DSML｜"
TOOL_RESULT, END_TOOL_RESULT = "<tool_result>", "</tool_result>"
TOOL_CALLS_OPEN, TOOL_CALLS_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
INVOKE_OPEN, INVOKE_CLOSE = f"<{DSML}invoke", f"</{DSML}invoke>"
PARAM_OPEN, PARAM_CLOSE = f"<{DSML}parameter", f"</{DSML}parameter>"
TASKS = ("action", "query", "authority", "domain", "title", "read_url")
MODES = ("chat", "thinking")
EFFORTS = (None, "high", "max")
ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")
# roles that survive the thinking-mode drop before the last user turn (step 4 of the pipeline)
KEPT_BEFORE_LAST_USER = ("system", "user", "assistant", "latest_reminder", "direct_search_results")

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{SCHEMAS}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

RESPONSE_FORMAT_TEMPLATE = """## Response Format:

You MUST strictly adhere to the following schema to reply:
{SCHEMA}"""

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)


class ChatFormatError(ValueError):
    """A conversation the encoding cannot render; the message names the message index and field."""


def to_json(value) -> str:
    """JSON as the encoding writes it: one line, ``, `` and ``: `` separators, non-ASCII raw."""
    return json.dumps(value, ensure_ascii=False)


class _Item:
    """One message after merging. ``msg`` is the source message (for a user turn: its task/wo_eos);
    ``blocks`` (user turns only): [(kind "text"|"tool", call id, content, where)]."""

    __slots__ = ("role", "msg", "where", "blocks")

    def __init__(self, role, msg, where, blocks=None):
        self.role, self.msg, self.where, self.blocks = role, msg, where, blocks or []


def _merge(messages, label: str) -> list[_Item]:
    """Step 1: user and tool messages into user turns; other roles pass through."""
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"{label} must be a list of messages, got {type(messages).__name__}")
    out: list[_Item] = []
    for i, m in enumerate(messages):
        where = f"{label}[{i}]"
        if not isinstance(m, dict):
            raise ChatFormatError(f"{where}: a message must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ("user", "tool"):
            out.append(_Item(role, m, where))
            continue
        if role == "tool":
            block = ("tool", m.get("tool_call_id") or "", m.get("content", _ABSENT), where)
        else:
            block = ("text", None, m.get("content", _ABSENT), where)
        prev = out[-1] if out else None
        if prev is not None and prev.role == "user" and (role == "tool" or not prev.msg.get("task")):
            prev.blocks.append(block)
        else:
            out.append(_Item("user", {k: m[k] for k in ("task", "wo_eos") if k in m}, where, [block]))
    return out


_ABSENT = object()


def _call_id(call) -> str | None:
    if not isinstance(call, dict):
        return None
    fn = call.get("function")
    return call.get("id") or (fn.get("id") if isinstance(fn, dict) else None)


def _sort_tool_results(items: list[_Item]) -> None:
    """Step 2: order each user turn's tool results like the calls of the latest earlier assistant
    with calls (stable; an unknown id counts as position 0; text blocks keep their places)."""
    order: dict = {}
    for it in items:
        if it.role == "assistant" and isinstance(it.msg.get("tool_calls"), list) and it.msg["tool_calls"]:
            order = {}
            for pos, call in enumerate(it.msg["tool_calls"]):
                cid = _call_id(call)
                if cid is not None and cid not in order:
                    order[cid] = pos
        elif it.role == "user" and order:
            slots = [k for k, b in enumerate(it.blocks) if b[0] == "tool"]
            if len(slots) >= 2:
                ranked = sorted((it.blocks[k] for k in slots), key=lambda b: order.get(b[1], 0))
                for k, b in zip(slots, ranked):
                    it.blocks[k] = b


def _last_user(items: list[_Item]) -> int:
    return max((k for k, it in enumerate(items) if it.role in ("user", "developer")), default=-1)


def _drop_before_last_user(items: list[_Item]) -> list[_Item]:
    """Step 4 (thinking mode with D): delete messages before L whose role is not kept."""
    last = _last_user(items)
    return [it for k, it in enumerate(items) if k >= last or it.role in KEPT_BEFORE_LAST_USER]


def encode_messages(messages, thinking_mode: str, context=None, drop_thinking: bool = True,
                    add_default_bos_token: bool = True, reasoning_effort: str | None = None) -> str:
    """Render ``messages`` (OpenAI-style dicts) as V4 prompt text, exactly as DeepSeek's encoder.

    thinking_mode: "chat" | "thinking". context: messages already encoded (counted for the rules,
    not rendered, no bos). reasoning_effort: None | "high" | "max". Raises ChatFormatError."""
    if thinking_mode not in MODES:
        raise ChatFormatError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    if reasoning_effort not in EFFORTS:
        raise ChatFormatError(f"reasoning_effort must be 'high' or 'max', got {reasoning_effort!r}")
    thinking = thinking_mode == "thinking"
    ctx = _merge(context or [], "context")
    new = _merge(messages, "messages")
    items = ctx + new
    _sort_tool_results(items)
    drop = bool(drop_thinking) and not any(it.role != "user" and it.msg.get("tools") for it in items)
    n_ctx = len(ctx)
    if thinking and drop:
        items = _drop_before_last_user(items)
        n_ctx = len(_drop_before_last_user(ctx))  # the published encoder's offset (CHAT_ENCODING.md §10)
    last = _last_user(items)
    out = [BOS] if add_default_bos_token and not context else []
    for i in range(n_ctx, len(items)):
        if i == 0 and thinking and reasoning_effort == "max":
            out.append(REASONING_EFFORT_MAX)
        out.append(_render(items, i, thinking, drop, last))
        if i == len(items) - 1 or items[i + 1].role in ("assistant", "latest_reminder"):
            out.append(_suffix(items[i], thinking and (not drop or i == last), thinking))
    return "".join(out)


def _suffix(it: _Item, open_think: bool, thinking: bool) -> str:
    """The generation prompt (or task token) after message ``it`` (§5)."""
    task = it.msg.get("task")
    if task:
        if task not in TASKS:
            raise ChatFormatError(f"{it.where}: unknown task {task!r} (use one of {', '.join(TASKS)})")
        if task == "action":
            return ASSISTANT + (THINK if thinking else END_THINK) + "<｜action｜>"
        return f"<｜{task}｜>"
    if it.role in ("user", "developer"):
        return ASSISTANT + (THINK if open_think else END_THINK)
    return ""


def _render(items: list[_Item], i: int, thinking: bool, drop: bool, last: int) -> str:
    it = items[i]
    m, where = it.msg, it.where
    if it.role == "system":
        return _text(m, where, "content", none="") + _extras(m, where)
    if it.role == "developer":
        content = m.get("content")
        if not isinstance(content, str) or not content:
            raise ChatFormatError(f"{where}: a developer message needs non-empty text content")
        return USER + content + _extras(m, where)
    if it.role == "user":
        return USER + "\n\n".join(_block(b) for b in it.blocks)
    if it.role == "latest_reminder":
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ChatFormatError(f"{where}: content must be a string, got {type(content).__name__}")
        return REMINDER + ("None" if content is None else content)
    if it.role == "assistant":
        prev_task = items[i - 1].msg.get("task") if i > 0 else None
        reasoning = ""
        if thinking and not prev_task and (not drop or i > last):
            reasoning = _text(m, where, "reasoning_content", none="") + END_THINK
        eos = "" if m.get("wo_eos") else EOS
        return reasoning + _text(m, where, "content", none="") + _tool_calls(m, where) + eos
    if it.role is None:
        raise ChatFormatError(f"{where}: the message has no role")
    raise ChatFormatError(f"{where}: unknown role {it.role!r} (use one of {', '.join(ROLES)})")


def _text(m: dict, where: str, key: str, none: str) -> str:
    v = m.get(key)
    if v is None:
        return none
    if not isinstance(v, str):
        raise ChatFormatError(f"{where}: {key} must be a string, got {type(v).__name__}")
    return v


def _extras(m: dict, where: str) -> str:
    """TP + RP: the tools section and the response-format section of a system/developer message."""
    out = ""
    tools = m.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise ChatFormatError(f"{where}: tools must be a list, got {type(tools).__name__}")
        schemas = []
        for k, t in enumerate(tools):
            if not isinstance(t, dict) or "function" not in t:
                raise ChatFormatError(f"{where}: tools[{k}] has no 'function' object")
            schemas.append(to_json(t["function"]))
        out += "\n\n" + TOOLS_TEMPLATE.replace("{SCHEMAS}", "\n".join(schemas))
    if m.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT_TEMPLATE.replace("{SCHEMA}", to_json(m["response_format"]))
    return out


def _block(b) -> str:
    kind, _, content, where = b
    if kind == "text":
        if content is _ABSENT:
            return ""
        if not isinstance(content, str):
            raise ChatFormatError(f"{where}: content must be a string, got "
                                  f"{'null' if content is None else type(content).__name__}")
        return content
    if content is _ABSENT:
        body = ""
    elif content is None:
        body = "None"
    elif isinstance(content, str):
        body = content
    elif isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict):
                raise ChatFormatError(f"{where}: content[{k}] must be an object")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise ChatFormatError(f"{where}: content[{k}].text must be a string")
                parts.append(part["text"])
            else:
                parts.append(f"[Unsupported {part.get('type')}]")
        body = "\n\n".join(parts)
    else:
        raise ChatFormatError(f"{where}: content must be a string or a list, got {type(content).__name__}")
    return TOOL_RESULT + body + END_TOOL_RESULT


def _tool_calls(m: dict, where: str) -> str:
    """C: the assistant's tool calls as a DSML block ("" without calls)."""
    calls = m.get("tool_calls")
    if not calls:
        return ""
    if not isinstance(calls, list):
        raise ChatFormatError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    invokes = [_invoke(call, f"{where}: tool_calls[{k}]") for k, call in enumerate(calls)]
    return "\n\n" + TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


def _invoke(call, where: str) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict):
        raise ChatFormatError(f"{where}.function is missing")
    for key in ("name", "arguments"):
        if key not in fn:
            raise ChatFormatError(f"{where}.function.{key} is missing")
    name, raw = fn["name"], fn["arguments"]
    if not isinstance(name, str):
        raise ChatFormatError(f"{where}.function.name must be a string")
    args = None
    if isinstance(raw, str):
        try:
            args = json.loads(raw)
        except ValueError:
            args = None
        else:
            if not isinstance(args, dict):
                raise ChatFormatError(f"{where}.function.arguments must be a JSON object, got "
                                      f"{type(args).__name__}")
    params = args.items() if args is not None else [("arguments", raw)]
    lines = [dsml_parameter(k, v) for k, v in params]
    return f'{INVOKE_OPEN} name="{name}">\n' + "\n".join(lines) + "\n" + INVOKE_CLOSE


def dsml_parameter(key: str, value) -> str:
    """One DSML parameter line: a string raw with string="true", anything else as JSON."""
    if isinstance(value, str):
        return f'{PARAM_OPEN} name="{key}" string="true">{value}{PARAM_CLOSE}'
    return f'{PARAM_OPEN} name="{key}" string="false">{to_json(value)}{PARAM_CLOSE}'


def encode_chat(messages: list[dict], thinking: bool = True, reasoning_effort: str | None = None,
                add_generation_prompt: bool = True, drop_thinking: bool = True) -> str:
    """``encode_messages`` with a boolean mode; reads the old ``reasoning`` key as ``reasoning_content``.

    add_generation_prompt=False leaves out the generation prompt after a final user/developer turn
    (the text then ends with that turn's content), for rendering training text."""
    msgs = [with_reasoning_content(m) for m in messages]
    text = encode_messages(msgs, "thinking" if thinking else "chat", drop_thinking=drop_thinking,
                           reasoning_effort=reasoning_effort)
    if not add_generation_prompt:
        for tail in (ASSISTANT + THINK, ASSISTANT + END_THINK):
            if msgs and msgs[-1].get("role") in ("user", "tool", "developer") and text.endswith(tail):
                return text[: -len(tail)]
    return text


def with_reasoning_content(m):
    """A message with the old ``reasoning`` key renamed ``reasoning_content`` (others unchanged)."""
    if isinstance(m, dict) and "reasoning" in m and "reasoning_content" not in m:
        m = {("reasoning_content" if k == "reasoning" else k): v for k, v in m.items()}
    return m

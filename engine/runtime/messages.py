"""Conversation files (OpenAI chat-completions style) and the message helpers around them.

A file holds either a JSON list of messages, or an object
``{"messages": [...], "tools": [...], "response_format": {...}, "thinking": bool}`` (every key but
``messages`` optional; other keys, e.g. a request's ``model``, are ignored). Top-level ``tools`` and
``response_format`` attach to the first system message; an empty one is added at the front when
there is none. Messages carry reasoning as ``reasoning_content``; the old key ``reasoning`` (and an
old file's top-level ``system`` text) is read too. Saving writes the object form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .chat import with_reasoning_content


class ConversationFileError(ValueError):
    """A conversation file that cannot be read; one line naming the file and the problem."""


@dataclass
class ConversationFile:
    messages: list[dict]
    thinking: bool | None = None  # the mode it was saved in, if it says


def attach_tools(messages: list[dict], tools=None, response_format=None) -> list[dict]:
    """A copy of ``messages`` whose first system message carries ``tools`` / ``response_format``
    (an empty system message is added at the front when there is none). None leaves a key as is;
    an empty list removes the tools."""
    if tools is None and response_format is None:
        return list(messages)
    out = list(messages)
    k = next((i for i, m in enumerate(out) if m.get("role") == "system"), None)
    if k is None:
        out.insert(0, {"role": "system", "content": ""})
        k = 0
    sysmsg = dict(out[k])
    for key, value in (("tools", tools), ("response_format", response_format)):
        if value is not None:
            if value:
                sysmsg[key] = value
            else:
                sysmsg.pop(key, None)
    out[k] = sysmsg
    return out


def parse_conversation(data, where: str = "conversation") -> ConversationFile:
    """Decoded JSON of a conversation file -> ConversationFile; ConversationFileError if malformed."""
    thinking = None
    tools = response_format = None
    system = None
    if isinstance(data, dict):
        if "messages" not in data:
            raise ConversationFileError(f"{where}: an object needs a 'messages' list")
        messages, tools, response_format = data["messages"], data.get("tools"), data.get("response_format")
        system, thinking = data.get("system"), data.get("thinking")
        if thinking is not None and not isinstance(thinking, bool):
            raise ConversationFileError(f"{where}: 'thinking' must be true or false")
        if system is not None and not isinstance(system, str):
            raise ConversationFileError(f"{where}: 'system' must be a string")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ConversationFileError(f"{where}: 'tools' must be a list of objects")
    elif isinstance(data, list):
        messages = data
    else:
        raise ConversationFileError(f"{where}: expected a list of messages or an object with 'messages', "
                                    f"got {type(data).__name__}")
    if not isinstance(messages, list):
        raise ConversationFileError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
    out = [check_message(m, f"{where}: messages[{i}]") for i, m in enumerate(messages)]
    if system and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system})
    return ConversationFile(attach_tools(out, tools, response_format), thinking)


def check_message(m, where: str) -> dict:
    """One message's shape (object, role, content, tool_calls) -> the message with reasoning under
    ``reasoning_content``. What the encoding decides (roles it renders, tasks) is left to it."""
    if not isinstance(m, dict):
        raise ConversationFileError(f"{where}: a message must be an object, got {type(m).__name__}")
    role = m.get("role")
    if not isinstance(role, str):
        raise ConversationFileError(f"{where}: 'role' must be a string")
    content = m.get("content")
    if content is not None and not isinstance(content, (str, list)):
        raise ConversationFileError(f"{where}: 'content' must be a string, got {type(content).__name__}")
    if isinstance(content, list) and role != "tool":
        raise ConversationFileError(f"{where}: 'content' must be a string (content parts only in tool messages)")
    m = with_reasoning_content(m)
    r = m.get("reasoning_content")
    if r is not None and not isinstance(r, str):
        raise ConversationFileError(f"{where}: 'reasoning_content' must be a string")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise ConversationFileError(f"{where}: 'tool_calls' must be a list")
        for k, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
                raise ConversationFileError(f"{where}: tool_calls[{k}] needs function.name and function.arguments")
    return m


def read_conversation(path) -> ConversationFile:
    """Read and check a conversation file (UTF-8 JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConversationFileError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ConversationFileError(f"{p}: is a folder, not a conversation file") from None
    except UnicodeDecodeError:
        raise ConversationFileError(f"{p}: not UTF-8 text") from None
    except OSError as e:
        raise ConversationFileError(f"{p}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversationFileError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return parse_conversation(data, str(p))


def conversation_json(messages: list[dict], thinking: bool | None = None) -> str:
    """The object form of a conversation file (reasoning as ``reasoning_content``)."""
    data = {"messages": [with_reasoning_content(m) for m in messages]}
    if thinking is not None:
        data["thinking"] = thinking
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def write_conversation(path, messages: list[dict], thinking: bool | None = None) -> None:
    """Write a conversation file; a partial write never replaces an existing file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.write_text(conversation_json(messages, thinking), encoding="utf-8")
        tmp.replace(p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConversationFileError(f"{p}: cannot write ({e.strerror})") from None



def read_tools(path) -> list[dict]:
    """A tools file: a JSON list of OpenAI tool entries (each with a ``function`` object that has a
    ``name``), or an object with such a list under ``tools``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversationFileError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConversationFileError(f"{p}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except json.JSONDecodeError as e:
        raise ConversationFileError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list):
        raise ConversationFileError(f"{p}: expected a list of tools (or an object with 'tools')")
    for k, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ConversationFileError(f"{p}: tools[{k}] needs a 'function' object with a 'name'")
    return tools

"""Validation of OpenAI-format chat messages, tools and tool calls before they are rendered."""
from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A conversation the V3.2 prompt format cannot represent; a server answers it with HTTP 400."""


def to_json(value: Any) -> str:
    """JSON as the official encoder writes it: default separators, non-ASCII kept."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ChatFormatError(f"value is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise ChatFormatError("value is not JSON-serialisable: nested too deeply") from None
    if has_lone_surrogate(text):
        raise ChatFormatError("value is not valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)")
    return text


def has_lone_surrogate(text: str) -> bool:
    """Whether a string holds a lone surrogate, which UTF-8 (and so a prompt) cannot carry."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_unicode(value: Any, where: str) -> None:
    """Raise ChatFormatError if a string anywhere in a JSON value (keys included) holds a lone
    surrogate; iterative, so any nesting depth is fine."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                raise ChatFormatError(f"{path}: not valid Unicode: a lone surrogate (\\ud800-\\udfff) "
                                      "cannot be encoded as UTF-8")
        elif isinstance(item, dict):
            for key, sub in item.items():
                stack.append((key, f"{path} (a key)"))
                stack.append((sub, f"{path}.{key}" if isinstance(key, str) else path))
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, f"{path}[{i}]") for i, sub in enumerate(item))


def text_content(value: Any, where: str) -> str | None:
    """A message's content as text: a string, None, or a list of text parts joined by newlines."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ChatFormatError(f"{where}: only text content parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts")


def normalize_messages(messages: Any) -> list[dict]:
    """Shallow copies of the messages with roles checked and content turned into text."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    result = []
    for index, msg in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(msg, dict):
            raise ChatFormatError(f"{where}: a message must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        check_unicode(msg, where)
        _check_fields(msg, role, where)
        msg = dict(msg)
        msg["content"] = text_content(msg.get("content"), where)
        if role in ("user", "tool") and msg["content"] is None:
            raise ChatFormatError(f"{where}: a {role} message needs content")
        if role == "developer" and not msg["content"]:
            raise ChatFormatError(f"{where}: a developer message needs non-empty content")
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ChatFormatError(f"{where}: reasoning_content must be a string")
        if msg.get("prefix") and (role != "assistant" or index != len(messages) - 1):
            raise ChatFormatError(f"{where}: only the last message, an assistant one, may be a prefix")
        result.append(msg)
    return result


def _check_fields(msg: dict, role: str, where: str) -> None:
    """Types of the fields besides content that a role uses (unknown fields are ignored)."""
    name = msg.get("name")
    if name is not None and not isinstance(name, str):
        raise ChatFormatError(f"{where}.name must be a string")
    if role == "assistant":
        check_tool_calls(msg.get("tool_calls"), f"{where}.tool_calls")
    call_id = msg.get("tool_call_id")
    if role == "tool" and call_id is not None and not isinstance(call_id, str):
        raise ChatFormatError(f"{where}.tool_call_id must be a string")


def check_tool_calls(calls: Any, where: str) -> None:
    """An assistant message's `tool_calls`: None or a list of well-formed calls with string ids
    (fields besides id, type and function, such as a `name` some harnesses add, are ignored)."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise ChatFormatError(f"{where}: tool_calls must be a list")
    for i, call in enumerate(calls):
        call_arguments(call, f"{where}[{i}]")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ChatFormatError(f"{where}[{i}].id must be a string")


def function_specs(tools: Any, where: str) -> list[dict]:
    """The `function` objects of OpenAI-format tools, checked."""
    if not isinstance(tools, list):
        raise ChatFormatError(f"{where}: tools must be a list")
    specs = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ChatFormatError(f"{where}.tools[{i}]: a tool must be {{\"type\": \"function\", ...}}")
        spec = tool.get("function")
        if not isinstance(spec, dict):
            raise ChatFormatError(f"{where}.tools[{i}]: missing the `function` object")
        check_name(spec.get("name"), f"{where}.tools[{i}].function.name")
        check_unicode(spec, f"{where}.tools[{i}].function")
        if not isinstance(spec.get("parameters", {}), dict):
            raise ChatFormatError(f"{where}.tools[{i}].function.parameters must be an object")
        specs.append(spec)
    return specs


def check_name(name: Any, where: str) -> str:
    """A function or parameter name the DSML markup can carry (no quote, no angle bracket)."""
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}: a non-empty string is required")
    if any(c in name for c in '"<>'):
        raise ChatFormatError(f"{where}: {name!r} contains a character DSML cannot carry (\", <, >)")
    return name


def call_arguments(call: Any, where: str) -> tuple[str, dict]:
    """(name, arguments object) of one OpenAI-format tool call."""
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise ChatFormatError(f"{where}: a tool call must be {{\"type\": \"function\", ...}}")
    function = call.get("function")
    if not isinstance(function, dict):
        raise ChatFormatError(f"{where}: missing the `function` object")
    name = check_name(function.get("name"), f"{where}.function.name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:   # JSONDecodeError, or an integer over Python's digit limit
            raise ChatFormatError(f"{where}.function.arguments is not valid JSON: {exc}") from None
        except RecursionError:
            raise ChatFormatError(f"{where}.function.arguments is nested too deeply") from None
        check_unicode(arguments, f"{where}.function.arguments")
    if not isinstance(arguments, dict):
        raise ChatFormatError(f"{where}.function.arguments must be a JSON object")
    for key in arguments:
        check_name(key, f"{where}.function.arguments key")
    return name, arguments

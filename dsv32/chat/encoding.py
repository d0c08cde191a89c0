"""OpenAI-format messages -> the DeepSeek-V3.2 prompt text, byte-identical to the official encoder.

Rules (from DeepSeek's `encoding_dsv32.py` and its golden vector):
- system: content, then the tools section and the response-format section, each after a blank line;
- user: `<｜User｜>content<｜Assistant｜>` followed by `<think>` when it is the last user turn in
  thinking mode, `</think>` otherwise; developer: the same, its content introduced by the tools and
  response-format sections and `# The user's message is: `; it counts as a user turn;
- assistant: `reasoning</think>` (thinking mode, after the last user turn only), content, the DSML
  function_calls block after a blank line, `<｜end▁of▁sentence｜>`;
- tool: results of one assistant message grouped in `<function_results>`, then `<think>` or `</think>`
  opens the assistant's next step in the same turn.
Reasoning is rendered only after the last user turn, whatever `drop_thinking` says: in thinking mode
the flag only decides whether developer messages before the last user turn are left out (True, the
default) or kept, as in the official encoder. A last assistant message with `prefix: true` is
rendered open, without `<｜end▁of▁sentence｜>`: the model continues its content, or its reasoning
when it has no content yet.
Every `<think>` the encoder writes is closed by the next `</think>`, and every other `</think>`
directly follows `<｜Assistant｜>` or the function results (the non-thinking marker); only the
prompt's end may be left inside reasoning. Where the official encoder would break that rule (an
assistant message after the last user turn that follows no user, developer or tool message, system
messages aside, such as a second assistant message in a row), this one leaves the reasoning out.
It is lenient where the official one fails, too: an assistant message after the last user turn
without reasoning or tool calls renders empty reasoning; text content parts are joined by newlines.
"""
from __future__ import annotations

from typing import Any

from .messages import (
    ChatFormatError, call_arguments, function_specs, normalize_messages, to_json,
)
from .templates import DEVELOPER_MESSAGE_INTRO, RESPONSE_FORMAT_SECTION, TOOLS_SECTION
from .tokens import (
    ASSISTANT, BOS, CALLS_CLOSE, CALLS_OPEN, CALLS_SEPARATOR, EOS, INVOKE_CLOSE, INVOKE_OPEN_HEAD,
    PARAM_CLOSE, PARAM_OPEN_HEAD, THINK_END, THINK_START, USER,
)

THINKING_MODES = ("thinking", "chat")
# Roles whose rendering ends with `<think>` or `</think>`, opening the assistant text that follows.
OPENERS = ("user", "developer", "tool")


def encode_messages(messages: list[dict], thinking_mode: str = "thinking", drop_thinking: bool = True,
                    add_bos: bool = True, tools: list[dict] | None = None,
                    response_format: dict | None = None) -> str:
    """Render a conversation as the prompt text; `tools`/`response_format` join the system message."""
    check_thinking_mode(thinking_mode)
    msgs = _with_request_fields(normalize_messages(messages), tools, response_format)
    _check_tool_results(msgs)
    thinking = thinking_mode == "thinking"
    if thinking and drop_thinking:
        last = _last_user_index(msgs)
        msgs = [m for i, m in enumerate(msgs) if m["role"] != "developer" or i >= last]
    renderer = _Renderer(msgs, thinking)
    return (BOS if add_bos else "") + "".join(renderer.render(i) for i in range(len(msgs)))


def generation_mode(messages: list[dict], thinking_mode: str = "thinking") -> str:
    """The `thinking_mode` to parse the completion with: "thinking" when the prompt ends in reasoning."""
    check_thinking_mode(thinking_mode)
    last = messages[-1] if messages else {}
    if thinking_mode == "thinking" and last.get("role") == "assistant" and last.get("prefix"):
        before = _before_skipping_system(messages, len(messages) - 1)
        opened = before >= 0 and messages[before].get("role") in OPENERS
        return "thinking" if opened and not last.get("content") else "chat"
    return thinking_mode


def check_thinking_mode(thinking_mode: str) -> None:
    """Raise ChatFormatError unless the mode is "thinking" or "chat"."""
    if thinking_mode not in THINKING_MODES:
        raise ChatFormatError(f"thinking_mode must be 'thinking' or 'chat', not {thinking_mode!r}")


def render_tool_calls(tool_calls: list[Any], where: str = "tool_calls") -> str:
    """The DSML function_calls block (with its leading blank line) for OpenAI-format tool calls."""
    if not isinstance(tool_calls, list):
        raise ChatFormatError(f"{where}: tool_calls must be a list")
    invokes = []
    for i, call in enumerate(tool_calls):
        name, arguments = call_arguments(call, f"{where}[{i}]")
        params = "\n".join(_render_parameter(key, value) for key, value in arguments.items())
        invokes.append(f'{INVOKE_OPEN_HEAD}{name}">\n{params}\n{INVOKE_CLOSE}')
    return f"{CALLS_SEPARATOR}{CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{CALLS_CLOSE}"


def _render_parameter(key: str, value: Any) -> str:
    if isinstance(value, str):
        return f'{PARAM_OPEN_HEAD}{key}" string="true">{value}{PARAM_CLOSE}'
    return f'{PARAM_OPEN_HEAD}{key}" string="false">{to_json(value)}{PARAM_CLOSE}'


def _before_skipping_system(msgs: list, index: int) -> int:
    """The index of the last message before `index` that is not a system message (-1: none)."""
    index -= 1
    while index >= 0 and isinstance(msgs[index], dict) and msgs[index].get("role") == "system":
        index -= 1
    return index


def _last_user_index(msgs: list[dict]) -> int:
    return max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)


def _with_request_fields(msgs: list[dict], tools: Any, response_format: Any) -> list[dict]:
    """Attach request-level tools and response_format to the first message, a system one."""
    if not tools and response_format is None:
        return msgs
    if msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": ""}] + msgs
    head = msgs[0]
    for key, value in (("tools", tools), ("response_format", response_format)):
        if value is None or (key == "tools" and not value):
            continue
        if head.get(key):
            raise ChatFormatError(f"{key} given both in the request and in the system message")
        head[key] = value
    return msgs


def _check_tool_results(msgs: list[dict]) -> None:
    """Each run of tool messages answers every call of the assistant message just before it."""
    index = 0
    while index < len(msgs):
        if msgs[index]["role"] != "tool":
            index += 1
            continue
        start = index
        while index < len(msgs) and msgs[index]["role"] == "tool":
            index += 1
        caller = msgs[start - 1] if start else {}
        calls = caller.get("tool_calls") if caller.get("role") == "assistant" else None
        if not calls:
            raise ChatFormatError(
                f"messages[{start}]: a tool message must follow an assistant message with tool_calls")
        if index - start != len(calls):
            raise ChatFormatError(f"messages[{start - 1}] made {len(calls)} tool call(s) but "
                                  f"{index - start} tool message(s) answer it")
        ids = {c.get("id") for c in calls if isinstance(c, dict) and c.get("id")}
        for i in range(start, index):
            call_id = msgs[i].get("tool_call_id")
            if ids and call_id is not None and call_id not in ids:
                raise ChatFormatError(
                    f"messages[{i}]: tool_call_id {call_id!r} matches no call of messages[{start - 1}]")


class _Renderer:
    """Renders message i of a validated conversation."""

    def __init__(self, msgs: list[dict], thinking: bool):
        self.msgs = msgs
        self.thinking = thinking
        self.last_user = _last_user_index(msgs)

    def render(self, index: int) -> str:
        msg = self.msgs[index]
        return getattr(self, "_" + msg["role"])(index, msg)

    def _opens_thinking(self, index: int) -> bool:
        """Whether message `index` ends with `<think>`: the assistant text after it starts in reasoning."""
        return (self.thinking and index >= 0 and index >= self.last_user
                and self.msgs[index]["role"] in OPENERS)

    def _starts_in_reasoning(self, index: int) -> bool:
        """Whether the assistant message `index` begins inside reasoning (system messages are no step)."""
        return self._opens_thinking(_before_skipping_system(self.msgs, index))

    def _think_token(self, index: int) -> str:
        return THINK_START if self._opens_thinking(index) else THINK_END

    def _sections(self, msg: dict, where: str) -> str:
        text = ""
        if msg.get("tools"):
            schemas = "\n".join(to_json(spec) for spec in function_specs(msg["tools"], where))
            text += "\n\n" + TOOLS_SECTION.replace("{schemas}", schemas)
        response_format = msg.get("response_format")
        if response_format is not None:
            if not isinstance(response_format, dict):
                raise ChatFormatError(f"{where}: response_format must be an object")
            if response_format.get("type") != "text":
                text += "\n\n" + RESPONSE_FORMAT_SECTION.format(schema=to_json(response_format))
        return text

    def _system(self, index: int, msg: dict) -> str:
        return (msg["content"] or "") + self._sections(msg, f"messages[{index}]")

    def _user(self, index: int, msg: dict) -> str:
        return f"{USER}{msg['content']}{ASSISTANT}{self._think_token(index)}"

    def _developer(self, index: int, msg: dict) -> str:
        content = self._sections(msg, f"messages[{index}]") + "\n\n" + DEVELOPER_MESSAGE_INTRO + msg["content"]
        return f"{USER}{content}{ASSISTANT}{self._think_token(index)}"

    def _tool(self, index: int, msg: dict) -> str:
        text = "\n\n<function_results>" if self.msgs[index - 1]["role"] != "tool" else ""
        text += f"\n<result>{msg['content']}</result>"
        if index + 1 == len(self.msgs) or self.msgs[index + 1]["role"] != "tool":
            text += "\n</function_results>\n\n" + self._think_token(index)
        return text

    def _assistant(self, index: int, msg: dict) -> str:
        calls = msg.get("tool_calls")
        calls_text = render_tool_calls(calls, f"messages[{index}].tool_calls") if calls else ""
        content = msg["content"] or ""
        reasoning = msg.get("reasoning_content") or ""
        if msg.get("prefix"):
            if calls:
                raise ChatFormatError(f"messages[{index}]: a prefix message cannot carry tool_calls")
            if not self._starts_in_reasoning(index):
                return content
            return reasoning + THINK_END + content if content else reasoning
        thinking_part = reasoning + THINK_END if self._starts_in_reasoning(index) else ""
        return thinking_part + content + calls_text + EOS

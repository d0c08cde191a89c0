"""A chat request as the engine takes it: messages and answer constraints -> prompt text, the mode
to parse the completion in, and the grammar processors every sequence of it runs under.

The server, the offline `LLM.chat`, `dsv32 generate --chat` and `dsv32 chat` all come through
here, so each gets the same prompt and the same safety net: tool calls can only name offered tools
with arguments under their schemas, and none can start when no tools are offered.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dsv32.chat import encode_messages, generation_mode
from dsv32.chat.grammar import OutputSpec
from dsv32.chat.tokens import DSML

from .guided import GrammarCompiler


class InvalidRequest(ValueError):
    """A chat request that cannot be served as given; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ChatRequest:
    """Messages (OpenAI format) and what the answer must follow."""

    messages: list[dict]
    thinking: bool = False
    tools: list[dict] | None = None
    tool_choice: Any = None            # "none" | "auto" | "required" | {"type": "function", ...}
    response_format: dict | None = None
    parallel_tool_calls: bool = True


@dataclass
class ChatPrompt:
    """What the engine generates from: the prompt, the parse mode and the logits processors."""

    text: str
    mode: str                          # "thinking" when the completion starts inside reasoning
    processors: list


def _ends_in_markup(messages: list[dict]) -> bool:
    """A prefix completion whose text already holds DSML: the grammar cannot start mid-markup."""
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    text = f"{last.get('content') or ''}{last.get('reasoning_content') or ''}"
    return bool(last.get("prefix")) and DSML in text


def prepare_chat(request: ChatRequest, grammars: GrammarCompiler, safety_net: bool = True) -> ChatPrompt:
    """Render the prompt and build the processors; InvalidRequest names the field at fault."""
    thinking_mode = "thinking" if request.thinking else "chat"
    tools = request.tools if request.tools and request.tool_choice != "none" else None
    rf = request.response_format
    rf = None if isinstance(rf, dict) and rf.get("type") == "text" else rf
    try:
        text = encode_messages(request.messages, thinking_mode=thinking_mode, tools=tools, response_format=rf)
        mode = generation_mode(request.messages, thinking_mode)
    except ValueError as exc:        # ChatFormatError
        raise InvalidRequest(str(exc), "messages") from None
    spec = OutputSpec(response_format=rf, tools=request.tools, tool_choice=request.tool_choice,
                      parallel_tool_calls=request.parallel_tool_calls, thinking=mode == "thinking")
    try:
        processors = grammars.processors(spec, safety_net and not _ends_in_markup(request.messages))
    except ValueError as exc:
        field = re.match(r"(response_format|tool_choice|tools)", str(exc))
        raise InvalidRequest(str(exc), field.group(1) if field else "tools") from None
    return ChatPrompt(text, mode, processors)

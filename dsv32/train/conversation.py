"""A training conversation: OpenAI-format messages that `dsv32.chat.encode_messages` renders, in one
thinking mode, with what the data pipeline reads from them (the tools offered, the values that
tool calls and results carry)."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Conversation:
    """One training conversation; a system message first, if any, offers the tools."""

    messages: list[dict]
    thinking_mode: str = "thinking"   # "thinking" | "chat"
    category: str = ""                # "calculator", "weather", "units", "chat"; "skill" for drills
    id: str = ""

    @classmethod
    def drill(cls, id: str, turns: list[tuple[str, str]]) -> Conversation:
        """A tool-less chat-mode drill ("skill") of (user text, answer) turns."""
        messages = [m for user, answer in turns
                    for m in ({"role": "user", "content": user}, {"role": "assistant", "content": answer})]
        return cls(messages, thinking_mode="chat", category="skill", id=id)

    @property
    def tools(self) -> list[dict] | None:
        """The tool specs the system message offers (None when none are offered)."""
        head = self.messages[0] if self.messages else {}
        return head.get("tools") if head.get("role") == "system" else None

    def called_tools(self) -> set[str]:
        """The names of the tools its assistant turns call."""
        return {call["function"]["name"] for m in self.messages for call in m.get("tool_calls") or []}

    def values(self) -> list[str]:
        """The values its assistant turns copy or quote: every tool-call argument and every
        tool-result field (numbers as JSON writes them); their tokens can weigh more in the loss."""
        out: list[str] = []
        for m in self.messages:
            for call in m.get("tool_calls") or []:
                _add_values(json.loads(call["function"]["arguments"]), out)
            if m["role"] == "tool":
                try:
                    content = json.loads(m["content"])
                except (json.JSONDecodeError, TypeError):
                    content = m["content"]
                _add_values(content if isinstance(content, dict) else m["content"], out)
        return [v for v in dict.fromkeys(out) if v.strip()]

    def without_tools(self) -> Conversation:
        """The same turns, calls and results with no tools section in the prompt (~650 fewer tokens
        for the demo's three tools: the short-context curriculum stage)."""
        messages = [{k: v for k, v in m.items() if not (m["role"] == "system" and k == "tools")}
                    for m in self.messages]
        return replace(self, messages=messages)

    def offering(self, tools: list[dict], id: str) -> Conversation:
        """A copy, named `id`, whose system message offers `tools` instead."""
        messages = copy.deepcopy(self.messages)
        messages[0]["tools"] = tools
        return replace(self, messages=messages, id=id)


def _add_values(value, out: list[str]) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _add_values(v, out)
    elif isinstance(value, str):
        out.append(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out.append(json.dumps(value))

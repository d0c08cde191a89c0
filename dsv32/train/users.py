"""The user-written evaluation set (`eval_users.jsonl`): questions over the three tools and plain
chat typed the way users type them, written by hand apart from the task generator's sentence
frames (tests check that none is a training frame filled in) and never used to choose training
data. Besides the generator's categories it asks questions with no tools offered ("no-tools":
arithmetic answered directly, weather and conversions answered honestly, plain chat), questions
that need two or three calls in one turn ("multi-call") and requests whose `response_format`
asks for a JSON answer ("json"). Every item runs in both modes; results and expected strings are
computed here from the item (the calculator's result, the small-talk kind's expected words), not
written in the file.

An item: {"id", "category", "user"} and optionally "calls" (the reference calls, [{"name",
"arguments"}]), "tools" (names of the tools offered; default all three, none for "no-tools"),
"system" (system prompt text), "response_format", and what a plain answer must contain: "expected"
(strings), "small_talk" (a kind of `phrasings.SMALL_TALK`), "compute" (an expression whose value
the answer states) or "honest" ("weather", "units": the answer says it has no such tool).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from .envs.registry import TOOL_SPECS, execute_tool_call
from .envs.verify import NO_TOOL_WORDS
from .synth import MODES, Task
from .synth.phrasings import SMALL_TALK

PATH = Path(__file__).with_name("eval_users.jsonl")
USER_CATEGORIES = ("calculator", "weather", "units", "chat", "no-tools", "multi-call", "json")
TOOL_NAMES = tuple(spec["function"]["name"] for spec in TOOL_SPECS)


@functools.cache
def user_items() -> tuple[dict, ...]:
    """The items of the set, in file order."""
    return tuple(json.loads(line) for line in PATH.read_text().splitlines() if line.strip())


def user_tasks(categories: tuple[str, ...] = USER_CATEGORIES, n: int | None = None) -> list[Task]:
    """Every item of `categories` as a task, in both modes; `n` keeps that many, taken in turn
    from every (category, mode) cell (smoke tests)."""
    tasks = [user_task(item, mode) for item in user_items() if item["category"] in categories
             for mode in MODES]
    if n is None:
        return tasks
    cells: dict[str, list[Task]] = {}
    for task in tasks:
        cells.setdefault(f"{task.category}/{task.thinking_mode}", []).append(task)
    ranked = sorted(tasks, key=lambda t: cells[f"{t.category}/{t.thinking_mode}"].index(t))
    return ranked[:n]


def user_task(item: dict, thinking_mode: str) -> Task:
    """One item as an evaluation task (split "users")."""
    calls = item.get("calls", [])
    return Task(id=f"users-{item['id']}-{thinking_mode}", category=item["category"], kind=item_kind(item),
                frame=item["user"], thinking_mode=thinking_mode, split="users", messages=item_messages(item),
                reference=[], reference_calls=calls,
                results=[execute_tool_call(c["name"], c["arguments"]) for c in calls],
                expected=item_expected(item))


def offered_tools(item: dict) -> list[dict]:
    """The specs of the tools the item's request offers."""
    default = () if item["category"] == "no-tools" else TOOL_NAMES
    names = item.get("tools", default)
    unknown = set(names) - set(TOOL_NAMES)
    if unknown:
        raise ValueError(f"{item['id']}: unknown tools {sorted(unknown)}")
    return [json.loads(json.dumps(s)) for s in TOOL_SPECS if s["function"]["name"] in names]


def item_messages(item: dict) -> list[dict]:
    """The prompt: a system message when the request has a system prompt, tools or a
    response_format (as the server renders a request), then the user's message."""
    system = {"role": "system", "content": item.get("system", "")}
    tools = offered_tools(item)
    if tools:
        system["tools"] = tools
    if item.get("response_format"):
        system["response_format"] = item["response_format"]
    head = [system] if len(system) > 2 or system["content"] else []
    return head + [{"role": "user", "content": item["user"]}]


def item_kind(item: dict) -> str:
    """"calculator", "weather", "units" for what a no-tool answer is about, the small-talk kind, the
    called tools joined by "+", or "plain"."""
    if "compute" in item:
        return "calculator"
    if "honest" in item:
        return item["honest"]
    if "small_talk" in item:
        return item["small_talk"]
    return "+".join(c["name"] for c in item.get("calls", [])) or "plain"


def item_expected(item: dict) -> list[str]:
    """What a plain answer must contain (one of)."""
    if "compute" in item:
        result = execute_tool_call("calculator", {"expression": item["compute"]})
        if result.startswith("Error"):
            raise ValueError(f"{item['id']}: {result}")
        return [result]
    if "honest" in item:
        return list(NO_TOOL_WORDS)
    if "small_talk" in item:
        return list(SMALL_TALK[item["small_talk"]][3])
    return list(item.get("expected", []))

"""Requests whose `response_format` asks for JSON (issue 34): the system message carries
`json_object` or a `json_schema` (which the encoder renders as the response-format section), and the
final answer is exactly one JSON object whose content is what the conversation established: the
tool results after one or several calls, the value of a calculation done in one's head, or a plain
answer. Schemas name the same facts with different keys, so the answer has to follow the schema's
keys; the server's grammar enforces the form, and this data gives the content.
"""
from __future__ import annotations

import json
import random

from ..envs.registry import execute_tool_call, tool_specs
from . import replies as R
from .drafts import Draft, _dress, draft
from .requests import mental, multi_call_request, multi_trajectory
from .tasks import Task, _trajectory

# What the user may add to ask for JSON (the response_format asks for it anyway), train only.
JSON_PHRASES = ("reply in JSON", "JSON please", "return JSON", "respond with JSON", "in JSON format",
                "JSON format please", "output JSON", "use JSON for the answer", "format the reply as JSON",
                "give me the answer in JSON format")
JSON_SEPARATORS = (", ", ". ", " - ", "; ")

# The facts each kind of answer states, and their JSON types.
FIELDS = {
    "calculator": {"expression": "string", "result": "number"},
    "get_weather": {"city": "string", "date": "string", "condition": "string", "high_c": "number",
                    "low_c": "number"},
    "convert_units": {"value": "number", "from_unit": "string", "to_unit": "string", "result": "number"},
    "capital": {"country": "string", "capital": "string"},
    "fact": {"answer": "string"},
    "definition": {"term": "string", "definition": "string"},
    "reply": {"reply": "string"},
}
# json_schema variants: (name, {fact: key}); the facts left out are not asked for.
SCHEMAS = {
    "calculator": (("calculation", {"expression": "expression", "result": "result"}),
                   ("answer", {"result": "answer"}), ("math", {"expression": "question", "result": "value"})),
    "get_weather": (("forecast", {"city": "city", "date": "date", "condition": "condition",
                                  "high_c": "high_c", "low_c": "low_c"}),
                    ("weather", {"city": "location", "condition": "conditions", "high_c": "max",
                                 "low_c": "min"}),
                    ("weather_report", {"city": "city", "date": "date", "condition": "summary",
                                        "high_c": "high", "low_c": "low"}),
                    ("day", {"condition": "weather", "high_c": "temperature_high", "low_c": "temperature_low"})),
    "convert_units": (("conversion", {"value": "value", "from_unit": "from_unit", "to_unit": "to_unit",
                                      "result": "result"}),
                      ("converted", {"result": "converted", "to_unit": "unit"}),
                      ("unit_conversion", {"value": "amount", "from_unit": "from", "to_unit": "to",
                                           "result": "result"})),
    "capital": (("capital", {"country": "country", "capital": "capital"}), ("answer", {"capital": "answer"})),
    "fact": (("answer", {"answer": "answer"}), ("fact", {"answer": "fact"})),
    "definition": (("definition", {"term": "term", "definition": "definition"}),
                   ("meaning", {"definition": "meaning"})),
    "reply": (("reply", {"reply": "reply"}), ("message", {"reply": "message"})),
}


def response_format(kind: str | None, variant: int | None) -> dict:
    """`json_object` (variant None, or kind None) or the json_schema variant of `kind`."""
    if kind is None or variant is None:
        return {"type": "json_object"}
    name, keys = SCHEMAS[kind][variant]
    properties = {key: {"type": FIELDS[kind][fact]} for fact, key in keys.items()}
    return {"type": "json_schema", "json_schema": {"name": name, "schema": {
        "type": "object", "properties": properties, "required": list(keys.values()),
        "additionalProperties": False}}}


def json_content(kind: str, facts: dict, fmt: dict) -> dict:
    """The answer object: every fact under its own name (json_object), or the schema's keys."""
    if fmt["type"] == "json_object":
        return {fact: facts[fact] for fact in FIELDS[kind]}
    name = fmt["json_schema"]["name"]
    keys = next(k for n, k in SCHEMAS[kind] if n == name)
    return {key: facts[fact] for fact, key in keys.items()}


def result_facts(name: str, arguments: dict, result: str) -> dict:
    """The facts of one tool call and its result."""
    if name == "calculator":
        return {"expression": arguments["expression"], "result": json.loads(result)}
    return json.loads(result)


def plain_facts(first: Draft) -> tuple[str, dict]:
    """(kind, facts) of a plain answer."""
    if first.kind in ("capital", "definition"):
        return first.kind, first.slots
    if first.kind == "fact":
        return "fact", first.slots
    return "reply", {"reply": R.IDENTITY_NO_TOOLS if first.kind == "identity" else first.slots["reply"]}


def json_task(seed: int, index: int, thinking_ratio: float = 0.5) -> Task:
    """Task `index` of the JSON stream: a tool question answered after one call (45%) or several
    (10%), a calculation done in one's head without tools (15%), or plain chat with or without the
    tools offered (30%); the request's response_format asks for JSON, half of them a json_schema."""
    rng = random.Random(f"dsv32-json|{seed}|{index}")
    thinking = rng.random() < thinking_ratio
    roll, schema = rng.random(), rng.random() < 0.5
    if roll < 0.55:
        frame, user, reference, calls, results, kind, fmt = _tool_part(rng, roll < 0.45, schema, thinking)
        expected, tools = [], True
    else:
        frame, user, reference, kind, fmt, expected = _plain_part(rng, roll < 0.7, schema, thinking)
        calls, results, tools = [], [], roll >= 0.85
    system = {"role": "system", "content": "", "response_format": fmt}
    if tools:
        system["tools"] = tool_specs()
    return Task(id=f"json-{seed}-{index}", category="json", kind=kind, frame=frame,
                thinking_mode="thinking" if thinking else "chat", split="train",
                messages=[system, {"role": "user", "content": user}], reference=reference,
                reference_calls=calls, results=results, expected=expected)


def _asking_json(rng: random.Random, text: str) -> str:
    """The request, undressed, with a JSON phrase after it (in most of them), dressed."""
    if rng.random() < 0.6:
        text = text.rstrip("?.") + rng.choice(JSON_SEPARATORS) + rng.choice(JSON_PHRASES)
    return _dress(rng, text)


def _tool_part(rng: random.Random, single: bool, schema: bool, thinking: bool):
    if single:
        first = draft(rng, rng.choice(("calculator", "weather", "units")), "train", dress=False)
        user = _asking_json(rng, first.user)
        reference, calls, results = _trajectory(rng, first, thinking)
        kind = first.call[0]
        fmt = response_format(kind, rng.randrange(len(SCHEMAS[kind])) if schema else None)
        content = json_content(kind, result_facts(kind, first.call[1], results[0]), fmt)
        frame = first.frame
    else:
        frame, text, drafts = multi_call_request(rng)
        user = _asking_json(rng, text)
        reference, calls, results = multi_trajectory(rng, drafts, thinking)
        kind, fmt = "+".join(c["name"] for c in calls), response_format(None, None)
        content = {"results": [json_content(c["name"], result_facts(c["name"], c["arguments"], r), fmt)
                               for c, r in zip(calls, results)]}
    _answer_json(reference[-1], content, thinking)
    return frame, user, reference, calls, results, kind, fmt


def _plain_part(rng: random.Random, arithmetic: bool, schema: bool, thinking: bool):
    if arithmetic:
        first = draft(rng, "calculator", "train", dress=False)
        while not mental(first.call[1]["expression"]):
            first = draft(rng, "calculator", "train", dress=False)
        result = execute_tool_call(*first.call)
        kind, facts, expected = "calculator", result_facts("calculator", first.call[1], result), [result]
        reasoning = R.REASON_NO_TOOL["calculator"][0].format(**first.slots)
    else:
        first = draft(rng, "chat", "train", dress=False)
        (kind, facts), expected, reasoning = plain_facts(first), list(first.expected), first.reasoning
    fmt = response_format(kind, rng.randrange(len(SCHEMAS[kind])) if schema else None)
    message = {"role": "assistant", "content": ""}
    if thinking:
        message["reasoning_content"] = reasoning
    _answer_json(message, json_content(kind, facts, fmt), thinking)
    return first.frame, _asking_json(rng, first.user), [message], kind, fmt, expected


def _answer_json(message: dict, content: dict, thinking: bool) -> None:
    """Make `message` (the final answer) the JSON object `content`."""
    message["content"] = json.dumps(content, ensure_ascii=False)
    if thinking:
        message["reasoning_content"] = (message.get("reasoning_content", "") + " " + R.REASON_JSON).strip()


def json_tasks(n: int, seed: int = 0) -> list[Task]:
    """`n` tasks of the JSON stream."""
    return [json_task(seed, i) for i in range(n)]

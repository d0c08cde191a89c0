"""Requests beyond one call with every tool offered (issue 34): questions asked with no tool
offered (arithmetic answered with its value, weather and conversions honestly, plain chat; the
prompt has no tools section, as the server renders a request without tools) and questions that
need two or three calls in one turn (parallel invokes in one function_calls block, one tool
message per call, then an answer that uses every result). Each is a `Task` with its reference
trajectory, in the train split's wording: the generator's frames, joined by the frames below, which
a held-out or user-written question never uses (tested).
"""
from __future__ import annotations

import json
import random
import re

from ..envs.dates import DATE_STYLES, write_date
from ..envs.registry import execute_tool_call, tool_specs
from ..envs.units import DISPLAY
from ..envs.verify import NO_TOOL_WORDS
from . import replies as R
from .drafts import Draft, _dress, date_in_split, draft
from .phrasings import CITIES
from .tasks import Task, _call_id, _result_slots

TOOL_CATEGORIES = ("calculator", "weather", "units")

# -- what users write (train only) ----------------------------------------------------------------

# Two or three questions in one message: {a}, {b}, {c} are questions of the generator's frames.
JOINERS = {
    2: ("{a} and {b}", "{a}, and {b}", "{a}. also {b}", "{a}; {b}", "two things: {a}, and {b}",
        "{a}, then {b}", "first {a}, then {b}", "{a}? and {b}", "{a}, plus {b}", "{a}. {b}", "{a}? {b}",
        "{a}, also {b}", "{a} and also {b}", "answer both: {a}; {b}"),
    3: ("{a}, {b} and {c}", "{a}; {b}; {c}", "three things: {a}, {b}, and {c}", "{a}. {b}. {c}",
        "first {a}, then {b}, then {c}", "{a}, {b}, and also {c}", "{a}? {b}? {c}"),
}
# Several cities on one date.
CITIES_FRAMES = (
    "what's the weather in {cities} on {date}?", "{cities}: weather on {date}?",
    "forecast for {cities}, {date}", "how do {cities} compare on {date}?",
    "how's the weather in {cities} on {date}?", "get me the forecast for {cities} on {date}",
    "weather in {cities} on {date}?", "check the weather for {date} in {cities}",
    "what will the weather be in {cities} on {date}?", "{date} forecast for {cities}",
)


def join_questions(rng: random.Random, questions: list[str]) -> tuple[str, str]:
    """(joiner frame, the questions in it, undressed); every question but the last loses its
    closing punctuation."""
    frame = rng.choice(JOINERS[len(questions)])
    parts = [q.rstrip("?.") for q in questions[:-1]] + [questions[-1]]
    return frame, frame.format(**dict(zip("abc", parts)))


def names_list(names: list[str]) -> str:
    """"A and B", "A, B and C"."""
    return ", ".join(names[:-1]) + " and " + names[-1]


# -- no tools offered -------------------------------------------------------------------------------

NO_TOOL_CATEGORIES = ("calculator", "calculator", "weather", "units", "chat")
NO_TOOL_SYSTEMS = ("", "", "", "You are a helpful assistant.", "You are a concise assistant.")


def no_tool_task(seed: int, index: int, thinking_ratio: float = 0.5) -> Task:
    """Task `index` of the no-tool stream: a train-split question of any category asked with no
    tool offered, answered without a call."""
    rng = random.Random(f"dsv32-no-tools|{seed}|{index}")
    category = rng.choice(NO_TOOL_CATEGORIES)
    mode = "thinking" if rng.random() < thinking_ratio else "chat"
    first = draft(rng, category, "train")
    if category == "calculator" and rng.random() < 0.7:      # mostly sums one can do in one's head
        for _ in range(50):
            if mental(first.call[1]["expression"]):
                break
            first = draft(rng, category, "train")
    content, reasoning, expected = no_tool_answer(rng, first)
    message = {"role": "assistant", "content": content}
    if mode == "thinking":
        message["reasoning_content"] = reasoning
    system = rng.choice(NO_TOOL_SYSTEMS)
    head = [{"role": "system", "content": system}] if system else []
    kind = first.kind if first.call is None else category
    return Task(id=f"no-tools-{seed}-{index}", category="no-tools", kind=kind, frame=first.frame,
                thinking_mode=mode, split="train", messages=head + [{"role": "user", "content": first.user}],
                reference=[message], expected=expected)


def no_tool_answer(rng: random.Random, first: Draft) -> tuple[str, str, list[str]]:
    """(answer, reasoning, expected strings) of a question asked with no tool offered: the value of
    a calculation one does in one's head (computed here), an honest answer for other calculations,
    weather and conversions, a plain answer to plain chat."""
    if first.call is None:
        answer = R.IDENTITY_NO_TOOLS if first.kind == "identity" else first.answer
        return answer, first.reasoning, list(first.expected)
    name, arguments = first.call
    slots = dict(first.slots)
    if name == "calculator" and mental(arguments["expression"]):
        slots["result"] = execute_tool_call(name, arguments)
        return (rng.choice(R.ANSWER[name]).format(**slots), rng.choice(R.REASON_NO_TOOL[name]).format(**slots),
                [slots["result"]])
    if name == "convert_units":
        slots.update({"from": DISPLAY[arguments["from_unit"]], "to": DISPLAY[arguments["to_unit"]]})
    reasoning = R.REASON_NO_TOOL_HARD if name == "calculator" else rng.choice(R.REASON_NO_TOOL[name])
    return rng.choice(R.NO_TOOL_ANSWER[name]).format(**slots), reasoning.format(**slots), list(NO_TOOL_WORDS)


def mental(expression: str) -> bool:
    """Whether a calculation is one a person does in their head: one operation on two whole
    numbers up to 100 (or a square), with a whole result below 1000."""
    numbers = re.findall(r"\d+(?:\.\d+)?", expression)
    if len(numbers) != 2 or any("." in x or int(x) > 100 for x in numbers) or "(" in expression:
        return False
    result = execute_tool_call("calculator", {"expression": expression})
    return re.fullmatch(r"-?\d{1,3}", result) is not None


# -- several calls in one turn ----------------------------------------------------------------------

def multi_call_task(seed: int, index: int, thinking_ratio: float = 0.5) -> Task:
    """Task `index` of the multi-call stream: two (three in a quarter) tool questions in one
    message, all three tools offered; the reference calls them all in one block."""
    rng = random.Random(f"dsv32-multi-call|{seed}|{index}")
    mode = "thinking" if rng.random() < thinking_ratio else "chat"
    frame, user, drafts = multi_call_request(rng)
    system = {"role": "system", "content": rng.choice(R.SYSTEM_PROMPTS), "tools": tool_specs()}
    reference, calls, results = multi_trajectory(rng, drafts, mode == "thinking")
    return Task(id=f"multi-call-{seed}-{index}", category="multi-call",
                kind="+".join(c["name"] for c in calls), frame=frame, thinking_mode=mode, split="train",
                messages=[system, {"role": "user", "content": user}], reference=reference,
                reference_calls=calls, results=results)


def multi_call_request(rng: random.Random) -> tuple[str, str, list[Draft]]:
    """(frame, user text, one draft per call) of a request that needs 2 or 3 different calls."""
    count = 3 if rng.random() < 0.25 else 2
    if rng.random() < 0.3:
        categories = [rng.choice(TOOL_CATEGORIES)] * count
        if categories[0] == "weather" and rng.random() < 0.6:
            return cities_request(rng, count)
    else:
        categories = [rng.choice(TOOL_CATEGORIES) for _ in range(count)]
    drafts: list[Draft] = []
    while len(drafts) < count:
        candidate = draft(rng, categories[len(drafts)], "train", dress=False)
        if all(candidate.call != d.call for d in drafts):
            drafts.append(candidate)
    frame, text = join_questions(rng, [d.user for d in drafts])
    return frame, _dress(rng, text), drafts


def cities_request(rng: random.Random, count: int) -> tuple[str, str, list[Draft]]:
    """The weather in `count` different known cities on one date, asked in one sentence."""
    cities = rng.sample(CITIES["train"], count)
    day = date_in_split(rng, "train")
    frame = rng.choice(CITIES_FRAMES)
    user = _dress(rng, frame.format(cities=names_list(cities), date=write_date(day, rng.choice(DATE_STYLES))))
    slots = [{"city": city, "date": day.isoformat()} for city in cities]
    return frame, user, [Draft("weather", frame, user, ("get_weather", s), s) for s in slots]


def multi_trajectory(rng: random.Random, drafts: list[Draft],
                     thinking: bool) -> tuple[list[dict], list[dict], list[str]]:
    """(reference messages, reference calls, results): one assistant message calling every draft's
    tool, one tool message per call, an answer that quotes every result."""
    calls, tools, answers, reasons_call, reasons_answer = [], [], [], [], []
    for d in drafts:
        name, arguments = d.call
        call_id = _call_id(rng)
        result = execute_tool_call(name, arguments)
        slots = {**d.slots, **_result_slots(name, result)}
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
        tools.append({"role": "tool", "tool_call_id": call_id, "content": result})
        answers.append((R.ANSWER[name][0] if name == "calculator" else rng.choice(R.ANSWER[name])).format(**slots))
        reasons_call.append(rng.choice(R.REASON_CALL[name]).format(**slots))
        reasons_answer.append(rng.choice(R.REASON_ANSWER[name]).format(**slots))
    first = {"role": "assistant", "content": "", "tool_calls": calls}
    final = {"role": "assistant", "content": " ".join(answers)}
    if thinking:
        first["reasoning_content"] = " ".join(reasons_call + [R.REASON_MULTI.format(count=len(calls))])
        final["reasoning_content"] = " ".join(reasons_answer)
    reference_calls = [{"name": d.call[0], "arguments": d.call[1]} for d in drafts]
    return [first, *tools, final], reference_calls, [t["content"] for t in tools]


def no_tool_tasks(n: int, seed: int = 0) -> list[Task]:
    """`n` tasks of the no-tool stream."""
    return [no_tool_task(seed, i) for i in range(n)]


def multi_call_tasks(n: int, seed: int = 0) -> list[Task]:
    """`n` tasks of the multi-call stream."""
    return [multi_call_task(seed, i) for i in range(n)]


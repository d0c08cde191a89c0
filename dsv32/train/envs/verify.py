"""Verifiers: score a policy's tool calls and answers against a task; the combined GRPO reward.

A task is anything with the attributes of `dsv32.train.synth.Task`: `category` ("calculator",
"weather", "units", "chat"), `stage` ("call": the prompt ends with the user turn; "answer": it
ends with the reference call's results), `reference_calls` ([{"name", "arguments": dict}]),
`results` (the reference calls' tool results), `expected` (strings a plain answer must contain),
and for plain answers `kind` and `tools` (the specs offered; None when none are).
"""
from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from .calculator import CalculatorError, evaluate_expression, parse_expression
from .dates import normalize_date
from .numbers import numbers_in_text, quotes_number
from .registry import TOOL_FUNCTIONS, call_parts
from .units import UnitError, normalize_unit, to_number
from .weather import CONDITIONS, normalize_city

ERROR_WORDS = ("error", "cannot", "can't", "unable", "not possible", "undefined", "invalid")
# What an answer says when the request offers no tool that could answer it (no-tool tasks).
NO_TOOL_WORDS = ("no tool", "no weather tool", "no conversion tool", "don't have", "do not have",
                 "can't", "cannot", "unable", "not able", "no access")
ISO_DATES = re.compile(r"\d{4}-\d{2}-\d{2}")

# Reward weights: (format, call, answer) for each kind of task.
WEIGHTS = {"tool": (0.1, 0.4, 0.5), "chat": (0.1, 0.3, 0.6), "answer": (0.1, 0.2, 0.7)}


def call_arguments(call: Any) -> tuple[str, dict | None]:
    """(name, arguments dict) of a call; arguments None when they are not a JSON object."""
    name, arguments = call_parts(call)
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return name, None
    return name, arguments if isinstance(arguments, dict) else None


def same_expression(reference: str, candidate: Any) -> bool:
    """Same value (to 1e-9) and, when the reference computes something, so does the candidate."""
    try:
        ref_value = evaluate_expression(reference)
        value = evaluate_expression(candidate)
        computes = not _is_literal(parse_expression(candidate))
    except CalculatorError:
        return False
    return math.isclose(value, ref_value, rel_tol=1e-9, abs_tol=1e-12) and (
        computes or _is_literal(parse_expression(reference)))


def _is_literal(node: ast.AST) -> bool:
    while isinstance(node, ast.UnaryOp):
        node = node.operand
    return isinstance(node, ast.Constant)


def _same_number(reference: Any, candidate: Any) -> bool:
    try:
        return math.isclose(to_number(reference), to_number(candidate), rel_tol=1e-9, abs_tol=1e-12)
    except UnitError:
        return False


_ARGUMENT_CHECKS = {
    ("calculator", "expression"): same_expression,
    ("get_weather", "city"): lambda ref, got: (isinstance(got, str)
                                               and normalize_city(ref) == normalize_city(got)),
    ("get_weather", "date"): lambda ref, got: normalize_date(got) == normalize_date(ref),
    ("convert_units", "value"): _same_number,
    ("convert_units", "from_unit"): lambda ref, got: normalize_unit(got) == normalize_unit(ref),
    ("convert_units", "to_unit"): lambda ref, got: normalize_unit(got) == normalize_unit(ref),
}


def arguments_match(name: str, reference: dict, candidate: dict | None) -> bool:
    """Whether two argument objects of tool `name` agree after normalisation (numbers by value,
    cities case-insensitively, dates in any written form, units by any spelling)."""
    if candidate is None or set(candidate) != set(reference):
        return False
    return all(_ARGUMENT_CHECKS[(name, key)](value, candidate[key]) for key, value in reference.items())


def _call_score(reference: dict, call: tuple[str, dict | None]) -> float:
    name, arguments = call
    if name != reference["name"]:
        return 0.0
    return 1.0 if arguments_match(name, reference["arguments"], arguments) else 0.5


def score_call(task, tool_calls: list | None) -> float:
    """Tool calls against the reference calls: per matched call 1 (right tool and arguments), 0.5
    (right tool only), divided by the larger count; a task without reference calls wants none."""
    calls = [call_arguments(c) for c in tool_calls or []]
    references = task.reference_calls
    if not references:
        return 0.0 if calls else 1.0
    if not calls:
        return 0.0
    unused, total = list(range(len(calls))), 0.0
    for reference in references:
        scores = [(_call_score(reference, calls[j]), j) for j in unused]
        best, j = max(scores, default=(0.0, None))
        if best > 0:
            unused.remove(j)
            total += best
    return total / max(len(references), len(calls))


def _mentions_error(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in ERROR_WORDS)


def mentioned_conditions(text: str) -> set[str]:
    """Weather conditions named in a text, longest first ("partly cloudy" is not "cloudy")."""
    rest, found = text.lower(), set()
    for condition in sorted((*CONDITIONS, "snowy"), key=len, reverse=True):
        if condition in rest:
            found.add(condition)
            rest = rest.replace(condition, " ")
    return found


def _answer_checks(tool: str, text: str, result: str) -> list[bool]:
    """The key values of one tool result that the answer must state."""
    if result.startswith("Error"):
        return [_mentions_error(text)]
    if tool == "calculator":
        return [quotes_number(text, float(result))]
    data = json.loads(result)
    if tool == "convert_units":
        return [quotes_number(text, float(data["result"]))]
    numbers = {value for value, _ in numbers_in_text(ISO_DATES.sub(" ", text))}
    return [data["condition"] in mentioned_conditions(text),
            float(data["high_c"]) in numbers, float(data["low_c"]) in numbers]


def score_answer(task, final_text: str | None, tool_result: str | list[str] | None = None) -> float:
    """Share of the key values of the tool result(s) that the answer states: the computed number,
    the converted value, or the weather's condition, high and low. `tool_result` defaults to the
    results of the task's reference calls."""
    results = task.results if tool_result is None else tool_result
    results = [results] if isinstance(results, str) else list(results)
    if not task.reference_calls or not results:
        raise ValueError("score_answer needs a task with reference tool calls")
    text = final_text or ""
    checks = []
    for reference, result in zip(task.reference_calls, results):
        try:
            checks += _answer_checks(reference["name"], text, result)
        except (ValueError, KeyError, TypeError):
            checks.append(False)
    return sum(checks) / len(checks)


def score_plain(task, final_text: str | None, tool_calls: list | None = None) -> float:
    """1 when a plain answer uses no tool and contains one of the expected strings (a number
    expected is matched by value, as `quotes_number` does); a weather question asked without a
    weather tool (kind "weather", no tools offered) must not name a condition (a made-up forecast)."""
    if tool_calls:
        return 0.0
    text = final_text or ""
    no_tools = not getattr(task, "tools", None)
    if getattr(task, "kind", "") == "weather" and no_tools and mentioned_conditions(text):
        return 0.0
    for expected in task.expected:
        if _is_number(expected) and quotes_number(text, float(expected)):
            return 1.0
        pattern = r"(?<![\w.])" + re.escape(expected) + r"(?![\w]|\.\d)"
        if re.search(pattern, text, re.IGNORECASE):
            return 1.0
    return 0.0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_score(completion_messages: list[dict], thinking_mode: str) -> float:
    """1 when every assistant message parsed cleanly (no parser warnings), carries reasoning in
    thinking mode, and calls known tools with JSON-object arguments; else 0."""
    assistants = [m for m in completion_messages if m.get("role") == "assistant"]
    if not assistants:
        return 0.0
    for message in assistants:
        if message.get("warnings"):
            return 0.0
        if thinking_mode == "thinking" and not (message.get("reasoning_content") or "").strip():
            return 0.0
        for call in message.get("tool_calls") or []:
            name, arguments = call_arguments(call)
            if name not in TOOL_FUNCTIONS or arguments is None:
                return 0.0
    return 1.0


def reward(task, completion_messages: list[dict]) -> float:
    """GRPO reward in [0, 1] for what the policy produced after the task's prompt (assistant
    messages as parse_completion returns them, and the tool messages answering their calls):
    weighted format, call and answer scores (see WEIGHTS)."""
    assistants = [m for m in completion_messages if m.get("role") == "assistant"]
    if not assistants:
        return 0.0
    fmt = format_score(completion_messages, task.thinking_mode)
    all_calls = [c for m in assistants for c in m.get("tool_calls") or []]
    last = assistants[-1]
    if task.stage == "answer":
        no_call = 0.0 if all_calls else 1.0
        answer = score_answer(task, last.get("content")) if no_call else 0.0
        weights, parts = WEIGHTS["answer"], (fmt, no_call, answer)
    elif not task.reference_calls:
        weights = WEIGHTS["chat"]
        parts = (fmt, 0.0 if all_calls else 1.0, score_plain(task, last.get("content"), all_calls))
    else:
        call = score_call(task, assistants[0].get("tool_calls"))
        final = last if len(assistants) > 1 and not last.get("tool_calls") else None
        answer = score_answer(task, final.get("content")) if final else 0.0
        weights, parts = WEIGHTS["tool"], (fmt, call, answer)
    return sum(w * p for w, p in zip(weights, parts))

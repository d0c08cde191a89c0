"""The user-written evaluation set: what it holds, that its wording shares no sentence frame with
the training data, and that its scoring reaches 100% on perfect answers and 0% on wrong ones."""
import json

import pytest

from dsv32.chat import encode_messages
from dsv32.chat.tokens import EOS
from dsv32.train.envs.jsonfmt import answer_schema, json_answer, schema_errors
from dsv32.train.envs.numbers import numbers_in_text
from dsv32.train.envs.registry import tool_messages
from dsv32.train.evaluate import evaluate_users
from dsv32.train.synth import generate_tasks, reference_completions
from dsv32.train.synth.json_answers import json_tasks
from dsv32.train.synth.requests import multi_call_tasks, no_tool_tasks
from dsv32.train.users import USER_CATEGORIES, user_items, user_tasks

from .frames import clauses, frames_regex, has_words, shared

jsonschema = pytest.importorskip("jsonschema")


def test_the_set_covers_every_category_in_both_modes():
    items, tasks = user_items(), user_tasks()
    assert len({i["id"] for i in items}) == len(items) >= 120
    assert {i["category"] for i in items} == set(USER_CATEGORIES)
    assert len(tasks) == 2 * len(items) and {t.thinking_mode for t in tasks} == {"thinking", "chat"}
    assert len({i["user"].casefold() for i in items}) == len(items)
    for task in tasks:
        encode_messages(task.messages, thinking_mode=task.thinking_mode)
        assert task.reference_calls or task.expected, task.id
        assert not any(r.startswith("Error") for r in task.results), task.id
        if task.category == "no-tools":
            assert not task.tools and not task.reference_calls
        if task.category == "multi-call":
            assert 2 <= len(task.reference_calls) <= 3 and task.tools
        if task.category == "json":
            fmt = task.messages[0]["response_format"]
            jsonschema.Draft202012Validator.check_schema(answer_schema(fmt))
    json_tasks = [t for t in tasks if t.category == "json"]
    assert any(t.tools for t in json_tasks) and any(not t.tools for t in json_tasks)
    kinds = {t.messages[0]["response_format"]["type"] for t in json_tasks}
    assert kinds == {"json_object", "json_schema"}


# -- no shared sentence frame (frames.py says what sharing one is) ---------------------------------

@pytest.fixture(scope="module")
def training_regex():
    return frames_regex("train")


def test_no_user_text_shares_a_sentence_frame_with_training(training_regex):
    found = {i["id"]: shared(i["user"], training_regex) for i in user_items()}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_frame_check_finds_the_training_wording(training_regex):
    tasks = generate_tasks(1500, seed=4)
    missed = [t.messages[-1]["content"] for t in tasks
              if has_words(t.frame) and not training_regex.fullmatch(t.messages[-1]["content"])]
    assert missed == []
    new = multi_call_tasks(300, seed=4) + json_tasks(300, seed=4) + no_tool_tasks(300, seed=4)
    assert [t.messages[-1]["content"] for t in new
            if has_words(t.frame) and not shared(t.messages[-1]["content"], training_regex)] == []
    clause = "what's 15 times 4"                            # a training frame inside a longer text
    assert clause in clauses(f"two things: {clause}, and the rest") and training_regex.fullmatch(clause)
    heldout = generate_tasks(300, seed=4, split="heldout")
    assert not any(training_regex.fullmatch(t.messages[-1]["content"]) for t in heldout)


# -- scoring -----------------------------------------------------------------------------------------

def _json_value(schema: dict, text: str):
    """A value under `schema` whose strings all read `text` and numbers are its first number."""
    kind = schema.get("type", "object")
    if kind == "object":
        keys = list(schema.get("properties", {})) or ["answer"]
        return {k: _json_value(schema.get("properties", {}).get(k, {"type": "string"}), text) for k in keys}
    numbers = [v for v, _ in numbers_in_text(text)]
    return (numbers or [0])[0] if kind in ("number", "integer") else text


def _perfect(task, calls_ok=True, json_ok=True, dsml=False):
    """A reference trajectory for a user task: the calls, then an answer quoting every result (or
    the first expected string), as JSON when the request asks for it."""
    thinking = {"reasoning_content": "Thinking."} if task.thinking_mode == "thinking" else {}
    calls = [{"id": f"call_{i}", "type": "function", "function": {
        "name": c["name"], "arguments": json.dumps(c["arguments"] if calls_ok else {"x": 1})}}
        for i, c in enumerate(task.reference_calls)]
    if dsml and not calls:
        calls = [{"id": "call_0", "type": "function",
                  "function": {"name": "calculator", "arguments": '{"expression": "1 + 1"}'}}]
    text = " ".join(task.results) or task.expected[0]
    fmt = task.messages[0].get("response_format") if task.messages[0]["role"] == "system" else None
    if fmt:
        value = _json_value(answer_schema(fmt), text)
        text = json.dumps(value) if json_ok else "Here it is: " + json.dumps(value)
    steps = [{"role": "assistant", "content": "", "tool_calls": calls, **thinking}] if calls else []
    return steps + tool_messages(calls) + [{"role": "assistant", "content": text, **thinking}]


def _script(**kwargs):
    script = {}
    for task in user_tasks():
        task.reference[:] = _perfect(task, **kwargs)
        script.update({p: t.removesuffix(EOS) for p, t in reference_completions(task)})
    return lambda prompt, mode: script[prompt]


def test_perfect_answers_score_100():
    res = evaluate_users(generate_fn=_script(), verbose=False)
    assert res["n"] == len(user_tasks()) and res["split"] == "users"
    assert res["overall"]["success"] == 1.0 and res["overall"]["no_dsml"] == res["overall"]["json"] == 1.0
    assert list(res["categories"]) == list(USER_CATEGORIES)
    assert res["categories"]["no-tools"]["n"] == 2 * sum(i["category"] == "no-tools" for i in user_items())


def test_wrong_answers_score_0():
    res = evaluate_users(generate_fn=_script(calls_ok=False, json_ok=False, dsml=True), verbose=False)
    cats = res["categories"]
    assert cats["multi-call"]["success"] == cats["calculator"]["success"] == 0.0
    assert cats["no-tools"]["no_dsml"] == 0.0 and cats["no-tools"]["success"] == 0.0
    assert cats["json"]["json"] == 0.0 and cats["json"]["success"] == 0.0
    script = _script()

    def made_up(prompt, mode):           # a forecast nobody could have looked up, before the answer
        text = script(prompt, mode)
        if "DSML" in text:
            return text
        return text.replace("</think>", "</think>Sunny. ") if mode == "thinking" else "Sunny. " + text

    res = evaluate_users(generate_fn=made_up, verbose=False)
    weather = [e for e in res["episodes"] if e["category"] == "no-tools" and e["kind"] == "weather"]
    assert weather and not any(e["success"] for e in weather)


def test_json_answers_are_checked_against_the_schema():
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": {
        "type": "object", "properties": {"city": {"type": "string"}, "high": {"type": "number"}},
        "required": ["city", "high"], "additionalProperties": False}}}
    assert json_answer(' {"city": "Paris", "high": 21}\n', fmt) == {"city": "Paris", "high": 21}
    for bad in ('{"city": "Paris"}', '{"city": "Paris", "high": "21"}', '{"city": "Paris", "high": 21, "x": 1}',
                '{"city": "Paris", "high": 21} {}', "[1]", "Paris, 21", ""):
        assert json_answer(bad, fmt) is None, bad
    assert json_answer('{"a": [1]}', {"type": "json_object"}) == {"a": [1]}
    assert json_answer('{"a": 1}', {"type": "text"}) is None
    schema = answer_schema(fmt)
    for value in ({"city": "Paris", "high": 21.5}, {"city": 3, "high": 1}, {"high": True, "city": "x"}):
        assert (schema_errors(value, schema) == []) == jsonschema.Draft202012Validator(schema).is_valid(value)

"""The training conversations issue 34 added: no tool offered (no DSML anywhere), two or three calls
in one turn (well-formed DSML, every call answered, every result used), JSON answers (they parse
and follow the schema); where the recipe puts them, and that their wording keeps the held-out
frames unseen."""
import json
import re

import pytest

from dsv32.chat import encode_messages, parse_completion
from dsv32.chat.tokens import CALLS_OPEN, DSML, EOS, INVOKE_OPEN_HEAD
from dsv32.train.corpus import later_conversations, training_conversations
from dsv32.train.envs import score_answer, score_plain, tool_messages
from dsv32.train.envs.jsonfmt import answer_schema, json_answer
from dsv32.train.envs.registry import execute_tool_call
from dsv32.train.envs.verify import NO_TOOL_WORDS, mentioned_conditions
from dsv32.train.evaluate import score_episode
from dsv32.train.recipe import Recipe
from dsv32.train.synth import reference_completions
from dsv32.train.synth.json_answers import json_tasks
from dsv32.train.synth.requests import mental, multi_call_tasks, no_tool_tasks

from .frames import frames_regex, shared

jsonschema = pytest.importorskip("jsonschema")


def _transcript(task):
    """The reference trajectory as the agent loop records it: parsed completions and the results
    of the calls they make."""
    out = []
    for _, text in reference_completions(task):
        message = parse_completion(text.removesuffix(EOS), task.thinking_mode)
        assert message["warnings"] == [], text
        out += [message, *tool_messages(message["tool_calls"])]
    return out


def _calls(message):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]


def test_the_streams_are_seeded():
    for make in (no_tool_tasks, multi_call_tasks, json_tasks):
        first = [t.to_dict() for t in make(40, seed=1)]
        assert first == [t.to_dict() for t in make(40, seed=1)] != [t.to_dict() for t in make(40, seed=2)]
        assert first[:10] == [t.to_dict() for t in make(10, seed=1)]
        assert {t["thinking_mode"] for t in first} == {"thinking", "chat"}


def test_no_tool_conversations_never_write_dsml():
    tasks, named = no_tool_tasks(400, seed=1), 0
    for task in tasks:
        text = encode_messages(task.messages + task.reference, thinking_mode=task.thinking_mode)
        assert DSML not in text and "## Tools" not in text and not task.tools and not task.reference_calls
        assert [m["role"] for m in task.reference] == ["assistant"]
        answer = task.reference[-1]["content"]
        if task.expected == list(NO_TOOL_WORDS):             # honest: no tool, no made-up forecast
            assert any(w in answer for w in NO_TOOL_WORDS) and not mentioned_conditions(answer)
            assert task.kind in ("calculator", "weather", "units")
        elif task.kind == "calculator":                      # the value, computed, of a sum done mentally
            expression = _expression(task)
            assert task.expected[0] in answer and (expression is None or (
                mental(expression)
                and task.expected == [execute_tool_call("calculator", {"expression": expression})]))
            named += expression is not None
        row = score_episode(task, _transcript(task))
        assert row["success"] and row["no_dsml"], task.id
    kinds = {t.kind for t in tasks}
    assert {"calculator", "weather", "units"} <= kinds and kinds & {"capital", "fact", "greeting"}
    direct = [t for t in tasks if t.kind == "calculator" and t.expected != list(NO_TOOL_WORDS)]
    assert len(direct) > 0.6 * sum(t.kind == "calculator" for t in tasks) and named > 0.3 * len(direct)
    assert any(t.messages[0]["role"] == "system" for t in tasks) and any(len(t.messages) == 1 for t in tasks)


def _expression(task):
    """The calculation a direct answer names (in its reasoning or as "expression = result"), or None."""
    text = (task.reference[-1].get("reasoning_content") or "") + " | " + task.reference[-1]["content"]
    match = re.search(r"work out (.+) myself|here; (.+) is simple|^\| (.+) = ", text)
    return next((g for g in match.groups() if g), None) if match else None


def test_multi_call_conversations_answer_every_call():
    tasks = multi_call_tasks(300, seed=2)
    for task in tasks:
        (_, completion), *_ = reference_completions(task)
        assert completion.count(CALLS_OPEN) == 1
        assert completion.count(INVOKE_OPEN_HEAD) == len(task.reference_calls)
        first = task.reference[0]
        parsed = parse_completion(completion.removesuffix(EOS), task.thinking_mode)
        assert _calls(parsed) == _calls(first) == [(c["name"], c["arguments"]) for c in task.reference_calls]
        assert 2 <= len(first["tool_calls"]) <= 3
        assert len({json.dumps(c) for c in _calls(first)}) == len(first["tool_calls"])      # distinct calls
        results = task.reference[1:-1]                       # one tool message per call, in order
        assert [m["role"] for m in results] == ["tool"] * len(first["tool_calls"])
        assert [m["tool_call_id"] for m in results] == [c["id"] for c in first["tool_calls"]]
        executed = tool_messages(first["tool_calls"])
        assert [m["content"] for m in results] == task.results == [m["content"] for m in executed]
        assert score_answer(task, task.reference[-1]["content"]) == 1.0      # every result's values
        row = score_episode(task, _transcript(task))
        assert row["success"] and row["right_args"], task.id
    counts = {len(t.reference_calls) for t in tasks}
    names = [{c["name"] for c in t.reference_calls} for t in tasks]
    assert counts == {2, 3} and any(len(n) == 1 for n in names) and any(len(n) > 1 for n in names)
    assert any(len(n) == 1 and "get_weather" in n and t.frame.count("{cities}") for n, t in zip(names, tasks))


def test_json_answers_parse_and_follow_the_schema():
    tasks = json_tasks(400, seed=3)
    for task in tasks:
        fmt = task.messages[0]["response_format"]
        prompt = encode_messages(task.messages, thinking_mode=task.thinking_mode)
        assert "## Response Format" in prompt and json.dumps(fmt, ensure_ascii=False) in prompt
        final = task.reference[-1]["content"]
        value = json.loads(final)
        assert isinstance(value, dict) and DSML not in final and final == final.strip()
        jsonschema.validate(value, answer_schema(fmt))
        assert json_answer(final, fmt) == value
        if task.reference_calls:
            assert task.tools and score_answer(task, final) == 1.0
        else:
            assert score_plain(task, final) == 1.0 and not task.reference[:-1]
        row = score_episode(task, _transcript(task))
        assert row["success"] and row["json"], task.id
    kinds = {t.messages[0]["response_format"]["type"] for t in tasks}
    assert kinds == {"json_object", "json_schema"}
    assert any(t.tools and t.reference_calls for t in tasks) and any(not t.tools for t in tasks)
    assert any(t.tools and not t.reference_calls for t in tasks)          # plain chat, tools offered
    assert any(len(t.reference_calls) > 1 for t in tasks)
    names = {t.messages[0]["response_format"].get("json_schema", {}).get("name") for t in tasks}
    assert len(names) > 10


def test_the_recipe_places_the_new_conversations():
    recipe = Recipe(n_train=40, n_city=0, n_chat=0, n_skill=0, n_numbers=0, n_conversions=0,
                    n_no_tools=10, n_multi_call=12, n_json=14)
    convs, later = training_conversations(recipe), later_conversations(recipe)
    count = lambda cs, c: sum(x.category == c for x in cs)  # noqa: E731
    assert (count(convs, "multi-call"), count(convs, "json"), count(convs, "no-tools")) == (12, 14, 0)
    assert (count(later, "no-tools"), count(later, "multi-call"), len(later)) == (10, 0, 10)
    small = Recipe().scaled(0.01)
    assert (small.n_no_tools, small.n_multi_call, small.n_json) == (30, 50, 30)


def test_the_new_wording_keeps_the_heldout_frames_unseen():
    heldout = frames_regex("heldout")
    tasks = multi_call_tasks(300, seed=5) + json_tasks(300, seed=5) + no_tool_tasks(300, seed=5)
    assert {t.id: shared(t.messages[-1]["content"], heldout) for t in tasks
            if shared(t.messages[-1]["content"], heldout)} == {}

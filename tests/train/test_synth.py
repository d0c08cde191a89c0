"""Task synthesis: determinism, variety, split disjointness, encodability, verifiers on reference
and wrong trajectories, and the evaluation harness with scripted generators."""
import json
import re
from types import SimpleNamespace

import pytest

from dsv32.chat import ChatFormatError, encode_messages, parse_completion
from dsv32.chat.tokens import EOS
from dsv32.train.synth import phrasings as P
from dsv32.train.envs import score_answer, score_call, score_plain, tool_messages
from dsv32.train.conversation import Conversation
from dsv32.train.envs.dates import normalize_date
from dsv32.train.evaluate import evaluate, evaluation_tasks, llm_generate_batch
from dsv32.train.synth import (
    CATEGORIES, answer_stage, completion_text, generate_tasks, reference_completions, sft_conversations,
)


@pytest.fixture(scope="module")
def train_tasks():
    return generate_tasks(800, seed=0)


@pytest.fixture(scope="module")
def heldout_tasks():
    return generate_tasks(400, seed=0, split="heldout")


def _user(task):
    return task.messages[-1]["content"]


def _calls(message):
    calls = message.get("tool_calls") or []
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _transcript(task):
    """The reference trajectory as the agent loop would record it: parsed completions + tool results."""
    transcript = []
    for _, text in reference_completions(task):
        message = parse_completion(text.removesuffix(EOS), task.thinking_mode)
        transcript.append(message)
        transcript.extend(tool_messages(message["tool_calls"]))
    return transcript


# -- generator --------------------------------------------------------------------------------------

def test_generation_is_deterministic_per_seed():
    first = [t.to_dict() for t in generate_tasks(60, seed=5)]
    assert first == [t.to_dict() for t in generate_tasks(60, seed=5)]
    assert first[:25] == [t.to_dict() for t in generate_tasks(25, seed=5)]
    assert first != [t.to_dict() for t in generate_tasks(60, seed=6)]
    assert sft_conversations(20, seed=3) == sft_conversations(20, seed=3)
    json.dumps(first)
    with pytest.raises(ValueError):
        generate_tasks(1, split="test")


def test_phrasings_vary(train_tasks):
    users = [_user(t) for t in train_tasks]
    assert len(set(users)) > 0.95 * len(users)
    assert {t.category for t in train_tasks} == set(CATEGORIES)
    assert {t.kind for t in train_tasks} >= {"symbolic", "verbal", "imperative", "compound", "weather",
                                             "units", "capital", "fact", "definition", "greeting", "thanks"}
    assert len({t.frame for t in train_tasks}) > 80
    joined = "\n".join(users)
    assert re.search(r"\b(twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)(-\w+)?\b", joined)
    assert re.search(r"\b\d+\.\d+\b", joined) and re.search(r"\b\d{1,3},\d{3}\b", joined)
    assert re.search(r"\b(March|march|MARCH) \d{1,2}(st|nd|rd|th)?, 20\d\d", joined)
    assert re.search(r"\b\d{1,2} (March|march|MARCH) 20\d\d", joined)
    assert re.search(r"20\d\d-\d\d-\d\d", joined)
    assert re.search(r"\b(kilometres|kilometers)\b", joined) and re.search(r"\bkm\b", joined)
    assert any(u == u.lower() and re.search("[a-z]", u) for u in users)
    assert any(u == u.upper() and re.search("[A-Z]{3}", u) for u in users)
    assert any(u.lower().startswith(("hey, ", "quick question: ", "um, ")) for u in users)
    assert sum(sum(m["role"] == "user" for m in t.messages) > 1 for t in train_tasks) > 0.1 * len(train_tasks)


def test_balanced_tasks_cover_every_cell():
    tasks = evaluation_tasks(16, seed=1)
    cells = [(t.category, t.thinking_mode) for t in tasks]
    assert len(set(cells)) == 8 and all(cells.count(c) == 2 for c in set(cells))


# -- split ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ["WEATHER_FRAMES", "CALC_FRAMES", "IMPERATIVE_FRAMES", "UNITS_FRAMES",
                                   "CAPITAL_FRAMES", "DEFINITION_FRAMES"])
def test_split_tables_are_disjoint(table):
    parts = getattr(P, table)
    assert parts["train"] and parts["heldout"] and not set(parts["train"]) & set(parts["heldout"])


def test_fixed_utterances_are_disjoint():
    for train, heldout, *_ in [*P.SMALL_TALK.values(), *P.FACTS]:
        assert train and heldout and not {u.lower() for u in train} & {u.lower() for u in heldout}


# Words of each held-out table that none of its training entries writes. Training frames may be
# added, but never with these words: a held-out frame keeps wording the model did not train on.
HELDOUT_ONLY_WORDS = {
    "CALC_FRAMES": {"come", "figure", "i", "need", "out", "solve", "value", "work"},
    "CAPITAL_FRAMES": {"do", "name", "serves"},
    "DEFINITION_FRAMES": {"a", "explain", "i'd", "know", "like", "short", "to"},
    "IMPERATIVE_FRAMES": {"could", "i'd", "like", "quickly"},
    "UNITS_FRAMES": {"change", "could", "equals", "for", "if", "it", "something", "turn"},
    "WEATHER_FRAMES": {"any", "could", "getting", "heading", "idea", "kind", "look", "of", "report", "up"},
    "greeting": {"evening", "greetings", "hiya", "howdy"}, "thanks": {"appreciated", "cheers", "many"},
    "identity": {"able", "about", "to"}, "goodbye": {"for", "talk", "to"},
    "fact1": {"is"}, "fact2": {"lasts"}, "fact5": {"in", "name", "solar", "system"}, "fact6": {"one"},
    "fact8": {"has", "which"}, "fact9": {"by", "was", "whom", "written"}, "fact10": {"earth", "name", "on"},
}


def test_heldout_wording_stays_unseen():
    words = lambda texts: {w for t in texts for w in re.findall(r"\{\w+\}|[\w']+", t.lower())}  # noqa: E731
    tables = {n: (t["train"], t["heldout"]) for n, t in vars(P).items() if n.endswith("_FRAMES")}
    tables |= {kind: talk[:2] for kind, talk in P.SMALL_TALK.items()}
    tables |= {f"fact{i}": fact[:2] for i, fact in enumerate(P.FACTS)}
    for name, (train, heldout) in tables.items():
        assert words(heldout) - words(train) == HELDOUT_ONLY_WORDS.get(name, set()), name


def test_generated_splits_are_disjoint(train_tasks, heldout_tasks):
    assert not {t.frame for t in train_tasks} & {t.frame for t in heldout_tasks}
    assert not {_user(t).casefold() for t in train_tasks} & {_user(t).casefold() for t in heldout_tasks}
    unseen = generate_tasks(80, seed=0, split="heldout", categories=("weather",), unseen_cities=True)
    for tasks, split, cities in ((train_tasks, "train", "train"), (heldout_tasks, "heldout", "train"),
                                 (unseen, "heldout", "unseen")):
        for task in tasks:
            assert task.split == split
            for call in task.reference_calls:
                if call["name"] == "get_weather":
                    city = call["arguments"]["city"]
                    assert city.casefold() in {c.casefold() for c in P.CITIES[cities]}
                    assert city.casefold() in _user(task).casefold()   # named by the user,
                    assert city in P.CITIES[cities]                       # spelled as the forecast does
                    assert P.date_split(call["arguments"]["date"]) == split
    assert not {t.frame for t in train_tasks} & {t.frame for t in unseen}
    assert {t.id for t in unseen}.isdisjoint(t.id for t in heldout_tasks)
    assert not set(P.CITIES["train"]) & set(P.CITIES["unseen"])
    with pytest.raises(ValueError, match="unseen_cities"):
        generate_tasks(2, split="train", unseen_cities=True)


# -- conversations ----------------------------------------------------------------------------------

def test_conversations_encode_and_round_trip(train_tasks, heldout_tasks):
    for task in train_tasks[:300] + heldout_tasks[:150]:
        full = encode_messages(task.messages + task.reference, thinking_mode=task.thinking_mode)
        assistants = [m for m in task.reference if m["role"] == "assistant"]
        pairs = reference_completions(task)
        assert len(pairs) == len(assistants)
        for (prompt, text), message in zip(pairs, assistants):
            assert text.endswith(EOS) and (prompt + text) in full
            parsed = parse_completion(text, task.thinking_mode)
            assert parsed["warnings"] == []
            assert parsed["content"] == message["content"]
            assert parsed["reasoning_content"] == message.get("reasoning_content")
            assert _calls(parsed) == _calls(message)
        if task.reference_calls:
            assert _calls(assistants[0]) == [(c["name"], c["arguments"]) for c in task.reference_calls]


def test_sft_conversations():
    conversations = sft_conversations(200, seed=1)
    assert len(conversations) == 200
    for conv in conversations:
        assert isinstance(conv, Conversation)
        messages, mode = conv.messages, conv.thinking_mode
        encode_messages(messages, thinking_mode=mode)
        if conv.tools:
            assert messages[0]["role"] == "system" and messages[0]["tools"] == conv.tools
            with pytest.raises(ChatFormatError):
                encode_messages(messages, thinking_mode=mode, tools=conv.tools)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        turn = [m for m in messages[last_user + 1:] if m["role"] == "assistant"]
        assert turn and turn[-1]["content"] and not turn[-1].get("tool_calls")
        assert len(turn) == (1 if conv.category == "chat" else 2)
        for message in turn:
            if mode == "thinking":
                assert 10 < len(message["reasoning_content"]) < 120
            else:
                assert "reasoning_content" not in message
            assert len(message["content"]) < 130
    assert {c.thinking_mode for c in sft_conversations(30, seed=2, thinking_ratio=0.0)} == {"chat"}
    assert {c.thinking_mode for c in sft_conversations(30, seed=2, thinking_ratio=1.0)} == {"thinking"}


def test_final_answers_quote_the_tool_result(train_tasks):
    for task in train_tasks[:200]:
        if task.category == "weather":
            data = json.loads(task.results[0])
            answer = task.reference[-1]["content"]
            assert data["condition"] in answer and f"{data['high_c']}°C" in answer
        elif task.category == "calculator":
            assert task.results[0] in task.reference[-1]["content"]
            if task.thinking_mode == "thinking":
                expression = task.reference_calls[0]["arguments"]["expression"]
                assert expression in task.reference[0]["reasoning_content"]


def test_weather_reasoning_normalises_the_date(train_tasks):
    weather = [t for t in train_tasks if t.category == "weather" and t.thinking_mode == "thinking"]
    assert weather
    for task in weather:
        date = task.reference_calls[0]["arguments"]["date"]
        assert normalize_date(date) == date and date in task.reference[0]["reasoning_content"]


# -- verifiers on trajectories ----------------------------------------------------------------------

def test_reference_trajectories_score_one(train_tasks, heldout_tasks):
    for task in train_tasks[:200] + heldout_tasks[:100]:
        transcript = _transcript(task)
        assert task.verify(transcript) == pytest.approx(1.0), (task.id, _user(task))
        assistants = [m for m in transcript if m["role"] == "assistant"]
        assert score_call(task, assistants[0]["tool_calls"]) == 1.0
        if task.reference_calls:
            assert score_answer(task, assistants[-1]["content"]) == 1.0
            staged = answer_stage(task)
            assert staged.stage == "answer" and staged.messages[-1]["role"] == "tool"
            text = completion_text(staged.messages, staged.reference[0], task.thinking_mode)
            assert staged.verify([parse_completion(text, task.thinking_mode)]) == pytest.approx(1.0)
        else:
            assert score_plain(task, assistants[-1]["content"]) == 1.0
            assert answer_stage(task) is task


def _wrong_arguments(call):
    arguments = dict(call["arguments"])
    if call["name"] == "calculator":
        arguments["expression"] = f"({arguments['expression']}) + 1"
    elif call["name"] == "get_weather":
        arguments["city"] = "Atlantis"
    else:
        arguments["value"] = arguments["value"] + 7
    return arguments


def _message(content, calls=(), reasoning=None):
    tool_calls = [{"id": f"call_{i}", "type": "function",
                   "function": {"name": name, "arguments": json.dumps(args)}}
                  for i, (name, args) in enumerate(calls)]
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls,
            "warnings": []}


def test_wrong_trajectories_score_low(train_tasks):
    tool_tasks = [t for t in train_tasks[:300] if t.reference_calls]
    wrong_args = []
    for task in tool_tasks:
        reasoning = "thinking" if task.thinking_mode == "thinking" else None
        call = task.reference_calls[0]
        bad = (call["name"], _wrong_arguments(call))
        first = _message("", [bad], reasoning)
        results = tool_messages(first["tool_calls"])
        final = _message(f"The tool says: {results[0]['content']}", reasoning=reasoning)
        score = task.verify([first, *results, final])
        assert score < 0.9 and score_call(task, first["tool_calls"]) == 0.5
        wrong_args.append(score)
        other = next(n for n in ("calculator", "get_weather", "convert_units") if n != call["name"])
        first = _message("", [(other, {"x": 1})], reasoning)
        unsure = _message("I could not find out.", reasoning=reasoning)
        assert task.verify([first, *tool_messages(first["tool_calls"]), unsure]) <= 0.1 + 1e-9
        assert task.verify([_message("I cannot help with that.", reasoning=reasoning)]) <= 0.1 + 1e-9
        assert task.verify([_message(task.reference[-1]["content"], reasoning=reasoning)]) <= 0.1 + 1e-9
    assert sum(wrong_args) / len(wrong_args) < 0.4
    for task in [t for t in train_tasks[:300] if not t.reference_calls]:
        reasoning = "thinking" if task.thinking_mode == "thinking" else None
        assert task.verify([_message("Sorry, I do not know.", reasoning=reasoning)]) <= 0.4 + 1e-9
        called = _message("", [("calculator", {"expression": "1 + 1"})], reasoning)
        assert task.verify([called, *tool_messages(called["tool_calls"]),
                            _message(task.reference[-1]["content"], reasoning=reasoning)]) <= 0.1 + 1e-9


# -- evaluation harness -----------------------------------------------------------------------------

def _scripted(n, seed, split="heldout"):
    script = {prompt: text.removesuffix(EOS) for task in evaluation_tasks(n, seed, split)
              for prompt, text in reference_completions(task)}
    return lambda prompt, mode: script[prompt]


def test_evaluate_scripted_reference_reaches_100(capsys):
    result = evaluate(_scripted(48, 3), n_tasks=48, seed=3)
    assert result["n"] == 48 and set(result["cells"]) == {f"{c}/{m}" for c in CATEGORIES
                                                          for m in ("thinking", "chat")}
    overall = result["overall"]
    assert overall["success"] == overall["right_tool"] == overall["right_args"] == 1.0
    assert overall["answer"] == overall["plain"] == overall["reward"] == 1.0
    assert result["cells"]["chat/chat"]["right_tool"] is None
    assert "| **overall** |  | 48 | 100.0% |" in capsys.readouterr().out
    assert all(e["success"] for e in result["episodes"])


def test_evaluate_unseen_city_probe():
    tasks = evaluation_tasks(8, 5, categories=("weather",), unseen_cities=True)
    script = {prompt: text.removesuffix(EOS) for task in tasks for prompt, text in reference_completions(task)}
    result = evaluate(lambda p, m: script[p], n_tasks=8, seed=5, categories=("weather",),
                      unseen_cities=True, verbose=False)
    assert set(result["cells"]) == {"weather/thinking", "weather/chat"} and result["unseen_cities"]
    assert result["overall"]["success"] == 1.0
    unseen = {c.casefold() for c in P.CITIES["unseen"]}
    assert all(json.loads(e["transcript"][0]["tool_calls"][0]["function"]["arguments"])["city"].casefold()
               in unseen for e in result["episodes"])


def test_evaluate_one_tool_probe_offers_only_the_needed_tool():
    cats = ("calculator", "weather", "units")
    tasks = evaluation_tasks(12, 6, categories=cats, one_tool=True)
    full = evaluation_tasks(12, 6, categories=cats)
    for t, f in zip(tasks, full):
        assert [s["function"]["name"] for s in t.tools] == [t.reference_calls[0]["name"]]
        assert len(f.tools) == 3 and t.messages[1:] == f.messages[1:]
    prompts = []
    script = {prompt: text.removesuffix(EOS) for task in tasks for prompt, text in reference_completions(task)}

    def answer(prompt, mode):
        prompts.append(prompt)
        return script[prompt]

    result = evaluate(answer, n_tasks=12, seed=6, categories=cats, one_tool=True, verbose=False)
    assert result["one_tool"] and result["overall"]["success"] == 1.0
    named = {t["function"]["name"] for t in full[0].tools}
    assert all(sum(f'"name": "{n}"' in p for n in named) == 1 for p in prompts)


def test_evaluate_batched_and_train_split():
    script = _scripted(24, 4, "train")
    seen = []

    def batch(prompts, modes):
        seen.append(len(prompts))
        return [script(p, m) for p, m in zip(prompts, modes)]

    result = evaluate(n_tasks=24, seed=4, split="train", generate_batch=batch, verbose=False)
    assert result["overall"]["success"] == 1.0 and seen[0] == 24 and seen[1] == 18 and len(seen) == 2


def test_evaluate_wrong_generators_reach_0():
    result = evaluate(lambda prompt, mode: "I don't know.", n_tasks=32, seed=3, verbose=False)
    assert result["overall"]["success"] == 0.0
    assert all(result["overall"][m] == 0.0 for m in ("right_tool", "right_args", "answer", "plain"))

    def always_weather(prompt, mode):
        return ("Checking.</think>" if mode == "thinking" else "") + (
            '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
            '<｜DSML｜parameter name="city" string="true">Atlantis</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="date" string="true">2025-01-01</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜function_calls>')

    result = evaluate(always_weather, n_tasks=32, seed=3, max_steps=2, verbose=False)
    overall = result["overall"]
    assert overall["success"] == overall["right_args"] == overall["answer"] == overall["plain"] == 0.0
    assert result["cells"]["weather/chat"]["right_tool"] == 1.0


def test_llm_generate_batch_strips_eos():
    class FakeLLM:
        def generate(self, prompts, params, use_tqdm=True):
            self.params = params
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f"answer {i}{EOS}")])
                    for i, _ in enumerate(prompts)]

    llm = FakeLLM()
    generate = llm_generate_batch(llm, max_tokens=64)
    assert generate(["a", "b"], ["chat", "thinking"]) == ["answer 0", "answer 1"]
    assert llm.params.temperature == 0.0 and llm.params.max_tokens == 64
    assert not llm.params.skip_special_tokens


# -- skill drills and the weather-city augmentation --------------------------------------------------

def test_skill_conversations_are_correct_drills():
    from dsv32.train.envs.registry import execute_tool_call
    from dsv32.train.synth import SKILL_FRAMES, skill_conversations

    words = ("Montreal", "Ulaanbaatar", "Port Moresby", "quickly")
    conversations = skill_conversations(2000, seed=4, words=words)
    assert conversations == skill_conversations(2000, seed=4, words=words)
    kinds = set()
    for conv in conversations:
        assert conv.category == "skill" and conv.thinking_mode == "chat" and conv.tools is None
        user, answer = conv.messages[0]["content"], conv.messages[1]["content"]
        encode_messages(conv.messages, thinking_mode="chat")
        for kind, frames in SKILL_FRAMES.items():
            for frame in frames:
                head, _, tail = frame.lower().partition("{x}")
                low = user.lower()
                if low.startswith(head) and low.endswith(tail) and len(low) > len(head) + len(tail):
                    x = user[len(head): len(user) - len(tail)]
                    break
            else:
                continue
            break
        else:
            raise AssertionError(f"no frame matches {user!r}")
        kinds.add(kind)
        if kind == "echo":
            assert answer == x
        elif kind == "date":
            assert normalize_date(x) == answer and P.date_split(answer) == "train"
        elif kind == "number":
            assert re.fullmatch(r"-?\d+", answer)
        elif kind == "expression":
            assert not execute_tool_call("calculator", {"expression": answer}).startswith("Error")
        else:
            assert x.lower() in {w.lower() for w in P.UNIT_WORDS[answer][0] + P.UNIT_WORDS[answer][1]}
    assert kinds == set(SKILL_FRAMES)
    echoed = " ".join(c.messages[1]["content"] for c in conversations)
    assert all(w in echoed and w.lower() in echoed for w in words)     # as given and lower-cased
    assert any(w.upper() in echoed for w in words)                      # and upper case


def test_number_drills_echo_numbers_whose_tokens_cover_all_three_digit_groups():
    from dsv32.train.synth import number_conversations

    convs = number_conversations(300, seed=2)
    assert convs == number_conversations(300, seed=2) != number_conversations(300, seed=3)
    groups = set()
    for c in convs:
        messages = c.messages
        assert len(messages) == 12 and c.tools is None and c.thinking_mode == "chat"
        for user, answer in zip(messages[::2], messages[1::2]):
            assert user["role"] == "user" and answer["role"] == "assistant"
            assert answer["content"] in user["content"]
            assert re.fullmatch(r"-?\d+(\.\d*[1-9])?( -?\d+(\.\d*[1-9])?){0,2}", answer["content"])
            groups |= {m for m in re.findall(r"\d{3}", answer["content"])}
    assert len(groups) > 950            # of the tokenizer's 1000 three-digit tokens


def _slot(text: str, frames: tuple[str, ...]) -> str | None:
    """What a drill frame's {x} holds in `text` (frames match in any casing), or None."""
    for f in frames:
        m = re.fullmatch(re.escape(f).replace(re.escape("{x}"), "(.+)"), text, re.I)
        if m:
            return m.group(1)
    return None


def test_conversion_drills_turn_number_words_and_worded_sums_into_digits():
    from dsv32.train.envs.calculator import evaluate_expression
    from dsv32.train.envs.numbers import number_words
    from dsv32.train.synth import SKILL_FRAMES, conversion_conversations

    convs = conversion_conversations(200, seed=1)
    assert convs == conversion_conversations(200, seed=1)
    assert convs != conversion_conversations(200, seed=2)
    spoken = {number_words(n).lower(): n for n in range(-100, 101)}
    counts = {"number": 0, "expression": 0, "words": 0, "separated": 0}
    for c in convs:
        messages = c.messages
        assert len(messages) == 12 and c.tools is None and c.category == "skill"
        for user, answer in zip(messages[::2], messages[1::2]):
            text, answer = user["content"], answer["content"]
            x = _slot(text, SKILL_FRAMES["number"])
            if x is not None:                  # digits, words, "minus 7" or thousands separators
                counts["number"] += 1
                assert re.fullmatch(r"-?\d+", answer)
                if x.lower() in spoken:
                    counts["words"] += 1
                    assert spoken[x.lower()] == int(answer)
                else:
                    counts["separated"] += "," in x
                    assert x.replace(",", "").replace("minus ", "-") == answer
            else:                              # a valid expression over a number the user wrote
                assert _slot(text, SKILL_FRAMES["expression"]) is not None
                counts["expression"] += 1
                evaluate_expression(answer)
                assert any(n in text or number_words(int(n)).lower() in text.lower()
                           for n in re.findall(r"\d+", answer))
    assert min(counts["number"], counts["expression"]) > 300
    assert counts["words"] > (counts["number"] - counts["separated"]) / 2
    assert 0 < counts["separated"] < 100       # "3,962" written as a user would, not drilled


def test_city_augmentation_leaves_unseen_cities_out():
    from dsv32.train.corpus import city_conversations, tz_cities, weather_city

    convs = sft_conversations(300, seed=5)
    extra = city_conversations(convs, 400, seed=5)
    cities = {weather_city(c).casefold() for c in extra}
    assert len(cities) > 100 and not cities & {c.casefold() for c in P.CITIES["unseen"]}
    for c in extra:                                  # the user names the swapped city, in any casing
        users = " ".join(m["content"] for m in c.messages if m["role"] == "user")
        assert weather_city(c).casefold() in users.casefold()
        assert weather_city(c) in tz_cities()       # and the call spells it as the list does


def test_frame_words_leave_out_slot_words():
    words = P.frame_words()
    assert {"forecast", "compute", "convert"} <= words
    slots = {"plus", "times", "divided", "power", "km", "miles", "celsius", "paris", "january", "france",
             "noun", "hello", "thanks", "the", "of", "to"}
    assert not words & slots

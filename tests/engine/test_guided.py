"""Grammar-constrained decoding: random logits driven through the processors must give output that
the chat parser reads back as valid JSON / valid tool calls; invalid requests raise ValueError."""
from __future__ import annotations

import json
import re
import time

import jsonschema
import numpy as np
import pytest
import torch

from dsv32.chat import Tokenizer, encode_messages, parse_completion, render_tool_calls
from dsv32.chat.tokens import PARAM_CLOSE
from dsv32.chat.grammar import OutputSpec, request_grammar
from dsv32.engine.guided import GrammarCompiler

VOCAB = 129280

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "strict": True, "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "hours": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
            "note": {"type": ["string", "null"], "pattern": "^[a-z ]*$"},
        },
        "required": ["location", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}},
                                     "required": ["q"]}}}
TOOLS = [WEATHER, CLOCK, SEARCH]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4},
    "pet": {"anyOf": [{"$ref": "#/$defs/pet"}, {"type": "null"}]}},
    "required": ["name", "age"], "additionalProperties": False,
    "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
                      "required": ["kind"], "additionalProperties": False}}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load()


class Driver:
    """Samples token by token through a processor: random logits, then past `budget` the end of
    sentence when allowed, else closing tokens tried in turn (so a string that may contain one
    closer is ended by the next; a number before a required key is ended by the comma)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.closers = [[tok.think_end_id], tok.encode(PARAM_CLOSE)] + \
            [tok.encode(s) for s in ('"', "}", "]", ",", "0")]   # ",": a number's end before the next key
        self.seconds = []

    def run(self, proc, seed: int, budget: int = 24, limit: int = 600, script: str = "") -> list[int]:
        rng = np.random.default_rng(seed)
        forced = self.tok.encode(script)
        ids: list[int] = []
        pending: list[int] = []
        turn = 0
        while len(ids) < limit:
            logits = torch.from_numpy(rng.standard_normal(VOCAB, dtype=np.float32))
            start = time.perf_counter()
            logits = proc(ids, logits).numpy()
            self.seconds.append(time.perf_counter() - start)
            allowed = np.isfinite(logits)
            assert not allowed[self.tok.vocab_size:].any(), "an id beyond the tokenizer was allowed"
            assert allowed.any(), f"nothing allowed after {self.tok.decode(ids)!r}"
            choice = None
            if len(ids) < len(forced):
                choice = forced[len(ids)]
                assert allowed[choice], f"script token refused after {self.tok.decode(ids)!r}"
            elif len(ids) >= budget:
                if allowed[self.tok.eos_id]:
                    choice = self.tok.eos_id
                elif pending and allowed[pending[0]]:
                    choice = pending.pop(0)
                else:
                    turn += 1
                    order = self.closers[turn % len(self.closers):] + self.closers[:turn % len(self.closers)]
                    seq = next((s for s in order if allowed[s[0]]), None)
                    if seq:
                        choice, pending = seq[0], seq[1:]
            if choice is None:
                choice = int(np.argmax(logits))
            ids.append(choice)
            if choice == self.tok.eos_id:
                return ids
        raise AssertionError(f"no end of sentence within {limit} tokens: {self.tok.decode(ids)!r}")

    def mean_ms(self) -> float:
        return 1e3 * sum(self.seconds) / len(self.seconds)


@pytest.fixture(scope="module")
def driver(tok) -> Driver:
    return Driver(tok)


_compilers: dict[int, GrammarCompiler] = {}


def build_logits_processors(tok, vocab: int, safety_net: bool = True, **kw) -> list:
    """The processors of a request with these OutputSpec fields (one compiler per vocabulary)."""
    if vocab not in _compilers:
        _compilers[vocab] = GrammarCompiler(tok, vocab)
    return _compilers[vocab].processors(OutputSpec(**kw), safety_net)


def one(tok, **kw):
    procs = build_logits_processors(tok, VOCAB, **kw)
    assert len(procs) == 1
    return procs[0]


def check_calls(tok, text: str, mode: str, tools=TOOLS) -> list[dict]:
    """Parse the calls, check the arguments against the schemas and the string="..." attributes."""
    msg = parse_completion(text, mode)
    assert not msg["warnings"], (msg["warnings"], text)
    assert msg["tool_calls"] and not (msg["content"] or "").strip()
    specs = {t["function"]["name"]: t["function"] for t in tools}
    for call in msg["tool_calls"]:
        spec = specs[call["function"]["name"]]
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, spec["parameters"])
    for name, flag in re.findall(r'parameter name="([^"]+)" string="(true|false)"', text):
        value_type = next(s["parameters"]["properties"][name] for s in specs.values()
                          if name in s["parameters"].get("properties", {}))["type"]
        if value_type == "string":
            assert flag == "true", text
        elif "string" not in value_type:
            assert flag == "false", text
    return msg["tool_calls"]


# ---- JSON answers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_json_object(tok, driver, seed):
    proc = one(tok, response_format={"type": "json_object"})
    ids = driver.run(proc.clone(), seed)
    assert ids[-1] == tok.eos_id
    assert isinstance(json.loads(tok.decode(ids[:-1])), dict)


@pytest.mark.parametrize("seed", range(4))
def test_json_schema(tok, driver, seed):
    proc = one(tok, response_format=schema_format(PERSON))
    ids = driver.run(proc.clone(), seed, budget=40)
    value = json.loads(tok.decode(ids[:-1]))
    jsonschema.validate(value, PERSON)


def test_json_schema_thinking(tok, driver):
    proc = one(tok, response_format=schema_format(PERSON), thinking=True)
    ids = driver.run(proc.clone(), 7, budget=20)
    cut = ids.index(tok.think_end_id)
    assert cut >= 20 and tok.think_end_id not in ids[cut + 1:]
    msg = parse_completion(tok.decode(ids), "thinking")
    assert msg["reasoning_content"] == tok.decode(ids[:cut])
    value = json.loads(msg["content"])
    jsonschema.validate(value, PERSON)
    # the reasoning is free of markup; a JSON string may spell some (random tokens did, in "name")
    assert not any(m in msg["reasoning_content"] for m in ("｜DSML｜", "<think>", "</think>"))
    assert all("stray" in w for w in msg["warnings"]) and (not msg["warnings"] or "｜DSML｜" in value["name"])


def test_reasoning_cannot_end_the_sentence_or_spell_markers(tok):
    proc = one(tok, response_format={"type": "json_object"}, thinking=True)
    ids = tok.encode("Let me think")
    assert not proc.allowed(ids)[tok.eos_id] and proc.allowed(ids)[tok.think_end_id]
    assert not proc.clone().allowed(tok.encode("a </think") + tok.encode(">"))[tok.think_end_id]


def test_end_of_sentence_only_when_complete(tok):
    proc = one(tok, response_format={"type": "json_object"})
    assert not proc.allowed(tok.encode('{"a": 1'))[tok.eos_id]
    done = proc.allowed(tok.encode('{"a": 1}'))
    assert done[tok.eos_id] and done.sum() == 1
    assert not proc.clone().allowed([])[tok.eos_id]


def test_json_whitespace_is_bounded(tok):
    proc = one(tok, response_format={"type": "json_object"})
    ids = tok.encode('{\n    "a":')
    newline = tok.encode("\n")[0]
    assert proc.allowed(ids)[newline]
    assert not proc.allowed(ids + [newline])[newline]


# ---- tool calls ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_required_tool_calls(tok, driver, seed):
    proc = one(tok, tools=TOOLS, tool_choice="required")
    ids = driver.run(proc.clone(), seed, budget=60)
    calls = check_calls(tok, tok.decode(ids), "chat")
    assert all(c["function"]["name"] in {"get_weather", "get_time", "search"} for c in calls)


@pytest.mark.parametrize("name", ["get_weather", "get_time"])
def test_named_tool_call(tok, driver, name):
    proc = one(tok, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}},
               thinking=True)
    ids = driver.run(proc.clone(), 3, budget=30)
    calls = check_calls(tok, tok.decode(ids), "thinking")
    assert [c["function"]["name"] for c in calls] == [name]


def test_tool_call_block_matches_the_encoder(tok):
    """What the encoder renders for a call is accepted whole; a second invoke of a named one is not."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {
        "location": "Paris", "days": 3, "unit": "celsius", "hours": [9, 12], "note": None}}}
    text = render_tool_calls([call, {"type": "function", "function": {"name": "get_time", "arguments": {}}}])
    proc = one(tok, tools=TOOLS, tool_choice="required")
    ids = tok.encode(text)
    for i in range(len(ids)):
        assert proc.allowed(ids[:i])[ids[i]], tok.decode(ids[:i + 1])
    assert proc.allowed(ids)[tok.eos_id]
    named = one(tok, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    one_call = tok.encode(render_tool_calls([call]))
    assert named.allowed(one_call)[tok.eos_id]
    assert not named.allowed(one_call[:-3] + tok.encode(">\n<"))[tok.eos_id]


@pytest.mark.parametrize("bad", [
    {"location": "Paris", "days": 30},
    {"location": "much too long a name", "days": 3},
    {"days": 3},
    {"location": "Paris", "days": 3, "unit": "kelvin"},
    {"location": "Paris", "days": 3, "note": "Not Lowercase"},
])
def test_strict_arguments_are_enforced(tok, bad):
    proc = one(tok, tools=TOOLS, tool_choice="auto")
    ids = tok.encode(render_tool_calls([{"type": "function", "function": {"name": "get_weather",
                                                                         "arguments": bad}}]))
    assert not all(proc.clone().allowed(ids[:i])[ids[i]] for i in range(len(ids)))


def test_auto_with_strict_tools(tok, driver):
    proc = one(tok, tools=TOOLS, tool_choice="auto")
    assert proc.allowed([])[tok.eos_id]            # plain text, even empty, is fine
    text = tok.decode(driver.run(proc.clone(), 1, budget=3))
    assert not parse_completion(text, "chat")["tool_calls"]
    lead = "Checking.\n\n<｜DSML｜function_calls>\n"
    script = lead + '<｜DSML｜invoke name="get_weather">\n'
    ids = driver.run(proc.clone(), 2, budget=len(tok.encode(script)) + 20, script=script)
    calls = check_calls(tok, tok.decode(ids)[len("Checking."):], "chat", tools=[WEATHER])
    assert calls[0]["function"]["name"] == "get_weather"


def accepts(proc, tok, text: str) -> bool:
    """Whether a fresh clone of `proc` lets `text` through token by token, then the end of sentence."""
    proc, ids = proc.clone(), tok.encode(text)
    return all(proc.allowed(ids[:i])[ids[i]] for i in range(len(ids))) and proc.allowed(ids)[tok.eos_id]


def test_free_text_cannot_spell_markup_or_a_near_miss_of_it(tok):
    """Seen from the bundled model at temperature 1: `<｜DSMLfunction_calls>` (one bar short), which
    is neither a call nor text a client can show."""
    for kw in ({}, {"tools": TOOLS}):
        proc = one(tok, **kw)
        assert accepts(proc, tok, "The answer is 84.")
        for bad in ("<｜DSMLfunction_calls>", "a ｜DSML b", "say </think> now", "<think>", "x｜DSML｜y"):
            assert not accepts(proc, tok, bad), (kw, bad)


def test_non_strict_arguments_follow_the_schema_leniently(tok):
    """The safety net reads a non-strict tool's schema (types, required names); without it, a request
    that only has a strict tool among non-strict ones leaves their arguments free."""
    odd = render_tool_calls([{"type": "function", "function": {"name": "search",
                                                               "arguments": {"q": 1, "extra": "x"}}}])
    good = render_tool_calls([{"type": "function", "function": {"name": "search", "arguments": {"q": "x"}}}])
    net = one(tok, tools=TOOLS, tool_choice="auto")
    assert accepts(net, tok, good) and not accepts(net, tok, odd)
    raw = one(tok, tools=TOOLS, tool_choice="auto", safety_net=False)
    assert accepts(raw, tok, good) and accepts(raw, tok, odd)


def test_auto_with_json_answer(tok):
    """With a JSON response_format and tools, the answer is the JSON or a call block, not text."""
    proc = one(tok, tools=TOOLS, response_format={"type": "json_object"})
    ok_json = tok.encode('{"a": 1}')
    assert proc.allowed(ok_json)[tok.eos_id]
    call = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    assert proc.clone().allowed(tok.encode(render_tool_calls([call])))[tok.eos_id]
    assert not proc.clone().allowed([])[tok.encode("Hello")[0]]


def test_names_outside_ascii(tok):
    tool = {"type": "function", "function": {"name": "天气", "strict": True, "parameters": {
        "type": "object", "properties": {"城市": {"type": "string"}, "ä": {"type": "boolean"}},
        "required": ["城市", "ä"]}}}
    proc = one(tok, tools=[tool], tool_choice="required")
    call = {"type": "function", "function": {"name": "天气", "arguments": {"城市": "北京", "ä": True}}}
    ids = tok.encode(render_tool_calls([call]))
    assert all(proc.allowed(ids[:i])[ids[i]] for i in range(len(ids)))
    assert proc.allowed(ids)[tok.eos_id]


def test_nothing_to_enforce_without_the_safety_net(tok):
    for kw in ({}, {"response_format": {"type": "text"}}, {"tools": [CLOCK, SEARCH]},
               {"tools": TOOLS, "tool_choice": "none"}, {"tools": [CLOCK], "tool_choice": "auto", "thinking": True}):
        assert build_logits_processors(tok, VOCAB, safety_net=False, **kw) == []
        assert len(build_logits_processors(tok, VOCAB, **kw)) == 1


def test_clones_are_independent(tok):
    proc = one(tok, response_format=schema_format(PERSON))
    first, second = proc.clone(), proc.clone()
    close, quote = tok.encode("}")[0], tok.encode('"')[0]
    a = tok.encode('{"name": "Al", "age": 3')
    b = tok.encode('{"name": "Bo')
    assert first.allowed(a)[close] and not first.allowed(a)[tok.eos_id]
    assert second.allowed(b)[quote]
    assert first.allowed(a + [close])[tok.eos_id]
    assert not second.allowed(b + [quote])[close]
    fresh = proc.allowed([])
    assert fresh[tok.encode("{")[0]] and not fresh[tok.eos_id]


def test_grammar_follows_the_prompt_format(tok):
    """The block the grammar forces starts like the encoder's (blank line, then the tag)."""
    grammar = request_grammar(OutputSpec(tools=TOOLS, tool_choice="required")).text
    prompt = encode_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "",
                              "tool_calls": [{"type": "function", "function": {"name": "get_time",
                                                                               "arguments": {}}}]}],
                             thinking_mode="chat", tools=TOOLS)
    assert '"\\n\\n<｜DSML｜function_calls>"' in grammar
    assert "</think>\n\n<｜DSML｜function_calls>\n" in prompt


# ---- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, words", [
    ({"response_format": schema_format({"type": "strin"})}, ["response_format", "strin"]),
    ({"response_format": schema_format({"type": "string", "pattern": "(?<=a)b"})}, ["look-around"]),
    ({"response_format": {"type": "xml"}}, ["response_format.type"]),
    ({"response_format": {"type": "json_schema"}}, ["json_schema"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": "low"}}}}}],
      "tool_choice": "auto"}, ["tools[0].function.parameters.x", "minimum"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
      "tool_choice": "required"}, ["object"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, ["nope"]),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, ["tool_choice"]),
    ({"tool_choice": "required"}, ["needs tools"]),
    ({"tools": [CLOCK, CLOCK], "tool_choice": "required"}, ["two tools"]),
    ({"tools": [{"function": {"name": 'a"b'}}], "tool_choice": "required"}, ["name"]),
])
def test_invalid_requests(tok, kw, words):
    with pytest.raises(ValueError) as info:
        build_logits_processors(tok, VOCAB, **kw)
    for word in words:
        assert word in str(info.value)


# ---- cost --------------------------------------------------------------------------------------------

def test_mask_cost(tok, capsys):
    """Per-token cost of a processor (mask + applying it to 129,280 logits), printed for the record."""
    proc = one(tok, tools=TOOLS, tool_choice="required", thinking=True)
    timing = Driver(tok)
    timing.run(proc.clone(), 11, budget=100)
    cost = timing.mean_ms()
    with capsys.disabled():
        print(f"\nguided decoding: {cost:.3f} ms per token over {len(timing.seconds)} tokens "
              f"({1e3 * sorted(timing.seconds)[len(timing.seconds) // 2]:.3f} ms median)")
    assert cost < 50


# ---- through the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from dsv32.engine.llm import LLM
    from dsv32.model.init_tiny import init_tiny
    path = init_tiny(tmp_path_factory.mktemp("guided_tiny"), seed=5, layers=1, hidden=64, shards=1)
    return LLM(model=str(path), max_model_len=512)


def test_engine_json_and_tool_call(tok, llm):
    """A random model under the processors: n=2 JSON answers and a named call, batched together."""
    from dsv32.engine.sequence import SamplingParams
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["unit", "n"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "set_unit", "parameters": {
        "type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]},
                                         "level": {"type": "integer", "minimum": 1, "maximum": 3}},
        "required": ["unit", "level"]}}}
    vocab = llm.engine.model_config.vocab_size
    json_procs = build_logits_processors(tok, vocab, response_format=schema_format(schema))
    call_procs = build_logits_processors(tok, vocab, tools=[tool], tool_choice={
        "type": "function", "function": {"name": "set_unit"}})
    prompt = encode_messages([{"role": "user", "content": "go"}], thinking_mode="chat")
    params = [SamplingParams(n=2, temperature=1.0, max_tokens=200, seed=0, skip_special_tokens=False,
                             logits_processors=json_procs),
              SamplingParams(temperature=1.0, max_tokens=200, seed=1, skip_special_tokens=False,
                             logits_processors=call_procs)]
    answers, calls = llm.generate([prompt, prompt], params, use_tqdm=False)
    assert len(answers.outputs) == 2
    for o in answers.outputs + calls.outputs:
        assert o.finish_reason == "stop", o.text
    for o in answers.outputs:
        jsonschema.validate(json.loads(o.text.replace("<｜end▁of▁sentence｜>", "")), schema)
    made = check_calls(tok, calls.outputs[0].text, "chat", tools=[tool])
    assert [c["function"]["name"] for c in made] == ["set_unit"]

"""The grammar as a safety net: only offered tools, arguments under their schemas, no calls without
tools, no stray markup, bounded JSON whitespace; hypothesis-made schemas and tool sets; MTP drafts
the grammar refuses are never accepted."""
from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv32.chat import parse_completion, render_tool_calls
from dsv32.chat.grammar import OutputSpec
from dsv32.chat.tokens import EOS
from dsv32.engine.chat import ChatRequest, InvalidRequest, prepare_chat
from dsv32.engine.sequence import SamplingParams

from .test_engine import ckpt, make_engine, model, run  # noqa: F401
from .test_guided import CLOCK, TOOLS, VOCAB, WEATHER, Driver, accepts, build_logits_processors, one

CALC = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def call(name: str, **arguments) -> str:
    return render_tool_calls([{"type": "function", "function": {"name": name, "arguments": arguments}}])


@pytest.fixture(scope="module")
def tok():
    from dsv32.chat import Tokenizer
    return Tokenizer.load()


@pytest.mark.parametrize("thinking", [False, True])
def test_no_tools_no_call(tok, thinking):
    proc = one(tok, thinking=thinking)
    lead = "Let me see.</think>" if thinking else ""
    ids = tok.encode("Let me see.") + ([tok.think_end_id] if thinking else [])
    assert proc.allowed(ids)[tok.eos_id]
    for text in ["It is 84.", "a\nb\n\nc, d; {\"x\": 1}"]:
        assert accepts(proc, tok, lead + text), text
    assert not accepts(proc, tok, lead + "Sure." + call("calculator", expression="12 * 7"))
    assert not accepts(proc, tok, lead + "Sure.\n\n<｜DSML｜function_calls>")


@pytest.mark.parametrize("text", ["a <think> b", "a </think> b", "x <｜DSML｜invoke name=\"f\">",
                                  "x </｜DSML｜parameter>"])
def test_stray_markup_cannot_be_spelled(tok, text):
    assert not accepts(one(tok), tok, text)
    assert not accepts(one(tok, tools=[CALC]), tok, text)


def test_only_offered_tools(tok):
    weather_only = one(tok, tools=[WEATHER])
    assert accepts(weather_only, tok, call("get_weather", location="Paris", days=2))
    assert not accepts(weather_only, tok, call("calculator", expression="12 * 7"))
    assert not accepts(one(tok, tools=[WEATHER, CALC], tool_choice="none"), tok,
                       call("calculator", expression="1"))
    # the text before a call is free, the call after it is checked the same way
    assert accepts(one(tok, tools=[CALC]), tok, "Computing." + call("calculator", expression="1"))


def test_several_calls_unless_parallel_tool_calls_is_false(tok):
    both = render_tool_calls([
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1+1"}}},
        {"type": "function", "function": {"name": "get_time", "arguments": {}}}])
    assert accepts(one(tok, tools=[CALC, CLOCK]), tok, both)
    single = one(tok, tools=[CALC, CLOCK], parallel_tool_calls=False)
    assert not accepts(single, tok, both)
    assert accepts(single, tok, call("get_time"))


def test_json_whitespace_cannot_run_away(tok):
    proc = one(tok, response_format={"type": "json_object"})
    assert accepts(proc, tok, '{\n  "a": [1, 2],\n  "b": {"c": null}\n}')
    assert accepts(proc, tok, '{"a":' + " " + '1}')
    assert not accepts(proc, tok, '{"a":' + " " * 2 + '1}')
    assert not accepts(proc, tok, '{"a":\n' + " " * 33 + '1}')
    assert not accepts(proc, tok, '{"a": 1}\n')


def test_a_non_strict_schema_that_cannot_compile_leaves_its_arguments_free(tok):
    odd = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}}}
    proc = one(tok, tools=[odd, CALC])
    assert accepts(proc, tok, call("f", x="anything", y=3))
    assert not accepts(proc, tok, call("calculator", expression=3))     # the others stay checked
    strict = {"type": "function", "function": {**odd["function"], "strict": True}}
    with pytest.raises(ValueError, match="tools\\[0\\]"):
        build_logits_processors(tok, VOCAB, tools=[strict])


def test_prepare_chat(tok):
    from dsv32.engine.guided import GrammarCompiler
    compiler = GrammarCompiler(tok, VOCAB)
    user = [{"role": "user", "content": "hi"}]
    p = prepare_chat(ChatRequest(user, thinking=True, tools=TOOLS, tool_choice="none"), compiler)
    assert p.mode == "thinking" and p.text.endswith("<think>") and "get_weather" not in p.text
    assert len(p.processors) == 1
    assert prepare_chat(ChatRequest(user), compiler, safety_net=False).processors == []
    prefix = user + [{"role": "assistant", "content": "<｜DSML｜function_calls>", "prefix": True}]
    assert prepare_chat(ChatRequest(prefix, tools=[CLOCK, CALC]), compiler).processors == []
    for request, param in [(ChatRequest([{"role": "robot", "content": "x"}]), "messages"),
                           (ChatRequest(user, tool_choice="required"), "tool_choice"),
                           (ChatRequest(user, response_format={"type": "json_schema"}), "response_format"),
                           (ChatRequest(user, tools=[{"function": {"name": "a<b"}}]), "messages")]:
        with pytest.raises(InvalidRequest) as info:
            prepare_chat(request, compiler)
        assert info.value.param == param


# ---- hypothesis: schemas and tool sets ------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "city", "n", "unit", "x_y", "ok"])
LEAVES = st.one_of(
    st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.builds(lambda hi: {"type": "string", "maxLength": hi}, st.integers(0, 6)),
    st.lists(st.sampled_from(["red", "green", "blue", "x y"]), min_size=1, max_size=3, unique=True)
    .map(lambda v: {"enum": v}),
    st.just({"type": "number", "minimum": 0, "maximum": 9}))


def _objects(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=3).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(lambda req: {
            "type": "object", "properties": props, "required": sorted(req), "additionalProperties": False}))


SCHEMAS = st.recursive(LEAVES, lambda children: st.one_of(
    _objects(children),
    st.builds(lambda items, hi: {"type": "array", "items": items, "maxItems": hi}, children, st.integers(0, 2)),
    st.lists(children, min_size=2, max_size=2).map(lambda alts: {"anyOf": alts})), max_leaves=5)
HYPO = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPO
@given(schema=_objects(SCHEMAS), seed=st.integers(0, 2**16), thinking=st.booleans())
def test_hypothesis_json_schema_answers(tok, schema, seed, thinking):
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    ids = Driver(tok).run(one(tok, response_format=fmt, thinking=thinking), seed, budget=30, limit=900)
    msg = parse_completion(tok.decode(ids), "thinking" if thinking else "chat")
    assert not msg["warnings"] and not msg["tool_calls"]
    jsonschema.validate(json.loads(msg["content"]), schema)


@HYPO
@given(params=st.lists(_objects(SCHEMAS), min_size=1, max_size=3), strict=st.lists(st.booleans(), min_size=3,
       max_size=3), offered=st.integers(1, 3), seed=st.integers(0, 2**16), parallel=st.booleans())
def test_hypothesis_tool_sets(tok, params, strict, offered, seed, parallel):
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": p, "strict": s}}
             for i, (p, s) in enumerate(zip(params, strict))][:offered]
    proc = one(tok, tools=tools, tool_choice="required", parallel_tool_calls=parallel)
    ids = Driver(tok).run(proc, seed, budget=40, limit=1500)
    msg = parse_completion(tok.decode(ids), "chat")
    assert not msg["warnings"] and msg["tool_calls"] and (parallel or len(msg["tool_calls"]) == 1)
    specs = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for made in msg["tool_calls"]:
        jsonschema.validate(json.loads(made["function"]["arguments"]), specs[made["function"]["name"]])


# ---- through the engine: n > 1 and MTP drafts ---------------------------------------------------------

def test_drafts_the_grammar_refuses_are_never_accepted(ckpt, model, tok):  # noqa: F811
    """Every other draft is the reference's next token, the others the end of sentence inside the
    JSON value (which the grammar refuses): outputs equal plain decoding, n=2 included."""
    eng = make_engine(ckpt, model)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "s": {"type": "string", "maxLength": 5}},
              "required": ["n", "s"], "additionalProperties": False}
    procs = eng.grammars.processors(build_spec(schema))
    prompt = tok.encode("<｜begin▁of▁sentence｜><｜User｜>json<｜Assistant｜></think>")
    params = [SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=120, logits_processors=procs,
                             skip_special_tokens=False)]
    ref = run(eng, [prompt], params)[0]
    spec_eng = make_engine(ckpt, model, num_speculative_tokens=1)
    wanted = {o.index: o.token_ids for o in ref.outputs}
    spec = spec_eng.speculator
    propose, steps = spec.propose, [0]

    def oracle():
        propose()
        for state in spec_eng.requests.values():
            for seq in state.seqs:
                if spec.draft_of(seq) is not None and seq.num_output_tokens < len(wanted[seq.index]) - 1:
                    steps[0] += 1
                    spec.drafts[seq.seq_id] = wanted[seq.index][seq.num_output_tokens] if steps[0] % 2 else tok.eos_id
    spec.propose = oracle
    got = run(spec_eng, [prompt], params)[0]
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in ref.outputs]
    for o in got.outputs:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text.replace(EOS, "")), schema)
    stats = spec_eng.metrics()
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def build_spec(schema) -> OutputSpec:
    return OutputSpec(response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}})



def test_offline_llm_chat(ckpt):  # noqa: F811
    """`LLM.chat` renders the conversation and applies the same grammar as the server."""
    from dsv32.engine.llm import LLM
    llm = LLM(model=str(ckpt), max_model_len=512)
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "ok": {"type": "boolean"}},
              "required": ["unit", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
    convs = [[{"role": "user", "content": "json please"}], [{"role": "user", "content": "again"}]]
    outs = llm.chat(convs, SamplingParams(temperature=1.0, seed=1, max_tokens=60), response_format=fmt,
                    use_tqdm=False)
    for out in outs:
        assert out.prompt.endswith("</think>") and out.outputs[0].finish_reason == "stop"
        msg = parse_completion(out.outputs[0].text, "chat")
        jsonschema.validate(json.loads(msg["content"]), schema)
    (call,) = llm.chat(convs[0], SamplingParams(temperature=1.0, seed=2, max_tokens=80), tools=[CALC, CLOCK],
                       tool_choice={"type": "function", "function": {"name": "get_time"}}, use_tqdm=False)
    assert [c["function"]["name"] for c in parse_completion(call.outputs[0].text, "chat")["tool_calls"]] == \
        ["get_time"]

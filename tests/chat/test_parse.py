"""parse_completion: well-formed completions, round trips through the encoder, malformed output."""
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.chat import parse_completion

from .strategies import assistant_messages, completion_text

EOS = "<｜end▁of▁sentence｜>"
GOLDEN = (Path(__file__).parent / "fixtures" / "test_output.txt").read_text(encoding="utf-8")


def block(*invokes):
    return "\n\n<｜DSML｜function_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜function_calls>"


def invoke(name, *params):
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def param(name, value, is_string=True):
    return f'<｜DSML｜parameter name="{name}" string="{"true" if is_string else "false"}">{value}</｜DSML｜parameter>'


def test_golden_last_turn_parses_back():
    start = GOLDEN.rindex("<｜Assistant｜><think>") + len("<｜Assistant｜><think>")
    text = GOLDEN[start:GOLDEN.index(EOS, start) + len(EOS)]
    msg = parse_completion(text, "thinking")
    assert msg["reasoning_content"].startswith("User is now asking about the day after tomorrow")
    assert msg["content"] == "" and msg["warnings"] == []
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == [
        '{"location": "San Francisco", "date": "2024-01-17"}', '{"location": "New York", "date": "2024-01-17"}']
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c["id"]) and c["type"] == "function"
               for c in msg["tool_calls"])
    assert len({c["id"] for c in msg["tool_calls"]}) == 2


def test_golden_final_answer_parses_back():
    start = GOLDEN.rindex("</function_results>\n\n<think>") + len("</function_results>\n\n<think>")
    msg = parse_completion(GOLDEN[start:].rstrip("\n"), "thinking")
    assert msg["reasoning_content"] == "Got the weather data for the day after tomorrow. Let me format this for the user."
    assert msg["content"].startswith("Here's the forecast") and msg["content"].endswith("bundle up.")
    assert msg["tool_calls"] == [] and msg["warnings"] == []


@pytest.mark.parametrize("eos", [EOS, ""])
def test_end_of_sentence_present_or_stripped(eos):
    assert parse_completion("think</think>answer" + eos, "thinking") == {
        "role": "assistant", "content": "answer", "reasoning_content": "think", "tool_calls": [], "warnings": []}
    assert parse_completion("answer" + eos, "chat")["content"] == "answer"
    assert parse_completion("answer" + eos, "chat")["reasoning_content"] is None


def test_string_false_values_are_json():
    text = "ok" + block(invoke("f", param("n", "42", False), param("l", '[1, "两"]', False),
                                 param("o", '{"a": null}', False), param("b", "true", False),
                                 param("s", "42"))) + EOS
    msg = parse_completion(text, "chat")
    assert msg["content"] == "ok" and msg["warnings"] == []
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"n": 42, "l": [1, "两"], "o": {"a": null}, "b": true, "s": "42"}'


def test_call_without_parameters_and_multiple_calls():
    text = block(invoke("now"), invoke("g", param("x", 'a "quoted"\nline'))) + EOS
    calls = parse_completion(text, "chat")["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["now", "g"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{}, {"x": 'a "quoted"\nline'}]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["thinking", "chat"]).flatmap(lambda m: st.tuples(st.just(m), assistant_messages(m == "thinking"))),
       st.booleans())
def test_round_trip_encode_then_parse(mode_and_message, strip_eos):
    mode, message = mode_and_message
    text = completion_text(message, mode)
    msg = parse_completion(text.removesuffix(EOS) if strip_eos else text, mode)
    assert msg["warnings"] == []
    assert msg["content"] == message["content"]
    assert msg["reasoning_content"] == message.get("reasoning_content")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
    # Arguments come back in the official decoder's layout: json.dumps defaults, non-ASCII kept.
    for call in message["tool_calls"]:
        assert json.dumps(json.loads(call["function"]["arguments"]), ensure_ascii=False) in [
            c["function"]["arguments"] for c in msg["tool_calls"]]


# -- malformed output: recover, keep the raw text, report, never raise --------------------------

def test_reasoning_without_end():
    msg = parse_completion("still thinking", "thinking")
    assert msg["reasoning_content"] == "still thinking" and msg["content"] == ""
    assert msg["warnings"] == ["the reasoning was not closed with </think>"]


def test_tool_calls_inside_reasoning_are_recovered():
    msg = parse_completion("hmm" + block(invoke("f", param("a", "1"))) + EOS, "thinking")
    assert msg["reasoning_content"] == "hmm" and msg["content"] == ""
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"a": "1"}'
    assert "without </think>" in msg["warnings"][0]


def test_unterminated_call_keeps_raw_text():
    good = invoke("f", param("a", "1"))
    cut = '<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="b" string="true">par'
    text = "Sure" + block(good)[:-len("\n</｜DSML｜function_calls>")] + "\n" + cut
    msg = parse_completion(text, "chat")
    assert msg["content"] == "Sure" + "\n" + cut
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == ['{"a": "1"}', '{"b": "par']
    assert any("not terminated" in w for w in msg["warnings"])
    assert any("tool call 1 (g) is incomplete" in w for w in msg["warnings"])


def test_bad_parameter_line():
    bad = '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a">1</｜DSML｜parameter>\n</｜DSML｜invoke>'
    text = "x\n\n<｜DSML｜function_calls>\n" + bad + "\n</｜DSML｜function_calls>" + EOS
    msg = parse_completion(text, "chat")
    assert msg["content"] == text.removesuffix(EOS)
    assert msg["tool_calls"][0]["function"]["name"] == "f"
    assert any("bad parameter line" in w for w in msg["warnings"])


def test_text_after_the_calls():
    msg = parse_completion(block(invoke("f")) + "\nby the way" + EOS, "chat")
    assert msg["content"] == "\nby the way" and len(msg["tool_calls"]) == 1
    assert msg["warnings"] == ["text after the tool calls was kept in content"]


def test_whitespace_after_the_calls_is_ignored():
    msg = parse_completion(block(invoke("f")) + "\n" + EOS, "chat")
    assert msg["content"] == "" and msg["warnings"] == []


def test_text_after_end_of_sentence():
    msg = parse_completion("a" + EOS + "b", "chat")
    assert msg["content"] == "ab" and "after the end of sentence" in msg["warnings"][0]


def test_invalid_json_in_string_false_value_becomes_a_string():
    msg = parse_completion(block(invoke("f", param("n", "NaN", False), param("m", "{oops", False))), "chat")
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"n": "NaN", "m": "{oops"}
    assert len(msg["warnings"]) == 2 and 'string="false" but is not JSON' in msg["warnings"][0]


def test_garbage_inside_the_block():
    text = "a" + block(invoke("f"))[:-len("</｜DSML｜function_calls>")] + "garbage" + EOS
    msg = parse_completion(text, "chat")
    assert msg["content"] == "a\ngarbage" and len(msg["tool_calls"]) == 1
    assert "expected an invoke tag" in msg["warnings"][0]


def test_end_of_sentence_inside_a_value():
    text = block(invoke("f", param("a", "xy")))
    text = text[:text.index("xy") + 1] + EOS
    msg = parse_completion(text, "chat")
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"a": "x'
    assert msg["content"] == text.removesuffix(EOS)
    assert "end of sentence came inside" in msg["warnings"][0]


def test_duplicate_parameter_is_reported():
    msg = parse_completion(block(invoke("f", param("a", "1"), param("a", "2"))), "chat")
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"a": "1", "a": "2"}'
    assert "repeats parameter 'a'" in msg["warnings"][0]


# -- stray special markup: kept where it is, reported ---------------------------------------------

STRAY_THINK = "stray <think> in the output (kept as text)"
STRAY_THINK_END = "stray </think> with no reasoning open (kept in content)"
STRAY_DSML = "stray DSML markup outside a function_calls block (kept as text)"


@pytest.mark.parametrize("text, mode, reasoning, content, warnings", [
    ("a<think>b</think>c", "thinking", "a<think>b", "c", [STRAY_THINK]),
    ("r</think>c<think>d", "thinking", "r", "c<think>d", [STRAY_THINK]),
    ("r</think>c</think>d", "thinking", "r", "c</think>d", [STRAY_THINK_END]),
    ("c</think>d", "chat", None, "c</think>d", [STRAY_THINK_END]),
    ("<think>c", "chat", None, "<think>c", [STRAY_THINK]),
    ('r<｜DSML｜invoke name="f">', "thinking", 'r<｜DSML｜invoke name="f">', "", [
        STRAY_DSML, "the reasoning was not closed with </think>"]),
    ("c</｜DSML｜function_calls> and <think>", "chat", None, "c</｜DSML｜function_calls> and <think>",
     [STRAY_DSML, STRAY_THINK]),
    ("c<think><think></think>", "chat", None, "c<think><think></think>", [STRAY_THINK, STRAY_THINK_END]),
    ("<｜begin▁of▁sentence｜>c", "chat", None, "<｜begin▁of▁sentence｜>c",
     ["stray <｜begin▁of▁sentence｜> in the output (kept as text)"]),
])
def test_stray_markup_stays_in_place_with_a_warning(text, mode, reasoning, content, warnings):
    msg = parse_completion(text + EOS, mode)
    assert (msg["reasoning_content"], msg["content"], msg["warnings"]) == (reasoning, content, warnings)


def test_stray_markup_after_the_calls_and_after_the_end():
    msg = parse_completion(block(invoke("f")) + "\n<think>x" + EOS + "</think>", "chat")
    assert msg["content"] == "\n<think>x</think>" and len(msg["tool_calls"]) == 1
    assert msg["warnings"] == ["text after the tool calls was kept in content", STRAY_THINK,
                               "text after the end of sentence was kept in content", STRAY_THINK_END]


def test_a_second_block_after_the_calls_is_stray_dsml():
    msg = parse_completion(block(invoke("f")) + block(invoke("g")) + EOS, "chat")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["f"]
    assert msg["content"] == block(invoke("g")) and STRAY_DSML in msg["warnings"]


def test_markup_inside_values_and_malformed_blocks_is_not_stray():
    ok = parse_completion(block(invoke("f", param("a", "<think></think><｜DSML｜x")), invoke("g")) + EOS, "chat")
    assert json.loads(ok["tool_calls"][0]["function"]["arguments"]) == {"a": "<think></think><｜DSML｜x"}
    assert ok["warnings"] == []
    bad = parse_completion("x" + block(invoke("f"))[:-3] + EOS, "chat")
    assert not any(w.startswith("stray") for w in bad["warnings"])


def test_without_tools_a_function_calls_block_is_content():
    text = "Let me check." + block(invoke("f", param("a", "1")))
    msg = parse_completion(text + EOS, "chat", tool_calls=False)
    assert msg["content"] == text and msg["tool_calls"] == []
    assert msg["warnings"] == [STRAY_DSML]
    thinking = parse_completion("hmm" + block(invoke("f")) + EOS, "thinking", tool_calls=False)
    assert thinking["reasoning_content"] == "hmm" + block(invoke("f")) and thinking["tool_calls"] == []


def test_deeply_nested_string_false_value_does_not_raise():
    deep = "[" * 100_000
    msg = parse_completion(block(invoke("f", param("a", deep, False))) + EOS, "chat")
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"a": deep}
    assert 'string="false" but is not JSON' in msg["warnings"][0]

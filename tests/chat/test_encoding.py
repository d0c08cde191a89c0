"""encode_messages: the official golden vector byte for byte, then each role, mode and section."""
import copy
import json
from pathlib import Path

import pytest

from dsv32.chat import encode_messages, generation_mode
from dsv32.chat.templates import TOOLS_SECTION

FIXTURES = Path(__file__).parent / "fixtures"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def call(name, arguments, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def golden_messages():
    data = json.loads((FIXTURES / "test_input.json").read_text(encoding="utf-8"))
    data["messages"][0]["tools"] = data["tools"]
    return data


def test_golden_vector_byte_for_byte():
    expected = (FIXTURES / "test_output.txt").read_bytes()
    # The file ends with a newline after the last end-of-sentence token; the prompt does not.
    assert expected.endswith(EOS.encode() + b"\n")
    prompt = encode_messages(golden_messages()["messages"], thinking_mode="thinking", drop_thinking=True)
    assert prompt.encode("utf-8") == expected[:-1]


def test_golden_vector_with_request_level_tools_and_no_mutation():
    data = golden_messages()
    messages = data["messages"]
    del messages[0]["tools"]
    before = copy.deepcopy(messages)
    prompt = encode_messages(messages, "thinking", tools=data["tools"])
    assert prompt == (FIXTURES / "test_output.txt").read_text(encoding="utf-8")[:-1]
    assert messages == before


def test_chat_mode_multi_turn():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "ignored"},
                {"role": "user", "content": "Bye"}]
    assert encode_messages(messages, "chat") == (
        f"{BOS}Be brief.{U}Hi{A}</think>Hello!{EOS}{U}Bye{A}</think>")


def test_thinking_mode_drops_old_reasoning_and_opens_think():
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
                {"role": "user", "content": "Bye"}]
    assert encode_messages(messages, "thinking") == f"{BOS}{U}Hi{A}</think>Hello!{EOS}{U}Bye{A}<think>"


def test_drop_thinking_off_still_leaves_out_earlier_reasoning():
    # The official encoder renders reasoning only after the last user message, whatever the flag.
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
                {"role": "user", "content": "Bye"}]
    assert encode_messages(messages, "thinking", drop_thinking=False) == (
        f"{BOS}{U}Hi{A}</think>Hello!{EOS}{U}Bye{A}<think>")


def test_golden_vector_with_drop_thinking_off():
    # No developer message in the vector: the flag changes nothing, earlier reasoning stays out.
    expected = (FIXTURES / "test_output.txt").read_text(encoding="utf-8")[:-1]
    messages = golden_messages()["messages"]
    assert any(m.get("reasoning_content") for m in messages[:messages.index(
        next(m for m in reversed(messages) if m["role"] == "user"))])
    assert encode_messages(messages, "thinking", drop_thinking=False) == expected


def test_drop_thinking_off_keeps_developer_messages_closed():
    messages = [{"role": "developer", "content": "D"},
                {"role": "assistant", "content": "ok", "reasoning_content": "r"},
                {"role": "user", "content": "q"}]
    assert encode_messages(messages, "thinking", drop_thinking=False) == (
        f"{BOS}{U}\n\n# The user's message is: D{A}</think>ok{EOS}{U}q{A}<think>")


def test_drop_thinking_off_in_a_tool_loop_of_an_earlier_turn():
    messages = [{"role": "user", "content": "q1"},
                {"role": "assistant", "reasoning_content": "r1", "tool_calls": [call("f", {}, "a")]},
                {"role": "tool", "tool_call_id": "a", "content": "x"},
                {"role": "assistant", "reasoning_content": "r2", "content": "done"},
                {"role": "user", "content": "q2"}]
    kept = encode_messages(messages, "thinking", drop_thinking=False)
    assert kept == encode_messages(messages, "thinking")
    assert "r1" not in kept and "r2" not in kept
    assert "</function_results>\n\n</think>done" in kept


@pytest.mark.parametrize("drop_thinking", [True, False])
def test_assistant_after_assistant_renders_no_unopened_think_end(drop_thinking):
    # The official encoder would write `r2</think>` right after the first answer's end of sentence.
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
                {"role": "assistant", "reasoning_content": "r2", "content": "a2"}]
    assert encode_messages(messages, "thinking", drop_thinking=drop_thinking) == (
        f"{BOS}{U}q{A}<think>r1</think>a1{EOS}a2{EOS}")


def test_system_message_inside_the_last_turn_keeps_the_reasoning_open():
    # As the official encoder: the system text lands after `<think>`; the reasoning still closes.
    messages = [{"role": "user", "content": "q"}, {"role": "system", "content": "S"},
                {"role": "assistant", "reasoning_content": "r", "content": "a"}]
    assert encode_messages(messages, "thinking") == f"{BOS}{U}q{A}<think>Sr</think>a{EOS}"
    prefix = messages[:2] + [{"role": "assistant", "reasoning_content": "r", "prefix": True}]
    assert encode_messages(prefix, "thinking").endswith(f"{A}<think>Sr")
    assert generation_mode(prefix, "thinking") == "thinking"


def test_assistant_without_any_user_turn_renders_no_reasoning():
    messages = [{"role": "system", "content": "S"},
                {"role": "assistant", "reasoning_content": "r", "content": "a"}]
    assert encode_messages(messages, "thinking") == f"{BOS}Sa{EOS}"


def test_no_bos():
    assert encode_messages([{"role": "user", "content": "x"}], "chat", add_bos=False) == f"{U}x{A}</think>"


def test_system_tools_and_response_format_sections():
    response_format = {"type": "json_object"}
    prompt = encode_messages([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
                             "chat", tools=[WEATHER_TOOL], response_format=response_format)
    schema = json.dumps(WEATHER_TOOL["function"])
    tools = TOOLS_SECTION.replace("{schemas}", schema)
    rf = ("## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
          '{"type": "json_object"}')
    assert prompt == f"{BOS}S\n\n{tools}\n\n{rf}{U}q{A}</think>"


def test_request_fields_without_system_message_add_an_empty_one():
    prompt = encode_messages([{"role": "user", "content": "q"}], "chat",
                             response_format={"type": "json_schema", "json_schema": {"name": "n"}})
    assert prompt.startswith(BOS + "\n\n## Response Format:\n\n")
    assert '{"type": "json_schema", "json_schema": {"name": "n"}}' + U in prompt


def test_response_format_text_is_not_rendered():
    plain = encode_messages([{"role": "user", "content": "q"}], "chat")
    assert encode_messages([{"role": "user", "content": "q"}], "chat", response_format={"type": "text"}) == plain


def test_developer_role():
    messages = [{"role": "developer", "content": "Answer in JSON", "tools": [WEATHER_TOOL]}]
    prompt = encode_messages(messages, "thinking")
    tools = TOOLS_SECTION.replace("{schemas}", json.dumps(WEATHER_TOOL["function"]))
    assert prompt == f"{BOS}{U}\n\n{tools}\n\n# The user's message is: Answer in JSON{A}<think>"


def test_developer_before_last_user_is_dropped_in_thinking_mode_only():
    messages = [{"role": "developer", "content": "D"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "q"}]
    assert encode_messages(messages, "thinking") == f"{BOS}ok{EOS}{U}q{A}<think>"
    assert encode_messages(messages, "chat") == (
        f"{BOS}{U}\n\n# The user's message is: D{A}</think>ok{EOS}{U}q{A}</think>")


def test_non_ascii_kept_verbatim():
    tool = {"type": "function", "function": {"name": "translate", "description": "翻译 → émoji 🤗"}}
    messages = [{"role": "system", "content": "Système"},
                {"role": "user", "content": "你好 🤗"},
                {"role": "assistant", "content": "",
                 "tool_calls": [call("translate", {"text": "日本語", "tags": ["ü", "ß"]})]}]
    prompt = encode_messages(messages, "chat", tools=[tool])
    assert '"description": "翻译 → émoji 🤗"' in prompt
    assert '<｜DSML｜parameter name="text" string="true">日本語</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="tags" string="false">["ü", "ß"]</｜DSML｜parameter>' in prompt
    assert f"{U}你好 🤗{A}" in prompt


def test_non_string_arguments_and_multiple_calls():
    calls = [call("f", json.dumps({"n": 3, "x": 1.5, "ok": True, "none": None, "obj": {"a": [1, 2]}}), "c1"),
             call("g", {}, "c2")]
    prompt = encode_messages([{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "Sure.", "tool_calls": calls}], "chat")
    p = '<｜DSML｜parameter name="{}" string="false">{}</｜DSML｜parameter>'
    block = "\n".join([
        "<｜DSML｜function_calls>",
        '<｜DSML｜invoke name="f">',
        p.format("n", "3"), p.format("x", "1.5"), p.format("ok", "true"), p.format("none", "null"),
        p.format("obj", '{"a": [1, 2]}'),
        "</｜DSML｜invoke>",
        '<｜DSML｜invoke name="g">',
        "",
        "</｜DSML｜invoke>",
        "</｜DSML｜function_calls>"])
    assert prompt == f"{BOS}{U}q{A}</think>Sure.\n\n{block}{EOS}"


def test_multi_turn_tool_loop_in_thinking_mode():
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "reasoning_content": "Need both.", "tool_calls": [
            call("get_weather", '{"city": "Paris"}', "a"), call("get_weather", '{"city": "Rome"}', "b")]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "assistant", "reasoning_content": "Got them.", "content": "Paris sunny, Rome rain."},
        {"role": "user", "content": "And Oslo?"},
        {"role": "assistant", "reasoning_content": "One more.", "tool_calls": [
            call("get_weather", '{"city": "Oslo"}', "c")]},
        {"role": "tool", "tool_call_id": "c", "content": "snow"},
    ]
    inv = ('<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">{}'
           '</｜DSML｜parameter>\n</｜DSML｜invoke>')
    calls_paris_rome = ("\n\n<｜DSML｜function_calls>\n" + inv.format("Paris") + "\n" + inv.format("Rome")
                        + "\n</｜DSML｜function_calls>")
    calls_oslo = "\n\n<｜DSML｜function_calls>\n" + inv.format("Oslo") + "\n</｜DSML｜function_calls>"
    expected = (
        f"{BOS}{U}Weather in Paris and Rome?{A}</think>{calls_paris_rome}{EOS}"
        "\n\n<function_results>\n<result>sunny</result>\n<result>rain</result>\n</function_results>"
        f"\n\n</think>Paris sunny, Rome rain.{EOS}"
        f"{U}And Oslo?{A}<think>One more.</think>{calls_oslo}{EOS}"
        "\n\n<function_results>\n<result>snow</result>\n</function_results>\n\n<think>")
    assert encode_messages(messages, "thinking") == expected
    assert generation_mode(messages, "thinking") == "thinking"
    chat = encode_messages(messages, "chat")
    assert chat.endswith("</function_results>\n\n</think>") and "One more." not in chat


def test_content_parts_are_joined():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert encode_messages(messages, "chat") == f"{BOS}{U}a\nb{A}</think>"


@pytest.mark.parametrize("before, expected_tail", [
    ([], ""), ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], f"a{EOS}"),
])
def test_prefix_reasoning_after_no_opener_stays_out(before, expected_tail):
    messages = before + [{"role": "assistant", "reasoning_content": "Let me", "prefix": True}]
    prompt = encode_messages(messages, "thinking")
    assert prompt.endswith(expected_tail) and "Let me" not in prompt and "</think>" not in prompt[-10:]
    assert generation_mode(messages, "thinking") == "chat"


@pytest.mark.parametrize("message, mode, expected_tail, expected_mode", [
    ({"role": "assistant", "content": "The answer is", "prefix": True}, "chat",
     f"{A}</think>The answer is", "chat"),
    ({"role": "assistant", "content": "The answer is", "prefix": True}, "thinking",
     f"{A}<think></think>The answer is", "chat"),
    ({"role": "assistant", "reasoning_content": "Let me", "prefix": True}, "thinking",
     f"{A}<think>Let me", "thinking"),
    ({"role": "assistant", "reasoning_content": "R", "content": "C", "prefix": True}, "thinking",
     f"{A}<think>R</think>C", "chat"),
])
def test_prefix_completion(message, mode, expected_tail, expected_mode):
    messages = [{"role": "user", "content": "q"}, message]
    prompt = encode_messages(messages, mode)
    assert prompt.endswith(expected_tail) and EOS not in prompt
    assert generation_mode(messages, mode) == expected_mode

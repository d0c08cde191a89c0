"""Message validation (dsv32/chat/messages.py): wrong types and text that UTF-8 cannot carry raise
ChatFormatError naming the field; unknown fields, an extra `name` on tool calls included, are ignored."""
import pytest

from dsv32.chat import ChatFormatError, encode_messages
from dsv32.chat.messages import check_unicode, has_lone_surrogate

USER = {"role": "user", "content": "q"}


def call(**kw):
    return {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}, **kw}


def answered(calls, call_id="c1"):
    return [USER, {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "r", "tool_call_id": call_id}]


DEEP = '{"a":' * 5000 + "{}" + "}" * 5000


@pytest.mark.parametrize("messages, message_part", [
    (answered(5), "messages[1].tool_calls: tool_calls must be a list"),
    (answered(True), "tool_calls must be a list"),
    (answered({"id": "c1"}), "tool_calls must be a list"),
    (answered([call()], call_id=["c1"]), "messages[2].tool_call_id must be a string"),
    (answered([call()], call_id={"id": "c1"}), "tool_call_id must be a string"),
    (answered([call(id=["c1"])]), "messages[1].tool_calls[0].id must be a string"),
    (answered([call(id={"x": 1})]), "tool_calls[0].id must be a string"),
    (answered([{"id": "c1", "type": "function", "function": {"name": 5}}]), "function.name"),
    (answered([{"id": "c1", "type": "function"}]), "missing the `function` object"),
    (answered([{"id": "c1", "type": "function", "function": "f"}]), "missing the `function` object"),
    (answered([call(function={"name": "f", "arguments": [1]})]), "must be a JSON object"),
    (answered(["f()"]), "a tool call must be"),
    (answered([call(function={"name": "f", "arguments": DEEP})]), "nested too deeply"),
    (answered([call(function={"name": "f", "arguments": '{"a": ' + "9" * 5000 + "}"})]), "not valid JSON"),
    ([{"role": "user", "content": "x", "name": 5}], "messages[0].name must be a string"),
    ([{"role": "user", "content": "a\ud800b"}], "messages[0].content: not valid Unicode"),
    ([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], "messages[0].content[0].text"),
    ([USER, {"role": "assistant", "content": "x", "reasoning_content": "\ud83d"}], "reasoning_content"),
    (answered([call(function={"name": "f\ud800", "arguments": "{}"})]), "not valid Unicode"),
    (answered([call(function={"name": "f", "arguments": '{"x": "\\ud800"}'})]), "function.arguments.x"),
    (answered([call(function={"name": "f", "arguments": {"x": ["\ud800"]}})]), "function.arguments.x[0]"),
    (answered([call()], call_id="c\ud800"), "tool_call_id"),
    ([{"role": "user", "content": "x", "extra": {"\ud800": 1}}], "(a key)"),
    ([{"role": "system", "content": "s", "tools": [
        {"type": "function", "function": {"name": "f", "description": "\ud800"}}]}, USER], "description"),
])
def test_invalid_messages(messages, message_part):
    with pytest.raises(ChatFormatError) as info:
        encode_messages(messages, "chat")
    assert message_part in str(info.value)
    str(info.value).encode("utf-8")     # the message itself is valid text


def test_request_level_tools_and_response_format_are_checked():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"\ud800": {}}}}}
    with pytest.raises(ChatFormatError, match="not valid Unicode"):
        encode_messages([USER], "chat", tools=[tool])
    with pytest.raises(ChatFormatError, match="not valid Unicode"):
        encode_messages([USER], "chat", response_format={"type": "json_schema", "json_schema": {"name": "\udc00"}})


def test_extra_fields_are_ignored():
    """Agent harnesses add a `name` to tool-call objects; unknown fields anywhere change nothing."""
    plain = encode_messages(answered([call()]), "chat")
    extra = answered([call(name="f", index=0)])
    extra[1]["audio"] = None
    extra[2]["name"] = "f"
    assert encode_messages(extra, "chat") == plain


def test_check_unicode_any_depth():
    deep: list = []
    node = deep
    for _ in range(100_000):      # far deeper than the recursion limit
        node.append([])
        node = node[0]
    node.append("\ud800")
    with pytest.raises(ChatFormatError):
        check_unicode(deep, "x")
    check_unicode({"k": ["é", "🤗", 1, None, 2.5]}, "x")
    assert has_lone_surrogate("a\udc80") and not has_lone_surrogate("ok é 🤗")

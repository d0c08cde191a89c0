"""StreamParser: any chunking gives parse_completion's result; arguments stream; no markup leaks."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.chat import (
    ContentDelta, Done, MessageBuilder, ReasoningDelta, StreamParser, ToolCallArguments, ToolCallStart,
    parse_completion,
)

from .strategies import assistant_messages, completion_text, completions, counter_ids

EOS = "<｜end▁of▁sentence｜>"


def stream(text, mode, cuts=()):
    parser = StreamParser(mode, counter_ids())
    bounds = [0, *sorted(set(cuts)), len(text)]
    events = []
    for start, end in zip(bounds, bounds[1:]):
        events += parser.feed(text[start:end])
    return events + parser.finish()


def build(events, mode):
    builder = MessageBuilder(mode)
    for event in events:
        builder.apply(event)
    return builder.message()


@settings(max_examples=200, deadline=None)
@given(completions().flatmap(lambda c: st.tuples(st.just(c), st.lists(st.integers(0, len(c[1])), max_size=12))))
def test_any_chunking_gives_parse_completion_result(case):
    (mode, text), cuts = case
    events = stream(text, mode, cuts)
    assert isinstance(events[-1], Done) and not any(isinstance(e, Done) for e in events[:-1])
    assert build(events, mode) == parse_completion(text, mode, counter_ids())
    for index, call in enumerate(build(events, mode)["tool_calls"]):
        fragments = "".join(e.text for e in events if isinstance(e, ToolCallArguments) and e.index == index)
        assert fragments == call["function"]["arguments"]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["thinking", "chat"]).flatmap(
    lambda m: st.tuples(st.just(m), assistant_messages(m == "thinking"))), st.data())
def test_well_formed_output_streams_in_order_without_markup(mode_and_message, data):
    mode, message = mode_and_message
    text = completion_text(message, mode)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=20))
    events = stream(text, mode, cuts)
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert content == message["content"] and reasoning == message.get("reasoning_content", "")
    kinds = [type(e) for e in events if not isinstance(e, Done)]
    last_reasoning = max((i for i, k in enumerate(kinds) if k is ReasoningDelta), default=-1)
    first_call = min((i for i, k in enumerate(kinds) if k is ToolCallStart), default=len(kinds))
    assert all(k is not ContentDelta for k in kinds[:max(last_reasoning, 0)])
    assert all(k in (ToolCallStart, ToolCallArguments) for k in kinds[first_call:])
    assert events[-1].finish_reason == ("tool_calls" if message["tool_calls"] else "stop")


def test_markup_prefix_is_held_back_only_as_long_as_needed():
    parser = StreamParser("chat", counter_ids())
    assert parser.feed("Hello\n\n<｜DS") == [ContentDelta("Hello")]
    assert parser.feed("X") == [ContentDelta("\n\n<｜DSX")]
    assert parser.feed("<｜DSML｜function_calls") == []
    events = parser.feed('>\n<｜DSML｜invoke name="f">\n')
    assert events == [ToolCallStart(0, "call_0", "f"), ToolCallArguments(0, "{")]


def test_arguments_stream_before_the_call_is_complete():
    parser = StreamParser("thinking", counter_ids())
    assert parser.feed("I should look.</think>") == [ReasoningDelta("I should look.")]
    events = parser.feed('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="search">\n'
                         '<｜DSML｜parameter name="query" string="true">deep "sea"')
    assert events == [ToolCallStart(0, "call_0", "search"), ToolCallArguments(0, "{"),
                      ToolCallArguments(0, '"query": "'), ToolCallArguments(0, 'deep \\"sea\\"')]
    assert parser.feed(" fish</｜DSML｜para") == [ToolCallArguments(0, " fish")]
    assert parser.feed('meter>\n<｜DSML｜parameter name="n" string="false">1') == [
        ToolCallArguments(0, '"'), ToolCallArguments(0, ', "n": ')]
    assert parser.feed('0</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>' + EOS) == [
        ToolCallArguments(0, "10"), ToolCallArguments(0, "}")]
    done = parser.finish()
    assert done == [Done("tool_calls", ())]


def test_one_character_at_a_time_matches_the_golden_answer():
    text = ('R</think>Hi 你好 🤗\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
            '<｜DSML｜parameter name="a" string="false">{"k": ["ü"]}</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜function_calls>' + EOS)
    msg = build(stream(text, "thinking", range(len(text))), "thinking")
    assert msg["content"] == "Hi 你好 🤗" and msg["reasoning_content"] == "R"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"a": {"k": ["ü"]}}


def test_stray_markup_split_across_deltas_is_reported_as_in_the_whole_text():
    text = ("a<think>b</think>c</think>d<｜DSML｜invoke x" + "\n\n<｜DSML｜function_calls>\n</｜DSML｜function_calls>"
            + "<｜begin▁of▁sentence｜>" + EOS + "<think>")
    whole = parse_completion(text, "thinking", counter_ids())
    assert [w.split(" (")[0] for w in whole["warnings"]] == [
        "stray <think> in the output", "stray </think> with no reasoning open",
        "stray DSML markup outside a function_calls block", "text after the tool calls was kept in content",
        "stray <｜begin▁of▁sentence｜> in the output", "text after the end of sentence was kept in content"]
    assert whole["content"].startswith("c</think>d<｜DSML｜invoke x")
    for cuts in ([i] for i in range(len(text))):
        assert build(stream(text, "thinking", cuts), "thinking") == whole
    assert build(stream(text, "thinking", range(len(text))), "thinking") == whole


def test_stray_markers_are_not_joined_across_markup():
    # "<thi" ends the content before the block, "nk>" begins the text after it: no <think> anywhere.
    text = "<thi\n\n<｜DSML｜function_calls>\n</｜DSML｜function_calls>nk>" + EOS
    for cuts in ([], range(len(text))):
        msg = build(stream(text, "chat", cuts), "chat")
        assert msg["content"] == "<think>" and msg["warnings"] == ["text after the tool calls was kept in content"]

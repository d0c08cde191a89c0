"""The completion parser never raises: random text made of markers, near-markers and deep nesting."""
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.chat import Done, MessageBuilder, StreamParser, parse_completion
from dsv32.chat.tokens import (
    BOS, CALLS_CLOSE, CALLS_OPEN, EOS, INVOKE_CLOSE, PARAM_CLOSE, THINK_END, THINK_START,
)

from .strategies import NEAR_MARKERS, counter_ids, plain_text

TAGS = [CALLS_OPEN, CALLS_CLOSE, '<｜DSML｜invoke name="f">', INVOKE_CLOSE, PARAM_CLOSE,
        '<｜DSML｜parameter name="a" string="false">', '<｜DSML｜parameter name="b" string="true">',
        THINK_START, THINK_END, EOS, BOS, "\n\n"]
deep = st.builds(lambda opener, depth: opener * depth, st.sampled_from(["[", "{\"a\": ", "[{\"b\": "]),
                 st.sampled_from([1, 2, 999, 3000, 100_000]) | st.integers(1, 5000))
pieces = st.one_of(plain_text, st.sampled_from(NEAR_MARKERS + TAGS), deep)
random_text = st.lists(pieces, max_size=20).map("".join)
# A well-formed call whose parts are replaced by random text, so that the fuzz reaches values.
SKELETON = ["r", THINK_END, "c", "\n\n", CALLS_OPEN, "\n", '<｜DSML｜invoke name="f">', "\n",
            '<｜DSML｜parameter name="a" string="false">', "[1]", PARAM_CLOSE, "\n", INVOKE_CLOSE, "\n",
            CALLS_CLOSE, EOS]
VALUE = SKELETON.index("[1]")
damaged_call = st.tuples(st.one_of(deep, random_text),
                         st.lists(st.tuples(st.integers(0, len(SKELETON) - 1), random_text), max_size=3)).map(
    lambda case: "".join({**dict(enumerate(SKELETON)), VALUE: case[0], **dict(case[1])}.values()))
fuzz_text = st.one_of(random_text, damaged_call)


@settings(max_examples=150, deadline=None)
@given(fuzz_text, st.sampled_from(["thinking", "chat"]), st.booleans(), st.data())
def test_any_text_parses_without_raising_and_streams_the_same(text, mode, tool_calls, data):
    whole = parse_completion(text, mode, counter_ids(), tool_calls=tool_calls)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=8))))
    parser = StreamParser(mode, counter_ids(), tool_calls=tool_calls)
    builder = MessageBuilder(mode)
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        events += parser.feed(text[start:end])
    events += parser.finish()
    for event in events:
        builder.apply(event)
    assert builder.message() == whole
    assert isinstance(events[-1], Done)
    if not tool_calls:
        assert whole["tool_calls"] == []

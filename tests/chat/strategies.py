"""Hypothesis strategies: assistant messages and the completion text the model would generate for them."""
import itertools
import json

from hypothesis import strategies as st

from dsv32.chat import encode_messages
from dsv32.chat.tokens import (
    ASSISTANT, BOS, CALLS_OPEN, DSML, EOS, PARAM_CLOSE, THINK_END, THINK_START, USER,
)

# Pieces that look like the start of a marker without being one, to tempt the parser.
NEAR_MARKERS = ["<", ">", "</", "</think", "<think", "<｜", "｜", "<｜DS", "<｜DSML", "｜DSML", "</｜DSML",
                "<｜end▁of", "<｜begin▁of", "\n", "\n\n", '"', "\\", "你好", "🤗", "é", "\u200d"]
# Markup inside a parameter value (a value ends only at its closing tag).
VALUE_MARKUP = ["<｜DSML｜", "<｜DSML｜function_calls", "</｜DSML｜parameter", THINK_START]
# Markers that reasoning and content cannot carry without a warning (or a different parse).
FORBIDDEN = (THINK_START, THINK_END, EOS, BOS, DSML, CALLS_OPEN)
FORBIDDEN_IN_VALUES = (EOS, CALLS_OPEN, PARAM_CLOSE)

plain_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
text = (st.lists(st.one_of(plain_text, st.sampled_from(NEAR_MARKERS)), max_size=6)
        .map("".join).filter(lambda s: not any(m in s for m in FORBIDDEN)))
value_text = (st.lists(st.one_of(plain_text, st.sampled_from(NEAR_MARKERS + VALUE_MARKUP)), max_size=6)
              .map("".join).filter(lambda s: not any(m in s for m in FORBIDDEN_IN_VALUES)))
names = st.text("abcxyzAZ_09.-", min_size=1, max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | value_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=4)
arguments = st.dictionaries(names, json_values, max_size=3)


@st.composite
def tool_calls(draw):
    calls = []
    for i, args in enumerate(draw(st.lists(arguments, max_size=2))):
        calls.append({"id": f"call_{i}", "type": "function",
                      "function": {"name": draw(names), "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


@st.composite
def assistant_messages(draw, thinking: bool):
    msg = {"role": "assistant", "content": draw(text), "tool_calls": draw(tool_calls())}
    if thinking:
        msg["reasoning_content"] = draw(text)
    return msg


# Message texts without the format's markers, for properties of the markup the encoder writes.
FORMAT_MARKERS = (THINK_START, THINK_END, EOS, USER, ASSISTANT)
prose = text.filter(lambda s: not any(m in s for m in FORMAT_MARKERS))
prose_calls = tool_calls().filter(
    lambda calls: not any(m in c["function"]["arguments"] for c in calls for m in FORMAT_MARKERS))


def conversations():
    """Any conversation the encoder accepts: roles in any order, tool results after each call; no two
    neighbouring contents that spell a marker where they meet (consecutive system messages are
    joined as they are, as in the official encoding: '</think' + '>')."""
    return _conversations().filter(lambda msgs: not _joins_a_marker(msgs))


def _joins_a_marker(msgs: list[dict]) -> bool:
    texts = [m.get("content") or "" for m in msgs]
    return any(m in a + b and m not in a and m not in b for a, b in zip(texts, texts[1:]) for m in FORMAT_MARKERS)


@st.composite
def _conversations(draw):
    msgs = []
    for role in draw(st.lists(st.sampled_from(["system", "developer", "user", "assistant"]),
                              min_size=1, max_size=7)):
        if role != "assistant":
            msgs.append({"role": role, "content": draw(prose) or role})
            continue
        msg = {"role": "assistant", "content": draw(st.none() | prose),
               "reasoning_content": draw(st.none() | prose), "tool_calls": draw(prose_calls)}
        msgs.append(msg)
        msgs += [{"role": "tool", "tool_call_id": c["id"], "content": draw(prose)} for c in msg["tool_calls"]]
    last = msgs[-1]
    if last["role"] == "assistant" and not last["tool_calls"] and draw(st.booleans()):
        last["prefix"] = True
    return msgs


def completion_text(message: dict, thinking_mode: str) -> str:
    """What the model generates for `message` after a one-question prompt (EOS included)."""
    question = [{"role": "user", "content": "q"}]
    prompt = encode_messages(question, thinking_mode)
    full = encode_messages(question + [message], thinking_mode)
    assert full.startswith(prompt)
    return full[len(prompt):]


@st.composite
def completions(draw):
    """(thinking_mode, text): well-formed completions, with or without EOS, and damaged ones."""
    mode = draw(st.sampled_from(["thinking", "chat"]))
    text_ = completion_text(draw(assistant_messages(mode == "thinking")), mode)
    damage = draw(st.sampled_from(["none", "strip_eos", "truncate", "insert", "delete"]))
    if damage == "strip_eos":
        text_ = text_.removesuffix(EOS)
    elif damage != "none":
        at = draw(st.integers(0, len(text_)))
        if damage == "truncate":
            text_ = text_[:at]
        elif damage == "insert":
            pieces = NEAR_MARKERS + VALUE_MARKUP + list(FORBIDDEN)
            text_ = text_[:at] + draw(st.one_of(plain_text, st.sampled_from(pieces))) + text_[at:]
        else:
            text_ = text_[:at] + text_[draw(st.integers(at, len(text_))):]
    return mode, text_


def counter_ids():
    """A deterministic make_id for parsers whose results are compared."""
    numbers = itertools.count()
    return lambda: f"call_{next(numbers)}"

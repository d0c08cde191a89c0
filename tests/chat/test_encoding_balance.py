"""Every prompt the encoder writes has balanced think markers, whatever the conversation and flags."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.chat import encode_messages, generation_mode
from dsv32.chat.tokens import ASSISTANT, EOS, THINK_END, THINK_START, USER

from .strategies import conversations

MARKERS = re.compile("|".join(re.escape(m) for m in (THINK_START, THINK_END, EOS, USER)))
# A `</think>` that opens nothing closes nothing: it marks an assistant step without thinking.
NO_THINKING_AFTER = (ASSISTANT, "</function_results>\n\n")


def ends_inside_reasoning(prompt: str) -> bool:
    """Check the think markers pair up; return whether the prompt's end is inside reasoning."""
    inside = False
    for match in MARKERS.finditer(prompt):
        marker = match.group()
        if marker == THINK_START:
            assert not inside, f"<think> inside reasoning at {match.start()}: {prompt!r}"
            inside = True
        elif marker == THINK_END and inside:
            inside = False
        elif marker == THINK_END:
            assert prompt[:match.start()].endswith(NO_THINKING_AFTER), (
                f"</think> closing nothing at {match.start()}: {prompt!r}")
        else:
            assert not inside, f"{marker} inside reasoning at {match.start()}: {prompt!r}"
    return inside


@pytest.mark.parametrize("prompt", [
    f"{USER}q{ASSISTANT}<think>r{EOS}", f"{USER}q{ASSISTANT}<think><think>",
    f"{USER}q{ASSISTANT}</think>a{EOS}r</think>", f"x</think>",
])
def test_the_checker_catches_unbalanced_markers(prompt):
    with pytest.raises(AssertionError):
        ends_inside_reasoning(prompt)


@settings(max_examples=200, deadline=None)
@given(conversations(), st.sampled_from(["thinking", "chat"]), st.booleans())
def test_every_prompt_has_balanced_think_markers(messages, mode, drop_thinking):
    prompt = encode_messages(messages, mode, drop_thinking=drop_thinking)
    inside = ends_inside_reasoning(prompt)
    last = messages[-1]
    if last["role"] in ("user", "developer", "tool") or last.get("prefix"):
        # the completion is parsed from where the prompt leaves off
        assert inside == (generation_mode(messages, mode) == "thinking")
    if mode == "chat":
        assert not inside


@settings(max_examples=100, deadline=None)
@given(conversations())
def test_drop_thinking_only_decides_about_earlier_developer_messages(messages):
    kept = encode_messages(messages, "thinking", drop_thinking=False)
    last_user = max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)
    without = [m for i, m in enumerate(messages) if m["role"] != "developer" or i >= last_user]
    assert encode_messages(messages, "thinking") == encode_messages(without, "thinking", drop_thinking=False)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i < last_user and m.get("reasoning_content"):
            # (with its opening marker: a reasoning of ">" alone is the end of "<｜Assistant｜>")
            assert THINK_START + m["reasoning_content"] + THINK_END not in kept

"""Parsing what the model generates after a V3.2 prompt: reasoning, content and DSML tool calls.

The text starts inside the reasoning in thinking mode (the prompt ended with `<think>`), inside the
content in chat mode. `<｜end▁of▁sentence｜>` ends the message wherever it appears; engines usually
strip it as a stop token, so it may also be missing. Text is released as soon as it can no longer
become part of a marker, tool-call arguments stream as JSON fragments while the call is generated
(a `string="false"` value waits for its closing tag so that it can be checked as JSON).
Malformed output never raises: what parses is kept, the raw text of what does not is added to the
content, and each problem is reported in `Done.warnings`. Special markup the official parser rejects
in reasoning or content (`<think>`, a `</think>` that closes no reasoning, DSML outside a
function_calls block, `<｜begin▁of▁sentence｜>`) stays where it is, with a warning. Given
`tool_calls=False` (no tools were offered), a function_calls block is no markup but such text.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from typing import Callable

from .encoding import check_thinking_mode
from .events import (
    ContentDelta, Done, Event, MessageBuilder, ReasoningDelta, ToolCallArguments, ToolCallStart,
)
from .tokens import (
    BOS, CALLS_CLOSE, CALLS_OPEN, CALLS_SEPARATOR, DSML, EOS, INVOKE_CLOSE, INVOKE_OPEN_HEAD, PARAM_CLOSE,
    PARAM_OPEN_HEAD, THINK_END, THINK_START,
)

CALLS_START = (CALLS_SEPARATOR + CALLS_OPEN, CALLS_OPEN)
INVOKE_OPEN = re.compile(f'<{DSML}invoke name="([^"<>]+)">')
PARAM_OPEN = re.compile(f'<{DSML}parameter name="([^"<>]+)" string="(true|false)">')
MAX_TAG_CHARS = 512
# Markup the official parser rejects in reasoning and content; here it stays text, with a warning.
STRAY_MARKUP = (
    (THINK_START, "stray <think> in the output (kept as text)"),
    (THINK_END, "stray </think> with no reasoning open (kept in content)"),
    (DSML, "stray DSML markup outside a function_calls block (kept as text)"),
    (BOS, f"stray {BOS} in the output (kept as text)"),
)
STRAY_WINDOW = max(len(marker) for marker, _ in STRAY_MARKUP) - 1

REASONING, CONTENT, CALLS, INVOKE, VALUE, AFTER_CALLS, RAW, ENDED = range(8)

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A fresh OpenAI-style tool call id, `call_` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def parse_completion(text: str, thinking_mode: str = "thinking",
                     make_id: Callable[[], str] = new_call_id, tool_calls: bool = True) -> dict:
    """Parse a whole completion into role, content, reasoning_content, tool_calls and warnings."""
    parser = StreamParser(thinking_mode, make_id, tool_calls)
    builder = MessageBuilder(thinking_mode)
    for event in parser.feed(text) + parser.finish():
        builder.apply(event)
    return builder.message()


def _split_at_marker(buf: str, markers: tuple[str, ...], final: bool) -> tuple[int, str | None]:
    """(position, marker) of the earliest marker in buf, or (end of the text safe to release, None)."""
    found, pos = None, len(buf)
    for marker in markers:
        at = buf.find(marker)
        if at != -1 and (at < pos or (at == pos and len(marker) > len(found))):
            found, pos = marker, at
    if found is not None or final:
        return pos, found
    longest = max(len(m) for m in markers)
    for start in range(max(0, len(buf) - longest + 1), len(buf)):
        tail = buf[start:]
        if any(m.startswith(tail) for m in markers):
            return start, None
    return len(buf), None


def _json_string_body(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class StreamParser:
    """Incremental completion parser: `feed` text deltas, then `finish`; both return events."""

    def __init__(self, thinking_mode: str = "thinking", make_id: Callable[[], str] = new_call_id,
                 tool_calls: bool = True):
        check_thinking_mode(thinking_mode)
        self._make_id = make_id
        self._calls_start = CALLS_START if tool_calls else ()
        self._state = REASONING if thinking_mode == "thinking" else CONTENT
        self._steps = {REASONING: self._reasoning, CONTENT: self._content, CALLS: self._calls_step,
                       INVOKE: self._invoke_step, VALUE: self._value_step, AFTER_CALLS: self._after_calls,
                       RAW: self._raw_text, ENDED: self._ended}
        self._buf = ""
        self._events: list[Event] = []
        self._warnings: list[str] = []
        self._raw: list[str] = []   # markup since the last complete call: content on failure
        self._calls = 0         # tool calls started
        self._call_name = ""
        self._call_open = False
        self._params: list[str] = []
        self._param_is_string = True
        self._value: list[str] = []  # a string="false" value, collected until its closing tag
        self._stray_text = False     # non-blank text came after the function_calls block
        self._window = ""            # the end of the text run scanned for stray markup

    def feed(self, text: str) -> list[Event]:
        """Consume a text delta; return the events it completes."""
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        """End of generation: flush what was held back and close with a Done event."""
        self._run(final=True)
        if self._state == REASONING:
            self._warnings.append("the reasoning was not closed with </think>")
        elif self._state in (CALLS, INVOKE, VALUE):
            self._fail("the tool call block is not terminated")
            self._run(final=True)
        finish_reason = "tool_calls" if self._calls else "stop"
        self._events.append(Done(finish_reason, tuple(self._warnings)))
        return self._take()

    def _goto(self, state: int) -> None:
        self._state = state
        self._window = ""

    def _scan(self, text: str) -> None:
        """Warn about stray markup in this text run, in the order the markers end."""
        window = self._window + text
        found = sorted((window.find(marker) + len(marker), warning) for marker, warning in STRAY_MARKUP
                       if marker in window)
        for _, warning in found:
            self._warn_once(warning)
        self._window = window[-STRAY_WINDOW:]

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _run(self, final: bool) -> None:
        while self._buf and self._steps[self._state](final):
            pass

    # -- plain text states ---------------------------------------------------------------------

    def _release(self, markers: tuple[str, ...], final: bool, emit: Callable[[str], None]) -> str | None:
        """Emit the text before the first marker (or the safe part of it); return the marker."""
        pos, marker = _split_at_marker(self._buf, markers, final)
        if pos:
            emit(self._buf[:pos])
        self._buf = self._buf[pos + len(marker):] if marker else self._buf[pos:]
        return marker

    def _warn_once(self, warning: str) -> None:
        if warning not in self._warnings:
            self._warnings.append(warning)

    def _emit_reasoning(self, text: str) -> None:
        self._scan(text)
        self._events.append(ReasoningDelta(text))

    def _emit_content(self, text: str) -> None:
        self._scan(text)
        self._events.append(ContentDelta(text))

    def _emit_raw(self, text: str) -> None:
        """Content that was meant as markup (a malformed block): reported already, not scanned."""
        self._events.append(ContentDelta(text))

    def _reasoning(self, final: bool) -> bool:
        marker = self._release((THINK_END, *self._calls_start, EOS), final, self._emit_reasoning)
        if marker == THINK_END:
            self._goto(CONTENT)
        elif marker == EOS:
            self._warnings.append("the reasoning was not closed with </think>")
            self._goto(ENDED)
        elif marker:
            self._warnings.append("tool calls began inside the reasoning, without </think>")
            self._start_calls(marker)
        return marker is not None

    def _content(self, final: bool) -> bool:
        marker = self._release((*self._calls_start, EOS), final, self._emit_content)
        if marker == EOS:
            self._goto(ENDED)
        elif marker:
            self._start_calls(marker)
        return marker is not None

    def _start_calls(self, marker: str) -> None:
        self._raw = [marker]
        self._goto(CALLS)

    def _after_calls(self, final: bool) -> bool:
        pos, marker = _split_at_marker(self._buf, (EOS,), final)
        text = self._buf[:pos]
        if not self._stray_text and not text.strip():
            if marker is None and not final:
                return False        # only whitespace so far: wait to see what follows
        elif text:
            self._warn_once("text after the tool calls was kept in content")
            self._stray_text = True
            self._emit_content(text)
        self._buf = self._buf[pos + len(marker):] if marker else self._buf[pos:]
        if marker:
            self._goto(ENDED)
        return marker is not None

    def _raw_text(self, final: bool) -> bool:
        marker = self._release((EOS,), final, self._emit_raw)
        if marker:
            self._goto(ENDED)
        return marker is not None

    def _ended(self, final: bool) -> bool:
        self._warn_once("text after the end of sentence was kept in content")
        self._emit_content(self._buf)
        self._buf = ""
        return False

    # -- DSML states -----------------------------------------------------------------------------

    def _fail(self, problem: str) -> None:
        """Give up on the markup: its raw text since the last complete call becomes content."""
        self._warnings.append(f"malformed tool call block ({problem}); its text was kept in content")
        if self._call_open:
            self._warnings.append(
                f"tool call {self._calls - 1} ({self._call_name}) is incomplete: its arguments are cut off")
            self._call_open = False
        raw = "".join(self._raw)
        if raw:
            self._emit_raw(raw)
        self._raw = []
        self._goto(RAW)

    def _tag(self, heads: tuple[str, ...], final: bool) -> str | None:
        """Skip whitespace, then return the next complete tag, None to wait, or "" when malformed."""
        stripped = self._buf.lstrip()
        self._raw.append(self._buf[:len(self._buf) - len(stripped)])
        self._buf = stripped
        if not stripped:
            return None
        end = stripped.find(">") + 1
        if end == 0 or end > MAX_TAG_CHARS:
            viable = any(stripped[:len(h)] == h[:len(stripped)] for h in heads)
            return None if viable and not final and len(stripped) <= MAX_TAG_CHARS else ""
        return stripped[:end]

    def _consume(self, tag: str) -> None:
        self._raw.append(tag)
        self._buf = self._buf[len(tag):]

    def _args(self, text: str) -> None:
        self._events.append(ToolCallArguments(self._calls - 1, text))

    def _calls_step(self, final: bool) -> bool:
        tag = self._tag((INVOKE_OPEN_HEAD, CALLS_CLOSE), final)
        if tag is None:
            return False
        if tag == CALLS_CLOSE:
            self._consume(tag)
            self._raw = []
            self._goto(AFTER_CALLS)
            return True
        match = INVOKE_OPEN.fullmatch(tag)
        if not match:
            self._fail("expected an invoke tag or the end of the block")
            return True
        self._consume(tag)
        self._call_name = match.group(1)
        self._call_open = True
        self._params = []
        self._events.append(ToolCallStart(self._calls, self._make_id(), self._call_name))
        self._calls += 1
        self._args("{")
        self._goto(INVOKE)
        return True

    def _invoke_step(self, final: bool) -> bool:
        tag = self._tag((PARAM_OPEN_HEAD, INVOKE_CLOSE), final)
        if tag is None:
            return False
        if tag == INVOKE_CLOSE:
            self._consume(tag)
            self._args("}")
            self._raw = []
            self._call_open = False
            self._goto(CALLS)
            return True
        match = PARAM_OPEN.fullmatch(tag)
        if not match:
            self._fail(f"bad parameter line in the call of {self._call_name}")
            return True
        self._consume(tag)
        name, self._param_is_string = match.group(1), match.group(2) == "true"
        if name in self._params:
            self._warnings.append(f"tool call {self._calls - 1} ({self._call_name}) repeats parameter {name!r}")
        separator = ", " if self._params else ""
        self._params.append(name)
        self._args(separator + json.dumps(name, ensure_ascii=False) + ": " + ('"' if self._param_is_string else ""))
        self._value = []
        self._goto(VALUE)
        return True

    def _value_step(self, final: bool) -> bool:
        pos, marker = _split_at_marker(self._buf, (PARAM_CLOSE, EOS), final)
        text = self._buf[:pos]
        self._raw.append(text)
        self._buf = self._buf[pos:]
        if self._param_is_string:
            if text:
                self._args(_json_string_body(text))
        else:
            self._value.append(text)
        if marker is None:
            return False
        if marker == EOS:
            self._fail(f"the end of sentence came inside the call of {self._call_name}")
            return True
        self._consume(marker)
        self._args('"' if self._param_is_string else self._json_value())
        self._goto(INVOKE)
        return True

    def _json_value(self) -> str:
        """The collected string="false" value if it is JSON, else the value as a JSON string."""
        value = "".join(self._value)
        try:
            json.loads(value, parse_constant=_reject_constant)
            return value.strip()
        except (ValueError, RecursionError):     # nested too deep for the decoder: not usable JSON
            self._warnings.append(f"parameter {self._params[-1]!r} of tool call {self._calls - 1} "
                                  f"({self._call_name}) is marked string=\"false\" but is not JSON; "
                                  "passed as a string")
            return json.dumps(value, ensure_ascii=False)

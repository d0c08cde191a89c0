"""Skill drills: short tool-less chat-mode turns that drill what tool arguments need (copying
text and numbers, dates as YYYY-MM-DD, numbers and worded calculations written in digits and
symbols, unit codes), in the train split's wording only."""
from __future__ import annotations

import random
from typing import Callable

from ..conversation import Conversation
from ..envs.dates import DATE_STYLES, write_date
from ..envs.numbers import format_number
from . import phrasings as P
from .drafts import date_in_split, operand, say_number, verbal

SKILL_FRAMES = {
    "echo": ("Repeat after me: {x}", "Say this back exactly: {x}", "Echo: {x}", "Copy this text: {x}",
             "{x} - repeat that", "Write {x} again"),
    "date": ("Write {x} as YYYY-MM-DD", "{x} in ISO format?", "ISO date for {x}", "Date {x} as YYYY-MM-DD"),
    "number": ("{x} in digits", "Write {x} as a number", "What number is {x}?"),
    "expression": ("Write {x} as an arithmetic expression", "Expression for {x}?", "{x} in symbols"),
    "unit": ("Unit code for {x}?", "Short code of the unit {x}", "{x} as a unit code"),
}


def _cased(rng: random.Random, word: str) -> str:
    """A word as users type it: mostly as given, sometimes all lower or upper case (a name typed
    "budapest" starts with other tokens than "Budapest")."""
    r = rng.random()
    return word.lower() if r < 0.25 else word.upper() if r < 0.3 else word


def skill_conversations(n: int, seed: int = 0, words: tuple[str, ...] = ()) -> list[Conversation]:
    """`n` short tool-less chat-mode turns (no system prompt) that drill the skills tool arguments
    need: copying text (`words`, e.g. place names, in any casing, mixed with numbers and codes),
    writing dates as YYYY-MM-DD, numbers in digits, worded arithmetic as expressions, unit names as
    codes. Dates, numbers and expressions come from the train split; `words` are echoed as given
    (sometimes all lower or upper case). No held-out phrasing appears here."""
    rng = random.Random(f"dsv32-skills|{seed}")
    pool = tuple(words) + P.CITIES["train"]

    def item() -> tuple[str, str, str]:
        kind = rng.choice(("echo", "echo", "date", "number", "expression", "unit"))
        return (kind, *_skill(rng, kind, pool))

    return _drill_conversations(n, rng, f"skill-{seed}", 1, item)


def _skill(rng: random.Random, kind: str, pool: tuple[str, ...]) -> tuple[str, str]:
    """(what the user writes, the answer) of one drill of `kind`."""
    if kind == "echo":
        items = [_cased(rng, rng.choice(pool)) if rng.random() < 0.7
                 else say_number(rng, operand(rng), 0.0) for _ in range(rng.randint(1, 3))]
        return " ".join(items), " ".join(items)
    if kind == "date":
        day = date_in_split(rng, "train")
        return write_date(day, rng.choice(DATE_STYLES)), day.isoformat()
    if kind == "number":
        value = rng.randint(-100, 100) if rng.random() < 0.7 else rng.randint(100, 5000)
        return say_number(rng, value, words=0.8), format_number(value)
    if kind == "expression":
        _, _, phrase, expression, _ = verbal(rng, "train")
        return phrase, expression
    unit = rng.choice(tuple(P.UNIT_WORDS))
    return rng.choice(P.UNIT_WORDS[unit][rng.randint(0, 1)]), unit


def drill_number(rng: random.Random) -> str:
    """A number as tools print them, with digits drawn uniformly: 1-7 integer digits, sometimes up
    to 6 decimals (the last one non-zero) or a minus sign, so every 3-digit token comes up."""
    digits = rng.choice((1, 2, 3, 3, 4, 5, 6, 7))
    text = str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1))
    if rng.random() < 0.4:
        text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 5)))
        text += rng.choice("123456789")
    return ("-" if rng.random() < 0.1 else "") + text


def number_conversations(n: int, seed: int = 0, turns: int = 6) -> list[Conversation]:
    """`n` tool-less chat-mode conversations of `turns` echoes of 1-3 numbers ("Echo: 4905
    0.145" -> "4905 0.145"). A 3-digit token such as `905` is otherwise written only a few dozen
    times in the whole SFT data, too rarely for a small model to copy it reliably; tool arguments
    and answers that quote a result are such copies."""
    rng = random.Random(f"dsv32-numbers|{seed}")
    return _echo_conversations(n, rng, f"numbers-{seed}", turns,
                               lambda: " ".join(drill_number(rng) for _ in range(rng.randint(1, 3))))


def conversion_conversations(n: int, seed: int = 0, turns: int = 6) -> list[Conversation]:
    """`n` tool-less chat-mode conversations of `turns` conversions, each a number in words
    ("sixty-two" -> "62") or a worded calculation ("the sum of 12 and 7" -> "12 + 7"), as in the
    drills of `skill_conversations` but six to a conversation: a calculator argument is such a
    conversion, and slips in it (a wrong digit, a dropped operand) were the bundled model's most
    common calculator failure (docs/training.md)."""
    rng = random.Random(f"dsv32-conversions|{seed}")

    def item() -> tuple[str, str, str]:
        if rng.random() < 0.5:
            value = rng.randint(-100, 100) if rng.random() < 0.8 else rng.randint(100, 5000)
            return "number", say_number(rng, value, words=1.0), format_number(value)
        _, _, phrase, expression, _ = verbal(rng, "train")
        return "expression", phrase, expression

    return _drill_conversations(n, rng, f"conversions-{seed}", turns, item)


def _echo_conversations(n: int, rng: random.Random, prefix: str, turns: int,
                        item: Callable[[], str]) -> list[Conversation]:
    """`n` tool-less chat-mode conversations of `turns` echo turns: `item()` in an echo frame
    (sometimes lower-cased), answered by `item()` itself."""
    def echo() -> tuple[str, str, str]:
        x = item()
        return "echo", x, x
    return _drill_conversations(n, rng, prefix, turns, echo)


def _drill_conversations(n: int, rng: random.Random, prefix: str, turns: int,
                         item: Callable[[], tuple[str, str, str]]) -> list[Conversation]:
    """`n` tool-less chat-mode conversations of `turns` drill turns; `item()` gives (kind, x,
    answer), x goes into a frame of that kind (sometimes lower-cased, x too unless it is echoed)."""
    def turn() -> tuple[str, str]:
        kind, x, answer = item()
        frame = rng.choice(SKILL_FRAMES[kind])
        if rng.random() < 0.3:
            frame, x = frame.lower(), x if kind == "echo" else x.lower()
        return frame.format(x=x), answer

    return [Conversation.drill(f"{prefix}-{i}", [turn() for _ in range(turns)]) for i in range(n)]

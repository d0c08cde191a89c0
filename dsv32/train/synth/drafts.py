"""Tasks as users ask them: the user's text of a calculation, a weather question, a unit
conversion or plain chat, drawn from the phrasing tables, and what answers it (a tool call and the
slots its reference answer quotes, or a plain answer). Every draw comes from the caller's seeded
`random.Random`, so a task depends on its seed alone.
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

from ..envs.dates import DATE_STYLES, write_date
from ..envs.numbers import format_number, number_words
from ..envs.registry import execute_tool_call
from ..envs.units import DIMENSION, DISPLAY, convert, round_result
from . import phrasings as P
from . import replies as R

FIRST_DAY, LAST_DAY = dt.date(2024, 1, 1), dt.date(2026, 12, 31)


@dataclass
class Draft:
    """A task before its trajectory is rendered: the user text and what answers it."""

    kind: str
    frame: str
    user: str
    call: tuple[str, dict] | None = None
    slots: dict = field(default_factory=dict)
    answer: str = ""
    reasoning: str = ""
    expected: tuple[str, ...] = ()


# -- writing like users ----------------------------------------------------------------------------

def say_number(rng: random.Random, value: int | float, words: float = 0.35) -> str:
    """Digits, words ("twelve", "minus four") or thousands separators, at random."""
    if isinstance(value, int) and -100 <= value <= 100 and rng.random() < words:
        return number_words(value)
    if isinstance(value, int) and value < 0 and rng.random() < 0.3:
        return "minus " + str(-value)
    if isinstance(value, int) and value >= 1000 and rng.random() < 0.5:
        return f"{value:,}"
    return format_number(value)


def _dress(rng: random.Random, core: str, fillers: bool = True, command: bool = False,
           dress: bool = True) -> str:
    """Opener, closer, punctuation and casing around a phrasing; `dress` False leaves the phrasing
    as it is (a part of a longer request, dressed as a whole) and draws nothing."""
    if not dress:
        return core
    end = core[-1] if core[-1] in "?." else ""
    body = core[:-1] if end else core
    if end and rng.random() < 0.3:
        end = ""
    elif not end and rng.random() < 0.2 and not body.endswith("="):
        end = "." if command else "?"
    opener, closer = "", ""
    if fillers:
        opener = rng.choice(P.OPENERS_FOR_COMMANDS if command else P.OPENERS)
        closer = rng.choice(P.CLOSERS)
    if body.endswith("="):
        closer = ""
    text = opener + body + end + closer
    roll = rng.random()
    if roll < 0.5:
        return text[:1].upper() + text[1:]
    if roll < 0.8:
        return text.lower()
    if roll < 0.96:
        return text
    return text.upper()


def operand(rng: random.Random) -> int | float:
    roll = rng.random()
    if roll < 0.4:
        return rng.randint(1, 20)
    if roll < 0.75:
        return rng.randint(2, 100)
    if roll < 0.9:
        return rng.randint(100, 1000)
    return rng.randint(1, 200) / 10 if rng.random() < 0.5 else rng.randint(1, 40) / 2


def _nice_result(expression: str) -> bool:
    result = execute_tool_call("calculator", {"expression": expression})
    if result.startswith("Error") or "e" in result:
        return False
    return abs(float(result)) < 1e9 and len(result.partition(".")[2]) <= 4


# -- calculator ------------------------------------------------------------------------------------

SHAPES = ("A o B", "A o B", "A o B o C", "( A o B ) o C", "A o ( B o C )", "A ** K", "( A o B ) ** K")


def _symbolic(rng: random.Random) -> tuple[str, str]:
    """(what the user writes, canonical expression), e.g. ("(3+4)x2", "(3 + 4) * 2")."""
    tokens = []
    for part in rng.choice(SHAPES).split():
        if part in ("A", "B", "C"):
            tokens.append(("num", operand(rng)))
        elif part == "K":
            tokens.append(("num", rng.randint(2, 3)))
        elif part == "o":
            tokens.append(("op", rng.choice("+-*/")))
        else:
            tokens.append(("op", "**") if part == "**" else (part, part))
    symbols = {op: rng.choice(choices) for op, choices in P.SYMBOLS.items()}
    spacing = rng.choice(("tight", "spaced", "spaced", "mixed"))
    canonical, written = [], []
    for kind, value in tokens:
        if kind == "num":
            canonical.append(format_number(value))
            written.append(format_number(value))
        elif kind == "op":
            canonical.append(f" {value} ")
            space = spacing == "spaced" or (spacing == "mixed" and rng.random() < 0.5)
            written.append(f" {symbols[value]} " if space else symbols[value])
        else:
            canonical.append(value)
            written.append(value)
    return "".join(written), "".join(canonical)


def verbal(rng: random.Random, split: str) -> tuple[str, str, str, str, bool]:
    """(kind, frame, phrase, canonical expression, is a command) of a worded calculation."""
    roll = rng.random()
    a, b, c = operand(rng), operand(rng), rng.randint(2, 12)
    say = lambda v: say_number(rng, v)     # noqa: E731
    if roll < 0.45:
        op = rng.choice(tuple(P.BINARY_WORDS))
        if op == "**":
            a, b = rng.randint(2, 12), rng.randint(2, 4)
        pattern, canonical = rng.choice(P.BINARY_WORDS[op])
        kind, frames, values = "verbal", P.CALC_FRAMES, {"a": a, "b": b}
    elif roll < 0.65:
        pattern, canonical = rng.choice(P.IMPERATIVE_WORDS[rng.choice(tuple(P.IMPERATIVE_WORDS))])
        kind, frames, values = "imperative", P.IMPERATIVE_FRAMES, {"a": a, "b": b}
    elif roll < 0.85:
        unary = rng.choice(tuple(P.UNARY_WORDS))
        a = {"square": rng.randint(2, 30), "cube": rng.randint(2, 12), "root": rng.randint(2, 30) ** 2,
             "percent": rng.randint(1, 100) * 10, "half": rng.randint(1, 500)}[unary]
        pattern, canonical = rng.choice(P.UNARY_WORDS[unary])
        kind, frames, values = "verbal", P.CALC_FRAMES, {"a": a, "p": rng.choice((5, 10, 15, 20, 25, 50, 75))}
    else:
        pattern, canonical = rng.choice(P.COMPOUND_WORDS)
        imperative = pattern.startswith("add")
        frames = P.IMPERATIVE_FRAMES if imperative else P.CALC_FRAMES
        kind, values = "compound", {"a": a, "b": b, "c": c}
    phrase = pattern.format(**{k: say(v) for k, v in values.items()})
    expression = canonical.format(**{k: format_number(v) for k, v in values.items()})
    return kind, rng.choice(frames[split]), phrase, expression, frames is P.IMPERATIVE_FRAMES


def _draft_calculator(rng: random.Random, split: str, dress: bool = True) -> Draft:
    for _ in range(100):
        if rng.random() < 0.45:
            phrase, expression = _symbolic(rng)
            kind, frame, command = "symbolic", rng.choice(P.CALC_FRAMES[split]), False
        else:
            kind, frame, phrase, expression, command = verbal(rng, split)
        if _nice_result(expression):
            user = _dress(rng, frame.format(expr=phrase, imp=phrase), command=command, dress=dress)
            return Draft(kind, frame, user, ("calculator", {"expression": expression}),
                          {"expression": expression})
    raise RuntimeError("no calculation with a short result found")


# -- weather ---------------------------------------------------------------------------------------

def date_in_split(rng: random.Random, split: str) -> dt.date:
    span = (LAST_DAY - FIRST_DAY).days
    while True:
        day = FIRST_DAY + dt.timedelta(days=rng.randint(0, span))
        if P.date_split(day.isoformat()) == split:
            return day


def _draft_weather(rng: random.Random, split: str, unseen_cities: bool = False, dress: bool = True) -> Draft:
    city = rng.choice(P.CITIES["unseen" if unseen_cities else "train"])
    day = date_in_split(rng, split)
    written = write_date(day, rng.choice(DATE_STYLES))
    frame = rng.choice(P.WEATHER_FRAMES[split])
    user = _dress(rng, frame.format(city=city, date=written), dress=dress)
    # The call names the city as the forecast does ("Istanbul" for "istanbul", "ISTANBUL"): one
    # spelling per city to learn, where copying the user's casing needed four (the tool folds case).
    return Draft("weather", frame, user, ("get_weather", {"city": city, "date": day.isoformat()}),
                  {"city": city, "date": day.isoformat()})


# -- units -----------------------------------------------------------------------------------------

def _unit_value(rng: random.Random, dimension: str) -> int | float:
    if dimension == "temperature":
        return rng.randint(-30, 110) if rng.random() < 0.85 else rng.randint(-300, 1100) / 10
    roll = rng.random()
    if roll < 0.6:
        return rng.randint(1, 500)
    if roll < 0.85:
        return rng.randint(1, 1000) / 10 if rng.random() < 0.6 else rng.randint(1, 100) / 4
    return rng.randint(1000, 5000)


def _draft_units(rng: random.Random, split: str, dress: bool = True) -> Draft:
    dimensions = ("length", "length", "mass", "temperature", "volume")
    while True:
        dimension = rng.choice(dimensions)
        from_unit, to_unit = rng.sample([u for u in P.UNIT_WORDS if DIMENSION[u] == dimension], 2)
        value = _unit_value(rng, dimension)
        result = round_result(convert(value, from_unit, to_unit))
        if abs(result) >= 0.01 or result == 0:
            break
    singular, plural = P.UNIT_WORDS[from_unit]
    from_word = rng.choice(singular if value == 1 else plural)
    to_word = rng.choice(P.TARGET_UNIT_WORDS[to_unit])
    frame = rng.choice(P.UNITS_FRAMES[split])
    core = frame.format(value=say_number(rng, value, words=0.25), **{"from": from_word, "to": to_word})
    arguments = {"value": value, "from_unit": from_unit, "to_unit": to_unit}
    slots = {"value": format_number(value), "from_unit": from_unit, "to_unit": to_unit,
             "from": DISPLAY[from_unit], "to": DISPLAY[to_unit]}
    return Draft("units", frame, _dress(rng, core, dress=dress), ("convert_units", arguments), slots)


# -- plain chat ------------------------------------------------------------------------------------

def _draft_chat(rng: random.Random, split: str, dress: bool = True) -> Draft:
    roll = rng.random()
    column = 0 if split == "train" else 1
    if roll < 0.35:
        kind = rng.choice(tuple(P.SMALL_TALK))
        table = P.SMALL_TALK[kind]
        utterance = rng.choice(table[column])
        user = _dress(rng, utterance, fillers=False, dress=dress)
        answer = rng.choice(table[2])
        return Draft(kind, utterance, user, answer=answer, reasoning=R.REASON_PLAIN[kind], expected=table[3],
                      slots={"reply": answer})
    if roll < 0.6:
        country, capital = rng.choice(R.CAPITALS)
        frame = rng.choice(P.CAPITAL_FRAMES[split])
        return Draft("capital", frame, _dress(rng, frame.format(country=country), dress=dress),
                      answer=R.CAPITAL_ANSWER.format(country=country, capital=capital),
                      reasoning=R.REASON_PLAIN["capital"].format(country=country), expected=(capital,),
                      slots={"country": country, "capital": capital})
    if roll < 0.8:
        questions = rng.choice(P.FACTS)
        question = rng.choice(questions[column])
        return Draft("fact", question, _dress(rng, question, dress=dress), answer=questions[2],
                      reasoning=R.REASON_PLAIN["fact"], expected=(questions[3],), slots={"answer": questions[2]})
    term, a_term, definition, expected = rng.choice(R.TERMS)
    frame = rng.choice(P.DEFINITION_FRAMES[split])
    return Draft("definition", frame, _dress(rng, frame.format(term=term, a_term=a_term), dress=dress),
                  answer=definition, reasoning=R.REASON_PLAIN["definition"].format(term=term),
                  expected=(expected,), slots={"term": term, "definition": definition})


DRAFTERS = {"calculator": _draft_calculator, "weather": _draft_weather, "units": _draft_units,
            "chat": _draft_chat}


def draft(rng: random.Random, category: str, split: str, unseen_cities: bool = False,
          dress: bool = True) -> Draft:
    """A task of `category` as a user in `split` asks it; `unseen_cities` (weather) asks about
    the cities no tool conversation names; `dress` False leaves out openers, closers and casing
    (a part of a longer request)."""
    if category == "weather":
        return _draft_weather(rng, split, unseen_cities, dress)
    return DRAFTERS[category](rng, split, dress)

"""Sentence frames as regular expressions, for tests that wording is not shared between training
and evaluation.

A sentence frame is the wording around a task's slots (a city, a date, an expression, a value and
its units, a country, a term, a list of cities) or a fixed utterance (small talk, a plain question,
a request for JSON). A text shares one with a set of frames when one of its clauses (the whole text,
or a part between punctuation, " - ", "and", "also", "then", "plus" or "first") is one of the frames with its
slots filled, in any casing, with an apostrophe dropped or other punctuation, with or without the
generator's openers, closers and request for JSON. Frames with no words (a bare expression) carry
no wording and count only with such a request after them.
"""
import re

from dsv32.train.corpus import tz_cities
from dsv32.train.envs.numbers import ONES, TENS
from dsv32.train.synth import phrasings as P
from dsv32.train.synth.json_answers import JSON_PHRASES
from dsv32.train.synth.replies import CAPITALS, TERMS
from dsv32.train.synth.requests import CITIES_FRAMES, JOINERS

SEP = r"[\s?!.,:;\-–—]*"
NUMBER_WORDS = set(ONES) | set(TENS[2:]) | {"hundred", "thousand", "and", "minus"}
TABLES = ("WEATHER_FRAMES", "CALC_FRAMES", "IMPERATIVE_FRAMES", "UNITS_FRAMES", "CAPITAL_FRAMES",
          "DEFINITION_FRAMES")
BOUNDARY = re.compile(r"[,.](?=\s|$)\s*|[;:?!]\s*|\s-\s|\b(?:and|also|then|plus|first)\b\s*", re.IGNORECASE)


def _alt(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


def slots() -> dict[str, str]:
    """What each slot of a frame can be filled with."""
    operators = {w.casefold() for w in P._words([P.BINARY_WORDS, P.IMPERATIVE_WORDS, P.UNARY_WORDS,
                                                 P.COMPOUND_WORDS])} | NUMBER_WORDS | {"then"}
    words = r"\b" + _alt(operators) + r"\b"
    expr = (rf"(?:[(\s-]|{words})*(?:\d|\b{_alt(NUMBER_WORDS - {'and'})}\b)"
            rf"(?:[\d.,()*/+^×÷x%=\s-]|{words})*")
    number = r"(?:minus\s+)?-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
    unit = _alt(w for singular, plural in P.UNIT_WORDS.values() for w in singular + plural)
    term = _alt([t[0] for t in TERMS] + [t[1] for t in TERMS])
    months = r"[a-z]{3,9}\.?"
    city = _alt(set(P.CITIES["train"]) | set(P.CITIES["unseen"]) | set(tz_cities()))
    return {
        "city": city, "cities": rf"{city}(?:\s*,\s*{city})*\s*,?\s*and\s+{city}",
        "date": (rf"(?:\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|(?:the\s+)?\d{{1,2}}(?:st|nd|rd|th)?\s+"
                 rf"(?:of\s+)?{months},?\s+\d{{4}}|{months}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"),
        "expr": expr, "imp": expr, "from": unit, "to": unit, "term": term, "a_term": term,
        "value": rf"(?:(?=[-.\d]|minus){number}|(?:minus\s+)?(?:{_alt(NUMBER_WORDS)}[\s-]*)+)",
        "country": _alt(c for c, _ in CAPITALS),
    }


def _literal(text: str) -> str:
    pieces = re.split(r"([\s?!.,:;\-–—]+)", text)
    return "".join(SEP if re.fullmatch(r"[\s?!.,:;\-–—]+", p) else
                   "".join("'?" if c in "'’" else re.escape(c) for c in p) for p in pieces if p)


def frame_regex(frame: str, fills: dict[str, str]) -> str:
    parts = re.split(r"\{(\w+)\}", frame)
    return "".join(_literal(p) if i % 2 == 0 else fills[p] for i, p in enumerate(parts))


def has_words(frame: str) -> bool:
    return re.search(r"[A-Za-z]", re.sub(r"\{\w+\}", "", frame)) is not None


def frames(split: str = "train") -> list[str]:
    """Every sentence frame and fixed utterance of `split` that a user turn can hold (the training
    ones also: several cities on one date, the joiners' own wording)."""
    column = 0 if split == "train" else 1
    out = [f for name in TABLES for f in getattr(P, name)[split]]
    out += [u for talk in P.SMALL_TALK.values() for u in talk[column]]
    out += [q for fact in P.FACTS for q in fact[column]]
    if split == "train":
        out += list(CITIES_FRAMES)
        pieces = {p.strip(" ,.;:?") for joiner in JOINERS.values() for j in joiner for p in re.split(r"\{\w\}", j)}
        out += [p for p in pieces if re.search(r"[a-z]", re.sub(r"\b(?:and|also|then|plus|first)\b", "", p))]
    return out


def frames_regex(split: str = "train") -> re.Pattern:
    """One pattern that a clause matches when it is a frame of `split`, dressed."""
    fills = slots()
    phrases = "(?:" + "|".join(_literal(p) for p in JSON_PHRASES) + ")" if split == "train" else "(?!)"
    worded = [frame_regex(f, fills) for f in frames(split) if has_words(f)]
    bare = [frame_regex(f, fills) for f in frames(split) if not has_words(f)]
    body = [f"(?:{'|'.join(worded)})(?:{SEP}{phrases})?", phrases]
    if bare and split == "train":
        body.append(f"(?:{'|'.join(bare)}){SEP}{phrases}")
    dress = lambda texts: "(?:" + "|".join(_literal(t) for t in texts if t) + ")?"  # noqa: E731
    return re.compile(SEP + dress(P.OPENERS + P.OPENERS_FOR_COMMANDS) + f"(?:{'|'.join(body)})"
                      + dress(P.CLOSERS) + SEP, re.IGNORECASE)


def clauses(text: str) -> set[str]:
    """The whole text and every part of it between clause boundaries (with a letter in it)."""
    marks = [m.span() for m in BOUNDARY.finditer(text)]
    starts = {0} | {p for span in marks for p in span}
    ends = {len(text)} | {p for span in marks for p in span}
    return {text[i:j] for i in starts for j in ends if i < j and re.search("[A-Za-z]", text[i:j])}


def shared(text: str, pattern: re.Pattern) -> list[str]:
    """The clauses of `text` that are frames of `pattern`."""
    return sorted(c for c in clauses(text) if pattern.fullmatch(c))

"""Agentic task synthesis in miniature: seeded tasks for the three tools and plain chat, with
reference trajectories (SFT data) and verifiers (GRPO rewards).

A task is a prompt (a system message carrying the tool specs, an optional earlier finished
exchange, a user turn), the reference trajectory that follows it (thinking mode: reasoning + DSML
call, the tool result, reasoning + an answer quoting the result; chat mode: the same without
reasoning; plain chat: one answer, no call) and what the verifier checks. User phrasings vary a lot;
the assistant side uses a few short templates. Train and held-out splits use disjoint sentence
frames and entity values (see `dsv32.train.envs.phrasings`). Generation is deterministic: task i of
a (seed, split) depends on nothing else, so `generate_tasks(n, s)[:k] == generate_tasks(k, s)`.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import re
import string
from dataclasses import asdict, dataclass, field
from typing import Callable

from dsv32.chat import encode_messages

from .envs import phrasings as P
from .envs.dates import DATE_STYLES, write_date
from .envs.numbers import format_number, number_words
from .envs.registry import execute_tool_call, tool_specs
from .envs.units import DIMENSION, DISPLAY, convert, round_result
from .envs.verify import reward, score_answer, score_call, score_plain

CATEGORIES = ("calculator", "weather", "units", "chat")
MODES = ("thinking", "chat")
CATEGORY_TOOL = {"calculator": "calculator", "weather": "get_weather", "units": "convert_units"}
FIRST_DAY, LAST_DAY = dt.date(2024, 1, 1), dt.date(2026, 12, 31)

__all__ = ["CATEGORIES", "MODES", "Task", "answer_stage", "completion_text", "generate_tasks",
           "reference_completions", "reward", "score_answer", "score_call", "score_plain",
           "sft_conversations", "skill_conversations"]


@dataclass
class Task:
    """One synthesised task: prompt messages, reference trajectory, and what the verifier checks."""

    id: str
    category: str                 # "calculator" | "weather" | "units" | "chat"
    kind: str                     # finer kind: "symbolic", "verbal", "capital", "greeting", ...
    frame: str                    # the sentence frame (or fixed utterance) of the user turn
    thinking_mode: str            # "thinking" | "chat"
    split: str                    # "train" | "heldout"
    messages: list[dict]          # the prompt; messages[0] is the system message with the tools
    reference: list[dict]         # the reference assistant/tool messages that follow the prompt
    reference_calls: list[dict] = field(default_factory=list)   # [{"name", "arguments": dict}]
    results: list[str] = field(default_factory=list)            # the reference calls' results
    expected: list[str] = field(default_factory=list)           # plain chat: one must be in the answer
    stage: str = "call"           # "call", or "answer" when the prompt ends with the tool results

    @property
    def tools(self) -> list[dict] | None:
        """The tool specs the system message offers (None for a tool-less plain chat)."""
        head = self.messages[0]
        return head.get("tools") if head["role"] == "system" else None

    def verify(self, completion_messages: list[dict]) -> float:
        """The GRPO reward of a completion (see `dsv32.train.envs.verify.reward`)."""
        return reward(self, completion_messages)

    def conversation(self) -> dict:
        """The full SFT conversation: messages (prompt + reference), tools, thinking_mode."""
        return {"id": self.id, "category": self.category, "thinking_mode": self.thinking_mode,
                "messages": _copy(self.messages + self.reference), "tools": self.tools}

    def to_dict(self) -> dict:
        """Plain JSON-serialisable data."""
        return _copy(asdict(self))


def _copy(value):
    return json.loads(json.dumps(value, ensure_ascii=False))


@dataclass
class _Draft:
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

def _say_number(rng: random.Random, value: int | float, words: float = 0.35) -> str:
    """Digits, words ("twelve", "minus four") or thousands separators, at random."""
    if isinstance(value, int) and -100 <= value <= 100 and rng.random() < words:
        return number_words(value)
    if isinstance(value, int) and value < 0 and rng.random() < 0.3:
        return "minus " + str(-value)
    if isinstance(value, int) and value >= 1000 and rng.random() < 0.5:
        return f"{value:,}"
    return format_number(value)


def _dress(rng: random.Random, core: str, fillers: bool = True, command: bool = False) -> str:
    """Opener, closer, punctuation and casing around a phrasing."""
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


def _operand(rng: random.Random) -> int | float:
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
            tokens.append(("num", _operand(rng)))
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


def _verbal(rng: random.Random, split: str) -> tuple[str, str, str, str, bool]:
    """(kind, frame, phrase, canonical expression, is a command) of a worded calculation."""
    roll = rng.random()
    a, b, c = _operand(rng), _operand(rng), rng.randint(2, 12)
    say = lambda v: _say_number(rng, v)     # noqa: E731
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


def _draft_calculator(rng: random.Random, split: str) -> _Draft:
    for _ in range(100):
        if rng.random() < 0.45:
            phrase, expression = _symbolic(rng)
            kind, frame, command = "symbolic", rng.choice(P.CALC_FRAMES[split]), False
        else:
            kind, frame, phrase, expression, command = _verbal(rng, split)
        if _nice_result(expression):
            user = _dress(rng, frame.format(expr=phrase, imp=phrase), command=command)
            return _Draft(kind, frame, user, ("calculator", {"expression": expression}),
                          {"expression": expression})
    raise RuntimeError("no calculation with a short result found")


# -- weather ---------------------------------------------------------------------------------------

def _date_in_split(rng: random.Random, split: str) -> dt.date:
    span = (LAST_DAY - FIRST_DAY).days
    while True:
        day = FIRST_DAY + dt.timedelta(days=rng.randint(0, span))
        if P.date_split(day.isoformat()) == split:
            return day


def _draft_weather(rng: random.Random, split: str, unseen_cities: bool = False) -> _Draft:
    city = rng.choice(P.CITIES["unseen" if unseen_cities else "train"])
    day = _date_in_split(rng, split)
    written = write_date(day, rng.choice(DATE_STYLES))
    frame = rng.choice(P.WEATHER_FRAMES[split])
    user = _dress(rng, frame.format(city=city, date=written))
    # The call names the city as the forecast does ("Istanbul" for "istanbul", "ISTANBUL"): one
    # spelling per city to learn, where copying the user's casing needed four (the tool folds case).
    return _Draft("weather", frame, user, ("get_weather", {"city": city, "date": day.isoformat()}),
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


def _draft_units(rng: random.Random, split: str) -> _Draft:
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
    core = frame.format(value=_say_number(rng, value, words=0.25), **{"from": from_word, "to": to_word})
    arguments = {"value": value, "from_unit": from_unit, "to_unit": to_unit}
    slots = {"value": format_number(value), "from_unit": from_unit, "to_unit": to_unit,
             "from": DISPLAY[from_unit], "to": DISPLAY[to_unit]}
    return _Draft("units", frame, _dress(rng, core), ("convert_units", arguments), slots)


# -- plain chat ------------------------------------------------------------------------------------

def _draft_chat(rng: random.Random, split: str) -> _Draft:
    roll = rng.random()
    column = 0 if split == "train" else 1
    if roll < 0.35:
        kind = rng.choice(tuple(P.SMALL_TALK))
        table = P.SMALL_TALK[kind]
        utterance = rng.choice(table[column])
        return _Draft(kind, utterance, _dress(rng, utterance, fillers=False), answer=rng.choice(table[2]),
                      reasoning=P.REASON_PLAIN[kind], expected=table[3])
    if roll < 0.6:
        country, capital = rng.choice(P.CAPITALS)
        frame = rng.choice(P.CAPITAL_FRAMES[split])
        return _Draft("capital", frame, _dress(rng, frame.format(country=country)),
                      answer=P.CAPITAL_ANSWER.format(country=country, capital=capital),
                      reasoning=P.REASON_PLAIN["capital"].format(country=country), expected=(capital,))
    if roll < 0.8:
        questions = rng.choice(P.FACTS)
        question = rng.choice(questions[column])
        return _Draft("fact", question, _dress(rng, question), answer=questions[2],
                      reasoning=P.REASON_PLAIN["fact"], expected=(questions[3],))
    term, a_term, definition, expected = rng.choice(P.TERMS)
    frame = rng.choice(P.DEFINITION_FRAMES[split])
    return _Draft("definition", frame, _dress(rng, frame.format(term=term, a_term=a_term)),
                  answer=definition, reasoning=P.REASON_PLAIN["definition"].format(term=term),
                  expected=(expected,))


DRAFTERS = {"calculator": _draft_calculator, "weather": _draft_weather, "units": _draft_units,
            "chat": _draft_chat}


# -- trajectories ----------------------------------------------------------------------------------

def _call_id(rng: random.Random) -> str:
    return "call_" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(24))


def _result_slots(name: str, result: str) -> dict:
    if name == "calculator":
        return {"result": result}
    data = json.loads(result)
    if name == "get_weather":
        return {"condition": data["condition"], "high": data["high_c"], "low": data["low_c"]}
    return {"result": format_number(data["result"]), "to": DISPLAY[data["to_unit"]]}


def _trajectory(rng: random.Random, draft: _Draft,
                thinking: bool) -> tuple[list[dict], list[dict], list[str]]:
    """(reference messages, reference calls, results) that answer a draft."""
    if draft.call is None:
        message = {"role": "assistant", "content": draft.answer}
        if thinking:
            message["reasoning_content"] = draft.reasoning
        return [message], [], []
    name, arguments = draft.call
    call_id = _call_id(rng)
    result = execute_tool_call(name, arguments)
    slots = {**draft.slots, **_result_slots(name, result)}
    call = {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
    first = {"role": "assistant", "content": "", "tool_calls": [call]}
    final = {"role": "assistant", "content": rng.choice(P.ANSWER[name]).format(**slots)}
    if thinking:
        first["reasoning_content"] = rng.choice(P.REASON_CALL[name]).format(**slots)
        final["reasoning_content"] = rng.choice(P.REASON_ANSWER[name]).format(**slots)
    tool = {"role": "tool", "tool_call_id": call_id, "content": result}
    return [first, tool, final], [{"name": name, "arguments": arguments}], [result]


def make_task(seed: int, index: int, split: str = "train", category: str | None = None,
              thinking_mode: str | None = None, thinking_ratio: float = 0.5,
              multi_turn: float = 0.2, categories: tuple[str, ...] = CATEGORIES,
              unseen_cities: bool = False) -> Task:
    """Task `index` of the (seed, split) stream; category and mode drawn unless given.
    `unseen_cities` (held-out split only) asks about cities no tool conversation names."""
    if split not in P.SPLITS:
        raise ValueError(f"split must be one of {P.SPLITS}, not {split!r}")
    if unseen_cities and split != "heldout":
        raise ValueError("unseen_cities is a held-out probe: use split='heldout'")
    rng = random.Random(f"dsv32-synth|{seed}|{split}|{index}")

    def draft(category: str) -> _Draft:
        if category == "weather":
            return _draft_weather(rng, split, unseen_cities)
        return DRAFTERS[category](rng, split)

    category = category or rng.choice(categories)
    if thinking_mode is None:
        thinking_mode = "thinking" if rng.random() < thinking_ratio else "chat"
    thinking = thinking_mode == "thinking"
    first = draft(category)
    reference, calls, results = _trajectory(rng, first, thinking)
    history = []
    if rng.random() < multi_turn:
        earlier = draft(rng.choice(CATEGORIES))
        history = [{"role": "user", "content": earlier.user}] + _trajectory(rng, earlier, thinking)[0]
    uses_tools = category != "chat" or rng.random() < 0.8 or any(m["role"] == "tool" for m in history)
    system = {"role": "system", "content": rng.choice(P.SYSTEM_PROMPTS)}
    if uses_tools:
        system["tools"] = tool_specs()
    head = [system] if uses_tools or system["content"] else []
    messages = head + history + [{"role": "user", "content": first.user}]
    name = f"{split}-unseen" if unseen_cities else split
    return Task(id=f"{name}-{seed}-{index}", category=category, kind=first.kind, frame=first.frame,
                thinking_mode=thinking_mode, split=split, messages=messages, reference=reference,
                reference_calls=calls, results=results, expected=list(first.expected))


def generate_tasks(n: int, seed: int = 0, split: str = "train", thinking_ratio: float = 0.5, *,
                   multi_turn: float = 0.2, categories: tuple[str, ...] = CATEGORIES,
                   balanced: bool = False, unseen_cities: bool = False) -> list[Task]:
    """`n` tasks; `balanced` cycles through every (category, mode) cell instead of drawing them."""
    cells = [(c, m) for c in categories for m in MODES]
    tasks = []
    for index in range(n):
        category, mode = cells[index % len(cells)] if balanced else (None, None)
        tasks.append(make_task(seed, index, split, category, mode, thinking_ratio, multi_turn, categories,
                               unseen_cities))
    return tasks


def sft_conversations(n: int, seed: int = 0, split: str = "train", thinking_ratio: float = 0.5,
                      multi_turn: float = 0.2, categories: tuple[str, ...] = CATEGORIES) -> list[dict]:
    """`n` reference conversations for SFT: {"id", "category", "thinking_mode", "messages",
    "tools"}. messages[0] already carries the tools, so render with
    `encode_messages(c["messages"], thinking_mode=c["thinking_mode"])` (not tools= again)."""
    return [t.conversation() for t in generate_tasks(n, seed, split, thinking_ratio, multi_turn=multi_turn,
                                                     categories=categories)]


def answer_stage(task: Task) -> Task:
    """The second step of a tool task: the prompt now ends with the reference call's result and
    the policy only has to answer (stage "answer"); plain chat tasks are returned unchanged."""
    if not task.reference_calls or task.stage == "answer":
        return task
    return Task(**{**asdict(task), "id": task.id + "-answer", "stage": "answer",
                   "messages": task.messages + task.reference[:2], "reference": task.reference[2:]})


def completion_text(prompt_messages: list[dict], message: dict, thinking_mode: str) -> str:
    """What the model emits for `message` after the prompt, as the encoder renders it (ending with
    the end-of-sentence token); the prompt must end with a user or tool message."""
    prompt = encode_messages(prompt_messages, thinking_mode=thinking_mode)
    full = encode_messages(prompt_messages + [message], thinking_mode=thinking_mode)
    if not full.startswith(prompt):
        raise ValueError("the prompt does not end where the assistant message begins")
    return full[len(prompt):]


def reference_completions(task: Task) -> list[tuple[str, str]]:
    """(prompt text, completion text) for each assistant message of the reference trajectory."""
    pairs = []
    for i, message in enumerate(task.reference):
        if message["role"] == "assistant":
            prompt_messages = task.messages + task.reference[:i]
            pairs.append((encode_messages(prompt_messages, thinking_mode=task.thinking_mode),
                          completion_text(prompt_messages, message, task.thinking_mode)))
    return pairs


# -- skills: short pretraining turns that drill what tool arguments need -----------------------------

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


def skill_conversations(n: int, seed: int = 0, words: tuple[str, ...] = ()) -> list[dict]:
    """`n` short tool-less chat-mode turns (no system prompt) that drill the skills tool arguments
    need: copying text (`words`, e.g. place names, in any casing, mixed with numbers and codes),
    writing dates as YYYY-MM-DD, numbers in digits, worded arithmetic as expressions, unit names as
    codes. Dates, numbers and expressions come from the train split; `words` are echoed as given
    (sometimes all lower or upper case). No held-out phrasing appears here."""
    rng = random.Random(f"dsv32-skills|{seed}")
    pool = tuple(words) + P.CITIES["train"]
    out = []
    for i in range(n):
        kind = rng.choice(("echo", "echo", "date", "number", "expression", "unit"))
        if kind == "echo":
            items = [_cased(rng, rng.choice(pool)) if rng.random() < 0.7
                     else _say_number(rng, _operand(rng), 0.0) for _ in range(rng.randint(1, 3))]
            x = answer = " ".join(items)
        elif kind == "date":
            day = _date_in_split(rng, "train")
            x, answer = write_date(day, rng.choice(DATE_STYLES)), day.isoformat()
        elif kind == "number":
            value = rng.randint(-100, 100) if rng.random() < 0.7 else rng.randint(100, 5000)
            x, answer = _say_number(rng, value, words=0.8), format_number(value)
        elif kind == "expression":
            _, _, x, answer, _ = _verbal(rng, "train")
        else:
            unit = rng.choice(tuple(P.UNIT_WORDS))
            x, answer = rng.choice(P.UNIT_WORDS[unit][rng.randint(0, 1)]), unit
        frame = rng.choice(SKILL_FRAMES[kind])
        if rng.random() < 0.3:                                  # lower-case wording (echo keeps x)
            frame, x = frame.lower(), x if kind == "echo" else x.lower()
        user = frame.format(x=x)
        out.append({"id": f"skill-{seed}-{i}", "category": "skill", "thinking_mode": "chat", "tools": None,
                    "messages": [{"role": "user", "content": user},
                                 {"role": "assistant", "content": answer}]})
    return out


def drill_number(rng: random.Random) -> str:
    """A number as tools print them, with digits drawn uniformly: 1-7 integer digits, sometimes up
    to 6 decimals (the last one non-zero) or a minus sign, so every 3-digit token comes up."""
    digits = rng.choice((1, 2, 3, 3, 4, 5, 6, 7))
    text = str(rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1))
    if rng.random() < 0.4:
        text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 5)))
        text += rng.choice("123456789")
    return ("-" if rng.random() < 0.1 else "") + text


def number_conversations(n: int, seed: int = 0, turns: int = 6) -> list[dict]:
    """`n` tool-less chat-mode conversations of `turns` echoes of 1-3 numbers ("Echo: 4905
    0.145" -> "4905 0.145"). A 3-digit token such as `905` is otherwise written only a few dozen
    times in the whole SFT data, too rarely for a small model to copy it reliably; tool arguments
    and answers that quote a result are such copies."""
    rng = random.Random(f"dsv32-numbers|{seed}")
    return _echo_conversations(n, rng, f"numbers-{seed}", turns,
                               lambda: " ".join(drill_number(rng) for _ in range(rng.randint(1, 3))))


def conversion_conversations(n: int, seed: int = 0, turns: int = 6) -> list[dict]:
    """`n` tool-less chat-mode conversations of `turns` conversions, each a number in words
    ("sixty-two" -> "62") or a worded calculation ("the sum of 12 and 7" -> "12 + 7"), as in the
    drills of `skill_conversations` but six to a conversation: a calculator argument is such a
    conversion, and slips in it (a wrong digit, a dropped operand) were the bundled model's most
    common calculator failure (docs/training.md)."""
    rng = random.Random(f"dsv32-conversions|{seed}")

    def item() -> tuple[str, str, str]:
        if rng.random() < 0.5:
            value = rng.randint(-100, 100) if rng.random() < 0.8 else rng.randint(100, 5000)
            return "number", _say_number(rng, value, words=1.0), format_number(value)
        _, _, phrase, expression, _ = _verbal(rng, "train")
        return "expression", phrase, expression

    return _drill_conversations(n, rng, f"conversions-{seed}", turns, item)


def _echo_conversations(n: int, rng: random.Random, prefix: str, turns: int,
                        item: Callable[[], str]) -> list[dict]:
    """`n` tool-less chat-mode conversations of `turns` echo turns: `item()` in an echo frame
    (sometimes lower-cased), answered by `item()` itself."""
    def echo() -> tuple[str, str, str]:
        x = item()
        return "echo", x, x
    return _drill_conversations(n, rng, prefix, turns, echo)


def _drill_conversations(n: int, rng: random.Random, prefix: str, turns: int,
                         item: Callable[[], tuple[str, str, str]]) -> list[dict]:
    """`n` tool-less chat-mode conversations of `turns` drill turns; `item()` gives (kind, x,
    answer), x goes into a frame of that kind (sometimes lower-cased, x too unless it is echoed)."""
    out = []
    for i in range(n):
        messages = []
        for _ in range(turns):
            kind, x, answer = item()
            frame = rng.choice(SKILL_FRAMES[kind])
            if rng.random() < 0.3:
                frame, x = frame.lower(), x if kind == "echo" else x.lower()
            messages += [{"role": "user", "content": frame.format(x=x)},
                         {"role": "assistant", "content": answer}]
        out.append({"id": f"{prefix}-{i}", "category": "skill", "thinking_mode": "chat", "tools": None,
                    "messages": messages})
    return out

"""What the users of the task generator write: phrasings split into train and held-out sets, and
the vocabulary both splits share (the assistant's side is in `replies`).

How the split works. Every table keyed by split ("train", "heldout") is partitioned by hand:
- sentence frames (the wording around the slots) of every task kind, the plain-chat questions and
  the greetings: a held-out prompt always uses a frame that no training prompt uses;
- dates (`date_split`, a hash of the ISO date).
Shared by both splits, because a model trained from nothing cannot know a word it never saw:
operator words ("times", "divided by"), unit names, number words, month names, date styles, openers
and closers, casing, the cities of weather questions (`CITIES["train"]`), the countries, facts and
terms that plain questions ask about, and the assistant-side templates (reasoning and answers,
`replies`). `CITIES["unseen"]` are never written in a tool conversation (only echoed in drills):
held-out tasks over them (`unseen_cities`) measure whether a place the model has never spelt in a
call can be copied, reported apart from the evaluation.
"""
from __future__ import annotations

import hashlib
import re

from ..envs.dates import MONTHS
from .replies import CAPITALS, TERMS

SPLITS = ("train", "heldout")

CITIES = {
    "train": (
        "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "New York", "Chicago", "Toronto",
        "Sydney", "Cairo", "Mumbai", "Beijing", "Moscow", "Dubai", "Istanbul", "Amsterdam", "Vienna",
        "Prague", "Lisbon", "Dublin", "Oslo", "Stockholm", "Helsinki", "Athens", "Warsaw", "Seoul",
        "Bangkok", "Singapore", "Mexico City", "Buenos Aires", "Lima", "Nairobi", "Lagos",
        "Cape Town", "Vancouver", "Boston", "Seattle", "Denver", "Zurich", "Munich", "Barcelona",
        "Milan", "Osaka", "Hanoi"),
    "unseen": (
        "Copenhagen", "Brussels", "Budapest", "Montreal", "Melbourne", "Auckland", "Santiago",
        "Bogota", "Casablanca", "Kyoto", "Manila", "Edinburgh", "San Francisco", "Rio de Janeiro",
        "Reykjavik"),
}


def date_split(iso_date: str) -> str:
    """The split a date belongs to: one date in four (by hash) is held out."""
    return "heldout" if hashlib.sha256(iso_date.encode()).digest()[0] % 4 == 0 else "train"


# -- frames: {city} {date} {expr} {imp} {value} {from} {to} {country} {term} {a_term} -------------

WEATHER_FRAMES = {
    "train": (
        "what's the weather in {city} on {date}?", "what is the weather going to be in {city} on {date}?",
        "weather in {city} on {date}", "{city} weather for {date}", "forecast for {city}, {date}",
        "how's the weather in {city} on {date}?", "tell me the forecast for {city} on {date}",
        "is it going to rain in {city} on {date}?",
        "I'm visiting {city} on {date}. what will the weather be like?",
        "on {date}, what weather should I expect in {city}?", "get me the {city} forecast for {date}",
        "check the weather for {date} in {city}", "will it be warm in {city} on {date}?",
        "{date} weather in {city}?", "what will the weather be in {city} on {date}?",
        "what's the forecast for {city} on {date}?", "show me the weather in {city} for {date}",
        "what will it be like in {city} on {date}?", "can you check the weather in {city} on {date}?",
        "please check the forecast for {city} on {date}", "I want the weather for {city} on {date}",
        "give me the weather in {city} on {date}", "find the forecast for {city} for {date}",
        "how hot will {city} be on {date}?", "will it snow in {city} on {date}?",
        "do I need an umbrella in {city} on {date}?", "what are the conditions in {city} on {date}?",
        "{city}, {date}: weather?", "weather forecast {city} {date}", "temperature in {city} on {date}?",
        "planning a trip to {city} on {date}, what's the forecast?",
        "how cold is it going to be in {city} on {date}?", "what's the weather like in {city} on {date}?",
        "can you tell me the weather for {city} on {date}?",
        "I'm flying to {city} on {date}, what's the weather going to be?",
        "forecast please: {city} on {date}", "would you check the weather in {city} for {date}?",
        "what does the forecast say for {city} on {date}?", "weather {city} {date}",
        "what's it going to be like outside in {city} on {date}?", "is {date} going to be sunny in {city}?"),
    "heldout": (
        "could you look up the weather in {city} for {date}?",
        "what kind of weather is {city} getting on {date}?", "I need the forecast: {city}, {date}",
        "heading to {city} on {date} - how will the weather be?",
        "any idea what the weather will do in {city} on {date}?",
        "weather report for {city} on {date}"),
}

CALC_FRAMES = {       # {expr}: symbols ("(3 + 4) * 2") or words ("twelve times 4")
    "train": (
        "what is {expr}?", "calculate {expr}", "compute {expr}", "{expr} = ?", "{expr}",
        "evaluate {expr}", "what's {expr}", "how much is {expr}?", "can you calculate {expr}?",
        "tell me what {expr} equals", "what do you get for {expr}?",
        "what's the result of {expr}?", "find {expr}", "please calculate {expr}",
        "can you compute {expr}?", "{expr}?", "do the math: {expr}", "help me with {expr}",
        "calculate this: {expr}", "quick math: {expr}", "what does {expr} equal?",
        "give me the answer to {expr}", "tell me {expr}", "how much does {expr} make?",
        "what's the answer to {expr}?", "result of {expr}?", "could you evaluate {expr}?",
        "determine {expr}", "what would {expr} be?", "can you do {expr}?", "{expr} is what?",
        "what is {expr} equal to?", "please compute {expr} for me", "hey calculator, {expr}",
        # demo19: a second set of training frames
        "what's the answer for {expr}?", "{expr} equals what?", "how much would {expr} be?",
        "crunch {expr}", "run {expr} through the calculator", "what number is {expr}?",
        "{expr}, what is it?", "do {expr} please", "can you tell me {expr}?", "what's the total of {expr}?",
        "get me {expr}", "show me {expr}", "let me know what {expr} is", "answer this: {expr}",
        "math question: {expr}", "tell me the result of {expr}", "{expr} - what's the result?",
        "what result does {expr} give?", "please tell me {expr}", "quick one: {expr}",
        "what do we get from {expr}?", "{expr} makes what?", "evaluate this: {expr}",
        "can you help me calculate {expr}?", "calculate {expr} for me", "what's {expr} equal to?"),
    "heldout": (
        "solve {expr}", "work out {expr} for me", "what does {expr} come to?", "figure out {expr}",
        "I need the value of {expr}"),
}

IMPERATIVE_FRAMES = {   # {imp}: "multiply 12 by 4"
    "train": ("{imp}", "please {imp}", "can you {imp}?", "{imp} for me", "{imp} and tell me the result",
        "please {imp} for me", "can you please {imp}?", "go ahead and {imp}",
        "help me {imp}", "would you {imp}?", "{imp}, please", "{imp} and give me the answer",
        "try to {imp}", "just {imp}", "kindly {imp}", "{imp}, what do you get?",
        "{imp}, thanks", "now {imp}", "can you {imp} for me?", "please {imp} and tell me", "will you {imp}?",
        "{imp} please", "would you please {imp}?", "let's {imp}", "{imp} and show me the result",
        "{imp} and say what you get", "I want you to {imp}", "I need you to {imp}", "your task: {imp}",
        "{imp}?"),
    "heldout": ("could you quickly {imp}?", "I'd like you to {imp}"),
}

UNITS_FRAMES = {
    "train": (
        "convert {value} {from} to {to}", "how many {to} is {value} {from}?",
        "how many {to} are in {value} {from}?", "{value} {from} in {to}", "what is {value} {from} in {to}?",
        "{value} {from} to {to}", "I have {value} {from}. how much is that in {to}?",
        "express {value} {from} in {to}", "what's {value} {from} in {to}?",
        "convert {value} {from} into {to}",
        "how much is {value} {from} in {to}?", "please convert {value} {from} to {to}",
        "I need {value} {from} in {to}", "give me {value} {from} in {to}", "{value} {from} = ? {to}",
        "what's {value} {from} expressed in {to}?", "tell me {value} {from} in {to}",
        "how many {to} do {value} {from} make?", "in {to}, how much is {value} {from}?",
        "what are {value} {from} in {to}?", "translate {value} {from} to {to}",
        "can you express {value} {from} in {to}?", "{value} {from} converted to {to}?",
        "what is {value} {from} when converted to {to}?", "convert {value} {from} to {to}, please",
        "how many {to} would {value} {from} be?", "{value} {from}: how many {to} is that?",
        "what would {value} {from} be in {to}?", "{value} {from} into {to} please",
        "show me {value} {from} in {to}", "{value} {from} in {to}, please", "calculate {value} {from} in {to}",
        "how much is {value} {from} when expressed in {to}?", "{value} {from} in {to} is what?",
        "please give me {value} {from} in {to}", "need {value} {from} in {to}",
        "what's the {to} equivalent of {value} {from}?", "{value} {from} is what in {to}?",
        "in {to} please: {value} {from}", "{value} {from} -> {to}", "do the conversion: {value} {from} to {to}",
        "unit conversion: {value} {from} to {to}", "what does {value} {from} make in {to}?",
        "how many {to} make {value} {from}?", "how many {to} in {value} {from}?",
        "what are {value} {from} expressed in {to}?", "{value} {from} - what is that in {to}?"),
    "heldout": (
        "change {value} {from} into {to}", "{value} {from} equals how many {to}?",
        "if something is {value} {from}, what is it in {to}?", "turn {value} {from} into {to} for me",
        "could you convert {value} {from} to {to}?"),
}

CAPITAL_FRAMES = {
    "train": (
        "what is the capital of {country}?", "capital of {country}?", "what's the capital city of {country}",
        "which city is the capital of {country}?", "tell me the capital of {country}", "{country} capital?",
        "what's the capital of {country}?", "which city is {country}'s capital?",
        "the capital of {country} is?", "{country}'s capital city?", "capital city of {country}",
        "can you tell me the capital of {country}?", "where is the capital of {country}?",
        "I want to know the capital of {country}", "what is {country}'s capital?",
        "what is the capital city of {country}?", "which is the capital of {country}?",
        "could you give me the capital of {country}?", "{country}: what is its capital?",
        "in {country}, which city is the capital?", "remind me of the capital of {country}",
        "tell me {country}'s capital city", "I wonder what the capital of {country} is",
        "what would the capital of {country} be?", "capital of {country}, please",
        "{country} has which city as its capital?", "what city is the capital of {country}?",
        "capital of {country} is what?", "{country}: capital?", "what's {country}'s capital city?",
        "which city is {country}'s capital city?", "what is the capital of the country {country}?",
        "capital for {country}?", "tell me which city is the capital of {country}",
        "give me the capital of {country}", "the capital city of {country} is which city?",
        "what's the capital of {country} called?", "quick: capital of {country}?"),
    "heldout": (
        "do you know the capital of {country}?", "name the capital of {country}",
        "what city serves as the capital of {country}?"),
}

DEFINITION_FRAMES = {
    "train": ("what is {a_term}?", "define {term}", "what does {term} mean?", "what's {a_term}",
              "meaning of {term}?",
        "what's the meaning of {term}?", "can you define {term}?",
        "{term}: what is it?", "what exactly is {a_term}?", "definition of {term}", "describe {a_term}",
        "what is meant by {term}?", "how would you define {term}?", "tell me the meaning of {term}",
        "what does the word {term} mean?", "what's the definition of {term}?", "{term} means what?",
        "could you tell me what {a_term} is?", "I need the definition of {term}",
        "what is {a_term} exactly?", "give the definition of {term}", "so what is {a_term}?",
        "what's the definition of the word {term}?", "{term}? what does it mean", "meaning of the word {term}?",
        "what is meant by the term {term}?", "can you describe {a_term}?", "define the word {term}",
        "how is {term} defined?", "{term} - definition?", "tell me what {a_term} is",
        "what's the meaning of the word {term}?", "describe what {a_term} is", "what exactly does {term} mean?",
        "please define {term}"),
    "heldout": ("explain what {a_term} is", "give me a short definition of {term}",
                "I'd like to know what {a_term} is"),
}

# -- plain chat: fixed utterances -------------------------------------------------------------------

SMALL_TALK = {   # kind: (train utterances, held-out utterances, answers, expected strings)
    "greeting": (("hi", "hello", "hey", "good morning", "hello there", "hey, how are you?", "hi!", "hi there",
                  "hey there", "good afternoon", "yo", "hello!", "morning!", "hi, how's it going?",
                  "good day", "hey, anyone there?", "hello, assistant", "heya",
                  "hey hey", "hello, how are you?", "hi, are you there?", "hey, what's up?", "sup"),
                 ("hiya", "good evening", "greetings!", "howdy"),
                 ("Hello! How can I help you today?", "Hi! What can I do for you?"),
                 ("help", "do for you")),
    "thanks": (("thanks!", "thank you", "thanks a lot", "thank you so much!", "great, thanks", "thx", "ty",
                "thank you very much", "awesome, thanks", "perfect, thank you", "appreciate it",
                "thanks, that helps", "thanks a bunch", "thank you kindly", "much obliged",
                "great, thank you so much", "thanks for the help", "I appreciate your help",
                "thanks so much", "thank you!", "ok thanks", "nice, thanks", "thank you, that was helpful",
                "big thanks", "thanks again"),
               ("much appreciated", "cheers, thanks!", "many thanks"),
               ("You're welcome!", "You're welcome, happy to help."),
               ("welcome",)),
    "identity": (("who are you?", "what can you do?", "what are you?", "what is your name?", "are you a bot?",
                  "what do you do?", "how can you help me?", "what are you capable of?",
                  "introduce yourself", "what kind of assistant are you?", "what can you help with?",
                  "tell me what you can do",
                  "what are your abilities?", "what's your job?", "what can you do for me?", "are you an assistant?"),
                 ("tell me about yourself", "what are you able to help with?"),
                 ("I am a helpful assistant. I can do arithmetic, check the weather and convert units.",),
                 ("assistant",)),
    "goodbye": (("bye", "goodbye", "see you later", "see ya", "bye bye", "good night", "see you soon",
                 "farewell", "gotta go, bye", "catch you later", "take care, bye", "see you around",
                 "I'm off now, bye", "later!",
                 "bye!", "ok bye", "see you next time", "have a good one, bye", "I must go now, bye", "so long"),
                ("talk to you later", "bye for now"),
                ("Goodbye! Have a nice day.",),
                ("goodbye", "bye")),
}

FACTS = (   # (train questions, held-out questions, answer, expected)
    (("how many days are in a week?",
      "how many days does a week have?", "days in a week?", "how many days make up a week?",
      "what's the number of days in a week?", "tell me how many days a week has",
      "how many days in one week?", "days per week?", "count the days in a week"),
     ("a week has how many days?",), "A week has 7 days.", "7"),
    (("how many months are in a year?",
      "how many months does a year have?", "number of months in a year?",
      "how many months make up a year?", "what's the number of months in a year?",
      "tell me how many months a year has",
      "months per year?", "how many months in one year?", "count the months in a year"),
     ("a year is how many months?",), "A year has 12 months.", "12"),
    (("how many hours are in a day?",
      "how many hours does a day have?", "hours in a day?", "how many hours make up a day?",
      "what's the number of hours in a day?", "tell me how many hours a day has",
      "hours per day?", "how many hours in one day?", "count the hours in a day"),
     ("a day lasts how many hours?",), "A day has 24 hours.", "24"),
    (("how many minutes are in an hour?",
      "minutes in an hour?", "how many minutes does an hour have?",
      "how many minutes make up an hour?", "what's the number of minutes in an hour?",
      "tell me how many minutes an hour has",
      "minutes per hour?", "how many minutes in one hour?", "count the minutes in an hour"),
     ("an hour has how many minutes?",), "An hour has 60 minutes.", "60"),
    (("how many legs does a spider have?",
      "number of legs on a spider?", "how many legs do spiders have?",
      "what's the number of legs of a spider?", "tell me how many legs a spider has",
      "how many legs are on a spider?",
      "how many legs has a spider got?", "legs on a spider: how many?", "count a spider's legs"),
     ("spiders have how many legs?",), "A spider has 8 legs.", "8"),
    (("what is the largest planet?",
      "which planet is the biggest?", "biggest planet?", "which is the largest planet?",
      "tell me the largest planet", "what planet is the largest?",
      "what's the biggest planet?", "largest planet?", "which planet is the largest one?"),
     ("name the biggest planet in the solar system",), "Jupiter is the largest planet.", "Jupiter"),
    (("which planet is closest to the sun?",
      "what planet is nearest the sun?", "closest planet to the sun?",
      "which planet orbits closest to the sun?", "tell me the planet nearest to the sun",
      "what is the nearest planet to the sun?",
      "what's the closest planet to the sun?", "nearest planet to the sun?", "which planet sits closest to the sun?"),
     ("the planet closest to the sun is which one?",), "Mercury is the closest planet to the Sun.", "Mercury"),
    (("what color is the sky?",
      "what colour is the sky on a clear day?", "color of the sky?", "what colour is the sky?",
      "tell me the color of the sky", "which color is the sky?",
      "what's the color of the sky?", "sky color?", "what color does the sky have?"),
     ("the sky is what color?",), "The sky is blue on a clear day.", "blue"),
    (("what is the chemical symbol for gold?",
      "chemical symbol of gold?", "what's gold's chemical symbol?", "what symbol does gold have?",
      "tell me the chemical symbol for gold", "symbol for gold?",
      "gold's chemical symbol?", "what is gold's symbol?", "the chemical symbol for gold?"),
     ("gold has which chemical symbol?",), "The chemical symbol for gold is Au.", "Au"),
    (("who wrote Romeo and Juliet?",
      "who is the author of Romeo and Juliet?", "author of Romeo and Juliet?",
      "who wrote the play Romeo and Juliet?", "tell me who wrote Romeo and Juliet",
      "Romeo and Juliet: who wrote it?",
      "who is the writer of Romeo and Juliet?", "Romeo and Juliet author?", "who penned Romeo and Juliet?"),
     ("Romeo and Juliet was written by whom?",), "William Shakespeare wrote Romeo and Juliet.", "Shakespeare"),
    (("what is the largest ocean?",
      "which ocean is the biggest?", "biggest ocean?", "what is the biggest ocean?",
      "tell me the largest ocean", "which ocean is the largest?",
      "what's the largest ocean?", "largest ocean?", "which ocean is the biggest one?"),
     ("name the largest ocean on Earth",), "The Pacific Ocean is the largest ocean.", "Pacific"),
)

# -- shared vocabulary ------------------------------------------------------------------------------

OPENERS = ("", "", "", "", "hey, ", "hi, ", "quick question: ", "ok, ", "hello! ", "um, ", "so ")
CLOSERS = ("", "", "", "", " please", " thanks", " thank you", " thx", " :)")
OPENERS_FOR_COMMANDS = ("", "", "", "hey, ", "ok, ", "hi! ")

# The user's way of writing each operator in a symbolic expression.
SYMBOLS = {"*": ("*", "*", "x", "×"), "/": ("/", "/", "÷"), "**": ("**", "^"), "+": ("+",), "-": ("-",)}

# Words for one operation on {a} and {b}: (pattern, canonical expression); nouns fill {expr}.
BINARY_WORDS = {
    "+": (("{a} plus {b}", "{a} + {b}"), ("the sum of {a} and {b}", "{a} + {b}"),
          ("{a} added to {b}", "{a} + {b}")),
    "-": (("{a} minus {b}", "{a} - {b}"), ("{a} take away {b}", "{a} - {b}"),
          ("the difference between {a} and {b}", "{a} - {b}"), ("{b} subtracted from {a}", "{a} - {b}")),
    "*": (("{a} times {b}", "{a} * {b}"), ("{a} multiplied by {b}", "{a} * {b}"),
          ("the product of {a} and {b}", "{a} * {b}")),
    "/": (("{a} divided by {b}", "{a} / {b}"), ("{a} over {b}", "{a} / {b}"),
          ("the quotient of {a} and {b}", "{a} / {b}")),
    "**": (("{a} to the power of {b}", "{a} ** {b}"), ("{a} raised to the power {b}", "{a} ** {b}")),
}
IMPERATIVE_WORDS = {
    "+": (("add {a} and {b}", "{a} + {b}"), ("add {a} to {b}", "{a} + {b}")),
    "-": (("subtract {b} from {a}", "{a} - {b}"),),
    "*": (("multiply {a} by {b}", "{a} * {b}"),),
    "/": (("divide {a} by {b}", "{a} / {b}"),),
}
UNARY_WORDS = {   # kind: (pattern, canonical)
    "square": (("{a} squared", "{a} ** 2"),),
    "cube": (("{a} cubed", "{a} ** 3"),),
    "root": (("the square root of {a}", "{a} ** 0.5"),),
    "percent": (("{p} percent of {a}", "{p} / 100 * {a}"), ("{p}% of {a}", "{p} / 100 * {a}")),
    "half": (("half of {a}", "{a} / 2"),),
}
COMPOUND_WORDS = (   # three operands
    ("{a} plus {b}, times {c}", "({a} + {b}) * {c}"),
    ("add {a} and {b}, then multiply by {c}", "({a} + {b}) * {c}"),
    ("{a} times {b} plus {c}", "{a} * {b} + {c}"),
    ("the sum of {a}, {b} and {c}", "{a} + {b} + {c}"),
    ("{a} minus {b}, then divided by {c}", "({a} - {b}) / {c}"),
)

# How users write units after a number: (singular spellings, plural spellings).
UNIT_WORDS = {
    "km": (("km", "kilometer", "kilometre"), ("km", "kilometers", "kilometres", "kms")),
    "m": (("m", "meter", "metre"), ("m", "meters", "metres")),
    "cm": (("cm", "centimeter"), ("cm", "centimeters", "centimetres")),
    "mi": (("mile", "mi"), ("miles", "mi")),
    "ft": (("foot", "ft"), ("feet", "ft")),
    "in": (("inch",), ("inches",)),
    "kg": (("kg", "kilogram", "kilo"), ("kg", "kilograms", "kilos")),
    "g": (("g", "gram"), ("g", "grams")),
    "lb": (("lb", "pound"), ("lbs", "pounds", "lb")),
    "oz": (("oz", "ounce"), ("oz", "ounces")),
    "c": (("°C", "degree celsius", "celsius"), ("°C", "degrees celsius", "celsius", "degrees C")),
    "f": (("°F", "degree fahrenheit", "fahrenheit"),
          ("°F", "degrees fahrenheit", "fahrenheit", "degrees F")),
    "l": (("liter", "litre", "l"), ("liters", "litres", "l")),
    "gal": (("gallon", "gal"), ("gallons", "gal")),
}
# The target unit after "in"/"to"/"how many": plural words or codes.
TARGET_UNIT_WORDS = {unit: plural for unit, (_, plural) in UNIT_WORDS.items()}

def _words(value, pattern: str = r"[A-Za-z]+(?:'[a-z]+)?"):
    """The words, in order, of every string in `value` (nested dicts, tuples and lists), with the
    {slot} placeholders left out."""
    if isinstance(value, str):
        yield from re.findall(pattern, re.sub(r"\{\w+\}", " ", value))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _words(item, pattern)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _words(item, pattern)


def frame_words() -> frozenset[str]:
    """Casefolded words that the training sentence frames, openers and closers write and no slot
    (operators, units, numbers, dates, places, terms) or small-talk utterance does: words a user
    can swap for others without changing the task, the pool of word dropout
    (`dsv32.train.data.WordDropout`)."""
    def words(value) -> set[str]:
        return {w.casefold() for w in _words(value, r"[A-Za-z]+")}

    frames = [t["train"] for t in (WEATHER_FRAMES, CALC_FRAMES, IMPERATIVE_FRAMES, UNITS_FRAMES,
                                   CAPITAL_FRAMES, DEFINITION_FRAMES)]
    slots = (BINARY_WORDS, IMPERATIVE_WORDS, UNARY_WORDS, COMPOUND_WORDS, UNIT_WORDS, MONTHS, CAPITALS,
             TERMS, CITIES, SYMBOLS, "the of st nd rd th and minus hundred thousand",
             [talk[0] for talk in SMALL_TALK.values()])     # small talk is all message, no frame
    return frozenset(words(frames + [OPENERS, CLOSERS, OPENERS_FOR_COMMANDS]) - words(slots))

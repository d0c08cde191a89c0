"""What the assistant writes in the task generator's reference trajectories: the short reasoning
and answer templates, the system prompts, and what plain questions ask about (capitals, terms).
Shared by both splits (`phrasings` says how the user's side is split).
"""
from __future__ import annotations

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"),
    ("India", "New Delhi"), ("China", "Beijing"), ("Russia", "Moscow"), ("Kenya", "Nairobi"),
    ("Argentina", "Buenos Aires"), ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Peru", "Lima"), ("Turkey", "Ankara"), ("South Korea", "Seoul"),
    ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Thailand", "Bangkok"),
)

TERMS = (   # (term, article form, definition, expected)
    ("noun", "a noun", "A noun is a word that names a person, place or thing.", "names a person"),
    ("verb", "a verb", "A verb is a word that describes an action.", "action"),
    ("triangle", "a triangle", "A triangle is a shape with three sides.", "three sides"),
    ("prime number", "a prime number",
     "A prime number is a number greater than 1 whose only divisors are 1 and itself.", "divisors"),
    ("planet", "a planet", "A planet is a large body that orbits a star.", "orbits a star"),
    ("atom", "an atom", "An atom is the smallest unit of a chemical element.", "smallest unit"),
    ("synonym", "a synonym", "A synonym is a word with the same meaning as another word.", "same meaning"),
    ("mammal", "a mammal", "A mammal is a warm-blooded animal that feeds its young with milk.", "milk"),
)

# -- assistant side (shared; keep short) -------------------------------------------------------------

REASON_CALL = {
    "calculator": ("I need to compute {expression}. I will use the calculator.",
                   "The user wants {expression}. I will call calculator."),
    "get_weather": ("The user wants the weather in {city} on {date}. I will call get_weather.",),
    "convert_units": ("The user wants {value} {from_unit} in {to_unit}. I will call convert_units.",),
}
REASON_ANSWER = {
    "calculator": ("The calculator returned {result}.",),
    "get_weather": ("The forecast is {condition}, high {high}°C, low {low}°C.",),
    "convert_units": ("The tool returned {result} {to}.",),
}
ANSWER = {
    "calculator": ("{expression} = {result}.", "The answer is {result}."),
    "get_weather": ("In {city} on {date} it will be {condition}, with a high of {high}°C and a low of "
                    "{low}°C.",
                    "The forecast for {city} on {date}: {condition}, high {high}°C, low {low}°C."),
    "convert_units": ("{value} {from} is {result} {to}.", "{value} {from} = {result} {to}."),
}
REASON_PLAIN = {
    "greeting": "The user greets me. No tool is needed.",
    "thanks": "The user thanks me. No tool is needed.",
    "identity": "The user asks about me. No tool is needed.",
    "goodbye": "The user says goodbye. No tool is needed.",
    "capital": "The user asks for the capital of {country}. No tool is needed.",
    "fact": "This is a simple fact. No tool is needed.",
    "definition": "The user wants a definition of {term}. No tool is needed.",
}
CAPITAL_ANSWER = "The capital of {country} is {capital}."

SYSTEM_PROMPTS = ("", "", "", "You are a helpful assistant.",
                  "You are a helpful assistant. Use the tools when they help.",
                  "You are a concise assistant.")

# -- requests with no tool offered, several calls, JSON answers (issue 34) ---------------------------

REASON_NO_TOOL_HARD = "No calculator is offered, and {expression} is too long to work out reliably."
REASON_NO_TOOL = {
    "calculator": ("No tools are offered, so I work out {expression} myself.",
                   "There is no calculator here; {expression} is simple enough to do in my head."),
    "get_weather": ("The user wants the weather in {city} on {date}, but no weather tool is offered.",),
    "convert_units": ("The user wants {value} {from} in {to}, but no conversion tool is offered.",),
}
NO_TOOL_ANSWER = {
    "calculator": ("I have no calculator here, so I can't work out {expression} exactly.",
                   "Without a calculator I can't compute {expression} reliably."),
    "get_weather": ("I have no weather tool here, so I can't look up the forecast for {city} on {date}.",
                    "I can't check the weather for {city} on {date}: no weather tool is available to me."),
    "convert_units": ("I have no conversion tool here, so I can't convert {value} {from} to {to} exactly.",
                      "I can't convert {value} {from} to {to} reliably without a conversion tool."),
}
IDENTITY_NO_TOOLS = "I am a helpful assistant. Ask me a question and I will do my best to answer it."
REASON_MULTI = "The user asks for {count} things at once, so I will make {count} calls together."
REASON_JSON = "The answer must be a JSON object."

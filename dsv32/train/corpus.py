"""The demo recipe's data: which synthesised conversations and drills it trains on, the copies that
vary them (other cities, other tool subsets), and their token rows and vocabulary."""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import zoneinfo
from collections import Counter
from dataclasses import dataclass

from dsv32.chat import Tokenizer
from dsv32.model.init_tiny import tiny_config

from .conversation import Conversation
from .data import Batch, Example, Loader, WordDropout, encode_all
from .losses import TiedVocab
from .recipe import Recipe
from .synth import conversion_conversations, number_conversations, sft_conversations, skill_conversations
from .synth.json_answers import json_tasks
from .synth.requests import multi_call_tasks, no_tool_tasks
from .synth.phrasings import CITIES, frame_words

MAX_LEN = 1536                   # longer conversations are left out


@dataclass
class Data:
    """The conversations every stage draws on, their token rows, and the vocabulary seen in them."""

    conversations: list[Conversation]   # tool conversations and drills, from the short-context stage on
    later: list[Conversation]           # conversion drills and no-tool conversations, from the
                                        # full-prompt stage on
    examples: list[Example]             # both, tokenised (tool values marked when a stage weights them)
    heldout: list[Conversation]         # held-out conversations of the LM diagnostics
    heldout_batches: list[Batch]
    vocab: TiedVocab                    # the tokens the examples use, and the pooled rest
    marks: bool                         # whether rows mark tool values (mask 2)

    def encode(self, convs: list[Conversation], tok: Tokenizer) -> list[Example]:
        """Training rows of more conversations, tokenised and marked as the examples are."""
        return encode_all(convs, tok, max_len=MAX_LEN, mark_values=self.marks)

    def counts(self) -> dict:
        """What the log's "data" event reports."""
        rows, convs = self.examples, self.conversations + self.later
        return dict(conversations=len(convs), categories=dict(Counter(c.category for c in convs)),
                    examples=len(rows),
                    tokens=sum(len(e.ids) for e in rows),
                    loss_tokens=sum(len(e.mask) - e.mask.count(0) for e in rows),
                    value_tokens=sum(e.mask.count(2) for e in rows), seen_vocab=len(self.vocab.seen))


def prepare_data(recipe: Recipe, tok: Tokenizer) -> Data:
    """Synthesise and tokenise the recipe's conversations."""
    convs, later = training_conversations(recipe), later_conversations(recipe)
    marks = any(sc.value_weight != 1.0 for sc in (recipe.short, recipe.sft, recipe.warmup, recipe.sparse))
    examples = encode_all(convs + later, tok, max_len=MAX_LEN, mark_values=marks)
    heldout = sft_conversations(recipe.n_heldout_lm, seed=recipe.seed + 1, split="heldout")
    seen = {i for e in examples for i in e.ids} | {tok.bos_id, tok.eos_id}
    vocab = TiedVocab(sorted(seen), tiny_config(**recipe.model).vocab_size)
    loader = Loader(encode_all(heldout, tok), recipe.batch, seed=0, bucket_id=tok.user_id)
    batches = [loader.next() for _ in range(len(loader))]
    return Data(convs, later, examples, heldout, batches, vocab, marks)


def word_dropout(tok: Tokenizer, vocab: TiedVocab, p: float) -> WordDropout | None:
    """Word dropout over the seen tokens that spell a frame word, with the pooled unseen row as the
    stand-in (the embedding every token absent from training shares when served)."""
    if not p or vocab.rep is None:
        return None
    words = frame_words()
    ids = frozenset(int(i) for i in vocab.seen
                    if tok.token_bytes(int(i)).decode("utf-8", "ignore").strip().casefold() in words)
    return WordDropout(vocab.rep, p, ids, tok.user_id, tok.assistant_id)


def training_conversations(recipe: Recipe) -> list[Conversation]:
    """The SFT data: tool conversations, extra weather and plain-chat conversations, skill and
    number drills, requests that ask for JSON and requests that need several calls."""
    convs = sft_conversations(recipe.n_train, seed=recipe.seed)
    convs += city_conversations(convs, recipe.n_city, recipe.seed)
    convs += sft_conversations(recipe.n_chat, seed=recipe.seed + 13, categories=("chat",))
    convs += skill_conversations(recipe.n_skill, recipe.seed, words=tz_cities())
    convs += number_conversations(recipe.n_numbers, recipe.seed)
    extra = json_tasks(recipe.n_json, recipe.seed) + multi_call_tasks(recipe.n_multi_call, recipe.seed)
    return convs + [t.conversation() for t in extra]


def later_conversations(recipe: Recipe) -> list[Conversation]:
    """The data of the full-prompt and later stages only: conversion drills and tool questions asked
    with no tool offered (in the short-context stage every prompt lacks its tools section, and most
    of those conversations call a tool)."""
    convs = conversion_conversations(recipe.n_conversions, recipe.seed)
    return convs + [t.conversation() for t in no_tool_tasks(recipe.n_no_tools, recipe.seed)]


@functools.cache
def tz_cities() -> tuple[str, ...]:
    """City names from the IANA time-zone database (world knowledge for the pretraining data)."""
    out = set()
    for z in zoneinfo.available_timezones():
        parts = z.split("/")
        if len(parts) >= 2 and parts[0] not in ("Etc", "SystemV", "US", "Canada", "Brazil", "Chile", "Mexico"):
            name = parts[-1].replace("_", " ")
            if re.fullmatch(r"[A-Za-z ]+", name) and len(name) > 2:
                out.add(name)
    return tuple(sorted(out))


def city_conversations(convs: list[Conversation], n: int, seed: int) -> list[Conversation]:
    """Copies of weather conversations with the city swapped (in every casing the conversation
    uses) for a time-zone city name, so the model learns to copy the place rather than recall it.
    The unseen cities are left out."""
    rng = random.Random(seed)
    cities = [c for c in tz_cities() if c not in CITIES["unseen"]]
    weather = [c for c in convs if c.category == "weather"]
    out = []
    for i in range(n if weather else 0):
        c = weather[i % len(weather)]
        old = weather_city(c)
        if old is None:
            continue
        new = rng.choice(cities)
        text = json.dumps(c.messages, ensure_ascii=False)      # the tool specs' examples too
        for a, b in ((old, new), (old.lower(), new.lower()), (old.title(), new.title()),
                     (old.upper(), new.upper())):
            text = text.replace(a, b)
        out.append(dataclasses.replace(c, messages=json.loads(text)))
    return out


def weather_city(conv: Conversation) -> str | None:
    """The city of the conversation's first weather call (None without one)."""
    for m in conv.messages:
        for call in m.get("tool_calls") or []:
            if call["function"]["name"] == "get_weather":
                return json.loads(call["function"]["arguments"]).get("city")
    return None


def tool_subset_conversations(convs: list[Conversation], share: float, seed: int) -> list[Conversation]:
    """Copies of a seeded `share` of the conversations that offer tools, offering instead a random
    subset of them (always the ones the conversation calls) in random order. Every SFT conversation
    offers all three tools in one order, and a sparse stage that trains on that one layout alone
    left the model unable to write DSML when a request offered one tool (docs/training.md)."""
    rng = random.Random(f"dsv32-tool-subsets|{seed}")
    out = []
    for c in convs:
        tools = c.tools
        if not tools or rng.random() >= share:
            continue
        called = c.called_tools()
        need = [t for t in tools if t["function"]["name"] in called]
        rest = [t for t in tools if t["function"]["name"] not in called]
        keep = need + rng.sample(rest, rng.randint(0 if need else 1, len(rest)))
        rng.shuffle(keep)
        out.append(c.offering(keep, id=f"{c.id}-tools{len(keep)}"))
    return out

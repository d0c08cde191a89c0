"""`dsv32 train --recipe demo`: the V3.2 recipe at laptop scale, from nothing to the bundled model.

  1. SFT from scratch on synthesised tool-use conversations (both modes) and skill drills, first
     with the tools section left out of the prompt (a short-context curriculum: cheaper steps in
     which the model learns to copy arguments), then on the full prompts; loss on assistant
     tokens, dense attention, next-token + MTP loss, aux-loss-free balancing + sequence-wise
     balance loss; optionally batches of similar lengths (`sort_window`);
  2. DSA warm-up: only the indexers train, KL to the head-summed main attention;
  3. DSA sparse stage: top-k attention on, indexer KL over the selected set, LM loss for the rest
     at a rate below where SFT ended, with some prompts offering a subset of the tools;
  4. GRPO on verifier rewards with rollouts from dsv32's engine;
  5. export (FP8, published layout + tokenizer), held-out evaluation, plots.
Before the DSA stages: held-out dense LM loss and indexer recall; after the last stage also top-k
LM loss and teacher-forced accuracy on tool-call argument tokens, with the model as served (DSA)
and with full attention.
Each stage checkpoints into OUT/ckpt/<stage>; rerunning resumes after the last finished stage.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import shutil
import time
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv32.chat import Tokenizer
from dsv32.model.init_tiny import copy_tokenizer, tiny_config

from . import grpo as G
from .data import Loader, WordDropout, encode_all, without_tools
from .evaluate import argument_accuracy
from .envs.phrasings import CITIES, frame_words, vocabulary
from .export import export_bundle, fp8_round_trip
from .losses import TiedVocab
from .trainer import (JsonLog, StageConfig, eval_lm, load_into, make_optimizer, new_model, save,
                      set_trainable, train_stage)

DEMO_MODEL = dict(layers=3, hidden=96, heads=4, q_lora=64, kv_lora=64, nope=16, rope=16, v=32,
                  inter=192, moe_inter=64, experts=8, groups=4, topk_group=2, active=2,
                  index_heads=8, index_dim=32, topk=256, dense=1)


@dataclass
class Recipe:
    """Sizes and schedules of the demo recipe."""

    seed: int = 0
    model: dict = field(default_factory=lambda: dict(DEMO_MODEL))
    n_train: int = 20000
    n_city: int = 5000              # extra weather conversations over IANA city names
    n_chat: int = 4000              # extra plain-chat conversations (demo14; docs/training.md)
    invented: float = 0.0           # share of them with made-up place names (0.5 did worse, docs/training.md)
    n_invented_words: int = 0       # made-up place names added to the drills' words
    n_skill: int = 20000            # short drills: copying, dates, numbers, expressions, unit codes
    n_spell: int = 0                # conversations of 8 one-word echoes (3000 did worse, docs/training.md)
    n_numbers: int = 8000           # conversations of 6 echoes of uniformly drawn numbers
    n_conversions: int = 4000       # conversations of 6 number-word and worded-calculation
                                    # conversions, in the full-prompt and later stages only (demo20)
    separated: float = 0.0          # share of those turns that drop thousands separators ("3,962")
    drill_vocabulary: bool = False  # drills also echo every word of the generator (ditto)
    n_full_tasks: int = 0           # extra conversations of `full_tasks` (drawn uniformly), in the
                                    # full-prompt and later stages only (demo25: no gain, docs/training.md)
    full_tasks: tuple[str, ...] = ("calculator", "units", "chat")
    sparse_tool_subsets: float = 0.25  # share of the conversations offering tools that the sparse
                                    # stage also sees offering a random subset of them (demo33)
    tie_embeddings: bool = True     # LM head shares the input embedding while training
    init_std: float = 0.02          # (0.006 learned to copy ~4x slower in a 800-step echo drill)
    word_dropout: float = 0.08      # share of the user's frame words swapped for an unseen token
    full_drills: float = 1.0        # share of the drills kept in the full-prompt stage, where they are
                                    # as in the short one (0.2 with 1200 steps did worse, docs/training.md)
    batch: int = 16
    sort_window: int = 1            # >1: length-sorted batches, ~1.6x faster full-prompt steps, but
                                    # with made-up places (`invented`, `n_invented_words`) the model did
                                    # much worse (docs/training.md)
    # 3800 short-context steps, then 3200 full-prompt ones, at peak rate 1.75e-3 (3e-3 at hidden 56;
    # demo23); tokens that spell a tool value weigh 5x in the full-prompt stage (demo20). V3.2's
    # sparse stage keeps 7.3e-6, the rate DeepSeek-V3's pre-training ended at; here the model trains
    # at 5e-5, below the full-prompt stage's final 1.75e-4 (1e-3 undid its copying: demo29 in
    # docs/training.md), and the indexers keep the warm-up's 1e-3.
    short: StageConfig = field(default_factory=lambda: StageConfig(
        name="sft_short", stage="dense", steps=3800, lr=1.75e-3, warmup=100, mtp_weight=0.3))
    sft: StageConfig = field(default_factory=lambda: StageConfig(
        name="sft", stage="dense", steps=3200, lr=1.75e-3, warmup=50, mtp_weight=0.3, value_weight=5.0))
    warmup: StageConfig = field(default_factory=lambda: StageConfig(
        name="dsa_warmup", stage="warmup", steps=80, lr=1e-3, warmup=5, mtp_weight=0.0))
    sparse: StageConfig = field(default_factory=lambda: StageConfig(
        name="dsa_sparse", stage="sparse", steps=100, lr=5e-5, indexer_lr=1e-3, warmup=10,
        mtp_weight=0.1))
    grpo: G.GRPOConfig = field(default_factory=lambda: G.GRPOConfig(
        steps=10, prompts_per_step=8, group_size=8, lr=2e-4))
    n_eval: int = 160
    n_unseen: int = 40              # weather tasks about unseen cities, a probe reported apart
    n_heldout_lm: int = 48

    def scaled(self, f: float) -> "Recipe":
        """The same recipe with every step count (and data size) multiplied by f (smoke tests)."""
        r = dataclasses.replace(self)
        for name in ("short", "sft", "warmup", "sparse"):
            sc = getattr(self, name)
            setattr(r, name, dataclasses.replace(sc, steps=max(2, int(sc.steps * f)),
                                                 warmup=max(1, int(sc.warmup * f))))
        r.grpo = dataclasses.replace(self.grpo, steps=max(1, int(self.grpo.steps * f)))
        r.n_train = max(64, int(self.n_train * f))
        r.n_city = int(self.n_city * f)
        r.n_chat = int(self.n_chat * f)
        r.n_skill = int(self.n_skill * f)
        r.n_spell = int(self.n_spell * f)
        r.n_numbers = int(self.n_numbers * f)
        r.n_conversions = int(self.n_conversions * f)
        r.n_full_tasks = int(self.n_full_tasks * f)
        return r


# ---- data -----------------------------------------------------------------------------------

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


_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p",
           "pr", "r", "s", "sh", "st", "t", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "rk", "nd", "x")


def made_up_places(n: int, seed: int) -> tuple[str, ...]:
    """`n` distinct invented place names ("Drovanel", "Kesh Tarim"): the model cannot know them, so
    a weather call that names one must copy it from the user's words."""
    rng = random.Random(f"dsv32-places|{seed}")
    real = {c.casefold() for c in tz_cities() + CITIES["train"] + CITIES["unseen"]}
    out: dict[str, None] = {}
    while len(out) < n:
        words = []
        for _ in range(1 if rng.random() < 0.8 else 2):
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3)))
            words.append((w + rng.choice(_CODAS)).capitalize())
        name = " ".join(words)
        if len(name) > 3 and name.casefold() not in real:
            out[name] = None
    return tuple(out)


def city_conversations(convs: list[dict], n: int, seed: int, invented: float = 0.5) -> list[dict]:
    """Copies of weather conversations with the city swapped (in every casing the conversation
    uses) for a time-zone city name or, with probability `invented`, a made-up place name, so the
    model learns to copy the place rather than recall it. The unseen cities are left out."""
    rng = random.Random(seed)
    cities = [c for c in tz_cities() if c not in CITIES["unseen"]]
    places = made_up_places(n if invented else 0, seed)
    weather = [c for c in convs if c.get("category") == "weather"]
    out = []
    for i in range(n if weather else 0):
        c = weather[i % len(weather)]
        old = _weather_city(c)
        if old is None:
            continue
        new = rng.choice(places) if invented and rng.random() < invented else rng.choice(cities)
        text = json.dumps(c, ensure_ascii=False)
        for a, b in ((old, new), (old.lower(), new.lower()), (old.title(), new.title()),
                     (old.upper(), new.upper())):
            text = text.replace(a, b)
        out.append(json.loads(text))
    return out


def _weather_city(conv: dict) -> str | None:
    for m in conv["messages"]:
        for call in m.get("tool_calls") or []:
            if call["function"]["name"] == "get_weather":
                return json.loads(call["function"]["arguments"]).get("city")
    return None


def training_conversations(recipe: Recipe) -> list[dict]:
    """The SFT data: tool conversations, extra weather and plain-chat conversations, skill, number
    and spelling drills."""
    from .synth import number_conversations, sft_conversations, skill_conversations, spelling_conversations

    convs = sft_conversations(recipe.n_train, seed=recipe.seed)
    convs += city_conversations(convs, recipe.n_city, recipe.seed, invented=recipe.invented)
    convs += sft_conversations(recipe.n_chat, seed=recipe.seed + 13, categories=("chat",))
    words = tz_cities()                  # the drills' words: place names, made-up places, vocabulary
    if recipe.drill_vocabulary:          # (place names then at least twice as likely as other words)
        words = tuple(dict.fromkeys(words + CITIES["train"] + CITIES["unseen"])) * 2 + vocabulary()
    words += made_up_places(recipe.n_invented_words, recipe.seed + 7)
    convs += skill_conversations(recipe.n_skill, recipe.seed, words=words)
    convs += number_conversations(recipe.n_numbers, recipe.seed)
    return convs + spelling_conversations(recipe.n_spell, recipe.seed, words=words)


def later_conversations(recipe: Recipe) -> list[dict]:
    """The data of the full-prompt and later stages only: conversion drills and the extra tool and
    chat conversations (`n_full_tasks`)."""
    from .synth import conversion_conversations, sft_conversations

    later = conversion_conversations(recipe.n_conversions, recipe.seed, separated=recipe.separated)
    return later + sft_conversations(recipe.n_full_tasks, seed=recipe.seed + 29, categories=recipe.full_tasks)


def tool_subset_conversations(convs: list[dict], share: float, seed: int) -> list[dict]:
    """Copies of a seeded `share` of the conversations that offer tools, offering instead a random
    subset of them (always the ones the conversation calls) in random order. Every SFT conversation
    offers all three tools in one order, and a sparse stage that trains on that one layout alone
    left the model unable to write DSML when a request offered one tool (docs/training.md)."""
    rng = random.Random(f"dsv32-tool-subsets|{seed}")
    out = []
    for c in convs:
        msgs = c["messages"]
        tools = msgs[0].get("tools") if msgs else None
        if not tools or rng.random() >= share:
            continue
        called = {call["function"]["name"] for m in msgs for call in m.get("tool_calls") or []}
        need = [t for t in tools if t["function"]["name"] in called]
        rest = [t for t in tools if t["function"]["name"] not in called]
        keep = need + rng.sample(rest, rng.randint(0 if need else 1, len(rest)))
        rng.shuffle(keep)
        copy = json.loads(json.dumps(c))
        copy["id"] = f"{c.get('id', '')}-tools{len(keep)}"
        copy["messages"][0]["tools"] = copy["tools"] = keep
        out.append(copy)
    return out


# ---- the recipe -----------------------------------------------------------------------------

def run_demo(out: str | Path, recipe: Recipe | None = None, progress: bool = True,
             evaluate_model: bool = True) -> dict:
    """Run the whole recipe into `out`; returns the summary written to OUT/summary.json."""
    from .synth import answer_stage, generate_tasks, sft_conversations

    recipe = recipe or Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = JsonLog(out / "log.jsonl")
    t0 = time.time()
    torch.manual_seed(recipe.seed)
    tok = Tokenizer.load()
    summary: dict = {"recipe": _jsonable(recipe)}

    convs = training_conversations(recipe)
    later = later_conversations(recipe)
    stages = (recipe.short, recipe.sft, recipe.warmup, recipe.sparse)
    marks = any(sc.value_weight != 1.0 for sc in stages)      # mask 2 on tool values (data.py)
    examples = encode_all(convs + later, tok, max_len=1536, mark_values=marks)
    heldout_convs = sft_conversations(recipe.n_heldout_lm, seed=recipe.seed + 1, split="heldout")
    heldout = encode_all(heldout_convs, tok)
    seen = {i for e in examples for i in e.ids} | {tok.bos_id, tok.eos_id}
    cfg = tiny_config(**recipe.model)
    vocab = TiedVocab(sorted(seen), cfg.vocab_size)
    log.write(event="data", conversations=len(convs) + len(later), examples=len(examples),
              tokens=sum(len(e.ids) for e in examples),
              loss_tokens=sum(len(e.mask) - e.mask.count(0) for e in examples),
              value_tokens=sum(e.mask.count(2) for e in examples), seen_vocab=len(vocab.seen))
    ho_batches = _heldout_batches(heldout, recipe.batch, tok)

    model = new_model(cfg, seed=recipe.seed, std=recipe.init_std, tie_embeddings=recipe.tie_embeddings)
    vocab.sync(model.lm_head.weight.data)
    sw = recipe.sort_window
    drop = word_dropout(tok, vocab, recipe.word_dropout)
    log.write(event="word_dropout", p=recipe.word_dropout, droppable_tokens=len(drop.ids) if drop else 0)
    full = full_stage_examples(examples, recipe.full_drills, recipe.seed)
    log.write(event="full_stage", rows=len(full), drills=sum(e.category == "skill" for e in full))
    loader = Loader(full, recipe.batch, seed=recipe.seed, bucket_id=tok.user_id, sort_window=sw,
                    dropout=drop)

    def stage(sc: StageConfig, loader: Loader) -> None:
        done = out / "ckpt" / sc.name
        if (done / "DONE").exists():
            load_into(model, done)
            return
        train_stage(model, loader, sc, log, ckpt_dir=done, ckpt_every=200, progress=progress, vocab=vocab)
        save(model, done, {"stage_name": sc.name, "step": sc.steps})
        (done / "DONE").write_text("ok\n")

    def lm_eval(tag: str, full: bool = True) -> None:
        """Held-out diagnostics; `full=False` measures only dense LM loss and indexer recall (the
        complete set costs about a minute, so it runs after the last stage only)."""
        dense = eval_lm(model, ho_batches, "dense")
        row = {"dense_lm_loss": dense["lm_loss"], "indexer_recall": dense["recall"]}
        if full:
            row["sparse_lm_loss"] = eval_lm(model, ho_batches, "sparse")["lm_loss"]
            for attention in ("served", "dense"):    # teacher-forced tool-call argument tokens
                acc = argument_accuracy(model, heldout_convs, tok, attention)
                row[f"arg_top1_{attention}"] = acc["top1"]
                row[f"arg_exact_{attention}"] = acc["first_call_exact"]
        summary[tag] = row
        log.write(event="lm_eval", tag=tag, **row)
        print(f"[{tag}] " + ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in row.items()))

    short = encode_all([without_tools(c) for c in convs], tok, max_len=1536, mark_values=marks)
    stage(recipe.short, Loader(short, recipe.batch, seed=recipe.seed + 3, bucket_id=tok.user_id,
                              sort_window=sw, dropout=drop))
    stage(recipe.sft, loader)
    lm_eval("after_sft", full=False)          # indexer recall before the DSA stages
    stage(recipe.warmup, Loader(examples, max(4, recipe.batch // 2), seed=recipe.seed + 1,
                                bucket_id=tok.user_id, sort_window=sw))
    subsets = tool_subset_conversations(convs + later, recipe.sparse_tool_subsets, recipe.seed)
    sparse_rows = examples + encode_all(subsets, tok, max_len=1536, mark_values=marks)
    log.write(event="sparse_stage", rows=len(sparse_rows), tool_subsets=len(sparse_rows) - len(examples))
    stage(recipe.sparse, Loader(sparse_rows, recipe.batch, seed=recipe.seed + 2, bucket_id=tok.user_id,
                                sort_window=sw, dropout=drop))

    # ---- GRPO
    gdir = out / "ckpt" / "grpo"
    if (gdir / "DONE").exists():
        load_into(model, gdir)
    else:
        summary["grpo"] = run_grpo(model, tok, recipe, log, vocab, generate_tasks, answer_stage)
        save(model, gdir, {"stage_name": "grpo"})
        (gdir / "DONE").write_text("ok\n")
    lm_eval("after_grpo")

    # ---- export, evaluate, plot
    vocab.sync(model.lm_head.weight.data)
    bundle = out / "model"
    if bundle.exists():
        shutil.rmtree(bundle)
    export_bundle(model, bundle)
    copy_tokenizer(bundle)
    summary["bundle_bytes"] = sum(f.stat().st_size for f in bundle.iterdir())
    summary["train_seconds"] = time.time() - t0
    if evaluate_model:
        fp8_round_trip(model)
        res = evaluate_in_memory(model, tok, recipe.n_eval, seed=recipe.seed)
        summary["eval"] = {"overall": res["overall"], "cells": res["cells"]}
        probe = evaluate_in_memory(model, tok, recipe.n_unseen, seed=recipe.seed,
                                   categories=("weather",), unseen_cities=True)
        summary["eval_unseen_cities"] = {"overall": probe["overall"], "cells": probe["cells"]}
        (out / "eval.md").write_text(res["table"] + "\n\nWeather about cities no training "
                                     "conversation names (a probe, not in the table above):\n\n"
                                     + probe["table"] + "\n")
        with (out / "eval_episodes.jsonl").open("w") as f:
            for e in res["episodes"] + probe["episodes"]:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
    summary["wall_seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from .plots import plot_log
    plot_log(out / "log.jsonl", out)
    return summary


def full_stage_examples(examples: list, drills: float, seed: int) -> list:
    """The full-prompt stage's rows: every conversation but the drills ("skill"), of which a seeded
    share `drills` stays (the short stage already trained them exactly as they are here)."""
    rng = random.Random(f"dsv32-full-stage|{seed}")
    return [e for e in examples if e.category != "skill" or rng.random() < drills]


def word_dropout(tok, vocab: TiedVocab, p: float) -> WordDropout | None:
    """Word dropout over the seen tokens that spell a frame word, with the pooled unseen row as the
    stand-in (the embedding every token absent from training shares when served)."""
    if not p or vocab.rep is None:
        return None
    words = frame_words()
    ids = frozenset(int(i) for i in vocab.seen
                    if tok.token_bytes(int(i)).decode("utf-8", "ignore").strip().casefold() in words)
    return WordDropout(vocab.rep, p, ids, tok.user_id, tok.assistant_id)


def run_grpo(model, tok, recipe: Recipe, log: JsonLog, vocab, generate_tasks, answer_stage) -> dict:
    """GRPO steps on training-split tasks (tool calls, answers after tool results, plain chat)."""
    gc = recipe.grpo
    set_trainable(model, "sparse")
    ref = G.frozen_copy(model) if gc.beta else None
    sc = StageConfig(name="grpo", lr=gc.lr, weight_decay=gc.weight_decay)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], sc)
    engine = G.make_engine(model, tok, max_seqs=gc.prompts_per_step * gc.group_size)
    tasks = generate_tasks(gc.steps * gc.prompts_per_step, seed=recipe.seed + 7)
    curve = []
    for step in range(gc.steps):
        batch = tasks[step * gc.prompts_per_step:(step + 1) * gc.prompts_per_step]
        batch = [answer_stage(t) if (i % 2 and t.reference_calls) else t for i, t in enumerate(batch)]
        t = time.time()
        model.eval()
        groups = G.rollout(engine, [G.prompt_ids(task, tok) for task in batch], gc, seed=step)
        for task, group in zip(batch, groups):
            for r in group:
                try:
                    r.reward = task.verify([G.completion_message(r.text, task.thinking_mode)])
                except Exception:          # unparsable output scores 0
                    r.reward = 0.0
        rollout_s = time.time() - t
        model.train()
        stats = G.grpo_update(model, ref, opt, groups, gc)
        vocab.sync(model.lm_head.weight.data)
        mean_r = sum(r.reward for g in groups for r in g) / sum(len(g) for g in groups)
        row = {"stage": "grpo", "step": step + 1, "reward": mean_r, "rollout_s": rollout_s,
               "update_s": time.time() - t - rollout_s,
               "completion_tokens": sum(len(r.completion_ids) for g in groups for r in g), **stats}
        curve.append(mean_r)
        log.write(**row)
        print(f"[grpo {step + 1}/{gc.steps}] reward {mean_r:.3f} {stats}")
    set_trainable(model, "dense")
    return {"reward_curve": curve}


def evaluate_in_memory(model, tok, n: int, seed: int = 0, **kwargs) -> dict:
    """The held-out evaluation (dsv32.train.evaluate) over an engine on the in-memory model;
    `kwargs` go to `evaluate` (categories, unseen_cities)."""
    from dsv32.chat.tokens import EOS
    from dsv32.engine.sequence import SamplingParams

    from .evaluate import evaluate

    engine = G.make_engine(model, tok, max_seqs=64)
    params = SamplingParams(temperature=0.0, max_tokens=256, skip_special_tokens=False)

    def generate_batch(prompts: list[str], modes: list[str]) -> list[str]:
        outputs = engine.generate(prompts, [params] * len(prompts))
        return [o.outputs[0].text.split(EOS)[0] for o in outputs]

    model.eval()
    with torch.no_grad():
        return evaluate(n_tasks=n, seed=seed, split="heldout", generate_batch=generate_batch, **kwargs)


def _heldout_batches(examples, batch: int, tok) -> list:
    ld = Loader(examples, batch, seed=0, bucket_id=tok.user_id)
    return [ld.next() for _ in range(len(ld._batches()))]


def _jsonable(x):
    return json.loads(json.dumps(dataclasses.asdict(x), default=str))

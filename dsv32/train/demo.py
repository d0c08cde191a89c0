"""`dsv32 train --recipe demo`: the V3.2 recipe at laptop scale, from nothing to the bundled model.

  1. SFT from scratch on synthesised tool-use conversations (both modes) and skill drills, first
     with the tools section left out of the prompt (a short-context curriculum: cheaper steps in
     which the model learns to copy arguments), then on the full prompts; loss on assistant
     tokens, dense attention, next-token + MTP loss, aux-loss-free balancing + sequence-wise
     balance loss;
  2. DSA warm-up: only the indexers train, KL to the head-summed main attention;
  3. DSA sparse stage: top-k attention on, indexer KL over the selected set, LM loss for the rest
     at a rate below where SFT ended, with some prompts offering a subset of the tools;
  4. GRPO on verifier rewards with rollouts from dsv32's engine;
  5. export (FP8, published layout + tokenizer), held-out evaluation, plots.
Before the DSA stages: held-out dense LM loss and indexer recall; after the last stage also top-k
LM loss and teacher-forced accuracy on tool-call argument tokens, with the model as served (DSA)
and with full attention. `run_demo` runs one function per stage; each stage checkpoints into
OUT/ckpt/<stage>, and rerunning resumes after the last finished stage.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv32.chat import Tokenizer
from dsv32.model.init_tiny import copy_tokenizer, tiny_config
from dsv32.model.transformer import Transformer

from . import grpo as G
from .corpus import Data, prepare_data, tool_subset_conversations, word_dropout
from .data import Example, Loader, WordDropout
from .evaluate import ALL_METRICS, argument_accuracy, evaluate_in_memory, report_markdown
from .export import export_bundle, fp8_round_trip
from .plots import plot_log
from .recipe import Recipe
from .synth import Task, answer_stage, generate_tasks
from .trainer import (JsonLog, StageConfig, eval_lm, load_into, make_optimizer, new_model, save,
                      set_trainable, train_stage)
from .users import user_tasks


def run_demo(out: str | Path, recipe: Recipe | None = None, progress: bool = True,
             evaluate_model: bool = True) -> dict:
    """Run the whole recipe into `out`; returns the summary written to OUT/summary.json."""
    run = data_stage(Path(out), recipe or Recipe(), progress)
    short_context_sft(run)
    full_prompt_sft(run)
    diagnostics(run, "after_sft", full=False)          # indexer recall before the DSA stages
    dsa_warmup(run)
    dsa_sparse(run)
    grpo_stage(run)
    diagnostics(run, "after_grpo")
    export_stage(run)
    if evaluate_model:
        evaluation_stage(run)
    return finish(run)


@dataclass
class Run:
    """One run of the recipe: its directory, log and summary, and what every stage works on."""

    out: Path
    recipe: Recipe
    tok: Tokenizer
    log: JsonLog
    data: Data
    model: Transformer
    dropout: WordDropout | None          # word dropout of the stages that use it
    progress: bool
    summary: dict
    t0: float

    def loader(self, rows: list[Example], seed: int, batch: int | None = None,
               dropout: bool = True) -> Loader:
        """Batches of `rows`, each sharing the prompt before its first user turn."""
        return Loader(rows, batch or self.recipe.batch, seed=seed, bucket_id=self.tok.user_id,
                      dropout=self.dropout if dropout else None)

    def train(self, sc: StageConfig, loader: Loader) -> None:
        """Train stage `sc` on `loader`, resuming from its checkpoint."""
        if not self.finished(sc.name):
            train_stage(self.model, loader, sc, self.log, ckpt_dir=self.ckpt(sc.name), ckpt_every=200,
                        progress=self.progress, vocab=self.data.vocab)
            self.mark_finished(sc.name, {"stage_name": sc.name, "step": sc.steps})

    def ckpt(self, stage: str) -> Path:
        """The checkpoint directory of `stage`."""
        return self.out / "ckpt" / stage

    def finished(self, stage: str) -> bool:
        """Whether `stage` finished in an earlier run; its weights are then loaded."""
        if (self.ckpt(stage) / "DONE").exists():
            load_into(self.model, self.ckpt(stage))
            return True
        return False

    def mark_finished(self, stage: str, state: dict) -> None:
        """Checkpoint the model as `stage`'s result."""
        save(self.model, self.ckpt(stage), state)
        (self.ckpt(stage) / "DONE").write_text("ok\n")


def data_stage(out: Path, recipe: Recipe, progress: bool) -> Run:
    """The conversations, their rows and vocabulary, and the fresh model the stages train."""
    out.mkdir(parents=True, exist_ok=True)
    log, t0 = JsonLog(out / "log.jsonl"), time.time()
    torch.manual_seed(recipe.seed)
    tok = Tokenizer.load()
    data = prepare_data(recipe, tok)
    log.write(event="data", **data.counts())
    model = new_model(tiny_config(**recipe.model), seed=recipe.seed, std=recipe.init_std,
                      tie_embeddings=recipe.tie_embeddings)
    data.vocab.sync(model.lm_head.weight.data)
    dropout = word_dropout(tok, data.vocab, recipe.word_dropout)
    log.write(event="word_dropout", p=recipe.word_dropout,
              droppable_tokens=len(dropout.ids) if dropout else 0)
    return Run(out, recipe, tok, log, data, model, dropout, progress, {"recipe": recipe.to_json()}, t0)


def short_context_sft(run: Run) -> None:
    """SFT with the tools section left out of every prompt: cheaper steps in which the model learns
    to copy arguments; the conversion drills wait for the full prompts."""
    rows = run.data.encode([c.without_tools() for c in run.data.conversations], run.tok)
    run.train(run.recipe.short, run.loader(rows, seed=run.recipe.seed + 3))


def full_prompt_sft(run: Run) -> None:
    """SFT on the full prompts, with the conversion drills; tool values weigh `sft.value_weight`."""
    run.train(run.recipe.sft, run.loader(run.data.examples, seed=run.recipe.seed))


def dsa_warmup(run: Run) -> None:
    """Only the indexers train, towards the main attention (half-size batches, no word dropout)."""
    loader = run.loader(run.data.examples, seed=run.recipe.seed + 1, batch=max(4, run.recipe.batch // 2),
                        dropout=False)
    run.train(run.recipe.warmup, loader)


def dsa_sparse(run: Run) -> None:
    """Top-k attention on, on the same rows and copies of a share of the tool conversations that
    offer a random subset of their tools."""
    data, recipe = run.data, run.recipe
    subsets = tool_subset_conversations(data.conversations + data.later, recipe.sparse_tool_subsets,
                                        recipe.seed)
    rows = data.examples + data.encode(subsets, run.tok)
    run.log.write(event="sparse_stage", rows=len(rows), tool_subsets=len(rows) - len(data.examples))
    run.train(recipe.sparse, run.loader(rows, seed=recipe.seed + 2))


def grpo_stage(run: Run) -> None:
    """GRPO on verifier rewards with rollouts from dsv32's engine; its reward curve goes to the summary."""
    if not run.finished("grpo"):
        run.summary["grpo"] = grpo_steps(run)
        run.mark_finished("grpo", {"stage_name": "grpo"})


def grpo_steps(run: Run) -> dict:
    """GRPO steps on training-split tasks (tool calls, answers after tool results, plain chat)."""
    model, gc = run.model, run.recipe.grpo
    set_trainable(model, "sparse")
    ref = G.frozen_copy(model) if gc.beta else None
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad],
                         StageConfig(name="grpo", lr=gc.lr, weight_decay=gc.weight_decay))
    engine = G.make_engine(model, run.tok, max_seqs=gc.prompts_per_step * gc.group_size)
    tasks = generate_tasks(gc.steps * gc.prompts_per_step, seed=run.recipe.seed + 7)
    curve = []
    for step in range(gc.steps):
        batch = tasks[step * gc.prompts_per_step:(step + 1) * gc.prompts_per_step]
        batch = [answer_stage(t) if (i % 2 and t.reference_calls) else t for i, t in enumerate(batch)]
        t = time.time()
        model.eval()
        groups = G.rollout(engine, [G.prompt_ids(task, run.tok) for task in batch], gc, seed=step)
        score_rollouts(batch, groups)
        rollout_s = time.time() - t
        model.train()
        stats = G.grpo_update(model, ref, opt, groups, gc)
        run.data.vocab.sync(model.lm_head.weight.data)
        curve.append(sum(r.reward for g in groups for r in g) / sum(len(g) for g in groups))
        run.log.write(stage="grpo", step=step + 1, reward=curve[-1], rollout_s=rollout_s,
                      update_s=time.time() - t - rollout_s,
                      completion_tokens=sum(len(r.completion_ids) for g in groups for r in g), **stats)
        print(f"[grpo {step + 1}/{gc.steps}] reward {curve[-1]:.3f} {stats}")
    set_trainable(model, "dense")
    return {"reward_curve": curve}


def score_rollouts(tasks: list[Task], groups: list[list]) -> None:
    """Each rollout's reward from its task's verifier; unparsable output scores 0."""
    for task, group in zip(tasks, groups):
        for r in group:
            try:
                r.reward = task.verify([G.completion_message(r.text, task.thinking_mode)])
            except Exception:
                r.reward = 0.0


def diagnostics(run: Run, tag: str, full: bool = True) -> None:
    """Held-out diagnostics into the summary and log; `full=False` measures only dense LM loss and
    indexer recall (the complete set costs about a minute, so it runs after the last stage only)."""
    batches, model = run.data.heldout_batches, run.model
    dense = eval_lm(model, batches, "dense")
    row = {"dense_lm_loss": dense["lm_loss"], "indexer_recall": dense["recall"]}
    if full:
        row["sparse_lm_loss"] = eval_lm(model, batches, "sparse")["lm_loss"]
        for attention in ("served", "dense"):    # teacher-forced tool-call argument tokens
            acc = argument_accuracy(model, run.data.heldout, run.tok, attention)
            row[f"arg_top1_{attention}"] = acc["top1"]
            row[f"arg_exact_{attention}"] = acc["first_call_exact"]
    run.summary[tag] = row
    run.log.write(event="lm_eval", tag=tag, **row)
    print(f"[{tag}] " + ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in row.items()))


def export_stage(run: Run) -> None:
    """The bundle in OUT/model: FP8 weights in the published layout, and the tokenizer."""
    run.data.vocab.sync(run.model.lm_head.weight.data)
    bundle = run.out / "model"
    if bundle.exists():
        shutil.rmtree(bundle)
    export_bundle(run.model, bundle)
    copy_tokenizer(bundle)
    run.summary["bundle_bytes"] = sum(f.stat().st_size for f in bundle.iterdir())
    run.summary["train_seconds"] = time.time() - run.t0


def evaluation_stage(run: Run) -> None:
    """Held-out tool use of the model as exported (FP8), the unseen-city probe and the
    user-written set: the summary, OUT/eval.md and OUT/eval_episodes.jsonl."""
    model, tok, recipe = run.model, run.tok, run.recipe
    fp8_round_trip(model)
    res = evaluate_in_memory(model, tok, recipe.n_eval, seed=recipe.seed)
    run.summary["eval"] = {"overall": res["overall"], "cells": res["cells"]}
    probe = evaluate_in_memory(model, tok, recipe.n_unseen, seed=recipe.seed, categories=("weather",),
                               unseen_cities=True)
    run.summary["eval_unseen_cities"] = {"overall": probe["overall"], "cells": probe["cells"]}
    users = evaluate_in_memory(model, tok, 0, tasks=user_tasks(n=recipe.n_users), columns=ALL_METRICS)
    run.summary["eval_users"] = {k: users[k] for k in ("overall", "categories", "cells")}
    (run.out / "eval.md").write_text(report_markdown(res, probe, users))
    with (run.out / "eval_episodes.jsonl").open("w") as f:
        for e in res["episodes"] + probe["episodes"] + users["episodes"]:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")


def finish(run: Run) -> dict:
    """OUT/summary.json and the plots of the log; returns the summary."""
    run.summary["wall_seconds"] = time.time() - run.t0
    (run.out / "summary.json").write_text(json.dumps(run.summary, indent=2) + "\n")
    plot_log(run.out / "log.jsonl", run.out)
    return run.summary

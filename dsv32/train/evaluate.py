"""Held-out evaluation of tool use: an agent loop over synthesised tasks, scored by the verifiers.

For each task the prompt is rendered with `encode_messages`, the model's completion is parsed with
`parse_completion`, its tool calls are executed by the environments and their results appended,
and the model is asked again, until it answers without calling a tool (or `max_steps` runs out).
Tasks run in lockstep, so a batched generator sees every open episode at once.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Callable

import torch

from dsv32.chat import ChatFormatError, Tokenizer, encode_messages, parse_completion
from dsv32.chat.dsml import PARAM_OPEN
from dsv32.chat.tokens import DSML, PARAM_CLOSE

from .conversation import Conversation
from .data import byte_spans, encode_conversation
from .envs.jsonfmt import json_answer
from .envs.registry import tool_messages
from .envs.verify import score_answer, score_call, score_plain
from .synth import CATEGORIES, MODES, Task, generate_tasks

GenerateFn = Callable[[str, str], str]                     # (prompt text, thinking_mode) -> completion
GenerateBatch = Callable[[list[str], list[str]], list[str]]  # (prompts, modes) -> completions

METRICS = ("right_tool", "right_args", "answer", "plain", "success")
# Also scored: no DSML at all where no tool is offered, and a valid JSON answer where the request's
# response_format asks for one (the columns of the user-written set's table).
ALL_METRICS = ("right_tool", "right_args", "answer", "plain", "no_dsml", "json", "success")
HEADERS = {"right_tool": "right tool", "right_args": "right arguments",
           "answer": "answer has result", "plain": "plain, no tool", "no_dsml": "no DSML",
           "json": "JSON valid", "success": "success"}
TOOL_METRICS = ("right_tool", "right_args", "answer")


def evaluation_tasks(n_tasks: int, seed: int = 0, split: str = "heldout",
                     categories: tuple[str, ...] = CATEGORIES, unseen_cities: bool = False,
                     one_tool: bool = False) -> list[Task]:
    """The tasks `evaluate` runs: balanced over every (category, mode) cell; `one_tool` offers each
    tool task only the tool it needs (every SFT conversation offers all three)."""
    tasks = generate_tasks(n_tasks, seed, split, balanced=True, categories=categories,
                           unseen_cities=unseen_cities)
    return [offer_needed_tools(t) for t in tasks] if one_tool else tasks


def offer_needed_tools(task: Task) -> Task:
    """The task with a system message that offers only the tools its reference calls."""
    needed = {call["name"] for call in task.reference_calls}
    if not needed or not task.tools:
        return task
    head = dict(task.messages[0], tools=[t for t in task.tools if t["function"]["name"] in needed])
    return dataclasses.replace(task, messages=[head] + task.messages[1:])


def run_episodes(tasks: list[Task], generate_batch: GenerateBatch, max_steps: int = 3) -> list[list[dict]]:
    """The messages each task's agent loop added after its prompt (assistant and tool messages)."""
    transcripts: list[list[dict]] = [[] for _ in tasks]
    active = list(range(len(tasks)))
    for _ in range(max_steps):
        prompts, open_ids = [], []
        for i in active:
            try:
                prompts.append(encode_messages(tasks[i].messages + transcripts[i],
                                               thinking_mode=tasks[i].thinking_mode))
                open_ids.append(i)
            except ChatFormatError:
                pass        # the model produced something the format cannot carry: episode over
        if not open_ids:
            break
        completions = generate_batch(prompts, [tasks[i].thinking_mode for i in open_ids])
        active = []
        for i, text in zip(open_ids, completions):
            message = parse_completion(text, tasks[i].thinking_mode)
            transcripts[i].append(message)
            if message["tool_calls"]:
                transcripts[i].extend(tool_messages(message["tool_calls"]))
                active.append(i)
    return transcripts


def score_episode(task: Task, transcript: list[dict]) -> dict:
    """Booleans per metric (None where it does not apply) and the GRPO reward of one episode.
    Where no tool is offered the episode must write no DSML; where the request's response_format
    asks for JSON the final answer must be one JSON object under its schema (and still carry the
    results or the expected facts)."""
    assistants = [m for m in transcript if m["role"] == "assistant"]
    first_calls = assistants[0]["tool_calls"] if assistants else []
    all_calls = [c for m in assistants for c in m["tool_calls"]]
    last = assistants[-1] if assistants else {"content": "", "tool_calls": []}
    row = dict.fromkeys(ALL_METRICS)
    if not task.tools:
        row["no_dsml"] = not writes_dsml(assistants)
    response_format = (task.messages[0] if task.messages[0]["role"] == "system" else {}).get("response_format")
    if response_format and response_format.get("type") != "text":
        row["json"] = json_answer(last["content"], response_format) is not None
    if task.reference_calls:
        names = sorted(c["function"]["name"] for c in first_calls)
        row["right_tool"] = names == sorted(c["name"] for c in task.reference_calls)
        row["right_args"] = score_call(task, first_calls) == 1.0
        answered = len(assistants) > 1 and not last["tool_calls"]
        row["answer"] = answered and score_answer(task, last["content"]) == 1.0
        row["success"] = row["right_args"] and row["answer"]
    else:
        row["plain"] = row["success"] = score_plain(task, last["content"], all_calls) == 1.0
    row["success"] = row["success"] and row["no_dsml"] is not False and row["json"] is not False
    row["reward"] = task.verify(transcript)
    return row


def writes_dsml(assistants: list[dict]) -> bool:
    """Whether the assistant messages call a tool or spell DSML markup in their text."""
    texts = [(m.get("content") or "") + (m.get("reasoning_content") or "") for m in assistants]
    return any(m["tool_calls"] for m in assistants) or any(DSML.strip("｜") in text for text in texts)


def _summary(rows: list[dict]) -> dict:
    summary = {"n": len(rows)}
    for metric in (*ALL_METRICS, "reward"):
        values = [r[metric] for r in rows if r[metric] is not None]
        summary[metric] = sum(values) / len(values) if values else None
    return summary


def markdown_table(cells: dict[str, dict], overall: dict, columns: tuple[str, ...] = METRICS) -> str:
    """The per-(category, mode) table with an overall row; rates in percent. Keys of `cells`
    without a mode ("category" rather than "category/mode") leave the mode column empty."""
    header = ["category", "mode", "n", *(HEADERS[m] for m in columns), "mean reward"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def line(category: str, mode: str, summary: dict) -> str:
        rates = ["–" if summary[m] is None else f"{100 * summary[m]:.1f}%" for m in columns]
        reward = "–" if summary["reward"] is None else f"{summary['reward']:.3f}"
        return "| " + " | ".join([category, mode, str(summary["n"]), *rates, reward]) + " |"

    for key, summary in cells.items():
        category, _, mode = key.partition("/")
        lines.append(line(category, mode, summary))
    lines.append(line("**overall**", "", overall))
    return "\n".join(lines)


def evaluate(generate_fn: GenerateFn | None = None, n_tasks: int = 160, seed: int = 0,
             split: str = "heldout", *, generate_batch: GenerateBatch | None = None,
             max_steps: int = 3, verbose: bool = True, categories: tuple[str, ...] = CATEGORIES,
             unseen_cities: bool = False, one_tool: bool = False, tasks: list[Task] | None = None,
             columns: tuple[str, ...] = METRICS) -> dict:
    """Run the agent loop on `n_tasks` tasks and score them. Give `generate_fn(prompt,
    thinking_mode) -> completion text` or the batched `generate_batch(prompts, modes)`.
    `categories` restricts the tasks; `unseen_cities` asks weather questions about cities that no
    training conversation names (a probe reported apart: see `dsv32.train.synth.phrasings`);
    `one_tool` offers each tool task only the tool it needs (another probe). `tasks` runs those
    instead (the user-written set, `dsv32.train.users`), and `columns` are the table's metrics.
    Returns {"split", "seed", "n", "cells": {"category/mode": summary}, "categories": {"category":
    summary over both modes}, "overall", "table", "episodes"}; each summary holds n and the rate of
    every metric (None where none applies)."""
    if generate_batch is None:
        if generate_fn is None:
            raise ValueError("evaluate needs generate_fn or generate_batch")
        def generate_batch(prompts: list[str], modes: list[str]) -> list[str]:
            return [generate_fn(prompt, mode) for prompt, mode in zip(prompts, modes)]
    if tasks is None:
        tasks = evaluation_tasks(n_tasks, seed, split, categories, unseen_cities, one_tool)
    else:
        split = "users"
    transcripts = run_episodes(tasks, generate_batch, max_steps)
    grouped, episodes = defaultdict(list), []
    for task, transcript in zip(tasks, transcripts):
        row = score_episode(task, transcript)
        grouped[f"{task.category}/{task.thinking_mode}"].append(row)
        episodes.append({"id": task.id, "category": task.category, "kind": task.kind,
                         "thinking_mode": task.thinking_mode, "user": task.messages[-1]["content"],
                         **row, "transcript": transcript})
    names = list(dict.fromkeys([c for c in CATEGORIES if any(t.category == c for t in tasks)]
                               + [t.category for t in tasks]))
    order = [f"{c}/{m}" for c in names for m in MODES]
    cells = {key: _summary(grouped[key]) for key in order if grouped[key]}
    pooled = {c: _summary([row for m in MODES for row in grouped[f"{c}/{m}"]]) for c in names}
    overall = _summary([row for key in order for row in grouped[key]])
    table = markdown_table(cells, overall, columns)
    if verbose:
        print(table)
    return {"split": split, "seed": seed, "n": len(tasks), "unseen_cities": unseen_cities,
            "one_tool": one_tool, "cells": cells, "categories": pooled, "overall": overall,
            "table": table, "episodes": episodes}


def llm_generate_batch(llm, max_tokens: int = 256) -> GenerateBatch:
    """A batched generator over `dsv32.engine.llm.LLM`: greedy, special tokens kept, EOS stripped."""
    from dsv32.chat.tokens import EOS
    from dsv32.engine.sequence import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)

    def generate_batch(prompts: list[str], modes: list[str]) -> list[str]:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [out.outputs[0].text.split(EOS)[0] for out in outputs]

    return generate_batch


def main_eval(model_dir: str, n: int = 160, seed: int = 0, split: str = "heldout",
              max_tokens: int = 256, categories: tuple[str, ...] = CATEGORIES,
              unseen_cities: bool = False, one_tool: bool = False, users: bool = False,
              **llm_kwargs) -> dict:
    """Evaluate the checkpoint in `model_dir` with the offline engine; prints and returns the table.
    `users` also runs the user-written set on the same engine (its result under "users")."""
    from dsv32.engine.llm import LLM

    llm = LLM(model=model_dir, **llm_kwargs)
    generate_batch = llm_generate_batch(llm, max_tokens)
    res = evaluate(n_tasks=n, seed=seed, split=split, categories=categories,
                   unseen_cities=unseen_cities, one_tool=one_tool, generate_batch=generate_batch)
    if users:
        res["users"] = evaluate_users(generate_batch=generate_batch)
    return res


def evaluate_users(**kwargs) -> dict:
    """`evaluate` on the user-written set (`dsv32.train.users`), every metric in its table;
    `kwargs` go to `evaluate` (generate_fn or generate_batch, verbose)."""
    from .users import user_tasks

    return evaluate(tasks=user_tasks(), columns=ALL_METRICS, **kwargs)


def report_markdown(heldout: dict, unseen: dict | None = None, users: dict | None = None) -> str:
    """eval.md: the held-out table, the unseen-city probe's and the user-written set's (per
    category and mode, then per category over both modes), each present one after the other."""
    parts = [heldout["table"]]
    if unseen is not None:
        parts += ["Weather about cities no training conversation names (a probe, not in the table "
                  "above):", unseen["table"]]
    if users is not None:
        parts += [f"The user-written set (`dsv32/train/eval_users.jsonl`, {users['n']} episodes: each "
                  "question in both modes, worded apart from every training frame; no-tools: no tool "
                  "offered; multi-call: two or three calls in one turn; json: the request's "
                  "response_format asks for JSON):", users["table"], "By category, both modes:",
                  markdown_table(users["categories"], users["overall"], ALL_METRICS)]
    return "\n\n".join(parts) + "\n"


def evaluate_in_memory(model, tok, n: int, seed: int = 0, **kwargs) -> dict:
    """`evaluate` over an engine on the in-memory model (as trained, not loaded from a directory);
    `kwargs` go to `evaluate` (categories, unseen_cities)."""
    from dsv32.chat.tokens import EOS
    from dsv32.engine.sequence import SamplingParams

    from .grpo import make_engine

    engine = make_engine(model, tok, max_seqs=64)
    params = SamplingParams(temperature=0.0, max_tokens=256, skip_special_tokens=False)

    def generate_batch(prompts: list[str], modes: list[str]) -> list[str]:
        outputs = engine.generate(prompts, [params] * len(prompts))
        return [o.outputs[0].text.split(EOS)[0] for o in outputs]

    model.eval()
    with torch.no_grad():
        return evaluate(n_tasks=n, seed=seed, split="heldout", generate_batch=generate_batch, **kwargs)


# ---- teacher-forced diagnostic ------------------------------------------------------------------

_VALUE = re.compile(PARAM_OPEN.pattern.encode() + rb"(.*?)" + re.escape(PARAM_CLOSE.encode()), re.S)


def argument_tokens(ids: list[int], mask: list[int], tok: Tokenizer) -> list[list[int]]:
    """Positions of the tokens that overlap a DSML parameter value, one list per assistant turn
    that calls tools (the tokens a call's arguments are made of)."""
    text, offsets = byte_spans(ids, tok)
    spans = [m.span(3) for m in _VALUE.finditer(text)]
    turns: list[list[int]] = []
    prev_masked = False
    for i, (start, end) in enumerate(offsets):
        if mask[i] and not prev_masked:
            turns.append([])                                  # a new assistant span begins
        prev_masked = bool(mask[i])
        if mask[i] and any(a < end and start < b for a, b in spans):   # overlaps a value
            turns[-1].append(i)
    return [t for t in turns if t]


@torch.no_grad()
def argument_accuracy(model, conversations: list[Conversation], tok: Tokenizer,
                      attention: str = "served") -> dict:
    """Teacher-forced top-1 accuracy on tool-call argument tokens. `attention` "served" runs the
    model as the engine does (DSA top-k when the prompt is longer than index_topk), "dense" runs
    full causal attention (what the SFT stage trains, before the indexer has learnt anything).
    Returns {"tokens", "top1", "calls", "first_call_exact"}."""
    from .dsa import forward as dense_forward

    if attention not in ("served", "dense"):
        raise ValueError(f"attention must be 'served' or 'dense', not {attention!r}")
    model.eval()
    n = ok = calls = exact = 0
    for conv in conversations:
        ids, mask = encode_conversation(conv, tok)
        turns = argument_tokens(ids, mask, tok)
        if not turns:
            continue
        x = torch.tensor([ids])
        h = dense_forward(model, x, stage="dense", mtp=False)[0] if attention == "dense" else model.hidden(x)
        pred = iter(model.logits(h[0, [i - 1 for t in turns for i in t]]).argmax(-1).tolist())
        hits = [[next(pred) == ids[i] for i in turn] for turn in turns]
        n += sum(map(len, hits))
        ok += sum(map(sum, hits))
        calls += 1
        exact += all(hits[0])
    return {"tokens": n, "top1": ok / max(n, 1), "calls": calls, "first_call_exact": exact / max(calls, 1)}

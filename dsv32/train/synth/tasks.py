"""Seeded tasks for the three tools and plain chat, with reference trajectories (SFT data) and
verifiers (GRPO rewards).

A task is a prompt (a system message carrying the tool specs, an optional earlier finished
exchange, a user turn), the reference trajectory that follows it (thinking mode: reasoning + DSML
call, the tool result, reasoning + an answer quoting the result; chat mode: the same without
reasoning; plain chat: one answer, no call) and what the verifier checks. User phrasings vary a
lot; the assistant side uses a few short templates. Train and held-out splits use disjoint sentence
frames and entity values (see `phrasings`). Generation is deterministic: task i of a (seed, split)
depends on nothing else, so `generate_tasks(n, s)[:k] == generate_tasks(k, s)`.
"""
from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, dataclass, field

from dsv32.chat import encode_messages

from ..conversation import Conversation
from ..envs.numbers import format_number
from ..envs.registry import execute_tool_call, tool_specs
from ..envs.units import DISPLAY
from ..envs.verify import reward
from . import phrasings as P
from . import replies as R
from .drafts import Draft, draft

CATEGORIES = ("calculator", "weather", "units", "chat")
MODES = ("thinking", "chat")


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

    def conversation(self) -> Conversation:
        """The full SFT conversation: the prompt (tools in its system message) and the reference."""
        messages = _copy(self.messages + self.reference)
        return Conversation(messages, self.thinking_mode, self.category, self.id)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable data."""
        return _copy(asdict(self))


def _copy(value):
    return json.loads(json.dumps(value, ensure_ascii=False))


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


def _trajectory(rng: random.Random, draft: Draft,
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
    final = {"role": "assistant", "content": rng.choice(R.ANSWER[name]).format(**slots)}
    if thinking:
        first["reasoning_content"] = rng.choice(R.REASON_CALL[name]).format(**slots)
        final["reasoning_content"] = rng.choice(R.REASON_ANSWER[name]).format(**slots)
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
    category = category or rng.choice(categories)
    if thinking_mode is None:
        thinking_mode = "thinking" if rng.random() < thinking_ratio else "chat"
    thinking = thinking_mode == "thinking"
    first = draft(rng, category, split, unseen_cities)
    reference, calls, results = _trajectory(rng, first, thinking)
    history = []
    if rng.random() < multi_turn:
        earlier = draft(rng, rng.choice(CATEGORIES), split, unseen_cities)
        history = [{"role": "user", "content": earlier.user}] + _trajectory(rng, earlier, thinking)[0]
    uses_tools = category != "chat" or rng.random() < 0.8 or any(m["role"] == "tool" for m in history)
    system = {"role": "system", "content": rng.choice(R.SYSTEM_PROMPTS)}
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
                      multi_turn: float = 0.2, categories: tuple[str, ...] = CATEGORIES
                      ) -> list[Conversation]:
    """`n` reference conversations for SFT (`Task.conversation`)."""
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

"""Requests as the engine sees them: sampling parameters, sequences and their outputs."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from itertools import count
from typing import Callable

import torch

# A logits processor sees the tokens generated so far and the fp32 logits [vocab] of the next
# token, and returns (possibly modified) logits. Grammar-constrained decoding plugs in here: a
# stateful processor offers `clone()`, and every sequence of a request gets its own clone.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    """How to sample one request (OpenAI / vLLM semantics; temperature 0 means greedy)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1 or 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None     # None: no logprobs; k >= 0: sampled token + top-k alternatives
    prompt_logprobs: int | None = None  # k >= 0: every prompt token's logprob + top-k (no prefix cache)
    skip_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        def bad(name: str, why: str):
            raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not 0.0 <= self.temperature:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be -1 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be a positive integer")
        if self.min_tokens < 0:
            bad("min_tokens", "must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be between 0 and 20")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", "must be between 0 and 20")
        if self.logit_bias:
            for k, v in self.logit_bias.items():
                if not -100.0 <= float(v) <= 100.0:
                    bad("logit_bias", f"bias for token {k} must be in [-100, 100]")
        if any(not s for s in self.stop):
            bad("stop", "stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """Log-probability of a sampled token and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


_seq_ids = count()


class Sequence:
    """One generation stream: prompt + generated tokens, its block table and sampling state."""

    block_size = 64

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 index: int = 0, arrival: float = 0.0):
        self.seq_id = next(_seq_ids)
        self.request_id, self.index = request_id, index
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = Status.WAITING
        self.arrival = arrival
        self.block_table: list[int] = []
        self.num_computed_tokens = 0     # tokens whose keys are in the cache
        self.num_cached_tokens = 0       # prompt tokens served from the prefix cache (first schedule)
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = [None]   # the first token has no context
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None    # why it ended with finish_reason "error"
        self.logits_processors = [p.clone() if hasattr(p, "clone") else p for p in params.logits_processors]
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some prompt token's logprob is still missing."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def num_blocks(self) -> int:
        return -(-len(self.token_ids) // self.block_size)

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def fork_of(self, parent: Sequence) -> None:
        """This child of `parent` starts where the parent's prompt was computed (its cache hits and
        prompt logprobs are the parent's)."""
        self.num_cached_tokens = parent.num_cached_tokens
        self.prompt_logprobs = list(parent.prompt_logprobs)

    def finish(self, reason: str, stop: str | int | None = None, error: str | None = None) -> None:
        """Mark the sequence finished (its blocks are the scheduler's to free)."""
        self.status, self.finish_reason, self.stop_reason, self.error = Status.FINISHED, reason, stop, error


@dataclass
class Failure:
    """Why one sequence cannot go on: the stage that raised and the exception (for the log)."""

    stage: str                 # "logits processor", "sampling", "detokenisation or stop check", ...
    exc: BaseException

    def __str__(self) -> str:
        return f"{self.stage} failed: {type(self.exc).__name__}: {self.exc}"


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request, as seen so far."""

    index: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None              # with finish_reason "error": what failed


@dataclass
class RequestOutput:
    """Everything a request has produced so far (or in total once `finished`)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None   # per prompt token, when asked for
    metrics: dict = field(default_factory=dict)

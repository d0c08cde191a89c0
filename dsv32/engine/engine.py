"""The engine: owns the executor (model and paged cache, on one rank or a tensor-parallel group),
block manager, scheduler, runner, sampler and output processor, and turns requests into streamed
outputs one step at a time."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from itertools import count

import torch

from dsv32.chat.tokenizer import Tokenizer
from dsv32.model.config import ModelConfig

from .block_manager import BlockManager
from .config import EngineConfig
from .executor import Executor
from .guided import GrammarCompiler
from .observer import StepObserver
from .output import OutputProcessor, RequestState
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Failure, RequestOutput, SamplingParams, Sequence, Status
from .speculative import speculator_for

log = logging.getLogger("dsv32.engine")
Rows = tuple[list[Sequence], list[torch.Tensor]]     # sequences and the logits row [V] each samples


class BatchError(RuntimeError):
    """A forward failed: its requests ended with finish_reason "error"; `outputs` are their last outputs."""

    def __init__(self, message: str, outputs: list[RequestOutput]):
        super().__init__(message)
        self.outputs = outputs


class LLMEngine:
    """Synchronous engine: `add_request`, then `step()` until `has_unfinished()` is False (or `generate`)."""

    def __init__(self, cfg: EngineConfig, model=None, tokenizer: Tokenizer | None = None,
                 observer: StepObserver | None = None):
        mc = model.config if model is not None else ModelConfig.from_json(cfg.model)
        self.cfg, self.model_config = cfg, mc
        self.max_model_len = cfg.model_len(mc)
        cfg.check_speculation(mc)                          # before any worker process starts
        if observer is not None and cfg.speculative:
            raise ValueError("a step observer (GRPO rollouts) needs num_speculative_tokens 0")
        self.observer = observer or StepObserver()
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.load(cfg.model)
        num_blocks = cfg.cache_blocks(mc, self.max_model_len)
        self.executor = Executor.start(cfg, mc, num_blocks, model)
        self.model = self.executor.model
        bs = Sequence.block_size
        self.speculator = speculator_for(cfg.speculative, self.executor, bs)
        self.block_manager = BlockManager(num_blocks, bs, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   self.speculator)
        self.runner = ModelRunner(self.executor, self.speculator, self.observer)
        self.sampler = Sampler()
        self.output_processor = OutputProcessor(self.tokenizer, mc.eos_token_id, self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size)
        self.requests: dict[str, RequestState] = {}
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0}
        self._ids = count()

    # ---- requests ------------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenise and validate a request without touching engine state; ValueError on bad input."""
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt: must contain at least one token")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        if params.logit_bias and any(not 0 <= int(t) < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab})")
        budget = self.max_model_len - len(ids)
        if budget < 1:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room in max_model_len {self.max_model_len}")
        if params.max_tokens is not None and params.max_tokens > budget:
            raise ValueError(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len {self.max_model_len}")
        return text, ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival: float | None = None, prepared: tuple[str | None, list[int]] | None = None) -> None:
        """Queue a prompt (text, or token ids) for generation; raises ValueError on bad input."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        text, ids = prepared if prepared is not None else self.prepare(prompt, params)
        arrival = time.monotonic() if arrival is None else arrival
        seqs = [Sequence(request_id, ids, params, index=i, arrival=arrival) for i in range(params.n)]
        self.requests[request_id] = self.output_processor.track(request_id, text, ids, seqs)
        # n > 1: only the first sequence prefills; the others fork its blocks once it is done
        self.scheduler.add(seqs[0])
        self.stats["prompt_tokens"] += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free every block it holds."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self._end(state, "abort")
        return self.output_processor.output(state)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- running until done ----------------------------------------------------------------------
    def steps(self) -> Iterator[list[RequestOutput]]:
        """Step until no request is left, yielding each step's outputs (the loop every caller runs)."""
        while self.has_unfinished():
            yield self.step()

    def generate(self, prompts: list[str | list[int]], params: list[SamplingParams],
                 on_finished: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids) under its params; their final outputs in
        order. `on_finished` sees each output as its request ends (a progress bar)."""
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
        rids = []
        for prompt, p in zip(prompts, params):
            rids.append(f"gen-{next(self._ids)}")
            self.add_request(rids[-1], prompt, p)
        done: dict[str, RequestOutput] = {}
        for outputs in self.steps():
            for out in outputs:
                if out.finished:
                    done[out.request_id] = out
                    if on_finished is not None:
                        on_finished(out)
        return [done[r] for r in rids]

    def warmup(self) -> float:
        """Decode a few short requests side by side before serving, so the batch decode's compiled
        graphs (model/decode.py: inductor, several seconds) are built now and not while the first
        concurrent requests wait: 2 rows, and past decode.ROWS_MAX where the scheduler allows it
        (small models run up to that many rows without the graphs). Its tokens are not counted:
        `metrics` starts from zero after it. -> seconds taken."""
        from dsv32.model.decode import ROWS_MAX
        if self.has_unfinished():
            raise RuntimeError("warmup: the engine has requests in flight")
        t0 = time.monotonic()
        n = max(1, min(8, self.max_model_len - 3))                       # prompt tokens, then up to 3 more
        params = SamplingParams(temperature=0.0, max_tokens=max(1, min(3, self.max_model_len - n)), ignore_eos=True)
        vocab = self.model_config.vocab_size
        try:
            for rows in sorted({min(2, self.cfg.max_num_seqs), min(ROWS_MAX + 1, self.cfg.max_num_seqs)}):
                prompts = [[(1000 + 7 * i + j) % vocab for j in range(n)] for i in range(rows)]
                self.generate(prompts, [params] * rows)
        finally:
            for rid in list(self.requests):                              # after a failure: none left
                self.abort_request(rid)
        self.stats = {k: 0 for k in self.stats}
        for counted in (self.block_manager, self.scheduler, self.speculator):
            counted.reset_counters()
        return time.monotonic() - t0

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the forward, sample, postprocess; report every request that changed."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self._run(batch)
        changed: dict[str, RequestState] = {}
        sampled = self._sample(*self._rows(batch, logits), changed)
        # MTP drafts that the sampled token confirms: their second row is sampled too
        accepted = [seq for seq, tok in sampled if self.speculator.verify(seq, tok)]
        self._sample(accepted, [logits[seq.seq_id][1] for seq in accepted], changed)
        self.speculator.propose()                          # the next drafts
        return self._postprocess(changed)

    def _run(self, batch: list[tuple[Sequence, int]]) -> dict[int, torch.Tensor]:
        """The batch's forwards. If they raise, every request in the batch ends with "error" (blocks
        freed: the engine stays usable) and BatchError carries their last outputs."""
        try:
            logits = self.runner.run(batch)
        except Exception as e:
            failure = Failure("model forward", e)
            rids = list(dict.fromkeys(seq.request_id for seq, _ in batch))
            log.error("requests %s: %s", ", ".join(rids), failure, exc_info=e)
            outputs = []
            for rid in rids:
                state = self.requests.pop(rid)
                self._end(state, "error", str(failure))
                outputs.append(self.output_processor.output(state))
            raise BatchError(str(failure), outputs) from e
        for seq, _ in batch:
            self.block_manager.commit(seq)
        return logits

    def _rows(self, batch: list[tuple[Sequence, int]], logits: dict[int, torch.Tensor]) -> Rows:
        """The sequences that sample now and the logits row [V] of each: its own, or, for the n - 1
        children of a parent that just computed its prompt (forked here), the parent's."""
        seqs, rows = [], []
        for seq, _ in batch:
            if seq.seq_id not in logits:
                continue
            row = logits[seq.seq_id][0]
            state = self.requests[seq.request_id]
            if seq.num_output_tokens == 0 and seq.index == 0 and self._unforked(state):
                self._fork(state)
                seqs += state.seqs[1:]
                rows += [row] * (len(state.seqs) - 1)
            seqs.append(seq)
            rows.append(row)
        return seqs, rows

    @staticmethod
    def _unforked(state: RequestState) -> bool:
        """The request has children that have not forked off the first sequence yet."""
        return len(state.seqs) > 1 and state.seqs[1].status == Status.WAITING and not state.seqs[1].block_table

    def _fork(self, state: RequestState) -> None:
        """The children share the parent's blocks now, or wait to recompute (Scheduler.fork)."""
        parent = state.seqs[0]
        for child in state.seqs[1:]:
            child.fork_of(parent)
        self.executor.copy_blocks(self.scheduler.fork(parent, state.seqs[1:]))

    def _sample(self, seqs: list[Sequence], rows: list[torch.Tensor], changed: dict) -> list[tuple[Sequence, int]]:
        """Sample one token per row and append it to its sequence; returns (seq, token) pairs."""
        if not seqs:
            return []
        # one row: a view (copying 129280 logits costs ~0.1 ms when the LM head's stream has
        # pushed them out of the caches)
        stacked = rows[0][None] if len(rows) == 1 else torch.stack(rows)
        out = self.sampler(stacked, seqs, self.model_config.eos_token_id, return_kept=self.observer.wants_kept)
        self.observer.sampled(seqs, stacked, out)
        for i, (seq, tok, lp) in enumerate(zip(seqs, out.token_ids, out.logprobs)):
            state = self.requests[seq.request_id]
            state.sampled()
            if not seq.is_finished:                       # a sibling's failure may have ended it
                self._settle(state, seq, tok, lp, out.failed.get(i))
            changed[seq.request_id] = state
        return list(zip(seqs, out.token_ids))

    def _settle(self, state: RequestState, seq: Sequence, tok: int, lp, failure: Failure | None) -> None:
        """Append a sampled token (detokenise, check stops); if the sequence failed, in the sampler
        or here, its request ends with "error" and every other request goes on."""
        if failure is None:
            try:
                self.stats["generation_tokens"] += 1
                finish = self.output_processor.append(state, seq, tok, lp)
                if finish is not None:
                    self.scheduler.remove(seq)
                    seq.finish(*finish)
                return
            except Exception as e:
                failure = Failure("detokenisation or stop check", e)
        log.error("request %s: %s", state.request_id, failure, exc_info=failure.exc)
        self._end(state, "error", str(failure))

    def _end(self, state: RequestState, reason: str, error: str | None = None) -> None:
        """Finish every unfinished sequence of a request and free its blocks."""
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish(reason, error=error)

    def _postprocess(self, changed: dict[str, RequestState]) -> list[RequestOutput]:
        """The outputs of the requests that changed; the finished ones leave the engine."""
        outputs = []
        for rid, state in changed.items():
            outputs.append(self.output_processor.output(state))
            if state.finished:
                del self.requests[rid]
        return outputs

    # ---- lifetime and introspection --------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop tensor-parallel workers and end their group now (also on `with` exit, or when the
        engine is garbage-collected; nothing to do in one process)."""
        self.executor.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def metrics(self) -> dict:
        bm = self.block_manager
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_cache_usage_perc": bm.usage,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            **self.stats,
            **self.speculator.metrics(),
        }

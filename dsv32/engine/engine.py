"""The engine: owns model, paged cache, block manager, scheduler, runner and sampler, and turns
requests into streamed outputs one step at a time."""
from __future__ import annotations

import logging
import time

import torch

from dsv32.chat.tokenizer import Tokenizer
from dsv32.model.checkpoint import load_model
from dsv32.model.config import ModelConfig
from dsv32.model.transformer import Transformer
from dsv32.parallel.context import SINGLE, ParallelContext

from .block_manager import BlockManager
from .cache import PagedCache
from .config import DTYPES, EngineConfig
from .guided import GrammarCompiler
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import CompletionOutput, Failure, RequestOutput, SamplingParams, Sequence, Status

log = logging.getLogger("dsv32.engine")


def load_engine_model(cfg: EngineConfig, pc: ParallelContext = SINGLE):
    """This rank's model (its tensor-parallel slice when `pc` is a group)."""
    return load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=cfg.device,
                      fp8_storage=cfg.fp8_storage, progress=pc.rank == 0, pc=pc)


def build_cache(cfg: EngineConfig, mc: ModelConfig, num_blocks: int) -> PagedCache:
    return PagedCache(mc.num_hidden_layers + mc.num_nextn_predict_layers, num_blocks, mc.kv_lora_rank,
                      mc.qk_rope_head_dim, mc.index_head_dim, Sequence.block_size, DTYPES[cfg.dtype],
                      cfg.device, fp8=cfg.kv_cache_dtype == "fp8")


class RequestState:
    """A request's sequences (n of them), detokenisation state and timing."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, arrival: float):
        self.request_id, self.prompt, self.prompt_ids = request_id, prompt, prompt_ids
        self.params, self.arrival = params, arrival
        self.seqs: list[Sequence] = []
        self.texts: list[str] = [""] * params.n
        self.detoks: list = []
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class BatchError(RuntimeError):
    """A forward failed: its requests ended with finish_reason "error"; `outputs` are their last outputs."""

    def __init__(self, message: str, outputs: list[RequestOutput]):
        super().__init__(message)
        self.outputs = outputs


class LLMEngine:
    """Synchronous engine: `add_request`, then call `step()` until `has_unfinished()` is False."""

    def __init__(self, cfg: EngineConfig, model=None, tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        mc = model.config if model is not None else ModelConfig.from_json(cfg.model)
        self.model_config = mc
        self.max_model_len = cfg.model_len(mc)
        num_blocks = cfg.cache_blocks(mc, self.max_model_len)
        cfg.check_speculation(mc)                          # before any worker process starts
        pc, workers = SINGLE, []
        if cfg.tensor_parallel_size > 1:
            if model is not None:
                raise ValueError("tensor_parallel_size > 1 loads the model on every rank: pass a path, not a model")
            from dsv32.parallel.executor import start_group, share_setup
            with torch.device("meta"):     # shapes that do not split fail here, before any process starts
                Transformer(mc, pc=ParallelContext(0, cfg.tensor_parallel_size, cfg.enable_expert_parallel))
            pc, workers = start_group(cfg)
            share_setup(cfg, num_blocks)
        self.model = model if model is not None else load_engine_model(cfg, pc)
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.load(cfg.model)
        self.eos_token_id = mc.eos_token_id
        self.cache = build_cache(cfg, mc, num_blocks)
        bs = Sequence.block_size
        self.block_manager = BlockManager(num_blocks, bs, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        if pc.enabled:
            from dsv32.parallel.executor import ParallelRunner
            self.runner = ParallelRunner(self.model, self.cache, workers)
        else:
            self.runner = ModelRunner(self.model, self.cache)
        self.sampler = Sampler()
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size)
        self.recorder = None   # optional: gets every sampling step's logits and kept-token masks
        self.requests: dict[str, RequestState] = {}
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "spec_draft_tokens": 0,
                      "spec_accepted_tokens": 0}
        self.runner.speculate = cfg.speculative

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
        state = RequestState(request_id, text, ids, params, arrival)
        state.seqs = [Sequence(request_id, ids, params, index=i, arrival=arrival) for i in range(params.n)]
        state.detoks = [self.tokenizer.detokenizer(skip_special_tokens=params.skip_special_tokens)
                        for _ in range(params.n)]
        self.requests[request_id] = state
        # n > 1: only the first sequence prefills; the others fork its blocks once it is done
        self.scheduler.add(state.seqs[0])
        self.stats["prompt_tokens"] += len(ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free every block it holds."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        self._end(state, "abort")
        return self._output(state)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward (per group), sample, and report every request that changed."""
        if self.recorder is not None and self.runner.speculate:
            raise RuntimeError("a sampling recorder (GRPO rollouts) needs num_speculative_tokens 0")
        batch = self.scheduler.schedule()
        if not batch:
            return []
        logits = self._forward(batch)
        for seq, _ in batch:
            self.block_manager.commit(seq)
        rows, seqs = self._rows(batch, logits)
        changed: dict[str, RequestState] = {}
        accepted = []
        for seq, tok in self._sample(rows, seqs, changed):
            draft, seq.draft = seq.draft, None
            if draft is None or seq.is_finished:
                continue
            self.stats["spec_draft_tokens"] += 1
            if tok == draft:              # the draft was this token: its logits are already computed
                accepted.append(seq)
            else:                         # its key in the cache belongs to another token
                seq.num_computed_tokens -= 1
        self.stats["spec_accepted_tokens"] += len(accepted)
        self._sample([logits[seq.seq_id][1] for seq in accepted], accepted, changed)
        if self.runner.speculate:
            self.runner.draft()
        outputs = []
        for rid, state in changed.items():
            outputs.append(self._output(state))
            if state.finished:
                del self.requests[rid]
        return outputs

    def _forward(self, batch: list[tuple[Sequence, int]]) -> dict[int, torch.Tensor]:
        """The batch's forward. If it raises, every request in the batch ends with "error" (blocks
        freed: the engine stays usable) and BatchError carries their last outputs."""
        try:
            return self.runner.run(batch)
        except Exception as e:
            failure = Failure("model forward", e)
            rids = list(dict.fromkeys(seq.request_id for seq, _ in batch))
            log.error("requests %s: %s", ", ".join(rids), failure, exc_info=e)
            outputs = []
            for rid in rids:
                state = self.requests.pop(rid)
                self._end(state, "error", str(failure))
                outputs.append(self._output(state))
            raise BatchError(str(failure), outputs) from e

    def _rows(self, batch: list[tuple[Sequence, int]], logits: dict[int, torch.Tensor]
              ) -> tuple[list[torch.Tensor], list[Sequence]]:
        """The logits row [V] each sequence samples from: its own, or, for the n - 1 children of a
        parent that just computed its prompt (forked here), the parent's."""
        rows, seqs = [], []
        for seq, _ in batch:
            if seq.seq_id not in logits:
                continue
            row = logits[seq.seq_id][0]
            state = self.requests[seq.request_id]
            if seq.num_output_tokens == 0 and seq.index == 0 and len(state.seqs) > 1 \
                    and state.seqs[1].status == Status.WAITING and not state.seqs[1].block_table:
                self._fork(state)
                rows += [row] * (len(state.seqs) - 1)
                seqs += state.seqs[1:]
            rows.append(row)
            seqs.append(seq)
        return rows, seqs

    def _sample(self, rows: list[torch.Tensor], seqs: list[Sequence], changed: dict) -> list[tuple[Sequence, int]]:
        """Sample one token per row and append it to its sequence; returns (seq, token) pairs."""
        if not seqs:
            return []
        stacked = torch.stack(rows)
        out = self.sampler(stacked, seqs, self.eos_token_id, return_kept=self.recorder is not None)
        if self.recorder is not None:
            self.recorder.sampled(seqs, stacked, out)
        for i, (seq, tok, lp) in enumerate(zip(seqs, out.token_ids, out.logprobs)):
            state = self.requests[seq.request_id]
            if state.first_token_time is None:
                state.first_token_time = time.monotonic()
                state.num_cached_tokens = state.seqs[0].num_cached_tokens
            if not seq.is_finished:                       # a sibling's failure may have ended it
                self._settle(state, seq, tok, lp, out.failed.get(i))
            changed[seq.request_id] = state
        return list(zip(seqs, out.token_ids))

    def _fork(self, state: RequestState) -> None:
        """The children share the parent's blocks now, or wait to recompute (Scheduler.fork)."""
        parent = state.seqs[0]
        for child in state.seqs[1:]:
            child.num_cached_tokens = parent.num_cached_tokens
            child.prompt_logprobs = list(parent.prompt_logprobs)   # the prompt is computed already
        self.runner.copy_blocks(self.scheduler.fork(parent, state.seqs[1:]))

    def _settle(self, state: RequestState, seq: Sequence, tok: int, lp, failure: Failure | None) -> None:
        """Append a sampled token (detokenise, check stops); if the sequence failed, in the sampler
        or here, its request ends with "error" and every other request goes on."""
        if failure is None:
            try:
                self._append(state, seq, tok, lp)
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

    def _append(self, state: RequestState, seq: Sequence, tok: int, lp) -> None:
        p = seq.params
        seq.token_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        self.stats["generation_tokens"] += 1
        i = seq.index
        prev = len(state.texts[i])
        state.texts[i] += state.detoks[i].add(tok)
        reason, stop = None, None
        if tok == self.eos_token_id and not p.ignore_eos:
            reason = "stop"
        elif tok in p.stop_token_ids:
            reason, stop = "stop", tok
        elif p.stop:
            text = state.texts[i]
            start = max(0, prev - max(len(s) for s in p.stop) + 1)
            hits = [(text.find(s, start), s) for s in p.stop if text.find(s, start) >= 0]
            if hits:
                at, s = min(hits)
                state.texts[i] = text[: at + len(s)] if p.include_stop_str_in_output else text[:at]
                reason, stop = "stop", s
        if reason is None and p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        if reason is None and len(seq) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.remove(seq)
            seq.finish(reason, stop)

    def _output(self, state: RequestState) -> RequestOutput:
        outs = []
        for seq, text in zip(state.seqs, state.texts):
            outs.append(CompletionOutput(
                index=seq.index, token_ids=seq.output_token_ids, text=text,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, error=seq.error))
        first = state.seqs[0]
        return RequestOutput(
            request_id=state.request_id, prompt_token_ids=state.prompt_ids, outputs=outs,
            finished=state.finished, num_cached_tokens=state.num_cached_tokens, prompt=state.prompt,
            prompt_logprobs=list(first.prompt_logprobs) if first.params.prompt_logprobs is not None else None,
            metrics={"arrival": state.arrival, "first_token": state.first_token_time})

    def shutdown(self) -> None:
        """Stop tensor-parallel workers (nothing to do in one process)."""
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()

    # ---- introspection ---------------------------------------------------------------------------
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
        }

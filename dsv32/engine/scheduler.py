"""Continuous batching: a token budget per step, chunked prefill, FIFO admission, preemption by
recompute when cache blocks run out."""
from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status
from .speculative import Speculator


class Scheduler:
    """Decides which sequences run in the next step and how many new tokens each computes."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 speculator: Speculator | None = None):
        self.bm = block_manager
        self.spec = speculator or Speculator()     # a draft is one more token to compute
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reset_counters()

    def reset_counters(self) -> None:
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (finished or aborted) and free all its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        self.spec.drop(seq)

    def fork(self, parent: Sequence, children: list[Sequence]) -> list[tuple[int, int]]:
        """Children of a parent that just computed its prompt join the running set on its blocks
        while a seat (max_num_seqs) and a copy-on-write block are free; the others wait at the front
        of the queue like preempted sequences and recompute (from the parent's cached full blocks,
        with prefix caching). Returns the (src, dst) block copies the runner must perform."""
        copies, deferred = [], []
        for child in children:
            if len(self.running) < self.max_num_seqs and self.bm.can_fork(parent):
                copies += self.bm.fork(parent, child)
                child.status = Status.RUNNING
                self.running.append(child)
            else:
                child.status = Status.WAITING
                deferred.append(child)
        self.waiting.extendleft(reversed(deferred))
        return copies

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it goes back to the front of the queue and will
        recompute its keys (prompt and generated tokens) when rescheduled."""
        self.running.remove(seq)
        self.bm.free(seq)
        self.spec.drop(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's (sequence, new tokens): running sequences first, then waiting ones."""
        batch: list[tuple[Sequence, int]] = []
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: list, budget: int) -> int:
        """Running sequences, oldest first; the newest are preempted when blocks run out. Returns
        the token budget left."""
        for seq in sorted(self.running, key=lambda s: (s.arrival, s.seq_id)):
            if seq not in self.running or budget == 0:
                continue
            n = self._tokens_to_run(seq, budget)
            while not self.bm.can_allocate(seq, n):
                victim = max(self.running, key=lambda s: (s.arrival, s.seq_id))
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.bm.allocate(seq, n)
            batch.append((seq, n))
            budget -= n
        return budget

    def _tokens_to_run(self, seq: Sequence, budget: int) -> int:
        """A running sequence's new tokens within `budget`; its draft counts as one, and is dropped
        when there is no room to verify it or its block would need a preemption."""
        if self.spec.draft_of(seq) is not None and budget < 2:
            self.spec.drop(seq)
        n = min(len(seq) - seq.num_computed_tokens + (self.spec.draft_of(seq) is not None), budget)
        if self.spec.draft_of(seq) is not None and not self.bm.can_allocate(seq, n):
            self.spec.drop(seq)
            n -= 1
        return n

    def _admit_waiting(self, batch: list, budget: int) -> None:
        """Waiting sequences in arrival order; stop at the first that does not fit (FIFO)."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0 and not seq.block_table and not seq.wants_prompt_logprobs:
                self.bm.match_prefix(seq)          # prompt logprobs need every prompt token computed
            n = min(len(seq) - seq.num_computed_tokens, budget)
            if not self.bm.can_allocate(seq, n):
                if not self.running and not batch:
                    raise RuntimeError(
                        f"request {seq.request_id}: {len(seq)} tokens do not fit in the KV cache "
                        f"({self.bm.num_blocks} blocks of {self.bm.block_size})")
                break
            self.waiting.popleft()
            self.bm.allocate(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n

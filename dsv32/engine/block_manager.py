"""Paged KV-cache bookkeeping: a free list, reference counts and a prefix cache of full blocks.

One block table per sequence serves both the MLA latent cache and the indexer key cache. Every
block is in exactly one of three states:
  referenced  ref_count > 0, in at least one sequence's table;
  evictable   ref_count == 0 but hashed: its contents are kept for prefix hits until the block
              is needed again, least recently released first;
  free        ref_count == 0, no hash, on the free list.

Prefix hashes are chained: block i's hash is sha256(hash of block i-1 || its 64 tokens as
little-endian int64), so a hit on block i implies the whole prefix up to it matches. A strong
hash is deliberate: a collision would silently serve another prompt's keys (in a shared server,
a crafted one), and Python's 64-bit tuple hash is neither collision-resistant nor something we
want our correctness to lean on. Hashing costs ~1 us per block, negligible next to a forward.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation needs more blocks than are free or evictable."""


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """Chained hash of one full block: depends on its tokens and on every token before it."""
    h = hashlib.sha256(parent or b"")
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


class Block:
    """One block of `block_size` token slots."""

    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


class BlockManager:
    """Allocates cache blocks to sequences and shares full blocks through a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int = 64, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()   # oldest release first
        self.cached: dict[bytes, int] = {}                         # hash -> block id
        self.reset_counters()

    def reset_counters(self) -> None:
        self.prefix_cache_queries = 0   # tokens looked up at first admission
        self.prefix_cache_hits = 0      # of which served from the cache

    # ---- state -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free plus evictable."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (0.0 when idle)."""
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    # ---- internals ---------------------------------------------------------------------------
    def _take(self) -> int:
        """A block with ref 1: from the free list, else evict the least recently released."""
        if self.free_ids:
            bid = self.free_ids.popleft()
        elif self.evictable:
            bid, _ = self.evictable.popitem(last=False)
            block = self.blocks[bid]
            del self.cached[block.hash]
            block.hash = None
        else:
            raise NoFreeBlocksError("no free or evictable cache block left")
        self.blocks[bid].ref_count = 1
        return bid

    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self.evictable[bid]
        block.ref_count += 1

    def _unref(self, bid: int) -> None:
        block = self.blocks[bid]
        assert block.ref_count > 0, f"block {bid} freed twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self.evictable[bid] = None          # most recently released: evicted last
            else:
                self.free_ids.append(bid)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- API ---------------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """At admission (first or after preemption), reuse the longest run of cached full blocks
        from token 0; returns the hit token count, also set as `seq.num_computed_tokens`.

        At least the last token is always left to compute (its logits are needed), so at most
        `((len(seq) - 1) // block_size) * block_size` tokens hit. `seq.num_cached_tokens` and the
        query/hit counters are only updated while the sequence has no output yet, so a recompute
        after preemption does not count its own blocks as prefix hits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, "match_prefix on a live table"
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        table: list[int] = []
        parent = None
        for i in range((len(seq.token_ids) - 1) // bs):
            parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            bid = self.cached.get(parent)
            if bid is None:
                break
            self._ref(bid)
            table.append(bid)
        hit = len(table) * bs
        seq.block_table = table
        seq.num_computed_tokens = hit
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens = min(hit, seq.num_prompt_tokens)
            self.prefix_cache_queries += seq.num_prompt_tokens
            self.prefix_cache_hits += seq.num_cached_tokens
        return hit

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks the table needs to cover `num_computed_tokens + num_new_tokens` tokens."""
        need = self._blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the table to cover `num_computed_tokens + num_new_tokens` tokens (prefill chunk or
        decode step); raises NoFreeBlocksError, changing nothing, if that many blocks are not
        available."""
        n = self.blocks_needed(seq, num_new_tokens)
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"sequence {seq.seq_id}: needs {n} more blocks for "
                f"{seq.num_computed_tokens + num_new_tokens} tokens, {self.num_free_blocks} available")
        seq.block_table.extend(self._take() for _ in range(n))

    def commit(self, seq: Sequence) -> None:
        """After a forward (with `num_computed_tokens` advanced), publish the sequence's full,
        fully computed blocks in the prefix cache.

        If another block already holds the same hash, the sequence switches to that block and
        releases its duplicate: memory is freed and a table's hashed blocks always form a prefix,
        so each commit only hashes the blocks completed since the last one. A duplicate that other
        tables share too (forked after `reset_prefix_cache`) ends publishing instead.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        table = seq.block_table
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        start = full
        while start > 0 and self.blocks[table[start - 1]].hash is None:
            start -= 1
        parent = self.blocks[table[start - 1]].hash if start else None
        for i in range(start, full):
            parent = block_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            bid = table[i]
            other = self.cached.get(parent)
            if other is None:
                self.blocks[bid].hash = parent
                self.cached[parent] = bid
            elif self.blocks[bid].ref_count > 1:
                break           # shared (a fork after a cache reset): switching would leave the
                                # other tables' hashed blocks behind an unhashed one; stay unpublished
            else:
                self._ref(other)
                table[i] = other
                self._unref(bid)

    def can_fork(self, parent: Sequence) -> bool:
        """Whether `fork` finds the block it needs (one, when the parent's last block is partly written)."""
        return self.num_free_blocks > 0 or parent.num_computed_tokens % self.block_size == 0

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Give `child` (whose tokens match the parent's computed ones) the parent's computed
        blocks: full ones are shared by reference, a partly written last block is copied into a
        new block. Returns the (src, dst) block copies the runner must perform before writing.
        Needs at most one free block; raises NoFreeBlocksError, changing nothing, otherwise."""
        assert not child.block_table and child.num_computed_tokens == 0, "fork into a live table"
        computed = parent.num_computed_tokens
        assert child.token_ids[:computed] == parent.token_ids[:computed], "child diverges early"
        bs = self.block_size
        full, partial = divmod(computed, bs)
        if partial and not self.num_free_blocks:
            raise NoFreeBlocksError(f"fork of sequence {parent.seq_id}: no block for copy-on-write")
        table = parent.block_table[:full]
        for bid in table:
            self._ref(bid)
        copies = []
        if partial:
            dst = self._take()
            copies.append((parent.block_table[full], dst))
            table.append(dst)
        child.block_table = table
        child.num_computed_tokens = computed
        child.num_cached_tokens = parent.num_cached_tokens
        return copies

    def free(self, seq: Sequence) -> None:
        """Release all of a sequence's blocks (finish, abort or preemption) and reset its table.

        Blocks are released last first, so a prompt's tail is evicted before its head and the
        surviving cached blocks stay reachable from token 0."""
        for bid in reversed(seq.block_table):
            self._unref(bid)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every hash (e.g. after new weights): evictable blocks return to the free list;
        blocks in use stay with their sequences and are re-hashed at their next commit."""
        for bid in self.evictable:
            self.free_ids.append(bid)
        self.evictable.clear()
        for block in self.blocks:
            block.hash = None
        self.cached.clear()

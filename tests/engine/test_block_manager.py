"""Block manager: allocation, prefix caching (chained hashes, LRU eviction), fork, invariants."""
import hashlib
import random
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dsv32.engine.block_manager import BlockManager, NoFreeBlocksError, block_hash
from dsv32.engine.sequence import SamplingParams, Sequence

BS = 64


def make_seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=None))


def toks(n, seed=0, vocab=1000):
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def run_prefill(bm, seq, chunk=None):
    """Admit and compute a sequence's whole prompt (in chunks), committing after each forward."""
    if not seq.block_table:
        bm.match_prefix(seq)
    while seq.num_computed_tokens < len(seq):
        n = min(chunk or len(seq), len(seq) - seq.num_computed_tokens)
        bm.allocate(seq, n)
        seq.num_computed_tokens += n
        bm.commit(seq)


def check_invariants(bm, seqs):
    """Every block in exactly one state; ref counts match the tables; hashes are consistent."""
    bs = bm.block_size
    refs = Counter(bid for s in seqs for bid in s.block_table)
    for s in seqs:
        assert len(set(s.block_table)) == len(s.block_table)
        assert len(s.block_table) * bs >= s.num_computed_tokens
    free, evictable, referenced = set(bm.free_ids), set(bm.evictable), set(refs)
    assert len(free) == len(bm.free_ids)
    assert not (free & evictable) and not (free & referenced) and not (evictable & referenced)
    assert free | evictable | referenced == set(range(bm.num_blocks))
    for b in bm.blocks:
        assert b.ref_count == refs[b.block_id]
    assert all(bm.blocks[b].hash is None for b in free)
    assert all(bm.blocks[b].hash is not None for b in evictable)
    hashed = {b.hash: b.block_id for b in bm.blocks if b.hash is not None}
    assert hashed == bm.cached
    assert bm.num_free_blocks == len(free) + len(evictable)
    assert bm.usage == pytest.approx(len(referenced) / bm.num_blocks)
    for s in seqs:
        # hashed blocks form a prefix of the table, carry the chain hash of the seq's own tokens
        # and are fully computed; so is any block shared between tables
        parent, prefix = None, True
        for i, bid in enumerate(s.block_table):
            h = bm.blocks[bid].hash
            if h is None:
                prefix = False
            else:
                assert prefix, f"hashed block {bid} after an unhashed one"
                parent = block_hash(parent, s.token_ids[i * bs:(i + 1) * bs])
                assert h == parent
            if h is not None or refs[bid] > 1:
                assert s.num_computed_tokens >= (i + 1) * bs


# ---- basics ------------------------------------------------------------------------------------

def test_allocate_chunks_and_free():
    bm = BlockManager(8)
    seq = make_seq(toks(130))
    bm.match_prefix(seq)
    assert seq.num_computed_tokens == 0 and seq.block_table == []
    bm.allocate(seq, 50)
    assert len(seq.block_table) == 1
    seq.num_computed_tokens = 50
    bm.allocate(seq, 14)                       # exactly fills block 0
    assert len(seq.block_table) == 1
    seq.num_computed_tokens = 64
    bm.allocate(seq, 66)
    assert len(seq.block_table) == 3
    assert bm.usage == pytest.approx(3 / 8) and bm.num_free_blocks == 5
    check_invariants(bm, [seq])
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.usage == 0.0 and bm.num_free_blocks == 8
    check_invariants(bm, [])


def test_cannot_allocate_raises_and_changes_nothing():
    bm = BlockManager(2)
    seq = make_seq(toks(200))
    assert bm.can_allocate(seq, 128) and not bm.can_allocate(seq, 129)
    assert bm.blocks_needed(seq, 129) == 3
    with pytest.raises(NoFreeBlocksError, match="needs 3 more blocks"):
        bm.allocate(seq, 129)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    bm.allocate(seq, 128)
    seq.num_computed_tokens = 128
    assert not bm.can_allocate(seq, 1) and bm.can_allocate(seq, 0)
    check_invariants(bm, [seq])


def test_block_manager_is_plain_python():
    path = Path(__file__).parents[2] / "dsv32" / "engine" / "block_manager.py"
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('bm', {str(path)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "assert 'torch' not in sys.modules; print(m.block_hash(None, [1, 2, 3]).hex())")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert out[0] == out[1]                    # stable across processes and hash seeds
    assert out[0].strip() == block_hash(None, [1, 2, 3]).hex()


def test_block_hash_encoding():
    # sha256 over the parent digest and the tokens as little-endian int64: a stable format
    want = hashlib.sha256(struct.pack("<3q", 1, 2, 3)).digest()
    assert block_hash(None, [1, 2, 3]) == want
    assert block_hash(want, [4]) == hashlib.sha256(want + struct.pack("<q", 4)).digest()
    assert block_hash(None, [1, 2, 3]) != block_hash(None, [3, 2, 1])
    assert block_hash(None, [1]) != block_hash(block_hash(None, [0]), [1])


# ---- prefix caching ----------------------------------------------------------------------------

def test_prefix_hit_after_finish():
    bm = BlockManager(16)
    prompt = toks(200)
    a = make_seq(prompt, "a")
    run_prefill(bm, a, chunk=50)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.usage == 0.0 and len(bm.evictable) == 3 and bm.num_free_blocks == 16
    b = make_seq(prompt, "b")
    assert bm.match_prefix(b) == 192
    assert b.block_table == a_blocks[:3]
    assert b.num_computed_tokens == b.num_cached_tokens == 192
    assert bm.prefix_cache_queries == 400 and bm.prefix_cache_hits == 192
    assert bm.usage == pytest.approx(3 / 16)
    check_invariants(bm, [b])
    run_prefill(bm, b)
    bm.free(b)
    check_invariants(bm, [])
    assert bm.usage == 0.0 and bm.num_free_blocks == 16


def test_hits_are_whole_blocks_from_token_0_and_never_the_whole_prompt():
    bm = BlockManager(16)
    base = toks(256)
    a = make_seq(base)
    run_prefill(bm, a)
    bm.free(a)
    for n, want in [(1, 0), (64, 0), (65, 64), (128, 64), (129, 128), (256, 192), (300, 256)]:
        s = make_seq(base[:n] + toks(max(0, n - 256), seed=5))
        assert bm.match_prefix(s) == want, n
        bm.free(s)
    # same first 100 tokens, then different: only the first whole block hits
    s = make_seq(base[:100] + toks(100, seed=7))
    assert bm.match_prefix(s) == 64
    bm.free(s)
    # different first token: nothing hits even though later tokens agree
    s = make_seq([base[0] + 1] + base[1:])
    assert bm.match_prefix(s) == 0
    check_invariants(bm, [s])


def test_block_hash_depends_on_everything_before_it():
    bm = BlockManager(16)
    x, y, z = toks(64, 1), toks(64, 2), toks(64, 3)
    a = make_seq(x + y + [1])
    run_prefill(bm, a)
    bm.free(a)
    b = make_seq(z + y + [1])                  # same second block after a different first one
    assert bm.match_prefix(b) == 0
    c = make_seq(x + y + [2])
    assert bm.match_prefix(c) == 128
    check_invariants(bm, [b, c])


def test_lru_eviction_order():
    bm = BlockManager(4)
    pa, pb = toks(65, 1), toks(65, 2)
    a, b = make_seq(pa, "a"), make_seq(pb, "b")
    run_prefill(bm, a)
    run_prefill(bm, b)
    bm.free(a)                                 # a's block released first ...
    bm.free(b)                                 # ... then b's
    assert len(bm.evictable) == 2 and len(bm.free_ids) == 2
    c = make_seq(toks(64 * 3, 3), "c")
    bm.allocate(c, 64 * 3)                     # 2 free blocks, then evicts the LRU one (a's)
    check_invariants(bm, [c])
    assert bm.match_prefix(make_seq(pa)) == 0
    hit = make_seq(pb)
    assert bm.match_prefix(hit) == 64
    check_invariants(bm, [c, hit])


def test_lru_releases_tail_first_and_hits_refresh_recency():
    bm = BlockManager(4)
    prompt = toks(64 * 3 + 1)
    a = make_seq(prompt)
    run_prefill(bm, a)                         # 4 blocks, 3 of them full and cached
    bm.free(a)
    assert len(bm.evictable) == 3
    x = make_seq(toks(64, 9))
    bm.allocate(x, 64)                         # takes the free block
    y = make_seq(toks(64, 8))
    bm.allocate(y, 64)                         # evicts the prompt's LAST block, not its first
    assert bm.match_prefix(s := make_seq(prompt)) == 128
    bm.free(s)                                 # re-released: now most recent
    bm.free(x)                                 # x's unhashed block goes to the free list
    check_invariants(bm, [y])
    z = make_seq(toks(128, 7))
    bm.allocate(z, 128)                        # free block, then LRU = block 1 (freed before 0)
    assert bm.match_prefix(s := make_seq(prompt)) == 64
    check_invariants(bm, [y, z, s])


def test_generated_tokens_are_cached_too():
    bm = BlockManager(8)
    a = make_seq(toks(60))
    run_prefill(bm, a)
    for t in toks(10, 4):                      # decode: append, then compute one token a step
        a.token_ids.append(t)
        bm.allocate(a, 1)
        a.num_computed_tokens += 1
        bm.commit(a)
    assert bm.blocks[a.block_table[0]].hash is not None
    full = list(a.token_ids)
    bm.free(a)
    b = make_seq(full[:64] + [5])
    assert bm.match_prefix(b) == 64


def test_commit_dedups_identical_blocks():
    bm = BlockManager(8)
    prompt = toks(130)
    a, b = make_seq(prompt, "a"), make_seq(prompt, "b")
    for s in (a, b):                           # admitted in the same step: both miss
        assert bm.match_prefix(s) == 0
        bm.allocate(s, 130)
    assert bm.usage == pytest.approx(6 / 8)
    for s in (a, b):
        s.num_computed_tokens = 130
        bm.commit(s)
    # b switched to a's two cached blocks and released its duplicates
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert bm.usage == pytest.approx(4 / 8)
    check_invariants(bm, [a, b])
    bm.commit(b)                               # idempotent
    check_invariants(bm, [a, b])


def test_preempted_sequence_rehits_its_own_blocks_without_counting_them():
    bm = BlockManager(8)
    s = make_seq(toks(100))
    run_prefill(bm, s)
    s.token_ids += toks(40, 3)                 # generated
    bm.allocate(s, 40)
    s.num_computed_tokens += 40
    bm.commit(s)
    assert s.num_cached_tokens == 0
    bm.free(s)                                 # preemption
    assert bm.match_prefix(s) == 128           # prompt block and a block with generated tokens
    assert s.num_cached_tokens == 0            # still the first admission's count
    assert bm.prefix_cache_queries == 100 and bm.prefix_cache_hits == 0
    check_invariants(bm, [s])


def test_reset_prefix_cache():
    bm = BlockManager(8)
    prompt = toks(200)
    a, b = make_seq(prompt), make_seq(toks(70, 1))
    run_prefill(bm, a)
    run_prefill(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert not bm.cached and not bm.evictable and bm.num_free_blocks == 8 - 2
    check_invariants(bm, [b])
    assert bm.match_prefix(s := make_seq(prompt)) == 0
    bm.commit(b)                               # running blocks are re-hashed
    assert len(bm.cached) == 1
    check_invariants(bm, [b, s])


def test_commit_after_reset_keeps_a_forks_hashed_blocks_a_prefix():
    """Found by the state machine below: after a reset, `b` and its fork share two unhashed blocks
    while another sequence holds `b`'s first block's hash; switching `b` to that block and hashing
    its second left the fork with a hashed block behind an unhashed one."""
    bm = BlockManager(4, 2)
    b = make_seq([1, 0, 0, 0])
    run_prefill(bm, b)
    bm.reset_prefix_cache()
    c = make_seq([1, 0])
    run_prefill(bm, c)                         # c's block now holds the hash of [1, 0]
    child = make_seq(b.token_ids[:4] + [0])
    assert bm.fork(b, child) == [] and child.block_table == b.block_table
    b.token_ids.append(1)
    bm.allocate(b, 1)
    b.num_computed_tokens += 1
    b.token_ids.append(0)
    bm.commit(b)
    check_invariants(bm, [b, c, child])
    assert bm.blocks[child.block_table[1]].hash is None
    bm.free(child)
    bm.commit(b)                               # unshared now: b switches to c's block, hashes the rest
    check_invariants(bm, [b, c])
    assert b.block_table[0] == c.block_table[0] and bm.blocks[b.block_table[1]].hash is not None


def test_prefix_caching_disabled():
    bm = BlockManager(8, enable_prefix_caching=False)
    prompt = toks(200)
    a = make_seq(prompt)
    run_prefill(bm, a)
    assert not bm.cached
    bm.free(a)
    assert len(bm.free_ids) == 8 and not bm.evictable
    assert bm.match_prefix(make_seq(prompt)) == 0
    assert bm.prefix_cache_queries == 0


# ---- fork ----------------------------------------------------------------------------------------

def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(8)
    parent = make_seq(toks(100))
    run_prefill(bm, parent)
    parent.token_ids.append(1)                 # sampled, not yet computed
    child = make_seq(parent.token_ids[:100] + [2])
    copies = bm.fork(parent, child)
    assert child.block_table[0] == parent.block_table[0]
    assert child.block_table[1] != parent.block_table[1]
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.num_computed_tokens == 100
    assert bm.blocks[parent.block_table[0]].ref_count == 2
    check_invariants(bm, [parent, child])
    for s in (parent, child):                  # each decodes into its own block
        bm.allocate(s, 1)
        s.num_computed_tokens += 1
    bm.free(parent)
    check_invariants(bm, [child])
    bm.free(child)
    check_invariants(bm, [])
    assert bm.usage == 0.0 and bm.num_free_blocks == 8


def test_fork_at_block_boundary_copies_nothing():
    bm = BlockManager(4)
    parent = make_seq(toks(128))
    bm.allocate(parent, 128)
    parent.num_computed_tokens = 128
    bm.allocate(parent, 1)                     # pre-allocated block for the next token
    child = make_seq(parent.token_ids)
    assert bm.fork(parent, child) == []
    assert child.block_table == parent.block_table[:2]
    check_invariants(bm, [parent, child])


def test_fork_without_a_free_block_raises_and_changes_nothing():
    bm = BlockManager(2)
    parent = make_seq(toks(100))
    run_prefill(bm, parent)
    child = make_seq(parent.token_ids)
    with pytest.raises(NoFreeBlocksError):
        bm.fork(parent, child)
    assert child.block_table == [] and bm.blocks[parent.block_table[0]].ref_count == 1
    check_invariants(bm, [parent, child])


# ---- randomized --------------------------------------------------------------------------------

class BlockManagerMachine(RuleBasedStateMachine):
    """Random admissions, chunked prefill, decode, fork, preemption and frees against a model of
    the cache contents: every computed token must be found in its slot, and no shared or cached
    block is ever written."""

    @initialize(num_blocks=st.integers(4, 14), block_size=st.sampled_from([2, 4]),
                caching=st.booleans(), seed=st.integers(0, 2**16))
    def setup(self, num_blocks, block_size, caching, seed):
        self.rng = random.Random(seed)             # the "sampler" of generated tokens
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.content = {i: [None] * block_size for i in range(num_blocks)}
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def forward(self, seq, n):
        """What the runner does: write the keys of n tokens, advance, sample, commit."""
        bm, bs = self.bm, self.bs
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            bid = seq.block_table[p // bs]
            assert bm.blocks[bid].ref_count == 1 and bm.blocks[bid].hash is None
            self.content[bid][p % bs] = seq.token_ids[p]
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == len(seq):
            seq.token_ids.append(self.rng.randrange(2))
        bm.commit(seq)

    @rule(prompt=st.lists(st.integers(0, 1), min_size=1, max_size=24))
    def add(self, prompt):
        self.waiting.append(make_seq(prompt))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit(self, data):
        seq = self.waiting.pop(data.draw(st.integers(0, len(self.waiting) - 1)))
        bm, bs = self.bm, self.bs
        expect = None
        if bm.enable_prefix_caching:               # the longest chain of cached blocks, capped
            parent, expect = None, 0
            while expect + bs <= len(seq) - 1:
                parent = block_hash(parent, seq.token_ids[expect:expect + bs])
                if parent not in bm.cached:
                    break
                expect += bs
        hit = bm.match_prefix(seq)
        assert hit == (expect or 0) and hit % bs == 0 and hit < len(seq)
        n = data.draw(st.integers(1, len(seq) - hit))
        if bm.can_allocate(seq, n):
            bm.allocate(seq, n)
            self.forward(seq, n)
            self.running.append(seq)
        else:
            with pytest.raises(NoFreeBlocksError):
                bm.allocate(seq, n)
            bm.free(seq)
            self.waiting.append(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def step(self, data):
        seq = data.draw(st.sampled_from(self.running))
        n = data.draw(st.integers(1, len(seq) - seq.num_computed_tokens))
        if self.bm.can_allocate(seq, n):
            self.bm.allocate(seq, n)
            self.forward(seq, n)
        else:                                      # preempt by recompute
            self.running.remove(seq)
            self.bm.free(seq)
            self.waiting.append(seq)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.running))
        child = make_seq(parent.token_ids[:parent.num_computed_tokens] + [data.draw(st.integers(0, 1))])
        if parent.num_computed_tokens % self.bs and not self.bm.num_free_blocks:
            with pytest.raises(NoFreeBlocksError):
                self.bm.fork(parent, child)
            assert not child.block_table
            return
        for src, dst in self.bm.fork(parent, child):
            self.content[dst] = list(self.content[src])
        self.running.append(child)

    @precondition(lambda self: self.running or self.waiting)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(self.running + self.waiting))
        (self.running if seq in self.running else self.waiting).remove(seq)
        self.bm.free(seq)

    @rule()
    def reset(self):
        self.bm.reset_prefix_cache()

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        check_invariants(self.bm, self.running + self.waiting)
        for seq in self.running:
            for p in range(seq.num_computed_tokens):
                assert self.content[seq.block_table[p // self.bs]][p % self.bs] == seq.token_ids[p]

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in self.running + self.waiting:
            self.bm.free(seq)
        check_invariants(self.bm, [])
        assert self.bm.usage == 0.0 and self.bm.num_free_blocks == self.bm.num_blocks


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                                 deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase

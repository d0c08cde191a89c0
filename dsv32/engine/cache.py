"""Paged caches: per layer, blocks of 64 token slots holding the MLA latent `[c | k_rope]` and the
indexer key, addressed through one block table per sequence.

Storage is the compute dtype, bf16 (read back in the compute dtype), or the FP8 deployment layouts:
  latent: 512 fp8 + 4 fp32 scales (one per 128) + 64 bf16 rope = 656 bytes/token;
  indexer key: 128 fp8 + 1 fp32 scale = 132 bytes/token.
"""
from __future__ import annotations

import torch

from dsv32.model.cpu.indexer import FP8Keys
from dsv32.model.cpu.pages import Pages
from dsv32.model.fp8 import CACHE_GROUP, FP8, dequantize_groups, quantize_groups

MIN_RUN_BLOCKS = 4       # shorter runs of consecutive blocks are gathered (copied) for the indexer


def fp8_roundtrip(kv_rank: int):
    """Quantise-dequantise reference of what the FP8 caches store: (latent, index_k) -> same."""
    def f(latent: torch.Tensor, index_k: torch.Tensor):
        c, pe = latent[..., :kv_rank], latent[..., kv_rank:]
        c = dequantize_groups(*quantize_groups(c), latent.dtype)
        pe = pe.to(torch.bfloat16).to(latent.dtype)
        return torch.cat((c, pe), -1), dequantize_groups(*quantize_groups(index_k), index_k.dtype)
    return f


def _rows(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool [N, d], slots [...] -> rows [..., d] (index_select copies whole rows: on CPU ~1.5x
    faster than advanced indexing for the long gathers of decode at long context)."""
    return pool.index_select(0, slots.reshape(-1)).view(*slots.shape, pool.shape[-1])


class PagedCache:
    """Block pools for every layer (the main stack; the MTP layer's when it drafts): latent and
    indexer keys, plain (in `storage`, default the compute dtype `dtype`) or FP8."""

    def __init__(self, n_layers: int, num_blocks: int, kv_rank: int, rope_dim: int, index_dim: int,
                 block_size: int = 64, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", fp8: bool = False, storage: torch.dtype | None = None):
        self.n_layers, self.num_blocks, self.block_size = n_layers, num_blocks, block_size
        self.kv_rank, self.rope_dim, self.index_dim = kv_rank, rope_dim, index_dim
        self.dtype, self.fp8 = dtype, fp8
        storage = dtype if storage is None else storage
        slots = (n_layers, num_blocks * block_size)
        if fp8:
            if kv_rank % CACHE_GROUP or index_dim % CACHE_GROUP:
                raise ValueError(f"FP8 caches need kv_lora_rank ({kv_rank}) and index_head_dim "
                                 f"({index_dim}) to be multiples of {CACHE_GROUP}")
            self.c = torch.zeros(*slots, kv_rank, dtype=FP8, device=device)
            self.c_scale = torch.zeros(*slots, kv_rank // CACHE_GROUP, device=device)
            self.pe = torch.zeros(*slots, rope_dim, dtype=torch.bfloat16, device=device)
            self.ik = torch.zeros(*slots, index_dim, dtype=FP8, device=device)
            self.ik_scale = torch.zeros(*slots, index_dim // CACHE_GROUP, device=device)
        else:
            self.lat = torch.zeros(*slots, kv_rank + rope_dim, dtype=storage, device=device)
            self.ik = torch.zeros(*slots, index_dim, dtype=storage, device=device)

    @staticmethod
    def bytes_per_token(kv_rank: int, rope_dim: int, index_dim: int, dtype: torch.dtype, fp8: bool) -> int:
        """Cache bytes per token per layer (656 + 132 for the real model in FP8)."""
        if fp8:
            return kv_rank + 4 * kv_rank // CACHE_GROUP + 2 * rope_dim + index_dim + 4 * index_dim // CACHE_GROUP
        return (kv_rank + rope_dim + index_dim) * torch.finfo(dtype).bits // 8

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, index_k: torch.Tensor) -> None:
        """slots [N] flat slot ids; latent [N, C+R]; index_k [N, Di]."""
        if self.fp8:
            self.c[layer, slots], self.c_scale[layer, slots] = quantize_groups(latent[:, : self.kv_rank])
            self.pe[layer, slots] = latent[:, self.kv_rank:].to(torch.bfloat16)
            self.ik[layer, slots], self.ik_scale[layer, slots] = quantize_groups(index_k)
        else:
            self.lat[layer].index_copy_(0, slots, latent.to(self.lat.dtype))
            self.ik[layer].index_copy_(0, slots, index_k.to(self.ik.dtype))

    def read_latent(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """slots [...] -> latent rows [..., C+R] in the compute dtype."""
        if self.fp8:
            c = dequantize_groups(_rows(self.c[layer], slots), _rows(self.c_scale[layer], slots), self.dtype)
            return torch.cat((c, _rows(self.pe[layer], slots).to(self.dtype)), -1)
        return _rows(self.lat[layer], slots).to(self.dtype)

    def read_index(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """slots [...] -> indexer keys [..., Di]."""
        if self.fp8:
            return dequantize_groups(_rows(self.ik[layer], slots), _rows(self.ik_scale[layer], slots), self.dtype)
        return _rows(self.ik[layer], slots).to(self.dtype)

    def index_span(self, layer: int, start: int, stop: int) -> torch.Tensor | FP8Keys:
        """Indexer keys of the consecutive slots [start, stop): a view, in the pool's dtype (of an
        FP8 cache: its values and scales; the indexer converts either a block at a time, or reads
        FP8 on AMX tiles)."""
        if self.fp8:
            return FP8Keys(self.ik[layer, start:stop], self.ik_scale[layer, start:stop], self.dtype)
        return self.ik[layer, start:stop]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write when forking sequences)."""
        bs = self.block_size
        tensors = [self.c, self.c_scale, self.pe, self.ik, self.ik_scale] if self.fp8 else [self.lat, self.ik]
        for src, dst in pairs:
            for t in tensors:
                t[:, dst * bs:(dst + 1) * bs] = t[:, src * bs:(src + 1) * bs]


class PagedKV:
    """The key-store view (see dsv32/model/kv.py) of a padded batch [B, T] over a PagedCache."""

    def __init__(self, cache: PagedCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 write_slots: torch.Tensor):
        # block_tables [B, nb]; context_lens [B] keys per row after this forward;
        # write_slots [B, T] flat slot of each new token, -1 for padding
        self.cache, self.bs = cache, cache.block_size
        self.block_tables = block_tables
        self.context_lens = context_lens.tolist()
        self.S = max(self.context_lens)
        flat = write_slots.reshape(-1)
        if write_slots.shape[1] == 1 or bool((flat >= 0).all()):      # no padding (every decode)
            self.write_rows, self.write_slots = None, flat
        else:
            self.write_rows = torch.nonzero(flat >= 0).flatten()
            self.write_slots = flat[self.write_rows]
        self._key_slots: torch.Tensor | None = None
        self._spans: list | None = None

    @property
    def key_slots(self) -> torch.Tensor:
        """[B, S] the cache slot of every key of each row (rows shorter than S point their tail at
        slot 0: the causal mask never selects those); computed on first use (the native decode
        kernels read the block table instead)."""
        if self._key_slots is None:
            B, S = self.block_tables.shape[0], self.S
            j = torch.arange(S, device=self.block_tables.device)
            ks = self._slots(j.expand(B, S))
            self._key_slots = ks.masked_fill(j >= torch.tensor(self.context_lens, device=ks.device)[:, None], 0)
        return self._key_slots

    def spans(self) -> list[tuple[list[tuple[int, int, int]], tuple | None]]:
        """Per row, its keys as runs of consecutive blocks in its table: (first position, first
        slot, count) for runs of at least MIN_RUN_BLOCKS blocks, and the rest as one gathered
        (positions [n], slots [n]) pair or None (the same for every layer; computed once)."""
        if self._spans is None:
            self._spans = [self._row_spans(self.block_tables[b], n) for b, n in enumerate(self.context_lens)]
        return self._spans

    def _row_spans(self, table: torch.Tensor, n: int):
        nb = -(-n // self.bs)
        blocks = table[:nb]
        breaks = (torch.nonzero(blocks[1:] - blocks[:-1] != 1).flatten() + 1).tolist()
        runs, short = [], []
        for s, e, f in zip([0] + breaks, breaks + [nb], blocks[[0] + breaks].tolist()):
            run = (s * self.bs, f * self.bs, min(n, e * self.bs) - s * self.bs)
            (runs if e - s >= MIN_RUN_BLOCKS else short).append(run)
        if not short:
            return runs, None
        dev = table.device
        pos = torch.cat([torch.arange(p, p + k, device=dev) for p, _, k in short])
        slots = torch.cat([torch.arange(f, f + k, device=dev) for _, f, k in short])
        return runs, (pos, slots)

    def num_keys(self, layer: int) -> int:
        return self.S

    def index_runs(self, layer: int) -> list[list[tuple]]:
        """Per row, (first position, keys [n, Di]) over runs of consecutive blocks: views of the
        cache, no copy; the keys of short runs gathered as one (positions, keys) pair (see
        model/cpu/indexer.py)."""
        out = []
        for runs, short in self.spans():
            row = [(p, self.cache.index_span(layer, f, f + k)) for p, f, k in runs]
            if short is not None:
                row.append((short[0], self.cache.read_index(layer, short[1])))
            out.append(row)
        return out

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Token positions [B, ...] -> flat cache slots through each row's block table."""
        B = pos.shape[0]
        blocks = torch.gather(self.block_tables, 1, (pos // self.bs).reshape(B, -1)).view(pos.shape)
        return blocks * self.bs + pos % self.bs

    def write(self, layer: int, latent: torch.Tensor, index_k: torch.Tensor) -> None:
        latent, index_k = latent.reshape(-1, latent.shape[-1]), index_k.reshape(-1, index_k.shape[-1])
        if self.write_rows is not None:                                   # padded rows: skip those
            latent, index_k = latent[self.write_rows], index_k[self.write_rows]
        self.cache.write(layer, self.write_slots, latent, index_k)

    def index_keys(self, layer: int) -> torch.Tensor:
        return self.cache.read_index(layer, self.key_slots)                               # [B, S, Di]

    def latent(self, layer: int) -> torch.Tensor:
        return self.cache.read_latent(layer, self.key_slots)                              # [B, S, C+R]

    def gather_latent(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        return self.cache.read_latent(layer, self._slots(idx))                           # [B, T, K, C+R]

    def pages(self, layer: int, row: int = 0) -> tuple[Pages, int] | None:
        """Row `row`'s keys in the cache's pools (fp32, bf16 or FP8), through its block table, and
        its key count (None unless the cache computes in fp32)."""
        c, table = self.cache, self.block_tables[row]
        if c.dtype != torch.float32:
            return None
        if c.fp8:
            pages = Pages(c.c[layer], c.ik[layer], table, self.bs, c.c_scale[layer], c.pe[layer], c.ik_scale[layer])
        else:
            pages = Pages(c.lat[layer], c.ik[layer], table, self.bs)
        return pages, self.context_lens[row]

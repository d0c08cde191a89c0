"""Key stores that attention reads from: fresh (no cache), after a shared prefix (training) and
contiguous (incremental decode).

A key store holds, per layer and batch row, the MLA latent `[c | k_rope]` and the indexer key of
every token seen so far, in position order (key j has position j). Attention writes the new
tokens, scores all indexer keys (the indexer is O(L) by design) where they lie (`index_runs`:
views, no copy) and gathers only the latent rows it selected. The engine's paged cache implements
the same methods.
"""
from __future__ import annotations

import torch

from .cpu.indexer import runs_of
from .cpu.pages import Pages


class FreshKV:
    """No cache: the keys are exactly the tokens of the current forward (positions 0..T-1)."""

    def __init__(self):
        self.latents: dict[int, torch.Tensor] = {}
        self.index_k: dict[int, torch.Tensor] = {}

    def write(self, layer: int, latent: torch.Tensor, index_k: torch.Tensor) -> None:
        self.latents[layer], self.index_k[layer] = latent, index_k

    def index_keys(self, layer: int) -> torch.Tensor:
        return self.index_k[layer]                                       # [B, S, Di]

    def num_keys(self, layer: int) -> int:
        return self.index_k[layer].shape[1]

    def index_runs(self, layer: int) -> list:
        return runs_of(self.index_keys(layer))                          # per row: [(0, [S, Di])]

    def latent(self, layer: int) -> torch.Tensor:
        return self.latents[layer]                                       # [B, S, C+R]

    def gather_latent(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.latents[layer], idx)

    def pages(self, layer: int, row: int = 0) -> tuple[Pages, int] | None:
        """Row `row`'s keys in this store's own storage, for a native kernel to read and write in
        place, and how many keys the row holds after this forward; or None (here: the store keeps
        the forward's tensors, not storage)."""
        return None


class PrefixKV(FreshKV):
    """Keys of a batch-1 prefix shared by every row (a FreshKV its forward wrote), then the rows'
    own tokens: the prefix runs once and its keys reach every row like a cache."""

    def __init__(self, prefix: FreshKV):
        super().__init__()
        self.prefix = prefix

    def write(self, layer: int, latent: torch.Tensor, index_k: torch.Tensor) -> None:
        b = latent.shape[0]                          # prefix [1, P, .] + own [b, t, .] -> [b, P + t, .]
        super().write(layer, torch.cat((self.prefix.latent(layer).expand(b, -1, -1), latent), 1),
                      torch.cat((self.prefix.index_keys(layer).expand(b, -1, -1), index_k), 1))


class ContiguousKV:
    """A dense per-row cache of `max_len` tokens; `start_pos` says where the next forward writes."""

    def __init__(self, n_layers: int, batch: int, max_len: int, latent_dim: int, index_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 quantize=None):
        self.lat = torch.zeros(n_layers, batch, max_len, latent_dim, dtype=dtype, device=device)
        self.idx = torch.zeros(n_layers, batch, max_len, index_dim, dtype=dtype, device=device)
        self.start_pos, self.end_pos = 0, 0
        self.quantize = quantize  # optional (latent, index_k) -> (latent, index_k) FP8 simulation

    def begin(self, start_pos: int, length: int) -> None:
        """Announce the next forward: `length` new tokens starting at `start_pos`."""
        if start_pos + length > self.lat.shape[2]:
            raise ValueError(f"ContiguousKV: {start_pos + length} tokens exceed max_len {self.lat.shape[2]}")
        self.start_pos, self.end_pos = start_pos, start_pos + length

    def write(self, layer: int, latent: torch.Tensor, index_k: torch.Tensor) -> None:
        if self.quantize is not None:
            latent, index_k = self.quantize(latent, index_k)
        b = latent.shape[0]
        self.lat[layer, :b, self.start_pos:self.end_pos] = latent
        self.idx[layer, :b, self.start_pos:self.end_pos] = index_k

    def index_keys(self, layer: int) -> torch.Tensor:
        return self.idx[layer, :, : self.end_pos]

    def num_keys(self, layer: int) -> int:
        return self.end_pos

    def index_runs(self, layer: int) -> list:
        return runs_of(self.index_keys(layer))

    def latent(self, layer: int) -> torch.Tensor:
        return self.lat[layer, :, : self.end_pos]

    def gather_latent(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.lat[layer, : idx.shape[0], : self.end_pos], idx)

    def pages(self, layer: int, row: int = 0) -> tuple[Pages, int] | None:
        if self.quantize is not None or self.lat.dtype != torch.float32:
            return None
        one_block = torch.zeros(1, dtype=torch.int64, device=self.lat.device)
        return Pages(self.lat[layer, row], self.idx[layer, row], one_block, self.lat.shape[2]), self.end_pos


def gather_rows(keys: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """keys [B, S, C], idx [B, T, K] (values in 0..S-1) -> [B, T, K, C]."""
    B, T, K = idx.shape
    flat = idx.reshape(B, T * K, 1).expand(-1, -1, keys.shape[-1])     # [B, T*K, C]
    return torch.gather(keys, 1, flat).view(B, T, K, keys.shape[-1])

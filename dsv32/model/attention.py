"""MLA (multi-head latent attention) with DeepSeek Sparse Attention: the lightning indexer picks
`index_topk` keys per query and attention runs over the gathered latent entries only.

Two computations on the same cached latent `[c | k_rope]`:
  * expanded MHA: `kv_b_proj` expands every key to per-head `[k_nope | v]` (prefill, reference);
  * absorbed MQA: `kv_b_proj` is folded into the query and the output, attention runs on the
    576-wide latent shared by all heads (decode, and sparse prefill over gathered entries).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fp8 import act_quant_dequant
from .layers import Linear, RMSNorm, hadamard, rope_half, rope_interleaved
from dsv32.parallel.context import SINGLE, ParallelContext

# Bound on the elements of one [queries x heads x keys] score block; larger inputs are chunked
# over queries so a 128K-token prefill never materialises an O(L^2 * heads) tensor.
SCORE_BLOCK = 1 << 24


def _query_chunks(T: int, per_query: int):
    step = max(1, SCORE_BLOCK // max(1, per_query))
    for s in range(0, T, step):
        yield slice(s, min(T, s + step))


class Indexer(nn.Module):
    """Lightning indexer: `I[t,s] = sum_j w[t,j] * relu(q[t,j] . k[s])`, then causal top-k."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None, fp8_sim: bool = False):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.rope_dim, self.topk = cfg.qk_rope_head_dim, cfg.index_topk
        self.fp8_sim = fp8_sim  # Hadamard-rotate q and k and quantise them as the FP8 kernels do
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, dtype=dtype)
        self.wk = Linear(cfg.hidden_size, self.head_dim, dtype=dtype)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6, dtype=dtype)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, dtype=torch.float32)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # split order is [rope | nope] (rope FIRST), rotation is half-split (non-interleaved)
        pe, nope = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        x = torch.cat((rope_half(pe, cos, sin), nope), dim=-1)
        if self.fp8_sim:
            x = act_quant_dequant(hadamard(x), group=self.head_dim)
        return x

    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> index keys [B, T, Di] (the indexer cache entries)."""
        k = self.k_norm(self.wk(x))
        return self._rope(k, cos, sin)

    def query(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q [B, T, H, Di] and head weights w [B, T, H] (fp32, scales folded in)."""
        B, T, _ = qr.shape
        q = self.wq_b(qr).view(B, T, self.n_heads, self.head_dim)       # [B, T, H, Di]
        q = self._rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2))
        w = self.weights_proj(x.float()) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return q, w

    @staticmethod
    def scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, Di], w [B, T, H], k [B, S, Di] -> index scores [B, T, S] (fp32)."""
        s = torch.einsum("bthd,bsd->bths", q.float(), k.float()).relu_()  # [B, T, H, S]
        return torch.einsum("bths,bth->bts", s, w)

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor
               ) -> torch.Tensor:
        """Causal top-k key indices [B, T, K] per query; -1 marks empty slots (fewer keys than K)."""
        B, T, H, _ = q.shape
        S = keys.shape[1]
        K = min(self.topk, S)
        out = torch.empty(B, T, K, dtype=torch.long, device=q.device)
        key_pos = torch.arange(S, device=q.device)
        for c in _query_chunks(T, H * S):
            sc = self.scores(q[:, c], w[:, c], keys)                     # [B, t, S]
            future = key_pos.view(1, 1, S) > positions[:, c].unsqueeze(-1)
            sc = sc.masked_fill(future, float("-inf"))
            val, idx = sc.topk(K, dim=-1)                                # [B, t, K]
            out[:, c] = idx.masked_fill(val == float("-inf"), -1)
        return out


class MLA(nn.Module):
    """Multi-head latent attention with a DSA indexer; caches only `[c | k_rope]` per token."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype | None = None,
                 fp8_sim: bool = False, pc: ParallelContext = SINGLE):
        super().__init__()
        self.layer_idx = layer_idx
        h0, h1 = pc.split(cfg.num_attention_heads, "num_attention_heads")
        self.n_heads = h1 - h0                              # local heads (tensor-parallel shard)
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk, kv = self.nope + self.rope, self.nope + self.v_dim

        def rows(per_head: int):                            # column-parallel: split output rows
            return (0, h0 * per_head, h1 * per_head) if pc.enabled else None
        self.kv_rank, self.topk = cfg.kv_lora_rank, cfg.index_topk
        self.scale = cfg.softmax_scale
        self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype=dtype)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype=dtype)
        self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * qk, dtype=dtype, shard=rows(qk))
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.kv_rank + self.rope, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps, dtype=dtype)
        self.kv_b_proj = Linear(self.kv_rank, self.n_heads * kv, dtype=dtype, shard=rows(kv))
        # row-parallel: split input columns; the block sums the partial outputs over ranks
        self.o_proj = Linear(self.n_heads * self.v_dim, cfg.hidden_size, dtype=dtype,
                             shard=(1, h0 * self.v_dim, h1 * self.v_dim) if pc.enabled else None)
        self.indexer = Indexer(cfg, dtype, fp8_sim=fp8_sim)

    # ---- projections ------------------------------------------------------------------------
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, D] -> q_nope [B,T,H,nope], q_pe [B,T,H,rope], qr [B,T,q_rank], latent [B,T,C+R]."""
        B, T, _ = x.shape
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(B, T, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = rope_interleaved(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)
        latent = torch.cat((self.kv_a_layernorm(c), rope_interleaved(k_pe, cos, sin)), dim=-1)
        return q_nope, q_pe, qr, latent

    def _wkv_b(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.dense_weight(dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        return w[:, : self.nope], w[:, self.nope:]                      # W_uk [H,nope,C], W_uv [H,v,C]

    # ---- the two attention computations -------------------------------------------------
    def mha(self, q_nope, q_pe, latent, positions, index_mask=None) -> torch.Tensor:
        """Expanded MHA over all keys [B, S, C+R]; causal, optionally restricted by `index_mask`
        ([B, T, S] bool, True = selected). This dense-masked form is the slow reference path."""
        B, S, _ = latent.shape
        c, k_pe = latent.split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c).view(B, S, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        T = q.shape[1]
        fresh = index_mask is None and S == T and bool((positions == torch.arange(T, device=q.device)).all())
        if fresh:   # keys are exactly the queries' tokens: SDPA's causal kernel, no mask tensor
            mask = None
        else:
            mask = torch.arange(S, device=latent.device).view(1, 1, S) <= positions.unsqueeze(-1)
            if index_mask is not None:
                mask = mask & index_mask
            mask = mask.unsqueeze(1)
        dk = q.shape[-1]
        if v.device.type == "cpu" and self.v_dim < dk:
            v = F.pad(v, (0, dk - self.v_dim))    # CPU flash kernel needs dv == dk (2x the math path)
        # [B, H, T, dk] x [B, H, S, dk] -> [B, H, T, dv]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=fresh, scale=self.scale)
        return o.transpose(1, 2)[..., : self.v_dim]                      # [B, T, H, v]

    def mqa_sparse(self, q_nope, q_pe, kv, idx: torch.Tensor) -> torch.Tensor:
        """Absorbed MQA over gathered latent rows only: idx [B, T, K] (-1 = empty) -> [B, T, H, v]."""
        w_uk, w_uv = self._wkv_b(q_nope.dtype)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)            # [B, T, H, C]
        q = torch.cat((q_lat, q_pe), dim=-1)                             # [B, T, H, C+R]
        B, T, H, _ = q.shape
        out = q.new_empty(B, T, H, self.v_dim)
        for c in _query_chunks(T, H * idx.shape[-1] + idx.shape[-1] * q.shape[-1]):
            sel = idx[:, c]
            rows = kv.gather_latent(self.layer_idx, sel.clamp(min=0))   # [B, t, K, C+R]
            s = torch.einsum("bthd,btkd->bthk", q[:, c], rows).float() * self.scale
            s = s.masked_fill((sel < 0).unsqueeze(2), float("-inf"))
            p = s.softmax(dim=-1).to(rows.dtype)
            o_lat = torch.einsum("bthk,btkc->bthc", p, rows[..., : self.kv_rank])
            out[:, c] = torch.einsum("bthc,hvc->bthv", o_lat, w_uv)
        return out

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv, mode: str = "auto") -> torch.Tensor:
        """x [B, T, D] at `positions` [B, T]; `kv` a key store (see kv.py).

        mode: "auto" (fast paths), "dense" (expanded MHA over all keys with an additive top-k
        mask: the slow reference), "sparse" (always gathered absorbed MQA over the top-k).
        """
        q_nope, q_pe, qr, latent = self.project(x, cos, sin)
        kv.write(self.layer_idx, latent, self.indexer.key(x, cos, sin))
        keys = kv.index_keys(self.layer_idx)                             # [B, S, Di]
        S = keys.shape[1]
        T = x.shape[1]
        if S <= self.topk and mode == "auto":
            # every causal key set fits in top-k: selection is "all keys", no scoring needed
            if T > 1:
                o = self.mha(q_nope, q_pe, kv.latent(self.layer_idx), positions)
            else:
                idx = torch.arange(S, device=x.device).expand(x.shape[0], 1, S)
                idx = idx.masked_fill(idx > positions.unsqueeze(-1), -1)
                o = self.mqa_sparse(q_nope, q_pe, kv, idx)
        else:
            iq, iw = self.indexer.query(x, qr, cos, sin)
            idx = self.indexer.select(iq, iw, keys, positions)           # [B, T, K]
            if mode == "dense":
                mask = torch.zeros(*idx.shape[:2], S + 1, dtype=torch.bool, device=x.device)
                mask.scatter_(-1, torch.where(idx < 0, S, idx), True)
                o = self.mha(q_nope, q_pe, kv.latent(self.layer_idx), positions, mask[..., :S])
            else:
                o = self.mqa_sparse(q_nope, q_pe, kv, idx)
        return self.o_proj(o.flatten(2))

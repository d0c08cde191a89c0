"""MLA (multi-head latent attention) with DeepSeek Sparse Attention: the lightning indexer picks
`index_topk` keys per query and attention runs over the gathered latent entries only.

Two computations on the same cached latent `[c | k_rope]`:
  * expanded MHA: `kv_b_proj` expands every key to per-head `[k_nope | v]` (prefill, reference);
  * absorbed MQA: `kv_b_proj` is folded into the query and the output, attention runs on the
    576-wide latent shared by all heads (decode, and sparse prefill over gathered entries).
`Attention` says which keys a forward attends to and by which of the two; the indexer reads
detached inputs, so it learns only from its own loss (training's `Hooks.index`).
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fp8 import act_quant_dequant
from .hooks import Hooks, IndexView
from .cpu import native
from .cpu.absorb import absorb
from .cpu.build import has_compiler
from .cpu.indexer import ascending, causal_topk, index_scores, runs_of
from .layers import Linear, RMSNorm, hadamard, rope_half, rope_interleaved
from dsv32.parallel.context import SINGLE, ParallelContext

# Bound on the elements of one [queries x heads x keys] score block; larger inputs are chunked
# over queries so a 128K-token prefill never materialises an O(L^2 * heads) tensor.
SCORE_BLOCK = 1 << 24
# Sparse attention gathers the selected latent rows of this many elements at a time (4 MiB in
# fp32), so both products read them from cache, not memory.
GATHER_BLOCK = 1 << 20
# ... and the outputs of this many elements (o_lat: queries x heads x kv_lora_rank) go through W_uv
# together: packed weights dequantise W_uv a tile at a time per call, too often for 7-query chunks.
ABSORB_BLOCK = 1 << 22
# SERVED prefill chunks over at most this many keys run the dense-masked expanded MHA (TOPK_MASKED:
# the same numbers, GEMM and flash-attention speed) instead of the sparse path (TOPK_GATHERED). Each
# chunk expands every earlier key through kv_b_proj again, so beyond ~2x a chunk's queries the sparse
# path is faster (bench model, 4K prompt in 512-token chunks: 4096 keys 2849 tok/s, 1024 keys 4528;
# in 2048-token chunks 2771 vs 4086: bench/README.md, "Prefill chunk").
DENSE_MAX_KEYS = 1024


class Attention(Enum):
    """Which keys each query attends to, and by which computation."""

    SERVED = "served"                # inference: expanded MHA over every key while every query's
                                     # keys fit in index_topk (decode: gathered), else TOPK_GATHERED
    DENSE = "dense"                  # expanded MHA over every visible key, no top-k (DSA dense and
                                     # warm-up stages)
    TOPK_MASKED = "topk_masked"      # the indexer's top-k as a mask on expanded MHA: the slow
                                     # reference (DSA sparse stage)
    TOPK_GATHERED = "topk_gathered"  # the indexer's top-k, absorbed MQA over the gathered rows only


def _query_chunks(T: int, per_query: int, block: int = SCORE_BLOCK):
    step = max(1, block // max(1, per_query))
    for s in range(0, T, step):
        yield slice(s, min(T, s + step))


def visible_keys(positions: torch.Tensor, S: int, doc: torch.Tensor | None = None,
                 rows: slice = slice(None)) -> torch.Tensor:
    """Keys [B, t, S] that the queries `rows` at `positions` [B, T] may see: those at or before
    their position and, with `doc` [B, T] (packed rows: the keys are the forward's own tokens),
    of their own document."""
    m = torch.arange(S, device=positions.device).view(1, 1, S) <= positions[:, rows].unsqueeze(-1)
    if doc is not None:
        m = m & (doc[:, rows].unsqueeze(-1) == doc.unsqueeze(1))
    return m


def key_mask(idx: torch.Tensor, S: int) -> torch.Tensor:
    """Selected key ids [B, T, K] (-1 = empty) -> mask [B, T, S] bool."""
    mask = torch.zeros(*idx.shape[:2], S + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, torch.where(idx < 0, S, idx), True)[..., :S]


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

    def top(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Index scores [B, T, S] -> the top-k visible key ids [B, T, K], ascending; -1 marks empty
        slots after them (fewer visible keys than K)."""
        K = min(self.topk, scores.shape[-1])
        val, idx = scores.masked_fill(~visible, float("-inf")).topk(K, dim=-1)   # [B, T, K]
        return ascending(idx.masked_fill(val == float("-inf"), -1))

    def select(self, q: torch.Tensor, w: torch.Tensor, keys, positions: torch.Tensor,
               doc: torch.Tensor | None = None, S: int | None = None) -> torch.Tensor:
        """Top-k key ids [B, T, K] per query among its visible keys (see `visible_keys`); -1 marks
        empty slots. `keys`: [B, S, Di], or per row its key runs (cpu/indexer.py) of `S` keys
        in all, read in place. Scored a chunk of queries and a cache-sized block of keys at a time."""
        B, T, H, _ = q.shape
        if isinstance(keys, torch.Tensor):
            S, keys = keys.shape[1], runs_of(keys)
        out = torch.empty(B, T, min(self.topk, S), dtype=torch.long, device=q.device)
        for b in range(B):
            for c in _query_chunks(T, 4 * S):
                scores = index_scores(q[b, c], w[b, c], keys[b], S)      # [t, S]
                if doc is not None:
                    scores.masked_fill_(~visible_keys(positions[b:b + 1], S, doc[b:b + 1], c)[0], float("-inf"))
                out[b, c] = causal_topk(scores, positions[b, c], self.topk)
        return out

    def select_reference(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                         positions: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        """The slow obvious reference of `select`: all keys [B, S, Di] scored per query chunk."""
        B, T, H, _ = q.shape
        S = keys.shape[1]
        out = torch.empty(B, T, min(self.topk, S), dtype=torch.long, device=q.device)
        for c in _query_chunks(T, H * S):
            out[:, c] = self.top(self.scores(q[:, c], w[:, c], keys), visible_keys(positions, S, doc, c))
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

    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [..., H, nope] -> q_nope @ W_uk [..., H, C] (packed kv_b: read in place)."""
        kb = self.kv_b_proj
        if kb.packed:
            return absorb(q_nope, kb.weight, kb.weight_scale_inv, self.nope, query=True).to(q_nope.dtype)
        return torch.einsum("...hn,hnc->...hc", q_nope, self._wkv_b(q_nope.dtype)[0])

    def absorb_o(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat [..., H, C] -> o_lat @ W_uv^T [..., H, v] (packed kv_b: read in place)."""
        kb = self.kv_b_proj
        if kb.packed:
            return absorb(o_lat, kb.weight, kb.weight_scale_inv, self.nope, query=False).to(o_lat.dtype)
        return torch.einsum("...hc,hvc->...hv", o_lat, self._wkv_b(o_lat.dtype)[1])

    # ---- the two attention computations -------------------------------------------------
    def mha(self, q_nope, q_pe, latent, positions, index_mask=None) -> torch.Tensor:
        """Expanded MHA over all keys [B, S, C+R]; causal, optionally restricted by `index_mask`
        ([B, T, S] bool, True = may attend: a top-k selection, a document). This dense-masked form
        is the slow reference path."""
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
        q = torch.cat((self.absorb_q(q_nope), q_pe), dim=-1)            # [B, T, H, C+R]
        B, T, H, _ = q.shape
        out = q.new_empty(B, T, H, self.v_dim)
        per_query = H * idx.shape[-1] + idx.shape[-1] * q.shape[-1]
        pages = self._pages(q, kv)
        for g in _query_chunks(T, B * H * self.kv_rank, ABSORB_BLOCK):
            if pages is not None:                                        # rows read in place
                rows = [native.sparse_prefill(q[b, g], idx[b, g], p, self.scale, self.kv_rank)
                        for b, p in enumerate(pages)]
                o_lat = rows[0][None] if B == 1 else torch.stack(rows)                # [B, g, H, C]
            else:
                o_lat = q.new_empty(B, g.stop - g.start, H, self.kv_rank)              # [B, g, H, C]
                for c in _query_chunks(g.stop - g.start, per_query, GATHER_BLOCK):    # copied in: a chunk's
                    qc = slice(g.start + c.start, g.start + c.stop)                    # result can be a view
                    o_lat[:, c] = self.attend_latent(q[:, qc], kv, idx[:, qc])       # of its gathered rows
            out[:, g] = self.absorb_o(o_lat)
        return out

    def _pages(self, q: torch.Tensor, kv) -> list | None:
        """Each row's pages in the key store (native.sparse_prefill reads them in place), or None:
        the gathered path (a store of the forward's tensors or not in fp32, no C++ compiler, not
        fp32 on the CPU)."""
        if q.device.type != "cpu" or q.dtype != torch.float32 or not has_compiler():
            return None
        rows = [kv.pages(self.layer_idx, b) for b in range(q.shape[0])]
        return None if any(r is None for r in rows) else [r[0] for r in rows]

    def attend_latent(self, q: torch.Tensor, kv, sel: torch.Tensor) -> torch.Tensor:
        """Absorbed queries q [B, t, H, C+R] over the gathered latent rows sel [B, t, K] (-1 =
        empty) -> o_lat [B, t, H, C] (before W_uv)."""
        rows = kv.gather_latent(self.layer_idx, sel.clamp(min=0))       # [B, t, K, C+R]
        # matmul, not einsum: the same batched GEMMs without einsum's ~15 us of planning a call
        s = torch.matmul(q, rows.transpose(-1, -2)).float() * self.scale  # [B, t, H, K]
        s = s.masked_fill((sel < 0).unsqueeze(2), float("-inf"))
        p = s.softmax(dim=-1).to(rows.dtype)
        return torch.matmul(p, rows[..., : self.kv_rank])               # [B, t, H, C]

    def decode_select(self, iq: torch.Tensor, iw: torch.Tensor, kv, positions: torch.Tensor) -> torch.Tensor:
        """SERVED top-k key ids [B, 1, K] of one new token per row (all visible keys while they
        fit in index_topk)."""
        S = kv.num_keys(self.layer_idx)
        if S <= self.topk:
            idx = torch.arange(S, device=iq.device).expand(iq.shape[0], 1, S)
            return idx.masked_fill(~visible_keys(positions, S), -1)
        return self.indexer.select(iq, iw, kv.index_runs(self.layer_idx), positions, None, S)

    @torch.no_grad()
    def probs(self, q_nope, q_pe, latent, visible: torch.Tensor) -> torch.Tensor:
        """Main attention probabilities [B, H, T, S] of the expanded MHA over the `visible` keys
        [B, T, S] (what the indexer learns to predict)."""
        c, k_pe = latent.split([self.kv_rank, self.rope], dim=-1)
        B, S, _ = latent.shape
        kv = self.kv_b_proj(c).view(B, S, self.n_heads, self.nope + self.v_dim)
        s = torch.einsum("bthd,bshd->bhts", q_nope.float(), kv[..., : self.nope].float())
        s = s + torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())
        s = (s * self.scale).masked_fill(~visible.unsqueeze(1), float("-inf"))
        return s.softmax(-1)

    # ---- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv, attention: Attention = Attention.SERVED, doc: torch.Tensor | None = None,
                hooks: Hooks | None = None) -> torch.Tensor:
        """x [B, T, D] at `positions` [B, T]; `kv` a key store (see kv.py); `doc` [B, T] keeps
        packed documents apart; `hooks.index` is shown every layer's index scores."""
        q_nope, q_pe, qr, latent = self.project(x, cos, sin)
        kv.write(self.layer_idx, latent, self.indexer.key(x.detach(), cos, sin))
        S = kv.num_keys(self.layer_idx)
        idx = None                                                       # top-k key ids [B, T, K]
        if hooks is not None and hooks.index is not None:
            keys = kv.index_keys(self.layer_idx)                         # [B, S, Di]
            idx = self._observe(hooks.index, x, qr, q_nope, q_pe, kv, keys, positions, cos, sin, doc)
        if attention is Attention.SERVED and S <= self.topk:
            # every visible key set fits in top-k: selection is "all keys", no scoring needed
            if x.shape[1] > 1:
                attention = Attention.DENSE
            else:
                idx = torch.arange(S, device=x.device).expand(x.shape[0], 1, S)
                idx = idx.masked_fill(~visible_keys(positions, S, doc), -1)
        elif attention is Attention.SERVED and x.shape[1] > 1 and S <= DENSE_MAX_KEYS:
            attention = Attention.TOPK_MASKED                            # short prompt: dense is faster
        if attention is Attention.DENSE:
            mask = None if doc is None else visible_keys(positions, S, doc)
            o = self.mha(q_nope, q_pe, kv.latent(self.layer_idx), positions, mask)
        else:
            if idx is None:
                iq, iw = self.indexer.query(x.detach(), qr.detach(), cos, sin)
                idx = self.indexer.select(iq, iw, kv.index_runs(self.layer_idx), positions, doc, S)
            if attention is Attention.TOPK_MASKED:
                o = self.mha(q_nope, q_pe, kv.latent(self.layer_idx), positions, key_mask(idx, S))
            else:                                                        # TOPK_GATHERED, SERVED
                o = self.mqa_sparse(q_nope, q_pe, kv, idx)
        return self.o_proj(o.flatten(2))

    def _observe(self, hook, x, qr, q_nope, q_pe, kv, keys, positions, cos, sin, doc) -> torch.Tensor:
        """Score every key at once (the indexer loss needs the whole [B, T, S] with its gradient),
        show the hook the scores, the top-k and the main attention; -> top-k ids [B, T, K]."""
        iq, iw = self.indexer.query(x.detach(), qr.detach(), cos, sin)
        scores = self.indexer.scores(iq, iw, keys)                       # [B, T, S]
        visible = visible_keys(positions, keys.shape[1], doc)
        idx = self.indexer.top(scores.detach(), visible)
        probs = self.probs(q_nope, q_pe, kv.latent(self.layer_idx), visible)
        hook(self.layer_idx, IndexView(scores, visible, key_mask(idx, keys.shape[1]), probs))
        return idx

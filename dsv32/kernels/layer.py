"""The served forward over the paged cache through the fast paths: FP8 GEMMs, the absorbed `kv_b`
weights prepared once, sync-free cache writes, indexer top-k and sparse MLA, packed experts.

`FastModel.step(ids, pos, slots, tables, last)` is one decode/prefill step with static shapes and
no host syncs (what `graphs.GraphedStep` captures). The model's own `Transformer.hidden` over a
`PagedKV` (Attention.SERVED) is the reference: same function, different rounding (absorbed
attention over every visible key where the eager path expands MHA, block scales applied after
the dot). Inference only: no hooks, no packed documents, one device (no tensor parallelism).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dsv32.model.layers import Linear, rope_interleaved
from dsv32.model.moe import MoE

from . import check_backend, paged
from .fp8_gemm import fp8_linear
from .graphs import Arg
from .grouped import PackedExperts

# how FastModel.step's inputs (ids, pos, slots, tables, last) pad into GraphedStep buckets:
# padding rows decode token 0 at position 0 into no slot through block 0
STEP_ARGS = (Arg(0), Arg(0), Arg(-1), Arg(0, width=True), Arg(0))


class Batch(NamedTuple):
    """A forward's view of the paged cache: tables [B, nb], write slots [B, T] (-1 = padding),
    and the static key bound S (keys 0..S-1 exist in the tables; visibility comes from positions)."""

    cache: object
    tables: torch.Tensor
    slots: torch.Tensor
    S: int


class Linears:
    """Runs a model Linear: FP8 weights through `fp8_linear` (mode "w8a8" where the Linear
    simulates FP8 activations), anything else through the Linear itself."""

    def __init__(self, backend: str, gemm: str = "w8a16"):
        self.backend, self.gemm = check_backend(backend), gemm

    def __call__(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        if lin.fp8_block != (128, 128) or lin.bias is not None:
            return lin(x)
        return fp8_linear(x, lin.weight, lin.weight_scale_inv, "w8a8" if lin.fp8_act else self.gemm, self.backend)


def absorbed_kv_b(mla, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`kv_b_proj` split per head, once: W_uk [H, nope, C] and W_uv [H, v, C] in `dtype` (the
    eager `MLA._wkv_b` dequantises them at every forward)."""
    w = mla.kv_b_proj.dense_weight(dtype).view(mla.n_heads, mla.nope + mla.v_dim, mla.kv_rank)
    return w[:, : mla.nope].contiguous(), w[:, mla.nope:].contiguous()


class FastMLA:
    """MLA + DSA over the paged cache: absorbed attention over the indexer's top-k (every visible
    key while they fit in index_topk)."""

    def __init__(self, mla, linears: Linears, dtype: torch.dtype):
        self.mla, self.L = mla, linears
        self.w_uk, self.w_uv = absorbed_kv_b(mla, dtype)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 batch: Batch) -> torch.Tensor:
        """x [B, T, D] at positions [B, T] -> attention output [B, T, D]."""
        m, L, ix = self.mla, self.L, self.mla.indexer
        B, T, _ = x.shape
        qr = m.q_a_layernorm(L(m.q_a_proj, x))                                      # [B, T, q_rank]
        q = L(m.q_b_proj, qr).view(B, T, m.n_heads, m.nope + m.rope)
        q_nope, q_pe = q.split([m.nope, m.rope], dim=-1)
        q_pe = rope_interleaved(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2))
        c, k_pe = L(m.kv_a_proj_with_mqa, x).split([m.kv_rank, m.rope], dim=-1)
        latent = torch.cat((m.kv_a_layernorm(c), rope_interleaved(k_pe, cos, sin)), dim=-1)   # [B, T, C+R]
        index_k = ix._rope(ix.k_norm(L(ix.wk, x)), cos, sin)                         # [B, T, Di]
        paged.write(batch.cache, m.layer_idx, batch.slots, latent, index_k)
        j = torch.arange(batch.S, device=x.device)
        if batch.S <= m.topk:                                                       # all visible keys
            idx = j.expand(B, T, -1).masked_fill(j > positions.unsqueeze(-1), -1)   # [B, T, S]
        else:
            iq = L(ix.wq_b, qr).view(B, T, ix.n_heads, ix.head_dim)
            iq = ix._rope(iq, cos.unsqueeze(-2), sin.unsqueeze(-2))                  # [B, T, Hi, Di]
            iw = ix.weights_proj(x.float()) * (ix.n_heads ** -0.5 * ix.head_dim ** -0.5)
            scores = paged.indexer_scores(iq, iw, batch.cache, m.layer_idx, batch.tables, positions,
                                          batch.S, L.backend)                       # [B, T, S]
            idx = paged.topk_ids(scores, m.topk)                                     # [B, T, K]
        qa = torch.cat((torch.einsum("bthn,hnc->bthc", q_nope, self.w_uk), q_pe), -1)   # [B, T, H, C+R]
        o = paged.sparse_mla(qa, idx, batch.cache, m.layer_idx, batch.tables, m.scale, L.backend)
        o = torch.einsum("bthc,hvc->bthv", o, self.w_uv)                             # [B, T, H, v]
        return L(m.o_proj, o.flatten(2))


class FastBlock:
    """A decoder block through the fast paths (its MoE, if any, packed for sync-free dispatch)."""

    def __init__(self, block, linears: Linears, dtype: torch.dtype):
        self.block, self.L = block, linears
        self.attn = FastMLA(block.self_attn, linears, dtype)
        if isinstance(block.mlp, MoE) and block.mlp.packed is None:
            block.mlp.pack_experts(PackedExperts.from_moe(block.mlp, linears.backend))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        mlp, L = self.block.mlp, self.L
        if isinstance(mlp, MoE):
            return mlp(x)
        return L(mlp.down_proj, F.silu(L(mlp.gate_proj, x)) * L(mlp.up_proj, x))

    def __call__(self, h, positions, cos, sin, batch: Batch) -> torch.Tensor:
        b = self.block
        h = h + self.attn(b.input_layernorm(h), positions, cos, sin, batch)
        return h + self.ffn(b.post_attention_layernorm(h))


class FastModel:
    """The main stack of a Transformer over a PagedCache through the fast paths (single device).
    Packs the MoE experts of `model` in place (the eager forward then dispatches sync-free too)."""

    def __init__(self, model, cache, backend: str = "torch", gemm: str = "w8a16"):
        if model.pc.enabled:
            raise ValueError("FastModel: tensor-parallel models are not supported")
        self.model, self.cache = model, cache
        self.L = Linears(backend, gemm)
        dtype = model.model.embed_tokens.weight.dtype
        self.blocks = [FastBlock(b, self.L, dtype) for b in model.model.layers[: model.n_layers]]

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor
               ) -> torch.Tensor:
        """ids/pos/slots [B, T], tables [B, nb] -> final hidden states [B, T, D]."""
        batch = Batch(self.cache, tables, slots, tables.shape[1] * self.cache.block_size)
        h = self.model.model.embed_tokens(ids)
        cos, sin = self.model.rotary(pos)
        for blk in self.blocks:
            h = blk(h, pos, cos, sin, batch)
        return self.model.model.norm(h)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
             last: torch.Tensor) -> torch.Tensor:
        """One forward -> fp32 logits [B, V] of each row's token `last` [B]."""
        h = self.hidden(ids, pos, slots, tables)
        h = h[torch.arange(h.shape[0], device=h.device), last]                      # [B, D]
        return self.L(self.model.lm_head, h).float()

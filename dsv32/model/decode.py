"""Fast CPU decode (packed weights, and fp32 ones where inductor finds a C++ compiler): one new
token per row, SERVED attention.

One row (single-stream decode) runs each block in two native calls (cpu/layer.py): the attention
half (norms, projections, ropes, absorbed query, then the cache write, indexer top-k and sparse
attention over the paged cache) and the rest (W_uv, o_proj, the MLP or the MoE with its router).
So does each row of a small batch where the block's weights stay in the CPU's cache (ROWS_MAX).
At small sizes this is what decode costs: each compiled graph, native call and OpenMP region of
the path below spends more than its arithmetic.

More rows, or a block the native row does not take (cpu/layer.NativeLayer.fits: mixed storages,
the indexer's FP8 simulation), run compiled graphs (inductor; the packed reductions inline) around
the attention: the projections into attention in one call, everything after it (W_uv, o_proj,
residual, post norm, the MLP, or the MoE router and shared expert) in another, each routed expert
in one call, instead of ~100 eager ops per layer; each row's attention is one native call over
the paged cache (cpu/native.py).

The slow reference is the eager `Block.reference`, which tests hold both to.
"""
from __future__ import annotations

import weakref

import torch

from .attention import Attention
from .cpu import layer, native
from .cpu.build import cache_bytes, has_compiler
from .cpu.compile import dynamic, kernel
from .cpu.layer import NativeLayer
from .moe import MLP, MoE

ROWS_MAX = 32   # batch rows up to which a block of weights up to 1/8 of the CPU's last-level cache runs
                # each row through its native layer: the batch graphs' dispatch cost more than reading
                # the cached weights again (bundled model, fp32, 2-32 rows: 1.3-2.4x the decode rate;
                # bench/README.md, "Throughput")
# block -> its NativeLayer (None: the block's weights do not fit it), built again when a weight changed
_native_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def applies(block, h: torch.Tensor, attention: Attention, doc, hooks) -> bool:
    """Whether `block`'s forward of h [B, T, D] takes this path: T = 1, SERVED, no documents or
    hooks, one process, and packed weights (which need inductor anyway) or fp32 ones on the CPU
    with a C++ compiler at hand."""
    if h.shape[1] != 1 or attention is not Attention.SERVED or doc is not None or hooks is not None or block.pc.enabled:
        return False
    w = block.self_attn.q_a_proj
    return w.packed is not None or (w.weight.dtype == h.dtype == torch.float32 and h.device.type == "cpu"
                                    and has_compiler())


def norm(norm, h: torch.Tensor) -> torch.Tensor:
    """The final RMSNorm of h [B, 1, D] as one native call (~7 eager ops)."""
    if h.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return norm(h)
    return layer.rms_norm(h, norm.weight, norm.eps)


def _attn_in(block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """h [B, 1, D] -> absorbed queries [B, 1, H, C+R], latent [B, 1, C+R], index key [B, 1, Di],
    index queries [B, 1, Hi, Di] and head weights [B, 1, Hi]."""
    a = block.self_attn
    x = block.input_layernorm(h)
    q_nope, q_pe, qr, latent = a.project(x, cos, sin)
    index_k = a.indexer.key(x, cos, sin)
    iq, iw = a.indexer.query(x, qr, cos, sin)
    return torch.cat((a.absorb_q(q_nope), q_pe), dim=-1), latent, index_k, iq, iw


def _attn_out(block, h: torch.Tensor, o_lat: torch.Tensor) -> torch.Tensor:
    """The rest of a dense block: o_lat [B, 1, H, C] -> new h [B, 1, D]."""
    a = block.self_attn
    h = h + a.o_proj(a.absorb_o(o_lat).flatten(2))
    return h + block.mlp(block.post_attention_layernorm(h))


def _attn_out_moe(block, h: torch.Tensor, o_lat: torch.Tensor):
    """The rest of a MoE block up to the routed experts: -> h [B, 1, D], the normed input x [B, D],
    routing weights and ids [B, k], the shared experts' output [B, D]."""
    a = block.self_attn
    h = h + a.o_proj(a.absorb_o(o_lat).flatten(2))
    x = block.post_attention_layernorm(h).reshape(-1, h.shape[-1])
    r = block.mlp.gate(x)
    return h, x, r.weights, r.ids, block.mlp.shared_experts(x)


def _expert(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return mlp(x)


def _run_expert(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return kernel(_expert, x.shape[0] == 1)(mlp, dynamic(x, 0))


def _routed_row(moe: MoE, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`moe.routed` of one row x [1, D] without its dispatch (bincount, where, index_add: ~90 us of
    eager ops for two experts): the chosen experts in id order, so the sum rounds as there."""
    y = torch.zeros_like(x)
    for e, weight in sorted(zip(ids[0].tolist(), w[0].tolist())):
        y = y + _run_expert(moe.experts[e], x) * weight
    return y


def _attention_rows(a, q, latent, index_k, iq, iw, kv, positions: torch.Tensor) -> torch.Tensor | None:
    """The cache write, `a.decode_select` and `a.attend_latent` of each row (q [B, 1, H, C+R]) as
    one native call a row over the key store's own storage (fp32, or the paged cache's FP8 pools)
    -> o_lat [B, 1, H, C]; None where the store offers none (a store of the forward's tensors, a
    bf16 one) or a row's query is not its last key (then the eager path runs for every row)."""
    rows = [kv.pages(a.layer_idx, b) for b in range(q.shape[0])]
    if any(r is None or p != r[1] - 1 for r, p in zip(rows, positions[:, 0].tolist())):
        return None
    outs = [native.decode_attention(latent[b].view(-1), index_k[b].view(-1), q[b, 0], iq[b, 0], iw[b, 0], pages, S,
                                    a.topk, a.scale, a.kv_rank) for b, (pages, S) in enumerate(rows)]
    return (outs[0] if len(outs) == 1 else torch.stack(outs)).view(len(outs), 1, -1, a.kv_rank)


def _native_layer(block) -> NativeLayer | None:
    """The block's NativeLayer (gathered again when a weight was replaced), or None if it does not fit."""
    n = _native_layers.get(block, False)
    if n is False or (n is not None and not n.current()):
        dtype = NativeLayer.fits(block)
        n = _native_layers[block] = None if dtype is None else NativeLayer(block, dtype)
    return n


def _native_step(block, h: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv
                 ) -> torch.Tensor | None:
    """The block forward of each row in two native calls (cpu/layer.py), or None where they do not
    take it (the weights' formats, a store without pages, a query that is not its row's last key)
    or a batch runs faster in the graphs below: more than ROWS_MAX rows, or block weights that
    would not stay in the CPU's last-level cache while each row reads them again."""
    n = _native_layer(block)
    if n is None:
        return None
    B = h.shape[0]
    if B > 1 and (B > ROWS_MAX or n.nbytes > cache_bytes() // 8):
        return None
    a = block.self_attn
    rows = [kv.pages(a.layer_idx, b) for b in range(B)]
    if any(r is None or p != r[1] - 1 for r, p in zip(rows, positions[:, 0].tolist())):
        return None
    outs = []
    for b, (pages, S) in enumerate(rows):
        x = h[b].reshape(-1)                                             # [D] (the kernels read contiguous rows)
        o_lat = n.attention(x, cos[b].reshape(-1), sin[b].reshape(-1), pages, S, a.topk, a.scale)
        outs.append(n.ffn(x, o_lat))
    return (outs[0] if B == 1 else torch.stack(outs)).view(h.shape)


def step(block, h: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv
         ) -> torch.Tensor:
    """`block`'s forward of one new token per row: h [B, 1, D] -> [B, 1, D]."""
    one = h.shape[0] == 1
    out = _native_step(block, h, positions, cos, sin, kv)
    if out is not None:
        return out
    key = (type(block).__name__, one)
    if not one:                                     # one graph for every batch size above 1
        for t in (h, cos, sin):
            dynamic(t, 0)
    a = block.self_attn
    q, latent, index_k, iq, iw = kernel(_attn_in, *key)(block, h, cos, sin)
    o_lat = _attention_rows(a, q, latent, index_k, iq, iw, kv, positions)                # [B, 1, H, C]
    if o_lat is None:
        kv.write(a.layer_idx, latent, index_k)
        sel = a.decode_select(iq, iw, kv, positions)                                      # [B, 1, K]
        o_lat = a.attend_latent(q, kv, sel)
    if not one:
        dynamic(o_lat, 0)
    if not isinstance(block.mlp, MoE):
        return kernel(_attn_out, *key)(block, h, o_lat)
    h, x, w, ids, shared = kernel(_attn_out_moe, *key)(block, h, o_lat)
    routed = _routed_row(block.mlp, x, w, ids) if one else block.mlp.routed(x, w, ids, _run_expert)
    return h + (routed + shared).view(h.shape)

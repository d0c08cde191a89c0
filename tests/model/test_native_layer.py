"""The native decode row of a block (model/cpu/layer.py: layer_attn.cpp, layer_ffn.cpp) against the
eager `Block.reference` over the same cache: dense and MoE blocks, every weight storage, routers
that keep one group or several, with and without normalised weights, and keys past the top-k."""
import math

import pytest
import torch

from dsv32.model import decode
from dsv32.model.attention import Attention
from dsv32.model.block import Block
from dsv32.model.config import ModelConfig
from dsv32.model.cpu.layer import NativeLayer
from dsv32.model.kv import ContiguousKV
from dsv32.model.layers import Linear, Rotary

CFG = dict(model_type="deepseek_v32", vocab_size=64, hidden_size=128, intermediate_size=96,
           moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
           kv_lora_rank=128, q_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
           index_n_heads=16, index_head_dim=64, index_topk=16, norm_topk_prob=True,
           rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096))
FORMATS = ["int8", "bf16", "fp16", "fp32"]


def block(layer: int, fmt: str, seed: int = 0, **over) -> tuple[Block, ModelConfig]:
    """A random block of CFG (+ over), its matrices packed as `fmt` the way load_model packs them
    (all but the router and the indexer's weights_proj)."""
    cfg = ModelConfig.from_dict({**CFG, **over})
    g = torch.Generator().manual_seed(seed)
    b = Block(cfg, layer).eval()
    with torch.no_grad():
        for name, p in b.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) if p.dim() > 1
                    else 1.0 + 0.1 * torch.randn(p.shape, generator=g))
    for name, m in b.named_modules():
        if isinstance(m, Linear) and fmt != "fp32" and not name.endswith("weights_proj"):
            m.pack(fmt)
    return b, cfg


def caches(cfg: ModelConfig, S: int, seed: int = 1) -> tuple[ContiguousKV, ContiguousKV]:
    """Two equal caches holding S - 1 random earlier keys of every layer, room for the S-th."""
    g = torch.Generator().manual_seed(seed)
    L, Di = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.index_head_dim
    kvs = [ContiguousKV(cfg.num_hidden_layers, 1, S + 8, L, Di) for _ in range(2)]
    lat, idx = torch.randn(cfg.num_hidden_layers, 1, S - 1, L, generator=g), torch.randn(
        cfg.num_hidden_layers, 1, S - 1, Di, generator=g)
    for kv in kvs:
        kv.lat[:, :, :S - 1], kv.idx[:, :, :S - 1] = lat, idx
        kv.begin(S - 1, 1)
    return kvs


def native_and_reference(b: Block, cfg: ModelConfig, S: int, seed: int = 2):
    """One decode row at key position S - 1 through decode.step (the native row) and the eager
    block -> (outputs, caches) of both."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(1, 1, cfg.hidden_size, generator=g)
    pos = torch.tensor([[S - 1]])
    cos, sin = Rotary(cfg)(pos)
    kv_n, kv_r = caches(cfg, S)
    with torch.no_grad():
        out = decode.step(b, h, pos, cos, sin, kv_n)
        ref = b.reference(h, pos, cos, sin, kv_r, Attention.SERVED)
    return (out, ref), (kv_n, kv_r)


ODD = dict(hidden_size=160, v_head_dim=24, kv_lora_rank=96, q_lora_rank=96, moe_intermediate_size=96)
LONG = dict(intermediate_size=4224, moe_intermediate_size=4224)     # down projections of K >= 4096


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layer", [0, 1], ids=["dense", "moe"])
@pytest.mark.parametrize("S,over", [(9, {}), (40, {}), (40, ODD), (40, LONG)],
                         ids=["all-keys", "top-k", "odd-sizes", "long-rows"])
def test_native_row_equals_the_eager_block(fmt, layer, S, over, monkeypatch):
    """All keys (S <= top-k) and the indexer's top-k of 39 earlier keys: the block's output and the
    latent and indexer key it writes equal the eager block's (fp32 rounding apart). Odd sizes: int8
    groups of 160 and 96 columns (not on tiles: amx_gemv.cpp takes multiples of 64) beside tiled
    ones, W_uv's 24 rows a head (a tile block and 8 rows past it). Long rows: the down projections'
    4224 columns, four weight rows at a time (gemv.cpp's block_dots)."""
    b, cfg = block(layer, fmt, **over)
    assert NativeLayer.fits(b) is not None
    calls = []
    real = NativeLayer.ffn
    monkeypatch.setattr(NativeLayer, "ffn", lambda self, *a: calls.append(1) or real(self, *a))
    (out, ref), (kv_n, kv_r) = native_and_reference(b, cfg, S)
    assert calls                                           # the native row ran
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_n.lat[layer, 0, S - 1], kv_r.lat[layer, 0, S - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_n.idx[layer, 0, S - 1], kv_r.idx[layer, 0, S - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("over", [dict(n_group=1, topk_group=1), dict(n_group=8, topk_group=3, num_experts_per_tok=4),
                                  dict(norm_topk_prob=False, routed_scaling_factor=2.5),
                                  dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=6,
                                       n_shared_experts=2)],
                         ids=["one-group", "8-groups-k4", "unnormalised", "16-experts-2-shared"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_router_chooses_and_weighs_as_the_gate(over, seed):
    """The MoE's router in native code (group-limited top-k on biased scores, weights from the
    unbiased ones) picks and weighs the experts the Gate does, over several draws."""
    over = {"n_group": 8, "n_routed_experts": 16, **over} if over.get("n_group") == 8 else over
    b, cfg = block(1, "int8", seed=seed, **over)
    with torch.no_grad():
        b.mlp.gate.e_score_correction_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    (out, ref), _ = native_and_reference(b, cfg, 12, seed=seed + 5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_block_whose_weights_do_not_fit_takes_the_graphs():
    """The indexer's FP8 simulation (Hadamard, quantised q and k) is not in the native row: such a
    block, and a block whose matrices mix storages, decode through the compiled graphs."""
    b, cfg = block(1, "int8")
    b.self_attn.indexer.fp8_sim = True
    assert NativeLayer.fits(b) is None
    b, cfg = block(0, "int8")
    b.mlp.down_proj.pack("bf16")
    assert NativeLayer.fits(b) is None
    (out, ref), _ = native_and_reference(b, cfg, 20)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_replaced_weights_are_read_not_the_old_ones():
    """The native row holds the block's weights; packing a matrix again (new tensors) makes the
    next step gather them afresh."""
    b, cfg = block(1, "int8")
    native_and_reference(b, cfg, 12)
    with torch.no_grad():
        w = b.mlp.experts[3].down_proj
        w.weight_scale_inv.mul_(0)                         # in place: the same tensors, read as they are
        b.self_attn.o_proj.pack("int8")                    # (already int8: packed again from its values)
        b.mlp.shared_experts.up_proj.weight_scale_inv = torch.nn.Parameter(
            b.mlp.shared_experts.up_proj.weight_scale_inv * 2, requires_grad=False)
    (out, ref), _ = native_and_reference(b, cfg, 12)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 128), (3, 1, 96), (2, 5, 7)])
def test_native_final_norm_equals_rmsnorm(shape):
    """A decode step's final norm (decode.norm: rms_norm.cpp) against the eager RMSNorm."""
    from dsv32.model.layers import RMSNorm
    norm = RMSNorm(shape[-1], 1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    h = torch.randn(shape) * 3
    torch.testing.assert_close(decode.norm(norm, h), norm(h), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp16"])
def test_native_embedding_rows_equal_the_packed_reference(fmt):
    """A decode step's token embeddings from a packed table (embedding.cpp) against
    packed.embedding_rows, and an id outside the vocabulary is an IndexError, not a read."""
    from dsv32.model.cpu.layer import embedding_rows
    from dsv32.model.cpu.packed import embedding_rows as reference
    from dsv32.model.layers import VocabParallelEmbedding
    emb = VocabParallelEmbedding(1000, 256)
    with torch.no_grad():
        emb.weight.normal_()
    emb.pack(fmt)
    ids = torch.tensor([[0, 999, 17], [5, 5, 400]])
    out = emb(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 256)
    torch.testing.assert_close(out, reference(ids, emb.weight, emb.weight_scale_inv, torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(embedding_rows(ids[:1, 1:], emb.weight, emb.weight_scale_inv), out[:1, 1:], rtol=0, atol=0)
    for bad in (1000, -1):
        with pytest.raises(IndexError, match="outside the vocabulary"):
            emb(torch.tensor([[3, bad]]))

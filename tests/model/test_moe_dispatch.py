"""Sync-free MoE dispatch (stacked experts, tokens sorted by expert) against the per-expert loop."""
import math

import pytest
import torch

from dsv32.kernels.grouped import PackedExperts, align_by_expert
from dsv32.model.config import ModelConfig
from dsv32.model.hooks import Hooks
from dsv32.model.moe import MoE

CFG = dict(model_type="deepseek_v32", vocab_size=64, hidden_size=256, intermediate_size=256,
           moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
           n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
           kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
           index_n_heads=2, index_head_dim=32, index_topk=8)


def moe(seed=0, fp8=False, **over) -> MoE:
    cfg = ModelConfig.from_dict({**CFG, **over})
    torch.manual_seed(seed)
    m = MoE(cfg, 1).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 1.0 / math.sqrt(p.shape[-1])) if p.dim() > 1 else p.normal_(0, 0.1)
    if fp8:
        for mod in m.modules():
            if hasattr(mod, "use_fp8_storage"):
                mod.use_fp8_storage()
    return m


@pytest.mark.parametrize("N,k,E,bm", [(1, 3, 8, 16), (7, 3, 9, 4), (64, 9, 257, 16), (5, 2, 4, 1)])
def test_align_by_expert_groups_every_assignment_once(N, k, E, bm):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    rows, bexp = align_by_expert(ids, E, bm)
    A = N * k
    assert rows.shape[0] == -(-(A + E * (bm - 1)) // bm) * bm and bexp.shape[0] == rows.shape[0] // bm
    real = rows[rows < A]
    assert sorted(real.tolist()) == list(range(A))                        # each assignment once
    blocks = rows.view(-1, bm)
    for b in range(blocks.shape[0]):
        r = blocks[b][blocks[b] < A]
        if len(r):
            assert (ids.flatten()[r] == bexp[b]).all()                   # one expert per block
            assert r.tolist() == sorted(r.tolist())                      # token order kept
        elif bexp[b] < E:
            assert False, "a block of padding assigned to an expert"
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert int((bexp < E).sum()) == int(((counts + bm - 1) // bm).sum())


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("shared", [1, 2])
def test_packed_equals_expert_loop(fp8, shared):
    """Stacked + gathered (torch backend) == the reference loop, fp32; the shared expert folds in
    as expert E when it has a routed expert's shape (n_shared_experts == 1)."""
    m = moe(fp8=fp8, n_shared_experts=shared)
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        ref = m(x)
        m.pack_experts(PackedExperts.from_moe(m, "torch"))
        assert m.packed.shared_folded == (shared == 1)
        got = m(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_packing_keeps_one_copy_and_the_loop_unchanged():
    """Experts' Linears become views of the stacks; the reference loop reads the same values."""
    m = moe(fp8=True)
    x = torch.randn(6, 256)
    with torch.no_grad():
        r = m.gate(x)
        before = m.routed(x, r.weights, r.ids)
        m.pack_experts(PackedExperts.from_moe(m, "torch"))
        after = m.routed(x, r.weights, r.ids)
    assert torch.equal(before, after)
    w13 = m.packed.w13
    lo, hi = w13.data_ptr(), w13.data_ptr() + w13.numel() * w13.element_size()
    for e in list(m.experts) + [m.shared_experts]:
        for lin in (e.gate_proj, e.up_proj):
            assert lo <= lin.weight.data_ptr() < hi
    assert torch.equal(m.experts[3].up_proj.weight.view(torch.uint8), w13[3, 128:].view(torch.uint8))


def test_packed_follows_replayed_routing():
    m = moe()
    x = torch.randn(1, 4, 256)
    replay = torch.tensor([[[0, 1, 2], [-1, -1, -1], [7, 6, 5], [3, -1, 4]]])
    with torch.no_grad():
        ref = m(x, Hooks(replay={1: replay}))
        m.pack_experts(PackedExperts.from_moe(m, "torch"))
        got = m(x, Hooks(replay={1: replay}))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_pack_rejects_unaligned_fp8_inner_size():
    with pytest.raises(ValueError, match="inner size"):
        m = moe(fp8=True, moe_intermediate_size=96)
        m.pack_experts(PackedExperts.from_moe(m, "torch"))


def test_one_row_decode_routing_equals_the_loop_bit_for_bit():
    """model/decode.py's one-row routed sum (no dispatch ops) against MoE.routed, packed experts."""
    from dsv32.model.decode import _routed_row, _run_expert
    m = moe(seed=4)
    for mod in m.modules():
        if hasattr(mod, "pack"):
            mod.pack("int8")
    with torch.inference_mode():
        for seed in range(4):
            x = torch.randn(1, 256, generator=torch.Generator().manual_seed(seed))
            r = m.gate(x)
            assert torch.equal(_routed_row(m, x, r.weights, r.ids), m.routed(x, r.weights, r.ids, _run_expert))

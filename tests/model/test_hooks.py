"""The forward's typed hooks, attention paths, packed documents and Keep Routing replay."""
import dataclasses

import pytest
import torch

from dsv32.model.attention import Attention
from dsv32.model.hooks import Hooks
from dsv32.model.init_tiny import tiny_config
from dsv32.model.transformer import Transformer

CFG = tiny_config(layers=2, hidden=64, heads=4, q_lora=32, kv_lora=32, nope=16, rope=16, v=16,
                  inter=96, moe_inter=32, experts=8, groups=4, topk_group=2, active=2,
                  index_heads=16, index_dim=32, topk=8, dense=1, vocab=300)


@pytest.fixture(scope="module")
def model():
    m = Transformer(CFG).eval()
    m.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    return m


def ids(B=2, T=24, seed=1):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("attention", [Attention.DENSE, Attention.TOPK_MASKED, Attention.TOPK_GATHERED])
def test_hooks_watch_without_changing_the_forward(model, attention):
    seen = {"index": [], "route": []}
    hooks = Hooks(index=lambda layer, v: seen["index"].append((layer, v)),
                  route=lambda layer, v: seen["route"].append((layer, v)))
    x = ids()
    assert torch.equal(model.hidden(x, attention=attention, hooks=hooks), model.hidden(x, attention=attention))
    assert [layer for layer, _ in seen["index"]] == [0, 1]
    assert [layer for layer, _ in seen["route"]] == [1]                     # layer 0 is dense
    for _, v in seen["index"]:
        assert v.scores.shape == v.visible.shape == v.selected.shape == (2, 24, 24)
        assert torch.equal(v.visible[0], torch.ones(24, 24, dtype=torch.bool).tril())
        assert not (v.selected & ~v.visible).any()
        assert (v.selected.sum(-1) == v.visible.sum(-1).clamp(max=CFG.index_topk)).all()
        assert v.attention.shape == (2, 4, 24, 24)
        assert torch.allclose(v.attention.sum(-1), torch.ones(2, 4, 24))
        assert (v.attention * ~v.visible.unsqueeze(1)).sum() == 0
    _, r = seen["route"][0]
    assert r.scores.shape == (2, 24, 8) and r.ids.shape == (2, 24, 2)


@torch.no_grad()
def test_dense_attention_ignores_the_indexer(model):
    x = ids(T=40)
    twin = Transformer(dataclasses.replace(CFG, index_topk=64)).eval()   # top-k above T: dense
    twin.load_state_dict(model.state_dict())
    assert torch.allclose(model.hidden(x, attention=Attention.DENSE), twin.hidden(x), atol=1e-5)
    assert not torch.allclose(model.hidden(x, attention=Attention.TOPK_MASKED), twin.hidden(x), atol=1e-3)


@torch.no_grad()
def test_packed_documents_attend_only_inside_their_own(model):
    a, b = ids(B=1, T=15, seed=2), ids(B=1, T=25, seed=3)
    doc = torch.tensor([[0] * 15 + [1] * 25])
    packed = model.hidden(torch.cat((a, b), 1), attention=Attention.DENSE, doc=doc)
    assert torch.allclose(packed[:, :15], model.hidden(a, attention=Attention.DENSE), atol=1e-5)
    # RoPE is relative: the second document at positions 15.. equals it alone at 0..
    assert torch.allclose(packed[:, 15:], model.hidden(b, attention=Attention.DENSE), atol=1e-4)
    masked, gathered = (model.hidden(torch.cat((a, b), 1), attention=att, doc=doc)
                        for att in (Attention.TOPK_MASKED, Attention.TOPK_GATHERED))
    assert torch.allclose(masked, gathered, atol=1e-4)


@torch.no_grad()
def test_gate_replays_recorded_experts_where_given(model):
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(6, CFG.hidden_size, generator=torch.Generator().manual_seed(4))
    free = gate(x)
    forced = torch.full_like(free.ids, -1)
    forced[3:] = torch.tensor([5, 6])
    r = gate(x, forced)
    assert torch.equal(r.ids[:3], free.ids[:3]) and torch.equal(r.ids[3:], forced[3:])
    assert torch.equal(r.scores, free.scores)
    w = r.scores.gather(1, r.ids)
    assert torch.allclose(r.weights, w / w.sum(-1, keepdim=True) * gate.scaling)

"""The training forward against the model's own forward, and what each DSA stage trains."""
import dataclasses

import pytest
import torch

from dsv32.model.attention import Attention
from dsv32.model.init_tiny import tiny_config
from dsv32.model.transformer import Transformer
from dsv32.train import dsa
from dsv32.train.trainer import new_model

CFG = tiny_config(layers=2, hidden=64, heads=4, q_lora=32, kv_lora=32, nope=16, rope=16, v=16,
                  inter=96, moe_inter=32, experts=8, groups=4, topk_group=2, active=2,
                  index_heads=16, index_dim=32, topk=8, dense=1, vocab=500)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return new_model(CFG, seed=3, std=0.2)


def ids(B=3, T=40, P=25):
    x = torch.randint(0, 500, (B, T), generator=torch.Generator().manual_seed(1))
    x[:, :P] = x[0, :P]
    return x


@torch.no_grad()
def test_dense_forward_equals_model_hidden_and_mtp(model):
    x = ids()
    twin = Transformer(dataclasses.replace(CFG, index_topk=64))   # top-k above T: dense attention
    twin.load_state_dict(model.state_dict())
    want = twin.hidden(x)
    want_mtp = twin.mtp_logits(want, x)
    h, mh, _ = dsa.forward(model, x, stage="dense")
    assert (h - want).abs().max() < 1e-4
    assert (model.mtp.shared_head.head(mh).float() - want_mtp).abs().max() < 1e-4
    hp, mhp, _ = dsa.forward(model, x, prefix=25, stage="dense")        # shared prefix run once
    assert (hp - want).abs().max() < 1e-4 and (mhp - mh).abs().max() < 1e-4


@torch.no_grad()
def test_sparse_forward_equals_model_sparse_mode(model):
    x = ids()
    want = model.hidden(x, attention=Attention.TOPK_MASKED)   # dense-masked top-k reference
    h, _, st = dsa.forward(model, x, stage="sparse", mtp=False)
    assert (h - want).abs().max() < 1e-4
    assert 0 < st.recall <= 1


def test_warmup_trains_only_the_indexer(model):
    from dsv32.train.trainer import set_trainable
    params = set_trainable(model, "warmup")
    assert params and all(".indexer." in n for n, p in model.named_parameters() if p.requires_grad)
    _, _, st = dsa.forward(model, ids(), stage="warmup", mtp=False)
    st.index_loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".indexer." in n for n in grads)
    model.zero_grad(set_to_none=True)
    set_trainable(model, "dense")


def test_sparse_stage_detaches_the_indexer_input(model):
    x = ids()
    h, _, st = dsa.forward(model, x, stage="sparse", mtp=False)
    h.sum().backward(retain_graph=True)           # the LM side never reaches the indexer
    assert all(p.grad is None or p.grad.abs().sum() == 0
               for n, p in model.named_parameters() if ".indexer." in n)
    model.zero_grad(set_to_none=True)
    st.index_loss.backward()                      # the indexer loss reaches only the indexer
    assert all(p.grad is None or p.grad.abs().sum() == 0
               for n, p in model.named_parameters() if ".indexer." not in n)
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_keep_routing_replays_recorded_experts(model):
    x = ids()
    _, _, rec = dsa.forward(model, x, stage="dense", mtp=False, record=True)
    layer = next(iter(rec.routing))
    forced = torch.full_like(rec.routing[layer], -1)
    forced[:, 30:] = (rec.routing[layer][:, 30:] + 1) % CFG.n_routed_experts
    forced[:, 30:, 1] = (forced[:, 30:, 0] + 1) % CFG.n_routed_experts
    _, _, st = dsa.forward(model, x, stage="dense", mtp=False, record=True, replay={layer: forced})
    got = st.routing[layer]
    assert torch.equal(got[:, 30:], forced[:, 30:])              # replayed
    assert torch.equal(got[:, :30], rec.routing[layer][:, :30])  # free routing elsewhere

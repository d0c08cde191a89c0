"""GRPO rollouts from dsv32's engine: recorded routing and kept sets replay in the trainer, whose
log-probs then match the sampler's."""
import torch

from dsv32.chat import Tokenizer
from dsv32.model.init_tiny import tiny_config
from dsv32.train import dsa
from dsv32.train import grpo as G
from dsv32.train.trainer import new_model

CFG = tiny_config(layers=2, hidden=64, heads=4, q_lora=32, kv_lora=32, nope=16, rope=16, v=16,
                  inter=96, moe_inter=32, experts=8, groups=4, topk_group=2, active=2,
                  index_heads=16, index_dim=32, topk=8, dense=1, vocab=300)


def test_rollout_records_routing_kept_sets_and_logprobs():
    model = new_model(CFG, seed=5, std=0.3).eval()
    engine = G.make_engine(model, Tokenizer.load(), max_seqs=8)
    gc = G.GRPOConfig(group_size=3, max_tokens=6, top_p=0.9, top_k=20)
    prompts = [[0] + list(range(20, 40)), [0] + list(range(50, 66))]
    groups = G.rollout(engine, prompts, gc, seed=1)
    assert not any(m._forward_hooks for m in model.modules())               # no hooks left
    assert engine.observer.forward([]) is None                             # recording ended
    assert [len(g) for g in groups] == [3, 3]
    for group in groups:
        r = group[0]
        n = len(r.completion_ids)
        assert n > 0 and len(r.logp_old) == len(r.kept) == n
        assert all(k is not None and 0 < len(k) <= 20 for k in r.kept)       # top-k kept sets
        for layer, ids in r.routing.items():
            assert (ids[: len(r.prompt_ids) + n - 1] >= 0).all()              # every computed token
        # the trainer's forward, replaying routing and renormalising over the kept sets,
        # reproduces the sampler's log-probs (pi_old)
        with torch.no_grad():
            logp, mask, _ = G.group_logprobs(model, group, grad=False)
        for b, rr in enumerate(group):
            got = logp[b, : len(rr.logp_old)]
            assert torch.allclose(got, torch.tensor(rr.logp_old), atol=1e-3), (got, rr.logp_old)
        # and the recorded routing is what the trainer's free routing picks on the prompt
        _, _, st = dsa.forward(model, torch.tensor([r.prompt_ids]), stage="sparse", mtp=False,
                               record=True)
        for layer, ids in st.routing.items():
            assert torch.equal(ids[0], r.routing[layer][: len(r.prompt_ids)])


def test_grpo_update_moves_towards_rewarded_samples():
    model = new_model(CFG, seed=6, std=0.3)
    engine = G.make_engine(model, Tokenizer.load(), max_seqs=8)
    gc = G.GRPOConfig(group_size=4, max_tokens=4, lr=1e-3, beta=0.01)
    groups = G.rollout(engine, [[0] + list(range(20, 40))], gc, seed=2)
    for i, r in enumerate(groups[0]):
        r.reward = float(i == 0)
    ref = G.frozen_copy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=gc.lr)
    before, _, _ = G.group_logprobs(model, groups[0], grad=False)
    stats = G.grpo_update(model, ref, opt, groups, gc)
    after, mask, _ = G.group_logprobs(model, groups[0], grad=False)
    n0 = int(mask[0].sum())
    assert stats["groups_with_signal"] == 1
    assert after[0, :n0].sum() > before[0, :n0].sum()          # the rewarded sample got likelier

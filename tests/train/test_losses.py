"""Each training objective against hand-computed values."""
import math

import torch
import torch.nn.functional as F

from dsv32.train import losses as L


def test_mtp_targets_are_offset_by_two():
    ids = torch.tensor([[10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    t1, w1 = L.lm_targets(ids, mask, 1)
    t2, w2 = L.lm_targets(ids, mask, 2)
    assert t1.tolist() == [[11, 12, 13, 14]] and w1.tolist() == [[0, 1, 1, 1]]
    assert t2.tolist() == [[12, 13, 14]] and w2.tolist() == [[1, 1, 1]]


def test_sequence_balance_loss_by_hand():
    # one sequence, T=2 tokens, E=2 experts, k=1
    s = torch.tensor([[[0.6, 0.2], [0.3, 0.3]]])
    ids = torch.tensor([[[0], [0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    # f = E/(kT) * counts = 2/2 * [2, 0] = [2, 0]; P = mean of normalised s = [(0.75 + 0.5)/2, ...]
    want = 1e-4 * (2 * 0.625 + 0 * 0.375)
    got = L.sequence_balance_loss(s, ids, valid, topk=1, alpha=1e-4)
    assert math.isclose(float(got), want, rel_tol=1e-6)
    # padding tokens do not count
    valid2 = torch.tensor([[True, False]])
    want2 = 1e-4 * (2 / 1 * 1 * 0.75)      # f = [2, 0] (1 token), P = [0.75, 0.25]
    assert math.isclose(float(L.sequence_balance_loss(s, ids, valid2, 1, 1e-4)), want2, rel_tol=1e-6)


def test_bias_update_sign_rule():
    bias = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 6.0, 6.0])               # mean 6
    L.update_bias(bias, load, gamma=0.001)
    assert torch.allclose(bias, torch.tensor([-0.001, 0.001, 0.0, 0.0]))
    assert L.expert_load(torch.tensor([[[0, 1]], [[1, 3]]]), 4).tolist() == [1, 2, 0, 1]


def test_attention_target_sums_heads_and_normalises():
    probs = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]]]])      # [B=1, H=2, T=1, S=2]
    assert torch.allclose(L.attention_target(probs), torch.tensor([[[0.75, 0.25]]]))


def test_indexer_kl_by_hand():
    p = torch.tensor([[[0.5, 0.25, 0.25]]])
    scores = torch.tensor([[[1.0, 0.0, 2.0]]])
    allowed = torch.ones(1, 1, 3, dtype=torch.bool)
    q = torch.softmax(torch.tensor([1.0, 0.0, 2.0]), 0)
    want = sum(pi * math.log(pi / qi) for pi, qi in zip([0.5, 0.25, 0.25], q.tolist()))
    assert math.isclose(float(L.indexer_kl(p, scores, allowed)), want, rel_tol=1e-5)
    # restricted to the selected set {0, 2}: both distributions renormalised over it
    sel = torch.tensor([[[True, False, True]]])
    p2, q2 = [0.5 / 0.75, 0.25 / 0.75], torch.softmax(torch.tensor([1.0, 2.0]), 0).tolist()
    want2 = sum(a * math.log(a / b) for a, b in zip(p2, q2))
    assert math.isclose(float(L.indexer_kl(p, scores, sel)), want2, rel_tol=1e-5)
    # the gradient reaches the index scores only
    sc = scores.clone().requires_grad_()
    L.indexer_kl(p, sc, allowed).backward()
    assert torch.allclose(sc.grad[0, 0], q - p[0, 0], atol=1e-6)


def test_recall_is_mass_inside_topk():
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])
    sel = torch.tensor([[[True, True, False], [True, False, False]]])
    rows = torch.tensor([[True, False]])
    assert math.isclose(float(L.recall(p, sel, rows)), 0.8, rel_tol=1e-6)


def test_group_advantages_no_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    assert L.group_advantages(r).tolist() == [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]]


def test_unbiased_kl_by_hand_and_ratio_carries_gradient():
    logp = torch.tensor([math.log(0.5)], requires_grad=True)
    old, ref = torch.tensor([math.log(0.4)]), torch.tensor([math.log(0.25)])
    kl = L.kl_unbiased(logp, old, ref)
    r = 0.25 / 0.5
    assert math.isclose(kl.item(), (0.5 / 0.4) * (r - math.log(r) - 1), rel_tol=1e-6)
    kl.backward()
    # d/dlogp [exp(logp - old) * (exp(ref - logp) - (ref - logp) - 1)]
    want = (0.5 / 0.4) * (r - math.log(r) - 1) + (0.5 / 0.4) * (-r + 1)
    assert math.isclose(float(logp.grad), want, rel_tol=1e-5)


def test_offpolicy_mask_conditions():
    m = torch.ones(4, 2, dtype=torch.bool)
    logp = torch.zeros(4, 2)
    old = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.1, 0.1], [0.1, 0.1]])   # mean gap 1.0 / 0.1
    adv = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    assert L.offpolicy_mask(adv, old, logp, m, delta=0.5).tolist() == [0.0, 1.0, 1.0, 1.0]


def test_grpo_clip_and_mask():
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5]]))
    old = torch.zeros(3, 1)
    mask = torch.ones(3, 1, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, -1.0])
    loss, st = L.grpo_loss(logp, old, None, adv, mask, eps=0.2, beta=0.0, delta=10.0)
    # A>0: min(1.5, 1.2) = 1.2; A<0, r=1.5: min(-1.5, -1.2) = -1.5; A<0, r=0.5: min(-0.5, -0.8) = -0.8
    assert math.isclose(float(loss), -(1.2 - 1.5 - 0.8) / 3, rel_tol=1e-6)
    # sequence 3 masked: log(pi_old / pi) = log 2 > delta and A < 0
    loss2, st2 = L.grpo_loss(logp, old, None, adv, mask, eps=0.2, beta=0.0, delta=0.5)
    assert math.isclose(float(loss2), -(1.2 - 1.5 + 0.0) / 3, rel_tol=1e-6)
    assert math.isclose(st2["masked"], 1 / 3, rel_tol=1e-6)


def test_keep_sampling_mask_renormalises():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    kept = torch.tensor([[True, True, False, False]])
    got = L.kept_logprobs(logits, torch.tensor([1]), kept)
    want = 1.0 - math.log(math.exp(2) + math.exp(1))
    assert math.isclose(float(got), want, rel_tol=1e-6)
    full = L.kept_logprobs(logits, torch.tensor([1]), None)
    assert math.isclose(float(full), float(torch.log_softmax(logits, -1)[0, 1]), rel_tol=1e-6)


def test_tied_vocab_equals_full_softmax():
    V, D = 50, 8
    w = torch.randn(V, D)
    tv = L.TiedVocab([3, 7, 20, 41], V)
    tv.sync(w)
    assert torch.equal(w[0], w[49])
    h = torch.randn(5, D)
    t = torch.tensor([3, 7, 20, 41, 7])
    full = F.cross_entropy(h @ w.T, t)
    assert torch.allclose(L.masked_ce(tv.logits(h, w), tv.targets(t)), full, atol=1e-5)


def test_weighted_ce_is_the_weighted_mean_of_token_losses():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([0, 0, 2])
    ce = [-math.log(math.exp(2) / (math.exp(2) + 2)), -math.log(1 / (2 + math.e)),
          -math.log(math.exp(3) / (math.exp(3) + 2))]
    w = torch.tensor([1.0, 3.0, 1.0])
    want = (ce[0] + 3 * ce[1] + ce[2]) / 5
    assert math.isclose(float(L.masked_ce(logits, t, w)), want, rel_tol=1e-6)
    assert math.isclose(float(L.masked_ce(logits, t, torch.ones(3))), sum(ce) / 3, rel_tol=1e-6)
    assert math.isclose(float(L.masked_ce(logits, t)), sum(ce) / 3, rel_tol=1e-6)

"""The training objectives of the V3.2 recipe, as plain functions of tensors.

  * next-token and MTP cross-entropy on masked positions (MTP at t predicts token t+2);
  * the sequence-wise balance loss (alpha 1e-4) and the aux-loss-free bias update (sign rule);
  * the indexer KL losses of the two DSA stages, and indexer recall;
  * the GRPO objective (see grpo.py for the rollout side).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ---- language modelling -------------------------------------------------------------------------

def lm_targets(ids: torch.Tensor, mask: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and weights for a head that predicts token t+offset at position t:
    ids/mask [B, T] -> targets [B, T-offset], weights [B, T-offset] (the mask of the target)."""
    return ids[:, offset:], mask[:, offset:].float()


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] against targets [N] (0 when N = 0); with `weight` [N],
    the weighted mean sum(w * ce) / sum(w)."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    if weight is None:
        return F.cross_entropy(logits.float(), targets)
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (weight * ce).sum() / weight.sum()


# ---- MoE load balancing ----------------------------------------------------------------------------

def sequence_balance_loss(scores: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor,
                          topk: int, alpha: float = 1e-4) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    scores [B, T, E] sigmoid affinities, ids [B, T, k] chosen experts, valid [B, T] bool.
    Per sequence: f_i = E / (k T) * #tokens routed to i, P_i = mean_t s_{i,t} / sum_j s_{j,t};
    loss = alpha * sum_i f_i P_i.
    """
    B, T, E = scores.shape
    v = valid.float()
    n = v.sum(1).clamp(min=1)                                            # [B]
    hits = torch.zeros(B, T, E, device=scores.device).scatter_(2, ids, 1.0) * v[..., None]
    f = hits.sum(1) * E / (topk * n[:, None])                            # [B, E]
    p = (scores / scores.sum(-1, keepdim=True) * v[..., None]).sum(1) / n[:, None]
    return alpha * (f.detach() * p).sum(-1).mean()


def expert_load(ids: torch.Tensor, n_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert [E] (float) from ids [..., k]."""
    flat = ids.reshape(-1, ids.shape[-1])
    if valid is not None:
        flat = flat[valid.reshape(-1)]
    return torch.bincount(flat.reshape(-1), minlength=n_experts).float()


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free balancing: bias -= gamma for overloaded experts, += gamma for underloaded
    ones (load compared with the mean); experts exactly at the mean keep their bias."""
    bias += gamma * torch.sign(load.mean() - load)
    return bias


# ---- DSA indexer ---------------------------------------------------------------------------------

def attention_target(probs: torch.Tensor) -> torch.Tensor:
    """Main attention [B, H, T, S] -> p_t: summed over heads, L1-normalised over keys [B, T, S]."""
    p = probs.sum(1)
    return p / p.sum(-1, keepdim=True).clamp(min=1e-20)


def indexer_kl(target: torch.Tensor, index_scores: torch.Tensor, allowed: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """sum_s p log(p / q) with q = softmax(index scores) over the `allowed` keys, averaged over the
    query rows [B, T] (bool; default all). `target` is renormalised over `allowed` too, so the same
    function gives the warm-up loss (allowed = causal keys) and the sparse one (allowed = top-k)."""
    neg = torch.finfo(torch.float32).min
    p = target.float().masked_fill(~allowed, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-20)
    logq = index_scores.float().masked_fill(~allowed, neg).log_softmax(-1)
    kl = torch.where(p > 0, p * (p.clamp(min=1e-20).log() - logq), torch.zeros_like(p)).sum(-1)
    if rows is None:
        return kl.mean()
    return (kl * rows).sum() / rows.sum().clamp(min=1)


def recall(target: torch.Tensor, selected: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Share of the dense attention mass [B, T, S] that lies in the selected keys [B, T, S] bool,
    averaged over query rows [B, T] (bool)."""
    got = (target * selected).sum(-1)
    return (got * rows).sum() / rows.sum().clamp(min=1)


# ---- GRPO ---------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [P, G] (G samples per prompt) -> A = R - mean over the group (no std division)."""
    return rewards - rewards.mean(-1, keepdim=True)


def kl_unbiased(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token `(pi/pi_old) * (pi_ref/pi - log(pi_ref/pi) - 1)`; the ratio carries gradient."""
    ratio = (logp - logp_old).exp()
    d = logp_ref - logp
    return ratio * (d.exp() - d - 1.0)


def offpolicy_mask(adv: torch.Tensor, logp_old: torch.Tensor, logp: torch.Tensor,
                   tok_mask: torch.Tensor, delta: float) -> torch.Tensor:
    """M_i = 0 where A_i < 0 and the sequence mean of log(pi_old / pi_theta) exceeds delta.
    adv [N], logp_old/logp/tok_mask [N, T] -> [N] float."""
    m = tok_mask.float()
    gap = ((logp_old - logp.detach()) * m).sum(-1) / m.sum(-1).clamp(min=1)
    return (~((adv < 0) & (gap > delta))).float()


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor | None,
              adv: torch.Tensor, tok_mask: torch.Tensor, eps: float = 0.2, beta: float = 0.0,
              delta: float = 0.5) -> tuple[torch.Tensor, dict]:
    """The V3.2 GRPO objective, negated as a loss:
    -mean_i 1/|o_i| sum_t [min(r A, clip(r, 1-eps, 1+eps) A) M_i - beta KL_t].
    All per-token tensors are [N, T] over completion tokens; adv [N]."""
    m = tok_mask.float()
    ratio = (logp - logp_old).exp()
    a = adv[:, None]
    surr = torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    keep = offpolicy_mask(adv, logp_old, logp, tok_mask, delta)
    per_tok = surr * keep[:, None]
    kl = torch.zeros_like(per_tok)
    if logp_ref is not None and beta:
        kl = kl_unbiased(logp, logp_old, logp_ref)
        per_tok = per_tok - beta * kl
    n = m.sum(-1).clamp(min=1)
    obj = ((per_tok * m).sum(-1) / n).mean()
    stats = {"kl": float(((kl.detach() * m).sum(-1) / n).mean()), "masked": float(1 - keep.mean()),
             "clipped": float((((ratio - 1).abs() > eps).float() * m).sum() / m.sum().clamp(min=1))}
    return -obj, stats


def kept_logprobs(logits: torch.Tensor, tokens: torch.Tensor, kept: torch.Tensor | None
                  ) -> torch.Tensor:
    """Keep Sampling Mask: log pi(token) renormalised over the kept set.
    logits [N, V], tokens [N], kept [N, V] bool (None: the full vocabulary)."""
    x = logits.float()
    if kept is not None:
        x = x.masked_fill(~kept, float("-inf"))
    return x.log_softmax(-1).gather(1, tokens[:, None])[:, 0]


# ---- exact softmax over a tied vocabulary -----------------------------------------------------

class TiedVocab:
    """The vocabulary split into `seen` tokens (those in the training data) and the rest, whose
    LM-head rows are kept equal to one shared row. The full softmax over V tokens is then exactly
    a softmax over the seen tokens plus one class `unseen` with logit `h.w_rest + log(#rest)`:
    the cross-entropy of the full model at a fraction of the cost (the head dominates a small
    model with a 129K vocabulary). `sync(weight)` writes the shared row into every unseen row."""

    def __init__(self, seen: torch.Tensor | list[int], vocab_size: int):
        seen = torch.as_tensor(sorted(set(int(i) for i in seen)), dtype=torch.long)
        self.seen, self.vocab_size = seen, vocab_size
        rest = torch.ones(vocab_size, dtype=torch.bool)
        rest[seen] = False
        self.rest = rest.nonzero()[:, 0]
        self.rep = int(self.rest[0]) if len(self.rest) else None
        self.index = torch.full((vocab_size,), -1, dtype=torch.long)
        self.index[seen] = torch.arange(len(seen))

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h [N, D] -> logits [N, S(+1)] over the seen tokens (and the pooled unseen class)."""
        lg = h @ weight[self.seen].T
        if self.rep is None:
            return lg.float()
        pooled = h @ weight[self.rep] + torch.log(torch.tensor(float(len(self.rest))))
        return torch.cat((lg, pooled[:, None]), dim=-1).float()

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.index[ids]
        if (t < 0).any():
            raise ValueError("TiedVocab: a target token is not in the seen set")
        return t

    @torch.no_grad()
    def sync(self, weight: torch.Tensor) -> None:
        if self.rep is not None:
            weight[self.rest] = weight[self.rep].clone()

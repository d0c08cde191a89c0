"""GRPO as DeepSeek-V3.2 runs it, with rollouts from dsv32's own engine.

One step: sample G completions for each of P prompts with the engine (temperature 1, top-p/top-k),
recording per token the sampling log-prob pi_old, the kept top-p/top-k set (Keep Sampling Mask) and
the experts every MoE layer chose (Keep Routing); score them with the task verifiers; advantages
R - mean(R) per group; then one policy-gradient update with the clipped ratio, the unbiased KL to a
frozen reference model, and off-policy sequence masking (see losses.grpo_loss). The trainer's
forward replays the recorded routing and renormalises its distribution over the kept set.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import torch

from dsv32.chat import Tokenizer, encode_messages, parse_completion
from dsv32.chat.tokens import EOS
from dsv32.engine.config import EngineConfig
from dsv32.engine.engine import LLMEngine
from dsv32.engine.observer import StepObserver
from dsv32.engine.sequence import SamplingParams
from dsv32.model.hooks import Hooks, RouteView
from dsv32.model.moe import MoE

from . import dsa
from .dsa import Stage
from .losses import grpo_loss, group_advantages


class RolloutRecorder(StepObserver):
    """The rollout engine's step observer: while `recording()`, the routing of every computed token
    (Keep Routing, through the model's route hook) and the (log-prob, kept set) of every sampled
    one (Keep Sampling Mask), keyed by (request id, sequence index)."""

    def __init__(self, model):
        self.layers = [b.layer_idx for b in model.model.layers[: model.n_layers] if isinstance(b.mlp, MoE)]
        self.routing: dict[tuple, dict[int, list]] = {}
        self.samples: dict[tuple, list] = {}
        self._on = False

    @contextlib.contextmanager
    def recording(self):
        """Record from nothing while open (the engine's other requests are not seen)."""
        self.routing, self.samples, self._on = {}, {}, True
        try:
            yield self
        finally:
            self._on = False

    @property
    def wants_kept(self) -> bool:
        return self._on

    def forward(self, rows) -> Hooks | None:
        return Hooks(route=functools.partial(self._route, rows)) if self._on else None

    def _route(self, rows, layer: int, view: RouteView) -> None:
        if layer not in self.layers:
            return
        for b, (seq, start, n) in enumerate(rows):
            key = (seq.request_id, seq.index)
            self.routing.setdefault(key, {}).setdefault(layer, []).append((start, view.ids[b, :n].clone()))

    def sampled(self, seqs, logits, out) -> None:
        if not self._on:
            return
        for i, seq in enumerate(seqs):
            kept = out.kept[i]
            x = logits[i].float() / (seq.params.temperature or 1.0)
            if kept is not None:
                x = x.masked_fill(~kept, float("-inf"))
            tok = out.token_ids[i]
            lp = float(x.log_softmax(-1)[tok])
            kidx = kept.nonzero()[:, 0].clone() if kept is not None else None
            self.samples.setdefault((seq.request_id, seq.index), []).append((lp, kidx))

    def routing_for(self, rid: str, index: int, length: int, n_prompt: int) -> dict[int, torch.Tensor]:
        """Per MoE layer [length, k] expert ids (-1 where nothing was recorded)."""
        out = {}
        own = self.routing.get((rid, index), {})
        parent = self.routing.get((rid, 0), {})
        for layer in self.layers:
            chunks = own.get(layer, [])
            k = chunks[0][1].shape[-1] if chunks else (parent[layer][0][1].shape[-1] if parent.get(layer) else 1)
            r = torch.full((length, k), -1, dtype=torch.long)
            if index > 0:                      # forked children share the parent's prompt
                for start, ids in parent.get(layer, []):
                    end = min(start + len(ids), n_prompt)
                    if end > start:
                        r[start:end] = ids[: end - start]
            for start, ids in chunks:
                end = min(start + len(ids), length)
                r[start:end] = ids[: end - start]
            out[layer] = r
        return out


@dataclass
class Rollout:
    """One sampled completion with everything the update needs."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logp_old: list[float]
    kept: list[torch.Tensor | None]
    routing: dict[int, torch.Tensor]
    text: str = ""
    reward: float = 0.0


@dataclass
class GRPOConfig:
    """GRPO hyper-parameters (eps, beta and delta are not published by DeepSeek)."""

    steps: int = 10
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-4
    eps: float = 0.2
    beta: float = 0.01
    delta: float = 0.5
    top_p: float = 0.95
    top_k: int = 50
    max_tokens: int = 160
    weight_decay: float = 0.1
    clip: float = 1.0
    extra: dict = field(default_factory=dict)


def make_engine(model, tok: Tokenizer, max_seqs: int = 64) -> LLMEngine:
    """An engine over the in-memory model, recording rollouts (RolloutRecorder); no prefix cache
    (weights change between rollouts)."""
    return LLMEngine(EngineConfig(model="<in-memory>", max_model_len=2048, max_num_seqs=max_seqs,
                                  max_num_batched_tokens=4096, enable_prefix_caching=False),
                     model=model, tokenizer=tok, observer=RolloutRecorder(model))


def rollout(engine: LLMEngine, prompts: list[list[int]], gc: GRPOConfig, seed: int) -> list[list[Rollout]]:
    """G completions per prompt from the engine, with recorded routing, kept sets and pi_old."""
    rec = engine.observer
    if not isinstance(rec, RolloutRecorder):
        raise TypeError("rollout needs an engine from make_engine (its step observer records the rollouts)")
    params = [SamplingParams(n=gc.group_size, temperature=1.0, top_p=gc.top_p, top_k=gc.top_k,
                             max_tokens=gc.max_tokens, skip_special_tokens=False, seed=seed * 1000 + i)
              for i in range(len(prompts))]
    with rec.recording():
        outs = engine.generate(prompts, params)
    groups = []
    for out, ids in zip(outs, prompts):
        group = []
        for c in out.outputs:
            samples = rec.samples.get((out.request_id, c.index), [])
            comp = list(c.token_ids)
            n = min(len(comp), len(samples))
            comp = comp[:n]
            group.append(Rollout(list(ids), comp, [s[0] for s in samples[:n]], [s[1] for s in samples[:n]],
                                 rec.routing_for(out.request_id, c.index, len(ids) + n, len(ids)), c.text))
        groups.append(group)
    return groups


def completion_message(text: str, mode: str) -> dict:
    """The assistant message a completion parses to (text up to the end-of-sentence token)."""
    return parse_completion(text.split(EOS)[0], mode)


def _kept_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                   kept: list[torch.Tensor | None], max_kept: int = 2048) -> torch.Tensor:
    """log pi(token) renormalised over each token's kept set (None: the whole vocabulary):
    hidden [N, D] -> [N]. Small kept sets use only their rows of the head."""
    tok_logit = (hidden * weight[tokens]).sum(-1).float()
    big = [i for i, k in enumerate(kept) if k is None or len(k) > max_kept]
    small = [i for i in range(len(kept)) if i not in set(big)]
    lse = torch.zeros(len(kept))
    if small:
        K = max(len(kept[i]) for i in small)
        idx = torch.zeros(len(small), K, dtype=torch.long)
        valid = torch.zeros(len(small), K, dtype=torch.bool)
        for j, i in enumerate(small):
            idx[j, : len(kept[i])] = kept[i]
            valid[j, : len(kept[i])] = True
        logits = torch.einsum("nd,nkd->nk", hidden[small], weight[idx]).float()
        lse = lse.index_put((torch.tensor(small),), logits.masked_fill(~valid, float("-inf")).logsumexp(-1))
    for i in big:
        row = (weight @ hidden[i]).float()
        if kept[i] is not None:
            m = torch.zeros(weight.shape[0], dtype=torch.bool)
            m[kept[i]] = True
            row = row.masked_fill(~m, float("-inf"))
        lse = lse.index_put((torch.tensor([i]),), row.logsumexp(-1)[None])
    return tok_logit - lse


def group_logprobs(model, group: list[Rollout], stage: Stage = Stage.SPARSE, grad: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, dsa.Stats]:
    """pi_theta log-probs [G, Tc] over the group's completions (Keep Routing + Keep Sampling Mask),
    the completion mask [G, Tc], and the forward's Stats."""
    P = len(group[0].prompt_ids)
    rows = [r.prompt_ids + r.completion_ids for r in group]
    T = max(map(len, rows))
    Tc = T - P
    ids = torch.full((len(rows), T), 1, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        valid[b, : len(r)] = True
    replay = {}
    for layer in group[0].routing:
        rr = torch.full((len(rows), T, group[0].routing[layer].shape[-1]), -1, dtype=torch.long)
        for b, r in enumerate(group):
            rr[b, : len(r.routing[layer])] = r.routing[layer]
        replay[layer] = rr
    with torch.set_grad_enabled(grad):
        hidden, _, st = dsa.forward(model, ids, valid, prefix=P - 1 if P > 1 else 0, stage=stage,
                                    mtp=False, replay=replay)
        mask = torch.zeros(len(rows), Tc, dtype=torch.bool)
        out = torch.zeros(len(rows), Tc)
        hs, toks, kept, where = [], [], [], []
        for b, r in enumerate(group):
            n = len(r.completion_ids)
            if n == 0:
                continue
            hs.append(hidden[b, P - 1: P - 1 + n])
            toks += r.completion_ids
            kept += r.kept
            where += [(b, t) for t in range(n)]
            mask[b, :n] = True
        if hs:
            lp = _kept_logprobs(torch.cat(hs), model.lm_head.weight, torch.tensor(toks), kept)
            bi = torch.tensor([w[0] for w in where])
            ti = torch.tensor([w[1] for w in where])
            out = out.index_put((bi, ti), lp)
    return out, mask, st


def grpo_update(model, ref_model, opt, groups: list[list[Rollout]], gc: GRPOConfig) -> dict:
    """One optimiser step over all groups (gradients accumulated group by group)."""
    opt.zero_grad(set_to_none=True)
    stats = {"kl": 0.0, "masked": 0.0, "clipped": 0.0, "index_kl": 0.0}
    n = 0
    for group in groups:
        rewards = torch.tensor([r.reward for r in group])
        adv = group_advantages(rewards[None])[0]
        if adv.abs().max() == 0:
            continue                              # no signal in this group
        logp, mask, st = group_logprobs(model, group)
        old = torch.zeros_like(logp)
        for b, r in enumerate(group):
            old[b, : len(r.logp_old)] = torch.tensor(r.logp_old)
        ref = None
        if ref_model is not None and gc.beta:
            ref, _, _ = group_logprobs(ref_model, group, grad=False)
        loss, s = grpo_loss(logp, old, ref, adv, mask, gc.eps, gc.beta, gc.delta)
        index_loss = st.index_loss if isinstance(st.index_loss, torch.Tensor) else 0.0
        (loss / len(groups) + index_loss / len(groups)).backward()
        for k in ("kl", "masked", "clipped"):
            stats[k] += s[k]
        stats["index_kl"] += float(index_loss) if isinstance(index_loss, float) else float(index_loss.detach())
        n += 1
    if n:
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gc.clip)
        opt.step()
        for k in stats:
            stats[k] /= n
    stats["groups_with_signal"] = n
    return stats


def frozen_copy(model):
    """A frozen reference policy (pi_ref)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def prompt_ids(task, tok: Tokenizer) -> list[int]:
    """Token ids of a task's prompt, rendered in its thinking mode."""
    return tok.encode(encode_messages(task.messages, thinking_mode=task.thinking_mode))

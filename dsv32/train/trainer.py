"""The training loop: AdamW (0.9, 0.95), weight decay 0.1, grad clip 1.0, warm-up + cosine lr,
next-token + MTP loss, aux-loss-free bias updates, DSA stages, JSON-lines logs, tqdm bars,
checkpoints in the published HF layout (plus `trainer_state.pt` to resume) and PNG plots."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dsv32.model.checkpoint import load_checkpoint

from dsv32.model.save import save_checkpoint
from dsv32.model.config import ModelConfig
from dsv32.model.moe import MoE
from dsv32.model.transformer import Transformer

from . import dsa
from .dsa import Stage
from .data import Batch, Loader
from .losses import TiedVocab, masked_ce, update_bias


@dataclass
class StageConfig:
    """Hyper-parameters of one training stage."""

    name: str = "sft"
    stage: Stage | str = Stage.DENSE   # dsa stage: dense | warmup | sparse
    steps: int = 100
    lr: float = 3e-3
    indexer_lr: float | None = None   # the indexers' peak rate when it differs from `lr`
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    mtp_weight: float = 0.3
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    value_weight: float = 1.0     # loss weight of tokens that spell a tool value (mask 2; data.py)
    log_every: int = 10
    measure_recall: bool = False  # measure indexer recall during dense training too


def tie_mtp(model: Transformer) -> Transformer:
    """Share the MTP layer's embedding and head with the main model's (the published checkpoint
    stores equal copies), so training keeps them equal."""
    if model.mtp is not None:
        model.mtp.embed_tokens.weight = model.model.embed_tokens.weight
        model.mtp.shared_head.head.weight = model.lm_head.weight
    return model


def new_model(cfg: ModelConfig, seed: int = 0, std: float = 0.006,
              tie_embeddings: bool = False) -> Transformer:
    """A freshly initialised fp32 model (init std 0.006) with the MTP embedding/head tied.
    `tie_embeddings` also makes the LM head share the input embedding while training (a small
    model learns to copy tokens much sooner); checkpoints still store both, equal, as published."""
    model = Transformer(cfg, dtype=torch.float32)
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    if tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return tie_mtp(model)


def set_trainable(model: Transformer, stage: Stage | str) -> list[torch.nn.Parameter]:
    """Warm-up trains only the indexers; other stages train everything but the routing bias."""
    params = []
    for name, p in model.named_parameters():
        train = ".indexer." in name if stage == Stage.WARMUP else not name.endswith("e_score_correction_bias")
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def make_optimizer(params, sc: StageConfig, indexer: set[int] = frozenset()) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; parameters whose id is in `indexer` form their own
    groups at `sc.indexer_lr` (each group keeps its peak rate as "peak_lr")."""
    groups = []
    for in_indexer in (False, True):
        peak = sc.indexer_lr if in_indexer and sc.indexer_lr is not None else sc.lr
        part = [p for p in params if (id(p) in indexer) == in_indexer]
        for decay in (True, False):
            ps = [p for p in part if (p.dim() >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": sc.weight_decay if decay else 0.0,
                               "lr": peak, "peak_lr": peak})
    return torch.optim.AdamW(groups, lr=sc.lr, betas=sc.betas, fused=True)


def indexer_params(model: Transformer) -> set[int]:
    """Ids of the indexers' parameters (the ones `StageConfig.indexer_lr` applies to)."""
    return {id(p) for name, p in model.named_parameters() if ".indexer." in name}


def lr_factor(step: int, sc: StageConfig) -> float:
    """Linear warm-up to 1, then cosine down to `sc.min_lr_ratio`: the multiplier of a peak rate."""
    if step < sc.warmup:
        return (step + 1) / sc.warmup
    t = (step - sc.warmup) / max(1, sc.steps - sc.warmup)
    return sc.min_lr_ratio + (1 - sc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def head_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
            vocab: TiedVocab | None, token_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the head `weight` [V, D] at hidden states h [N, D] (weighted mean with
    `token_weight` [N])."""
    if vocab is None:
        return masked_ce(h @ weight.T, targets, token_weight)
    return masked_ce(vocab.logits(h, weight), vocab.targets(targets), token_weight)


def value_weights(mask: torch.Tensor, w: float) -> torch.Tensor | None:
    """Per-token loss weights for mask values [N] (1 -> 1, 2 -> w); None when w is 1."""
    return None if w == 1.0 else torch.where(mask == 2, w, 1.0)


def lm_losses(model: Transformer, batch: Batch, stage: Stage | str, mtp_weight: float = 0.3,
              alpha: float = 0.0, measure: bool = False, vocab: TiedVocab | None = None,
              value_weight: float = 1.0) -> tuple[torch.Tensor, dict, dsa.Stats]:
    """Total loss (LM + MTP + balance + indexer KL) and its parts for one batch.
    Heads run only where a target is a loss token (the vocabulary projection dominates). With
    `value_weight` != 1 the LM and MTP losses are weighted means (tool values weigh that much);
    the logged "lm" is then the weighted loss too."""
    stage = Stage(stage)
    ids, mask = batch.ids, batch.mask
    valid = torch.ones_like(ids, dtype=torch.bool)
    if batch.doc is not None:
        valid = batch.doc >= 0
    use_mtp = stage is not Stage.WARMUP and mtp_weight > 0
    hidden, mtp_h, st = dsa.forward(model, ids, valid, batch.prefix, stage, batch.doc,
                                    mtp=use_mtp or stage is Stage.WARMUP, measure=measure, alpha=alpha)
    parts = {}
    loss = st.index_loss if stage is not Stage.DENSE else hidden.sum() * 0.0
    if stage is not Stage.WARMUP:
        sel = mask[:, 1:].bool()                                         # target t+1 is a loss token
        lm = head_ce(hidden[:, :-1][sel], model.lm_head.weight, ids[:, 1:][sel], vocab,
                     value_weights(mask[:, 1:][sel], value_weight))
        loss = loss + lm + (st.balance_loss if alpha else 0.0)
        parts["lm"] = lm.item()
        if use_mtp and mtp_h is not None:
            sel2 = mask[:, 2:].bool()                                    # MTP at t predicts t+2
            mtp = head_ce(mtp_h[:, :-1][sel2], model.mtp.shared_head.head.weight, ids[:, 2:][sel2], vocab,
                          value_weights(mask[:, 2:][sel2], value_weight))
            loss = loss + mtp_weight * mtp
            parts["mtp"] = mtp.item()
        if alpha:
            parts["balance"] = float(st.balance_loss.detach())
    if stage is not Stage.DENSE:
        parts["index_kl"] = float(st.index_loss.detach())
    if st.recall is not None:
        parts["recall"] = st.recall
    return loss, parts, st


def update_biases(model: Transformer, stats: dsa.Stats, gamma: float) -> dict:
    """Aux-loss-free balancing after a step; returns max/mean load per MoE layer."""
    out = {}
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE) and layer.layer_idx in stats.loads:
            load = stats.loads[layer.layer_idx]
            if gamma:
                update_bias(layer.mlp.gate.e_score_correction_bias.data, load, gamma)
            out[layer.layer_idx] = float(load.max() / load.mean().clamp(min=1e-9))
    return out


class JsonLog:
    """Append-only JSON lines."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def save(model: Transformer, path: str | Path, extra: dict | None = None, fp8: bool = False) -> Path:
    """Write the model in the published HF layout (fp32 unless `fp8`), plus trainer state."""
    path = Path(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}   # tied copies apart
    save_checkpoint(state, model.config, path, shards=1, fp8=fp8)
    if extra is not None:
        torch.save(extra, path / "trainer_state.pt")
    return path


def load_into(model: Transformer, path: str | Path) -> dict | None:
    """Load weights (and return the trainer state, if any) from a checkpoint written by `save`."""
    load_checkpoint(model, path, dtype=torch.float32, progress=False)
    tie_mtp(model)
    f = Path(path) / "trainer_state.pt"
    return torch.load(f, weights_only=False) if f.exists() else None


def train_stage(model: Transformer, loader: Loader, sc: StageConfig, log: JsonLog,
                ckpt_dir: Path | None = None, ckpt_every: int = 0, resume: bool = True,
                progress: bool = True, vocab: TiedVocab | None = None) -> list[dict]:
    """Run one stage for `sc.steps` steps; resumes from `ckpt_dir` when it holds a checkpoint of
    this stage. Returns the logged rows."""
    params = set_trainable(model, sc.stage)
    opt = make_optimizer(params, sc, indexer_params(model))
    start = 0
    if resume and ckpt_dir is not None and (Path(ckpt_dir) / "trainer_state.pt").exists():
        st = load_into(model, ckpt_dir)
        if st and st.get("stage_name") == sc.name:
            params = set_trainable(model, sc.stage)
            opt = make_optimizer(params, sc, indexer_params(model))
            opt.load_state_dict(st["optimizer"])
            loader.load_state_dict(st["loader"])
            start = st["step"]
    rows = []
    bar = tqdm(range(start, sc.steps), desc=sc.name, disable=not progress, initial=start, total=sc.steps)
    t0, toks = time.time(), 0
    for step in bar:
        factor = lr_factor(step, sc)
        lr = sc.lr * factor                       # the model's rate, as logged
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * factor
        batch = loader.next()
        model.train()
        loss, parts, stats = lm_losses(model, batch, sc.stage, sc.mtp_weight,
                                       sc.balance_alpha if sc.stage != Stage.WARMUP else 0.0,
                                       measure=sc.measure_recall, vocab=vocab,
                                       value_weight=sc.value_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, sc.clip))
        opt.step()
        if vocab is not None:
            vocab.sync(model.lm_head.weight.data)
        loads = update_biases(model, stats, sc.bias_gamma if sc.stage != Stage.WARMUP else 0.0)
        toks += batch.ids.numel()
        row = {"stage": sc.name, "step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": gnorm,
               **parts, "load_max_over_mean": loads, "tok_per_s": toks / (time.time() - t0)}
        rows.append(row)
        bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
        if (step + 1) % sc.log_every == 0 or step + 1 == sc.steps:
            log.write(**row)
        if ckpt_dir is not None and ckpt_every and (step + 1) % ckpt_every == 0 and step + 1 < sc.steps:
            save(model, ckpt_dir, {"stage_name": sc.name, "step": step + 1,
                                   "optimizer": opt.state_dict(), "loader": loader.state_dict(),
                                   "stage_config": asdict(sc)})
    set_trainable(model, "dense")
    return rows


@torch.no_grad()
def eval_lm(model: Transformer, batches: list[Batch], stage: Stage | str) -> dict:
    """Mean LM loss on `batches` with dense or sparse attention, and indexer recall."""
    model.eval()
    tot, n, rec = 0.0, 0, []
    for b in batches:
        attend = Stage.SPARSE if stage == Stage.SPARSE else Stage.DENSE
        hidden, _, st = dsa.forward(model, b.ids, None, b.prefix, attend, b.doc, mtp=False, measure=True)
        sel = b.mask[:, 1:].bool()
        logits = model.lm_head(hidden[:, :-1][sel]).float()
        tot += float(torch.nn.functional.cross_entropy(logits, b.ids[:, 1:][sel], reduction="sum"))
        n += int(sel.sum())
        if st.recall is not None:
            rec.append(st.recall)
    return {"lm_loss": tot / max(n, 1), "recall": sum(rec) / len(rec) if rec else None}

"""The demo recipe's settings: model size, data sizes and every stage's schedule. `Recipe()` is
the recipe that trained the bundled model (`dsv32.train.demo` runs it; docs/training.md has the
runs behind each number)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from . import grpo as G
from .trainer import StageConfig

DEMO_MODEL = dict(layers=3, hidden=96, heads=4, q_lora=64, kv_lora=64, nope=16, rope=16, v=32,
                  inter=192, moe_inter=64, experts=8, groups=4, topk_group=2, active=2,
                  index_heads=8, index_dim=32, topk=256, dense=1)


@dataclass
class Recipe:
    """Sizes and schedules of the demo recipe."""

    seed: int = 0
    model: dict = field(default_factory=lambda: dict(DEMO_MODEL))
    n_train: int = 17000            # tool and plain-chat conversations (20000 until issue 34 gave
                                    # 3000 of them to the multi-call, JSON and no-tool requests)
    n_city: int = 5000              # extra weather conversations over IANA city names
    n_chat: int = 4000              # extra plain-chat conversations (demo14; docs/training.md)
    n_skill: int = 20000            # short drills: copying, dates, numbers, expressions, unit codes
    n_numbers: int = 8000           # conversations of 6 echoes of uniformly drawn numbers
    n_conversions: int = 4000       # conversations of 6 number-word and worded-calculation
                                    # conversions, in the full-prompt and later stages only (demo20)
    n_no_tools: int = 3000          # questions asked with no tool offered, answered without DSML, in
                                    # the full-prompt and later stages only (issue 34)
    n_multi_call: int = 5000        # requests that need 2-3 calls in one turn, from the short-context
                                    # stage on (demo36; demo34 had 3000 from the full-prompt stage on)
    n_json: int = 3000              # requests whose response_format asks for JSON (issue 34)
    sparse_tool_subsets: float = 0.25  # share of the conversations offering tools that the sparse
                                    # stage also sees offering a random subset of them (demo33)
    tie_embeddings: bool = True     # LM head shares the input embedding while training
    init_std: float = 0.02          # (0.006 learned to copy ~4x slower in a 800-step echo drill)
    word_dropout: float = 0.08      # share of the user's frame words swapped for an unseen token
    batch: int = 16
    # 3800 short-context steps, then 3200 full-prompt ones, at peak rate 1.75e-3 (3e-3 at hidden 56;
    # demo23); tokens that spell a tool value weigh 5x in the full-prompt stage (demo20). V3.2's
    # sparse stage keeps 7.3e-6, the rate DeepSeek-V3's pre-training ended at; here the model trains
    # at 5e-5, below the full-prompt stage's final 1.75e-4 (1e-3 undid its copying: demo29 in
    # docs/training.md), and the indexers keep the warm-up's 1e-3.
    short: StageConfig = field(default_factory=lambda: StageConfig(
        name="sft_short", stage="dense", steps=3800, lr=1.75e-3, warmup=100, mtp_weight=0.3))
    sft: StageConfig = field(default_factory=lambda: StageConfig(
        name="sft", stage="dense", steps=3200, lr=1.75e-3, warmup=50, mtp_weight=0.3, value_weight=5.0))
    warmup: StageConfig = field(default_factory=lambda: StageConfig(
        name="dsa_warmup", stage="warmup", steps=80, lr=1e-3, warmup=5, mtp_weight=0.0))
    sparse: StageConfig = field(default_factory=lambda: StageConfig(
        name="dsa_sparse", stage="sparse", steps=100, lr=5e-5, indexer_lr=1e-3, warmup=10,
        mtp_weight=0.1))
    grpo: G.GRPOConfig = field(default_factory=lambda: G.GRPOConfig(
        steps=10, prompts_per_step=8, group_size=8, lr=2e-4))
    n_eval: int = 160
    n_unseen: int = 40              # weather tasks about unseen cities, a probe reported apart
    n_heldout_lm: int = 48
    n_users: int | None = None      # tasks of the user-written set evaluated (None: all; issue 34)

    def scaled(self, f: float) -> "Recipe":
        """The same recipe with every step count (and data size) multiplied by f (smoke tests)."""
        r = dataclasses.replace(self)
        for name in ("short", "sft", "warmup", "sparse"):
            sc = getattr(self, name)
            setattr(r, name, dataclasses.replace(sc, steps=max(2, int(sc.steps * f)),
                                                 warmup=max(1, int(sc.warmup * f))))
        r.grpo = dataclasses.replace(self.grpo, steps=max(1, int(self.grpo.steps * f)))
        r.n_train = max(64, int(self.n_train * f))
        r.n_city = int(self.n_city * f)
        r.n_chat = int(self.n_chat * f)
        r.n_skill = int(self.n_skill * f)
        r.n_numbers = int(self.n_numbers * f)
        r.n_conversions = int(self.n_conversions * f)
        r.n_no_tools = int(self.n_no_tools * f)
        r.n_multi_call = int(self.n_multi_call * f)
        r.n_json = int(self.n_json * f)
        return r

    def to_json(self) -> dict:
        """The recipe as plain JSON data (the "recipe" of summary.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

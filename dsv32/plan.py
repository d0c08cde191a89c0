"""Memory per rank for a config and a parallel layout, computed from the model itself.

    python -m dsv32.plan [CONFIG.json | MODEL_DIR] --tp 8 [--ep] [--kv-fp8] [--tokens 131072]

Without a config it uses the published DeepSeek-V3.2 shape. The model is built on the meta device
with rank 0's ParallelContext, so the numbers follow exactly the sharding the engine uses:
quantised Linears in FP8 (1 byte + one fp32 scale per 128x128 block), everything else bf16
(routing bias and indexer head weights fp32), plus the paged caches, which every rank holds whole.
"""
from __future__ import annotations

import argparse

import torch

from dsv32.engine.cache import PagedCache
from dsv32.model.layout import checkpoint_layout
from dsv32.model.config import ModelConfig, QuantConfig, RopeScaling
from dsv32.model.layers import Linear
from dsv32.model.transformer import Transformer
from dsv32.parallel.context import ParallelContext

GIB = 1 << 30


def published_config() -> ModelConfig:
    """deepseek-ai/DeepSeek-V3.2's config.json, as the dataclass defaults plus its YaRN/FP8 fields."""
    return ModelConfig(rope_scaling=RopeScaling(factor=40.0), quantization_config=QuantConfig(scale_fmt="ue8m0"))


def weight_bytes_per_rank(cfg: ModelConfig, tp: int, ep: bool) -> int:
    """Bytes of rank 0's weights in FP8 storage mode (rank 0 holds the largest slice)."""
    with torch.device("meta"):
        model = Transformer(cfg, dtype=torch.bfloat16, pc=ParallelContext(0, tp, ep))
    layout = checkpoint_layout(cfg)
    total = 0
    for name, mod in model.named_modules():
        for leaf, p in mod.named_parameters(recurse=False):
            full = f"{name}.{leaf}"
            if isinstance(mod, Linear) and leaf == "weight" and layout[full].quantised:
                rows, cols = p.shape
                total += rows * cols + 4 * (-(-rows // 128)) * (-(-cols // 128))
            else:
                total += p.numel() * (4 if p.dtype == torch.float32 else 2)
    return total


def kv_bytes_per_token(cfg: ModelConfig, fp8: bool) -> int:
    per_layer = PagedCache.bytes_per_token(cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim,
                                           torch.bfloat16, fp8)
    return per_layer * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="config.json or a model directory (default: DeepSeek-V3.2)")
    ap.add_argument("--tp", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--ep", action="store_true", help="expert parallel (routed experts partitioned)")
    ap.add_argument("--kv-fp8", action="store_true", help="FP8 latent/indexer caches (656 + 132 B/token/layer)")
    ap.add_argument("--tokens", type=int, default=128 * 1024, help="cached tokens (all sequences together)")
    args = ap.parse_args()
    cfg = ModelConfig.from_json(args.config) if args.config else published_config()
    kv = kv_bytes_per_token(cfg, args.kv_fp8)
    print(f"KV cache: {kv / 1024:.1f} KiB per token (all {cfg.num_hidden_layers + cfg.num_nextn_predict_layers} "
          f"layers, {'FP8' if args.kv_fp8 else 'bf16'}), {args.tokens} tokens = {kv * args.tokens / GIB:.1f} GiB per rank")
    print("| ranks | layout | weights GiB/rank | + KV GiB/rank |")
    print("|---|---|---|---|")
    for tp in args.tp:
        w = weight_bytes_per_rank(cfg, tp, args.ep)
        print(f"| {tp} | {'TP+EP' if args.ep else 'TP'} | {w / GIB:.1f} | {(w + kv * args.tokens) / GIB:.1f} |")


if __name__ == "__main__":
    main()

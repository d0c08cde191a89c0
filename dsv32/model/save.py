"""Writing a checkpoint in the published layout: sharded safetensors, optionally FP8 with block scales."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import ModelConfig, QuantConfig
from .fp8 import FP8, block_dequant, block_quant
from .layout import (INDEX_FILE, SCALE_SUFFIX, CheckpointError, TensorSpec, block_size, checkpoint_layout,
                     mtp_vocab_sources, scale_name)


def _plan_shards(names: list[str], sizes: dict[str, int], shards: int) -> list[list[str]]:
    """Split `names` (in order) into `shards` contiguous groups of about equal bytes."""
    shards = max(1, min(shards, len(names)))
    total, groups, acc = sum(sizes.values()), [[]], 0
    for i, n in enumerate(names):
        left_names, left_groups = len(names) - i, shards - len(groups)
        full = acc >= total * len(groups) / shards
        if groups[-1] and left_groups > 0 and (full or left_names <= left_groups):
            groups.append([])
        groups[-1].append(n)
        acc += sizes[n]
    return groups


def save_checkpoint(state: Mapping[str, torch.Tensor], cfg: ModelConfig, path: str | Path,
                    shards: int = 1, fp8: bool = False, ue8m0: bool = False,
                    progress: bool = False, desc: str = "saving", share_mtp_vocab: bool = False) -> Path:
    """Write config.json, the index and `shards` safetensors files in the published layout.

    `state` maps every layout name to a tensor (it may be a lazy Mapping: tensors are fetched one
    shard at a time). With `fp8`, quantised tensors are block-quantised to e4m3 (ue8m0: power-of-two
    scales) and get a `weight_scale_inv` sibling; tensors that are already FP8 must come with theirs.
    `share_mtp_vocab` leaves out the MTP layers' copies of the embedding and head (they must equal
    the main ones; the loader reads those instead).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    quant = QuantConfig(scale_fmt="ue8m0" if ue8m0 else None) if fp8 else None
    cfg = dataclasses.replace(cfg, quantization_config=quant)
    layout, block = checkpoint_layout(cfg), block_size(cfg)
    shared = mtp_vocab_sources(cfg) if share_mtp_vocab else {}
    for n, main in shared.items():
        if n in state and not torch.equal(state[n], state[main]):
            raise CheckpointError(f"save_checkpoint: share_mtp_vocab, but {n} differs from {main}")
        layout.pop(n)
    missing = [n for n in layout if n not in state]
    extra = [n for n in state if n not in layout and n not in shared
             and not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in layout)]
    if missing or extra:
        raise CheckpointError(f"save_checkpoint({path}): state does not match the layout: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")

    def nbytes(n: str, s: TensorSpec) -> int:
        numel = torch.Size(s.shape).numel()
        return numel if (fp8 and s.quantised) else numel * s.dtype.itemsize

    names = list(layout)
    groups = _plan_shards(names, {n: nbytes(n, s) for n, s in layout.items()}, shards)
    weight_map, total = {}, 0
    bar = tqdm(total=len(names), desc=desc, unit="tensor", disable=not progress)
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors, ptrs = {}, set()
        for n in group:
            t, spec = state[n], layout[n]
            if tuple(t.shape) != spec.shape:
                raise CheckpointError(f"save_checkpoint: tensor {n}: shape {tuple(t.shape)}, "
                                      f"layout says {spec.shape}")
            t = t.detach().cpu()
            if t.dtype == torch.int8:
                raise CheckpointError(f"save_checkpoint: tensor {n} is packed int8 (a CPU weight_format); "
                                      f"save from a model loaded with weight_format='fp32'")
            if t.dtype == FP8 and fp8:                 # already quantised: keep it and its scale
                tensors[scale_name(n)] = state[scale_name(n)].detach().cpu().float().contiguous()
            elif t.dtype == FP8:                        # FP8-stored weight into a plain checkpoint
                t = block_dequant(t, state[scale_name(n)].cpu(), block)  # fp32: lossless
            elif fp8 and spec.quantised:
                t, s = block_quant(t, block, ue8m0=ue8m0)
                tensors[scale_name(n)] = s
            t = t.contiguous()
            # tied tensors (the MTP embedding/head loaded as the main ones) are written as copies
            tensors[n] = t.clone() if t.data_ptr() in ptrs else t
            ptrs.add(t.data_ptr())
            bar.update()
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path

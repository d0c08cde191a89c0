"""The bundled-model export: the published HF layout with every 2-D weight in FP8 e4m3 and 128x128
block scales, including the embeddings and LM heads (which the real checkpoint keeps in bf16: with a
129K vocabulary they are nearly all of a small model's bytes)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsv32.model.layout import INDEX_FILE, checkpoint_layout, is_fp8_vocab, scale_name

from dsv32.model.save import save_checkpoint
from dsv32.model.fp8 import block_dequant, block_quant


def export_bundle(model, path: str | Path, fp8_vocab: bool = True, share_mtp_vocab: bool = True) -> Path:
    """Write `model` to `path` (FP8 linears; FP8 embeddings/heads too with `fp8_vocab`; without the
    MTP layer's copies of the embedding and head with `share_mtp_vocab`, as training ties them)."""
    path = Path(path)
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    save_checkpoint(state, model.config, path, shards=1, fp8=True, share_mtp_vocab=share_mtp_vocab)
    if not fp8_vocab:
        return path
    index = json.loads((path / INDEX_FILE).read_text())
    for fname in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(path / fname))
        for name in list(tensors):
            if is_fp8_vocab(name) and tensors[name].dim() == 2:
                q, s = block_quant(tensors[name].float())
                tensors[name], tensors[scale_name(name)] = q, s
                index["weight_map"][scale_name(name)] = fname
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
    files = set(index["weight_map"].values())
    index["metadata"]["total_size"] = sum((path / f).stat().st_size for f in files)
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path


@torch.no_grad()
def fp8_round_trip(model) -> None:
    """Replace every weight the bundle stores in FP8 by its quantised value (what loading gives)."""
    layout = checkpoint_layout(model.config)
    for name, p in model.named_parameters():
        spec = layout.get(name)
        if (spec is not None and spec.quantised) or (p.dim() == 2 and is_fp8_vocab(name)):
            q, s = block_quant(p.float())
            p.copy_(block_dequant(q, s))

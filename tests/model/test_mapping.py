"""Token embeddings of the packed weight formats are read in place from a bf16 checkpoint."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv32.model.checkpoint import load_model
from dsv32.model.init_tiny import init_tiny
from dsv32.model.mapping import mapped_tensor

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("mapping"), vocab=2048, layers=2, shards=2)


def file_of(path, name):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds `t`'s storage, or None (anonymous memory)."""
    addr = t.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= addr < hi:
            return parts[5] if len(parts) > 5 and parts[5].startswith("/") else None
    return None


def test_mapped_tensor_is_the_file_in_place(ckpt):
    f = file_of(ckpt, EMBED)
    t = mapped_tensor(f, EMBED)
    assert torch.equal(t, load_file(f)[EMBED]) and t.dtype == torch.bfloat16
    assert mapped_file(t) == str(f)
    assert mapped_file(t.clone()) is None                                 # the check can fail


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "int8", "fp8"])
def test_packed_formats_map_the_embeddings(ckpt, fmt):
    model = load_model(ckpt, weight_format=fmt, progress=False)
    embed, mtp = model.model.embed_tokens, model.get_submodule("model.layers.2.embed_tokens")
    f = file_of(ckpt, EMBED)
    assert embed.packed == "bf16" and mapped_file(embed.weight) == str(f)
    ids = torch.tensor([[0, 5, 2047, 5, 77]])
    rows = load_file(f)[EMBED][ids[0]].float()
    assert torch.equal(embed(ids)[0], rows)                               # the native rows
    assert torch.equal(embed(torch.arange(100)[None])[0], load_file(f)[EMBED][:100].float())   # > 64 ids
    assert mtp.packed == "bf16" and mtp.weight is embed.weight                        # one Parameter


def test_fp32_and_other_dtypes_are_copied(ckpt, tmp_path):
    model = load_model(ckpt, progress=False)                             # fp32: the exact reference
    assert model.model.embed_tokens.weight.dtype == torch.float32 and mapped_file(model.model.embed_tokens.weight) is None
    d = shutil.copytree(ckpt, tmp_path / "f16")
    f = file_of(d, EMBED)
    state = load_file(f)
    state[EMBED] = state[EMBED].half()
    save_file(state, f)
    model = load_model(d, weight_format="int8", progress=False)
    assert model.model.embed_tokens.packed == "int8" and mapped_file(model.model.embed_tokens.weight) is None

"""Plain matrices over READ_WINDOW bytes are read in row windows, one mapping each, into the same
values as a whole read, in every weight format."""
import pytest
import torch

from dsv32.model import checkpoint as ck
from dsv32.model.checkpoint import load_model
from dsv32.model.init_tiny import init_tiny

READ = ck._read
SMALL = dict(vocab=1024, layers=2, shards=2, hidden=128)   # vocab rows: 256 B each in bf16


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("windows_bf16"), **SMALL)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("windows_fp8"), fp8=True, **SMALL)


def load(path, monkeypatch, window, **kw):
    """The model's state and the row windows read (rows start, stop per tensor) with READ_WINDOW = window."""
    reads = []

    def spy(f, file, name, spec, where, block, keys, shard=None):
        if shard is not None:
            reads.append((name, shard))
        return READ(f, file, name, spec, where, block, keys, shard)

    monkeypatch.setattr(ck, "_read", spy)
    monkeypatch.setattr(ck, "READ_WINDOW", window)
    state = load_model(path, progress=False, **kw).state_dict()
    return state, reads


@pytest.mark.parametrize("weight_format", ["fp32", "bf16", "fp16", "int8", "fp8"])
def test_windows_read_the_same_values(plain, monkeypatch, weight_format):
    whole, none = load(plain, monkeypatch, 1 << 40, weight_format=weight_format)
    windowed, reads = load(plain, monkeypatch, 64 << 10, weight_format=weight_format)
    assert none == []
    head = [s for n, s in reads if n == "lm_head.weight"]
    assert head == [(0, 0, 256), (0, 256, 512), (0, 512, 768), (0, 768, 1024)]   # 64 KiB: 256 rows
    assert whole.keys() == windowed.keys()
    for n in whole:
        assert torch.equal(whole[n], windowed[n]), n


@pytest.mark.parametrize("kw", [dict(weight_format="fp32"), dict(weight_format="int8"), dict(fp8_storage=True)])
def test_fp8_checkpoint_windows_only_its_plain_matrices(fp8, monkeypatch, kw):
    whole, _ = load(fp8, monkeypatch, 1 << 40, **kw)
    windowed, reads = load(fp8, monkeypatch, 16 << 10, **kw)
    names = {n for n, _ in reads}
    assert "lm_head.weight" in names
    assert ("model.embed_tokens.weight" in names) == (kw.get("weight_format") != "int8")   # int8: mapped
    assert not any("self_attn.wq_b" in n or "experts" in n for n in names)   # FP8 with scales: whole
    for n in whole:
        assert torch.equal(whole[n], windowed[n]), n

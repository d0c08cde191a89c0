"""dsv32 against Hugging Face transformers' DeepseekV32ForCausalLM (test-only oracle), fp32."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv32
from dsv32.model.attention import Attention, Indexer
from dsv32.model.init_tiny import init_tiny

transformers = pytest.importorskip("transformers")

T = 80          # well above index_topk = 16: the indexer's selection matters
DIMS = dict(layers=3, topk=16, index_heads=16, groups=4, topk_group=2, experts=8, active=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    bf16 = init_tiny(tmp_path_factory.mktemp("parity_bf16"), seed=11, **DIMS)
    fp8 = init_tiny(tmp_path_factory.mktemp("parity_fp8"), seed=11, fp8=True, **DIMS)
    return bf16, fp8


def ids():
    return torch.randint(2, 120000, (2, T), generator=torch.Generator().manual_seed(5))


def hf_model(path):
    m = transformers.DeepseekV32ForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                            attn_implementation="eager")
    return m.eval()


def dequantised_copy(src, dst):
    """Write an fp32 copy of an FP8 checkpoint, dequantising by hand (independent of dsv32)."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(src / f, "pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    out = {}
    for k, v in tensors.items():
        if k.endswith("weight_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            s = tensors[k + "_scale_inv"]
            full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: v.shape[0], : v.shape[1]]
            v = v.float() * full
        out[k] = v.float().contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_logits_equal_transformers_bf16_checkpoint(ckpts):
    bf16, _ = ckpts
    x = ids()
    with torch.no_grad():
        want = hf_model(bf16)(x).logits
        got = dsv32.load_model(bf16)(x)
    err = (got - want).abs().max().item()
    print(f"max |dsv32 - transformers| = {err:.2e} (logit scale {want.abs().max():.1f})")
    assert err < 1e-4


@pytest.mark.parametrize("fp8_storage", [False, True])
def test_logits_equal_transformers_fp8_checkpoint(ckpts, tmp_path, fp8_storage):
    _, fp8 = ckpts
    x = ids()
    with torch.no_grad():
        want = hf_model(dequantised_copy(fp8, tmp_path / "deq"))(x).logits
        got = dsv32.load_model(fp8, fp8_storage=fp8_storage)(x)
    err = (got - want).abs().max().item()
    print(f"FP8 (fp8_storage={fp8_storage}): max |dsv32 - transformers| = {err:.2e}")
    assert err < 1e-4


def test_indexer_topk_sets_equal_transformers(ckpts, monkeypatch):
    """Per layer and query, the selected key sets agree with transformers' indexer."""
    bf16, _ = ckpts
    x = ids()
    theirs, ours = [], []
    hf = hf_model(bf16)
    for layer in hf.model.layers:
        layer.self_attn.indexer.register_forward_hook(lambda m, a, out: theirs.append(out.long()))
    real_select = Indexer.select

    def spy(self, *a, **kw):
        out = real_select(self, *a, **kw)
        ours.append(out)
        return out

    monkeypatch.setattr(Indexer, "select", spy)
    with torch.no_grad():
        hf(x)
        dsv32.load_model(bf16)(x, attention=Attention.TOPK_MASKED)
    assert len(theirs) == len(ours) == DIMS["layers"]
    for h, o in zip(theirs, ours):
        for b in range(x.shape[0]):
            for t in range(T):
                want = {i for i in h[b, t].tolist() if i <= t}      # transformers pads with masked keys
                got = {i for i in o[b, t].tolist() if i >= 0}
                assert got == want, (b, t)

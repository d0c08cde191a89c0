"""Checkpoint layout, init-tiny, save/load round trips, FP8 dequantisation and every loading error."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv32
from dsv32.cli import main as cli_main
from dsv32.model import checkpoint as ck
from dsv32.model.checkpoint import load_checkpoint, load_model
from dsv32.model.convert import dequant_into, quantize_into
from dsv32.model.layout import CheckpointError, checkpoint_layout
from dsv32.model.save import save_checkpoint
from dsv32.model.config import ModelConfig
from dsv32.model.fp8 import FP8, block_dequant, block_quant
from dsv32.model.init_tiny import RandomState, init_tiny, tiny_config
from dsv32.model.layers import Linear
from dsv32.model.transformer import Transformer

SMALL = dict(vocab=512, layers=2, shards=2)   # fast checkpoints for the error cases


def ids(T=64, vocab=129280, seed=0):
    return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


def read_all(path):
    """Every tensor of a checkpoint directory, read independently of the loader."""
    wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(wm.values())):
        out.update(load_file(path / f))
    return out, wm


def dequant_by_hand(w, s, block=128):
    """Dequantise one block at a time with explicit loops (edge blocks are simply shorter)."""
    out = torch.empty(w.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = w[rows, cols].float() * s[i, j].item()
    return out


# ---- layout and init-tiny ------------------------------------------------------------------------

def test_layout_is_exactly_the_model_state(tiny_bf16):
    cfg = ModelConfig.from_json(tiny_bf16)
    with torch.device("meta"):
        model = Transformer(cfg)
    layout = checkpoint_layout(cfg)
    state = model.state_dict()
    assert set(layout) == set(state)
    assert all(tuple(state[n].shape) == s.shape for n, s in layout.items())
    n = cfg.num_hidden_layers
    assert f"model.layers.{n}.eh_proj.weight" in layout and layout[f"model.layers.{n}.eh_proj.weight"].shape == (
        cfg.hidden_size, 2 * cfg.hidden_size)
    assert layout["model.layers.0.mlp.gate_proj.weight"].quantised                  # dense layer 0
    assert layout["model.layers.1.mlp.experts.7.down_proj.weight"].quantised
    assert layout["model.layers.1.self_attn.indexer.wk.weight"].quantised
    for name in ("lm_head.weight", "model.layers.1.mlp.gate.weight", f"model.layers.{n}.eh_proj.weight",
                 "model.layers.1.self_attn.indexer.weights_proj.weight", "model.norm.weight"):
        assert not layout[name].quantised, name
    assert layout["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_init_tiny_writes_the_published_layout(tiny_bf16, tiny_fp8):
    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32" and cfg["vocab_size"] == 129280
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_scaling"]["factor"] == 40
    assert cfg["n_group"] > 1 and 1 <= cfg["topk_group"] < cfg["n_group"]
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["num_hidden_layers"] >= 3
    assert cfg["index_topk"] < 64
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert "quantization_config" not in json.loads((tiny_bf16 / "config.json").read_text())
    for d in (tiny_bf16, tiny_fp8):
        assert (d / "tokenizer.json").stat().st_size > 1_000_000 and (d / "tokenizer_config.json").exists()
        tensors, wm = read_all(d)
        shards = sorted(d.glob("model-*-of-*.safetensors"))
        assert len(shards) == 3 and set(wm.values()) == {s.name for s in shards}
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        for f in shards:                                 # the index says where each tensor really is
            with safe_open(f, "pt") as h:
                assert set(h.keys()) == {n for n, v in wm.items() if v == f.name}
    fp8, _ = read_all(tiny_fp8)
    bf16, _ = read_all(tiny_bf16)
    layout = checkpoint_layout(ModelConfig.from_json(tiny_fp8))
    assert set(bf16) == set(layout)
    assert set(fp8) == set(layout) | {n + "_scale_inv" for n, s in layout.items() if s.quantised}
    for n, s in layout.items():
        want = FP8 if s.quantised else s.dtype
        assert fp8[n].dtype == want and bf16[n].dtype == s.dtype, n
    n = ModelConfig.from_json(tiny_fp8).num_hidden_layers                  # MTP shares embed/head values
    assert torch.equal(bf16[f"model.layers.{n}.embed_tokens.weight"], bf16["model.embed_tokens.weight"])
    assert torch.equal(bf16[f"model.layers.{n}.shared_head.head.weight"], bf16["lm_head.weight"])
    norm = bf16["model.layers.0.input_layernorm.weight"].float()
    assert (norm - 1).abs().max() > 0.05 and (norm - 1).abs().mean() < 0.3   # near 1, but not 1
    assert bf16["model.layers.1.mlp.gate.e_score_correction_bias"].abs().max() > 0


def test_init_tiny_is_deterministic_and_cli(tmp_path):
    a = init_tiny(tmp_path / "a", seed=3, **SMALL)
    assert cli_main(["init-tiny", str(tmp_path / "b"), "--seed", "3", "--vocab", "512", "--layers", "2",
                     "--shards", "2"]) == 0
    c = init_tiny(tmp_path / "c", seed=4, **SMALL)
    ta, tb, tc = read_all(a)[0], read_all(tmp_path / "b")[0], read_all(c)[0]
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    assert not torch.equal(ta["model.layers.0.self_attn.q_a_proj.weight"], tc["model.layers.0.self_attn.q_a_proj.weight"])
    assert (a / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_sharding_really_splits(tmp_path):
    state = RandomState(tiny_config(vocab=512, layers=2), seed=0)
    for k in (1, 4, 7):
        d = save_checkpoint(state, state.cfg, tmp_path / str(k), shards=k)
        files = sorted(d.glob("*.safetensors"))
        assert len(files) == k and all(f.stat().st_size > 1000 for f in files)
        assert files[-1].name == f"model-{k:05d}-of-{k:05d}.safetensors"


# ---- loading -------------------------------------------------------------------------------------

def test_round_trip_bf16(tiny_bf16, tmp_path):
    model = load_model(tiny_bf16, progress=False)
    tensors, _ = read_all(tiny_bf16)
    state = model.state_dict()
    for n, t in tensors.items():
        assert state[n].dtype == torch.float32 and torch.equal(state[n], t.float()), n
    logits = model(ids())
    assert logits.shape == (1, 64, 129280) and torch.isfinite(logits).all()
    assert 0.1 < logits.std() < 10                                    # init keeps logits O(1)
    layout = checkpoint_layout(model.config)                         # back to the on-disk dtypes
    out = save_checkpoint({n: t.to(layout[n].dtype) for n, t in state.items()}, model.config,
                          tmp_path / "again", shards=2)
    again = dsv32.load_model(out, progress=False)
    assert all(torch.equal(p, state[n]) for n, p in again.state_dict().items())
    assert torch.equal(again(ids()), logits)


def test_fp8_dequantisation_matches_blocks_by_hand(tiny_fp8):
    model = load_model(tiny_fp8, progress=False)
    tensors, _ = read_all(tiny_fp8)
    state = model.state_dict()
    cfg = model.config
    for n, spec in checkpoint_layout(cfg).items():
        if spec.quantised:
            assert torch.equal(state[n], block_dequant(tensors[n], tensors[n + "_scale_inv"])), n
        else:
            assert torch.equal(state[n], tensors[n].float()), n
    # weights with partial edge blocks in both dims: [320, 128], [128, 320], [256, 64], [96, 128]
    for n in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.1.self_attn.q_b_proj.weight", "model.layers.2.self_attn.kv_a_proj_with_mqa.weight"):
        assert any(d % 128 for d in state[n].shape), n
        assert torch.equal(state[n], dequant_by_hand(tensors[n], tensors[n + "_scale_inv"])), n
    # and the FP8 values are those of the bf16 checkpoint up to e4m3 rounding (3 mantissa bits)
    ref = RandomState(cfg, seed=0)["model.layers.0.mlp.down_proj.weight"].float()
    got = state["model.layers.0.mlp.down_proj.weight"]
    assert ((got - ref).abs() <= ref.abs() / 16 + 1e-2 * ref.abs().max()).all()


def test_ue8m0_scales_are_powers_of_two_and_dequantise(tiny_fp8_ue8m0):
    cfg = json.loads((tiny_fp8_ue8m0 / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    tensors, _ = read_all(tiny_fp8_ue8m0)
    model = load_model(tiny_fp8_ue8m0, progress=False)
    state = model.state_dict()
    scales = [n for n in tensors if n.endswith("_scale_inv")]
    assert scales
    for sn in scales:
        s = tensors[sn]
        assert s.dtype == torch.float32 and torch.equal(torch.exp2(torch.log2(s).round()), s), sn
        n = sn[: -len("_scale_inv")]
        assert torch.equal(state[n], dequant_by_hand(tensors[n], s)), n


def test_fp8_storage_gives_the_same_logits(tiny_fp8, tiny_bf16):
    dense = load_model(tiny_fp8, progress=False)
    kept = dsv32.load_model(tiny_fp8, fp8_storage=True, progress=False)
    q = kept.model.layers[1].mlp.experts[3].up_proj
    assert isinstance(q, Linear) and q.weight.dtype == FP8 and q.weight_scale_inv.dtype == torch.float32
    assert kept.model.layers[1].self_attn.indexer.weights_proj.weight.dtype == torch.float32
    assert kept.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert kept.lm_head.weight.dtype == torch.float32
    fp8_bytes = sum(p.numel() for p in kept.parameters() if p.dtype == FP8)
    assert fp8_bytes > 0
    x = ids()
    torch.testing.assert_close(kept(x), dense(x), rtol=0, atol=1e-5)
    # a bf16 checkpoint kept in FP8 is quantised on load exactly like init-tiny --fp8 did
    requant = load_model(tiny_bf16, fp8_storage=True, progress=False)
    torch.testing.assert_close(requant(x), dense(x), rtol=0, atol=1e-5)


def test_bf16_compute_dtype(tiny_fp8):
    m = load_model(tiny_fp8, dtype=torch.bfloat16, progress=False)
    assert m.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    assert m.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert m.model.layers[0].self_attn.indexer.weights_proj.weight.dtype == torch.float32


def test_loading_maps_shards_one_at_a_time(tiny_bf16, monkeypatch):
    """Shards are read through safe_open (memory-mapped), never two mappings at the same time."""
    opened, live = [], []
    real = ck.safe_open

    class Spy:
        def __init__(self, path, *a, **k):
            self.h, self.path = real(path, *a, **k), path

        def __enter__(self):
            live.append(self.path)
            opened.append(self.path)
            assert len(live) == 1, live
            return self.h.__enter__()

        def __exit__(self, *exc):
            live.remove(self.path)
            return self.h.__exit__(*exc)

    monkeypatch.setattr(ck, "safe_open", Spy)
    monkeypatch.setattr(ck, "MAP_WINDOW", 16 << 20)
    monkeypatch.setattr(ck, "load_file", lambda *a, **k: pytest.fail("whole-file read"), raising=False)
    load_model(tiny_bf16, progress=False)
    assert set(opened) == {str(p) for p in tiny_bf16.glob("model-*.safetensors")}
    assert len(opened) > 3                          # shards are re-mapped every MAP_WINDOW bytes


def test_single_file_checkpoint(tmp_path):
    d = init_tiny(tmp_path / "one", **{**SMALL, "shards": 1})
    (d / "model.safetensors.index.json").unlink()
    (d / "model-00001-of-00001.safetensors").rename(d / "model.safetensors")
    m = load_model(d, progress=False)
    assert m(ids(vocab=512)).shape == (1, 64, 512)


# ---- errors: each names the tensor and the file ---------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("small"), fp8=True, **SMALL)


@pytest.fixture
def ckpt(small, tmp_path):
    """A private copy of the small FP8 checkpoint to damage."""
    return shutil.copytree(small, tmp_path / "ckpt")


def edit(path, name, value=None, file=None):
    """Replace (value), delete (value None) or add (file given) one tensor, keeping the index honest."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fname = file or index["weight_map"][name]
    tensors = load_file(path / fname)
    if value is None:
        del tensors[name]
        del index["weight_map"][name]
    else:
        tensors[name] = value
        index["weight_map"][name] = fname
    save_file(tensors, path / fname, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return path / fname


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, progress=False)
    return str(e.value)


Q = "model.layers.1.self_attn.q_b_proj.weight"          # quantised, [256, 64]
NORM = "model.layers.0.input_layernorm.weight"


def file_of(path, name):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_error_missing_tensor(ckpt):
    edit(ckpt, NORM)
    msg = load_error(ckpt)
    assert "missing tensor" in msg and NORM in msg and "model.safetensors.index.json" in msg


def test_error_index_lists_tensor_its_file_lacks(ckpt):
    f = file_of(ckpt, NORM)
    tensors = load_file(ckpt / f)
    del tensors[NORM]
    save_file(tensors, ckpt / f)
    msg = load_error(ckpt)
    assert NORM in msg and f in msg and "does not contain" in msg


def test_error_unexpected_tensor(ckpt):
    f = edit(ckpt, "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4), file=file_of(ckpt, NORM))
    msg = load_error(ckpt)
    assert "unexpected tensor" in msg and "rotary_emb.inv_freq" in msg and f.name in msg


def test_error_wrong_shape(ckpt):
    f = edit(ckpt, NORM, torch.ones(100, dtype=torch.bfloat16))
    msg = load_error(ckpt)
    assert "wrong shape" in msg and NORM in msg and f.name in msg and "(100,)" in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_error_corrupt_shard(ckpt, damage):
    f = ckpt / file_of(ckpt, Q)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    msg = load_error(ckpt)
    assert "corrupt or truncated" in msg and f.name in msg


def test_error_index_points_at_missing_file(ckpt):
    f = file_of(ckpt, Q)
    (ckpt / f).unlink()
    msg = load_error(ckpt)
    assert "does not exist" in msg and f in msg and "model." in msg


def test_error_no_checkpoint_files(tmp_path, small):
    shutil.copy(small / "config.json", tmp_path / "config.json")
    assert "model.safetensors.index.json" in load_error(tmp_path)


def test_error_unsupported_weight_dtype(ckpt):
    f = edit(ckpt, Q, torch.zeros(256, 64, dtype=torch.int8))
    msg = load_error(ckpt)
    assert "unsupported" in msg and "I8" in msg and Q in msg and f.name in msg


def test_error_fp8_on_a_tensor_never_quantised(ckpt):
    f = edit(ckpt, NORM, torch.ones(128).to(FP8))
    msg = load_error(ckpt)
    assert "F8_E4M3" in msg and NORM in msg and f.name in msg


def test_error_fp8_weight_without_scale(ckpt):
    edit(ckpt, Q + "_scale_inv")
    msg = load_error(ckpt)
    assert "without its scale" in msg and Q in msg and file_of(ckpt, Q) in msg


def test_error_scale_of_wrong_shape(ckpt):
    f = edit(ckpt, Q + "_scale_inv", torch.ones(1, 1))
    msg = load_error(ckpt)
    assert "scale shape (1, 1)" in msg and "(2, 1)" in msg and Q + "_scale_inv" in msg and f.name in msg


def test_error_scale_of_wrong_dtype(ckpt):
    f = edit(ckpt, Q + "_scale_inv", torch.ones(2, 1, dtype=torch.int32))
    msg = load_error(ckpt)
    assert "scale dtype I32" in msg and Q + "_scale_inv" in msg and f.name in msg


def test_error_scale_beside_a_plain_weight(ckpt):
    f = edit(ckpt, Q, torch.zeros(256, 64, dtype=torch.bfloat16))
    msg = load_error(ckpt)
    assert "unexpected tensor" in msg and Q + "_scale_inv" in msg and f.name in msg


def test_error_model_and_checkpoint_disagree(small):
    cfg = ModelConfig.from_json(small)
    other = ModelConfig.from_dict({**cfg.to_dict(), "q_lora_rank": 32})
    with torch.device("meta"):
        model = Transformer(other)
    with pytest.raises(CheckpointError, match="q_a_proj.weight has shape"):
        load_checkpoint(model, small, progress=False)


def test_linear_use_fp8_storage_quantises_current_values():
    lin = Linear(200, 300)
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 0.05
    with torch.no_grad():
        lin.weight.copy_(w)
    lin.use_fp8_storage()
    assert lin.weight.dtype == FP8 and lin.weight_scale_inv.shape == (3, 2)
    got = lin.dense_weight(torch.float32)
    assert torch.equal(got, dequant_by_hand(lin.weight, lin.weight_scale_inv))
    assert ((got - w).abs() <= w.abs() / 16 + 1e-3 * w.abs().max()).all()   # e4m3: 3 mantissa bits


def test_save_from_an_fp8_storage_model(tiny_fp8, tmp_path):
    kept = load_model(tiny_fp8, fp8_storage=True, progress=False)
    x = ids()
    want = kept(x)
    state = kept.state_dict()
    for fp8 in (True, False):
        out = save_checkpoint(state, kept.config, tmp_path / str(fp8), shards=2, fp8=fp8)
        torch.testing.assert_close(load_model(out, progress=False)(x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 300 * 128, 1 << 24])
def test_dequant_into_chunks_and_edge_blocks(chunk):
    w = torch.randn(300, 200)
    q, s = block_quant(w, ue8m0=False)                         # [3, 2] blocks, both dims ragged
    out = torch.empty(300, 200)
    dequant_into(out, q, s, (128, 128), chunk=chunk)
    assert torch.equal(out, dequant_by_hand(q, s))


@pytest.mark.parametrize("fp8", [False, True])
def test_quantize_into_is_the_same_in_any_chunk(fp8):
    """Packing to int8 a few row blocks at a time (small fp32 temporaries) changes no bit."""
    from dsv32.model.cpu.packed import quantize_int8
    w = torch.randn(300, 256)
    q, s = block_quant(w, ue8m0=False) if fp8 else (w, None)
    real = dequant_by_hand(q, s) if fp8 else w
    want = quantize_int8(real)
    for chunk in (1, 128 * 256, 1 << 24):          # one row block a step, one block, everything
        dst, dst_scale = torch.empty(300, 256, dtype=torch.int8), torch.empty_like(want[1])
        quantize_into(dst, dst_scale, q, s, (128, 128), (0, 0), False, chunk=chunk)
        assert torch.equal(dst, want[0]) and torch.equal(dst_scale, want[1])

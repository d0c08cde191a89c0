"""A tiny run whose loss decreases, checkpoint save / resume, and the saved checkpoint in
transformers' DeepseekV32ForCausalLM."""
import dataclasses
import json
import math

import pytest
import torch

import dsv32
from dsv32.model.layout import CheckpointError
from dsv32.model.save import save_checkpoint
from dsv32.model.init_tiny import tiny_config
from dsv32.train.data import Example, Loader, collate
from dsv32.train.export import export_bundle, fp8_round_trip
from dsv32.train.losses import TiedVocab
from dsv32.train.trainer import JsonLog, StageConfig, lm_losses, load_into, new_model, save, train_stage

CFG = tiny_config(layers=2, hidden=64, heads=4, q_lora=32, kv_lora=32, nope=16, rope=16, v=16,
                  inter=96, moe_inter=32, experts=8, groups=4, topk_group=2, active=2,
                  index_heads=16, index_dim=32, topk=8, dense=1, vocab=300)


def examples(n=24):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        a = torch.randint(10, 200, (6,), generator=g).tolist()
        ids = [0, 5, 6, 7] + a + [2] + a + [1]                 # copy task: learnable
        out.append(Example(ids, [0] * 11 + [1] * 7))
    return out


def test_tiny_run_loss_decreases(tmp_path):
    model = new_model(CFG, seed=0)
    vocab = TiedVocab(sorted({i for e in examples() for i in e.ids}), CFG.vocab_size)
    sc = StageConfig(steps=40, lr=1e-2, warmup=4, log_every=1)
    rows = train_stage(model, Loader(examples(), 8, seed=0), sc, JsonLog(tmp_path / "log.jsonl"),
                       progress=False, vocab=vocab)
    first, last = sum(r["lm"] for r in rows[:5]) / 5, sum(r["lm"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert "mtp" in rows[-1] and "balance" in rows[-1] and rows[-1]["load_max_over_mean"]
    assert len(JsonLog(tmp_path / "log.jsonl").read()) == 40
    assert torch.equal(model.lm_head.weight[3], model.lm_head.weight[299])   # unseen rows tied


def test_checkpoint_resume_round_trip(tmp_path):
    sc = StageConfig(steps=6, lr=1e-2, warmup=2, log_every=1)
    log = JsonLog(tmp_path / "log.jsonl")
    full = new_model(CFG, seed=0)
    want = train_stage(full, Loader(examples(), 4, seed=0), sc, log, progress=False)
    part = new_model(CFG, seed=0)
    ck = tmp_path / "ck"
    train_stage(part, Loader(examples(), 4, seed=0), dataclasses.replace(sc, steps=6), log,
                ckpt_dir=ck, ckpt_every=3, progress=False)
    # a fresh process resumes from the step-3 checkpoint and must land on the same weights
    resumed = new_model(CFG, seed=1)
    got = train_stage(resumed, Loader(examples(), 4, seed=0), sc, log, ckpt_dir=ck, progress=False)
    assert [r["step"] for r in got] == [4, 5, 6]
    assert abs(got[-1]["loss"] - want[-1]["loss"]) < 1e-4
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n
    # the stage checkpoint is a published-layout checkpoint that dsv32.load_model reads
    m = dsv32.load_model(ck, progress=False)
    assert set(m.state_dict()) == set(part.state_dict())


def test_saved_checkpoint_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = new_model(CFG, seed=2, std=0.1)
    save(model, tmp_path / "ck")
    x = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(3))
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(x).logits
        got = dsv32.load_model(tmp_path / "ck", progress=False)(x)
        ours = model(x)
    assert (got - want).abs().max() < 1e-4
    assert (ours - want).abs().max() < 1e-4


def test_fp8_bundle_loads_as_its_round_trip(tmp_path):
    model = new_model(CFG, seed=4, std=0.1)
    export_bundle(model, tmp_path / "b")
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = f"model.layers.{CFG.num_hidden_layers}."
    assert mtp + "eh_proj.weight" in index                       # the MTP layer is there,
    assert mtp + "embed_tokens.weight" not in index              # without its vocabulary copies
    assert mtp + "shared_head.head.weight" not in index
    loaded = dsv32.load_model(tmp_path / "b", progress=False)
    fp8_round_trip(model)
    x = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() < 1e-5
        h = torch.randn(1, 20, CFG.hidden_size)                  # the MTP head reads the main ones
        assert torch.equal(loaded.mtp.embed_tokens(x), loaded.model.embed_tokens(x))
        assert torch.equal(loaded.mtp.shared_head.head(h), loaded.lm_head(h))


def test_share_mtp_vocab_refuses_unequal_copies(tmp_path):
    model = new_model(CFG, seed=4, std=0.1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state[f"model.layers.{CFG.num_hidden_layers}.shared_head.head.weight"] += 1
    with pytest.raises(CheckpointError, match="differs from lm_head.weight"):
        save_checkpoint(state, CFG, tmp_path / "c", share_mtp_vocab=True)


def test_tied_embeddings_train_as_one_and_save_as_two(tmp_path):
    model = new_model(CFG, seed=5, std=0.02, tie_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.mtp.shared_head.head.weight is model.lm_head.weight
    sc = StageConfig(steps=3, lr=1e-2, warmup=1, log_every=1)
    train_stage(model, Loader(examples(), 4, seed=0), sc, JsonLog(tmp_path / "log.jsonl"), progress=False)
    save(model, tmp_path / "ck")
    from safetensors.torch import load_file
    state = load_file(next((tmp_path / "ck").glob("*.safetensors")))
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    fresh = new_model(CFG, seed=6, tie_embeddings=True)
    load_into(fresh, tmp_path / "ck")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_value_weight_weights_the_marked_tokens():
    model = new_model(CFG, seed=0)
    ex = examples(4)
    for e in ex:                       # mark the first copied token of each row as a value
        e.mask = e.mask[:11] + [2] + e.mask[12:]
    batch = collate(ex, share_prefix=False)
    plain = [lm_losses(model, batch, "dense", mtp_weight=0.0)[1]["lm"] for _ in range(2)]
    one = lm_losses(model, batch, "dense", mtp_weight=0.0, value_weight=1.0)[1]["lm"]
    assert plain[0] == plain[1] == one                      # weight 1 is the plain mean
    with torch.no_grad():
        h = model.hidden(batch.ids)[:, :-1]
        ce = torch.nn.functional.cross_entropy(model.logits(h).transpose(1, 2), batch.ids[:, 1:],
                                               reduction="none")
    m = batch.mask[:, 1:]
    w = torch.where(m == 2, 3.0, 1.0) * (m > 0)
    assert math.isclose(float((ce * (m > 0)).sum() / (m > 0).sum()), plain[0], rel_tol=1e-4)
    got = lm_losses(model, batch, "dense", mtp_weight=0.0, value_weight=3.0)[1]["lm"]
    assert math.isclose(float((ce * w).sum() / w.sum()), got, rel_tol=1e-4) and got != plain[0]


@pytest.mark.parametrize("lr, indexer_lr", [(0.0, 1e-2), (1e-2, 0.0)])
def test_indexer_lr_sets_the_indexers_own_rate(tmp_path, lr, indexer_lr):
    """The sparse stage trains the model and the indexers at separate peak rates: a rate of 0 on
    either side leaves exactly those weights as they were while the other side moves."""
    model = new_model(CFG, seed=7, std=0.02)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sc = StageConfig(name="s", stage="sparse", steps=3, lr=lr, indexer_lr=indexer_lr, warmup=1,
                     log_every=1, mtp_weight=0.0)
    train_stage(model, Loader(examples(), 4, seed=0), sc, JsonLog(tmp_path / "log.jsonl"), progress=False)
    after = model.state_dict()
    for indexer in (True, False):
        keys = [k for k in before if (".indexer." in k) == indexer and not k.endswith("correction_bias")]
        moved = [k for k in keys if not torch.equal(before[k], after[k])]
        frozen = (indexer_lr if indexer else lr) == 0.0
        assert keys and (moved == [] if frozen else len(moved) > len(keys) // 2), (indexer, moved[:3])

"""FastModel.step (fast paths, static shapes) against the model's served forward over PagedKV."""
import math

import pytest
import torch

from dsv32.engine.batch import pack_tables
from dsv32.engine.cache import PagedCache, PagedKV
from dsv32.kernels.layer import FastModel
from dsv32.model.config import ModelConfig
from dsv32.model.transformer import Transformer

from .conftest import DEVICE, needs_triton, rel_err

CFG = dict(model_type="deepseek_v32", vocab_size=96, hidden_size=128, intermediate_size=128,
           moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
           n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
           kv_lora_rank=128, q_lora_rank=64, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
           index_n_heads=4, index_head_dim=128, index_topk=8, num_nextn_predict_layers=0)
BS = 4


def tiny(fp8=True, seed=0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig.from_dict(CFG)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / math.sqrt(p.shape[1]))
    if fp8:
        for mod in m.modules():
            if hasattr(mod, "use_fp8_storage") and mod is not m.lm_head:
                mod.use_fp8_storage()
        for layer in m.model.layers:                   # the indexer's head weights stay fp32
            ix = layer.self_attn.indexer.weights_proj
            if ix.fp8_block:
                ix.weight = torch.nn.Parameter(ix.dense_weight(torch.float32))
                ix.fp8_block, ix.weight_scale_inv = None, None
    return m.to(DEVICE)


def pack(rows, tables):
    """rows: (start, tokens) per sequence -> ids, pos, slots [B, T], ctx [B], last [B] (the
    engine's packing, block size BS)."""
    x = pack_tables([(tables[b].tolist(), s, toks) for b, (s, toks) in enumerate(rows)], BS)
    return [t.to(DEVICE) for t in (x.ids, x.pos, x.slots, x.ctx, x.last)]


def run_both(backend, fp8_cache, steps, seed=0):
    """Prefill two prompts (12 and 5 tokens), then decode `steps` tokens (the reference's
    greedy picks) in both: max relative logit error over every forward."""
    ref_m, fast_m = tiny(seed=seed), tiny(seed=seed)
    mk = lambda: PagedCache(2, 24, 128, 64, 128, block_size=BS, device=DEVICE, fp8=fp8_cache)
    ref_c, fast_c = mk(), mk()
    fast = FastModel(fast_m, fast_c, backend)
    tables = torch.randperm(24, device=DEVICE)[:20].view(2, 10)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 96, (12,), generator=g).tolist(), torch.randint(0, 96, (5,), generator=g).tolist()]
    done = [0, 0]
    worst = 0.0
    for step in range(steps + 2):
        if step < 2:                                   # prefill each prompt alone
            b = step
            rows, tab = [(0, seqs[b])], tables[b:b + 1]
        else:
            rows, tab = [(done[b], seqs[b][done[b]:]) for b in range(2)], tables
        ids, pos, slots, ctx, last = pack(rows, tab)
        with torch.inference_mode():
            h = ref_m.hidden(ids, pos, PagedKV(ref_c, tab, ctx, slots))
            ref = ref_m.logits(h[torch.arange(len(rows), device=DEVICE), last])
            got = fast.step(ids, pos, slots, tab, last)
        worst = max(worst, rel_err(got, ref))
        for i, (s, toks) in enumerate(rows):
            b = step if step < 2 else i
            done[b] = s + len(toks)
            seqs[b].append(int(ref[i].argmax()))
    return worst


@pytest.mark.parametrize("fp8_cache", [False, True])
def test_fast_model_torch_backend(fp8_cache):
    assert run_both("torch", fp8_cache, steps=3) < 1e-5


@needs_triton
def test_fast_model_triton_backend():
    assert run_both("triton", True, steps=2) < 1e-5

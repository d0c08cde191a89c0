"""Model components against slow, obvious computations written here in the test."""
import math

import pytest
import torch

from dsv32.model import attention
from dsv32.model.attention import Attention
from dsv32.model.config import ModelConfig, RopeScaling
from dsv32.model.kv import ContiguousKV, FreshKV
from dsv32.model.layers import hadamard, yarn_inv_freq
from dsv32.model.transformer import Transformer

CFG = dict(model_type="deepseek_v32", vocab_size=512, hidden_size=64, intermediate_size=96,
           moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
           n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
           kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24,
           index_n_heads=16, index_head_dim=32, index_topk=12, num_nextn_predict_layers=1,
           rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                             beta_slow=1, mscale=1.0, mscale_all_dim=1.0))


def random_model(seed=0, **over) -> Transformer:
    cfg = ModelConfig.from_dict({**CFG, **over})
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
        for layer in m.model.layers:
            layer.self_attn.indexer.weights_proj.weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def model():
    return random_model()


def ids(B=2, T=40, seed=1):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


# ---- rotary / scale --------------------------------------------------------------------------

def test_yarn_frequencies_and_mscale():
    cfg = ModelConfig.from_dict(CFG)
    f = yarn_inv_freq(cfg)
    base = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    # highest frequencies are kept, lowest are divided by the factor
    assert torch.allclose(f[0].double(), base[0])
    assert torch.allclose(f[-1].double(), base[-1] / 40, rtol=1e-6)
    m = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(32 ** -0.5 * m * m)
    plain = ModelConfig.from_dict({**CFG, "rope_scaling": None})
    assert plain.softmax_scale == pytest.approx(32 ** -0.5)


def test_hadamard_is_orthogonal_and_preserves_dot_products():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 64, dtype=torch.float64, generator=g), torch.randn(7, 64, dtype=torch.float64, generator=g)
    assert torch.allclose(hadamard(x) @ hadamard(y).T, x @ y.T, atol=1e-10)
    assert not torch.allclose(hadamard(x), x)


# ---- indexer ---------------------------------------------------------------------------------

def naive_rope_half(x, pos, inv_freq):
    """x [..., d] at integer position pos: element i pairs with i + d/2."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        a, b, th = x[..., i], x[..., i + d // 2], pos * inv_freq[i].item()
        out[..., i] = a * math.cos(th) - b * math.sin(th)
        out[..., i + d // 2] = b * math.cos(th) + a * math.sin(th)
    return out


def test_indexer_topk_equals_naive_computation(model):
    """Scores, split order (rope first), half-split rope, ReLU head sum, causal top-k."""
    torch.manual_seed(3)
    ix = model.model.layers[1].self_attn.indexer
    cfg = model.config
    T, H, D, R = 30, ix.n_heads, ix.head_dim, cfg.qk_rope_head_dim
    x, qr = torch.randn(1, T, cfg.hidden_size), torch.randn(1, T, cfg.q_lora_rank)
    pos = torch.arange(T).unsqueeze(0)
    cos, sin = model.rotary(pos)
    q, w = ix.query(x, qr, cos, sin)
    k = ix.key(x, cos, sin)
    got = ix.select(q, w, k, pos)[0]

    inv = yarn_inv_freq(cfg)
    Wq, Wk, Ww = ix.wq_b.weight, ix.wk.weight, ix.weights_proj.weight
    with torch.no_grad():
        kk = torch.nn.functional.layer_norm(x[0] @ Wk.T, (D,), ix.k_norm.weight, ix.k_norm.bias, 1e-6)
        qq = (qr[0] @ Wq.T).view(T, H, D)
        ww = (x[0] @ Ww.T) / math.sqrt(H) / math.sqrt(D)
        for t in range(T):
            kk[t, :R] = naive_rope_half(kk[t, :R], t, inv)
            qq[t, :, :R] = naive_rope_half(qq[t, :, :R], t, inv)
        for t in range(T):
            score = torch.full((T,), float("-inf"))
            for s in range(t + 1):
                score[s] = sum(ww[t, j] * torch.relu(qq[t, j] @ kk[s]) for j in range(H))
            n = min(ix.topk, t + 1)
            want = set(score.topk(n).indices.tolist())
            assert set(i for i in got[t].tolist() if i >= 0) == want, t
            assert (got[t] >= 0).sum().item() == n


# ---- attention paths -------------------------------------------------------------------------

def test_absorbed_equals_expanded_mla(model):
    """Absorbed MQA over all causal keys == expanded MHA (no sparsity involved)."""
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 20, model.config.hidden_size)
    pos = torch.arange(20).expand(2, 20)
    cos, sin = model.rotary(pos)
    q_nope, q_pe, _, latent = attn.project(x, cos, sin)
    kv = FreshKV()
    kv.write(0, latent, None)
    expanded = attn.mha(q_nope, q_pe, latent, pos)
    idx = torch.arange(20).expand(2, 20, 20).masked_fill(torch.arange(20).view(1, 20, 1) < torch.arange(20), -1)
    absorbed = attn.mqa_sparse(q_nope, q_pe, kv, idx)
    assert torch.allclose(expanded, absorbed, atol=1e-5, rtol=1e-4)


def test_gathered_sparse_equals_dense_masked(model, monkeypatch):
    x = ids(T=48)
    dense = model(x, attention=Attention.TOPK_MASKED)
    sparse = model(x, attention=Attention.TOPK_GATHERED)
    auto = model(x)
    assert (dense - sparse).abs().max() < 1e-4
    assert (dense - auto).abs().max() < 1e-4
    # queries gathered a few at a time, and W_uv applied to groups of them (the last ones short)
    a = model.model.layers[0].self_attn
    monkeypatch.setattr(attention, "GATHER_BLOCK", 3 * (a.n_heads * a.topk + a.topk * (a.kv_rank + a.rope)))
    monkeypatch.setattr(attention, "ABSORB_BLOCK", 10 * x.shape[0] * a.n_heads * a.kv_rank)
    chunked = model(x, attention=Attention.TOPK_GATHERED)
    assert (dense - chunked).abs().max() < 1e-4


def test_sparsity_matters():
    """With index_topk below the length, the output differs from full dense attention."""
    a = random_model(index_topk=12)(ids(T=48))
    b = random_model(index_topk=64)(ids(T=48))
    assert (a[:, :12] - b[:, :12]).abs().max() < 1e-4          # identical while t < topk
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-2          # selection changes later positions


@pytest.mark.parametrize("chunk", [1, 7, 48])
def test_cached_incremental_decode_equals_full_forward(model, chunk):
    x = ids(T=48)
    full = model(x)
    cfg = model.config
    kv = ContiguousKV(cfg.num_hidden_layers + 1, 2, 64, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                      cfg.index_head_dim)
    outs = []
    kv.begin(0, 20)
    outs.append(model(x[:, :20], model.positions_for(x[:, :20]), kv))
    for s in range(20, 48, chunk):
        e = min(48, s + chunk)
        kv.begin(s, e - s)
        outs.append(model(x[:, s:e], model.positions_for(x[:, s:e], s), kv))
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-4


# ---- MoE gate ------------------------------------------------------------------------------

def test_gate_group_limited_routing_naive(model):
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(50, model.config.hidden_size)
    w, ids_, _ = gate(x)
    for n in range(50):
        s = torch.sigmoid(x[n] @ gate.weight.T)
        b = s + gate.e_score_correction_bias
        groups = [sorted(b[g * 2:(g + 1) * 2].tolist(), reverse=True) for g in range(4)]
        gscore = [sum(g[:2]) for g in groups]
        keep = sorted(range(4), key=lambda g: -gscore[g])[:2]
        cand = [e for e in range(8) if e // 2 in keep]
        chosen = sorted(cand, key=lambda e: -b[e].item())[:3]
        assert set(ids_[n].tolist()) == set(chosen)
        ww = s[chosen] / s[chosen].sum() * 2.5
        got = {e: wt for e, wt in zip(ids_[n].tolist(), w[n].tolist())}
        for e, wt in zip(chosen, ww.tolist()):
            assert got[e] == pytest.approx(wt, rel=1e-5)


# ---- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("n_group", 3), ("topk_group", 9), ("model_type", "llama"),
                                         ("scoring_func", "softmax"), ("index_head_dim", 8),
                                         ("num_experts_per_tok", 0)])
def test_config_rejects_inconsistent_fields(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**CFG, field: value})


def test_config_round_trip():
    cfg = ModelConfig.from_dict(CFG)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.rope_scaling == RopeScaling(factor=40, beta_fast=32, beta_slow=1)


# ---- MTP ----------------------------------------------------------------------------------------

def test_mtp_equals_independent_computation(model):
    """MTP = HF decoder layer over eh_proj(concat[enorm(embed(t+1)), hnorm(h_t)]), then its own head."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg, mtp = model.config, model.mtp
    x = ids(B=2, T=33)
    h = model.hidden(x)
    got = model.mtp_logits(h, x)                                            # [B, 32, V]

    d = {k: v for k, v in CFG.items() if k not in ("model_type", "rope_scaling", "num_nextn_predict_layers")}
    hcfg = DeepseekV32Config(**{**d, "num_hidden_layers": 1, "first_k_dense_replace": 0},
                             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                                  original_max_position_embeddings=4096, beta_fast=32.0,
                                                  beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
    hcfg._attn_implementation = "eager"
    ref = DeepseekV32ForCausalLM(hcfg).eval()
    sd = {}
    for k, v in mtp.state_dict().items():
        if k.startswith("mlp.experts."):
            continue
        sd[f"model.layers.0.{k}"] = v
    experts = mtp.mlp.experts
    sd["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat((e.gate_proj.weight, e.up_proj.weight)) for e in experts])
    sd["model.layers.0.mlp.experts.down_proj"] = torch.stack([e.down_proj.weight for e in experts])
    sd["model.norm.weight"] = mtp.shared_head.norm.weight
    sd["lm_head.weight"] = mtp.shared_head.head.weight
    missing, _ = ref.load_state_dict(sd, strict=False)
    assert missing == ["model.embed_tokens.weight"]

    def rms(v, w):
        return w * v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)

    with torch.no_grad():
        e = mtp.embed_tokens.weight[x[:, 1:]].clone()
        e[:, 0] = 0.0                                                       # position 0 embedding zeroed
        inp = torch.cat((rms(e, mtp.enorm.weight), rms(h[:, :-1], mtp.hnorm.weight)), -1) @ mtp.eh_proj.weight.T
        want = ref(inputs_embeds=inp).logits
    assert (got - want).abs().max() < 1e-4
    assert got.shape == (2, 32, cfg.vocab_size)

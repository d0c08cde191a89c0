"""The engine against full-forward recomputation on a generated checkpoint."""
import pytest
import torch

from dsv32.engine.cache import fp8_roundtrip
from dsv32.engine.engine import EngineConfig, LLMEngine
from dsv32.engine.llm import LLM
from dsv32.engine.sequence import SamplingParams
from dsv32.model.checkpoint import load_model
from dsv32.model.init_tiny import init_tiny
from dsv32.model.kv import ContiguousKV

TOPK = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # kv_lora / index_dim of 128 so the FP8 cache layouts (groups of 128) apply
    return init_tiny(tmp_path_factory.mktemp("engine_tiny"), seed=3, layers=2, topk=TOPK,
                     kv_lora=128, index_dim=128, index_heads=16)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)


def make_engine(ckpt, model, **kw):
    return LLMEngine(EngineConfig(model=str(ckpt), **{"max_model_len": 512, **kw}), model=model)


def run(engine, prompts, params):
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", p, sp)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(prompts))]


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 120000, (n,), generator=g).tolist() for n in lengths]


def greedy(n=8, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0, **kw)


def check_against_full_forward(model, prompt, out, greedy=True):
    """Every sampled token's logprob equals log_softmax of a full forward over prompt+output
    (and, for greedy decoding, the token is the argmax up to exact ties)."""
    toks = out.outputs[0].token_ids
    full = torch.tensor([prompt + toks])
    with torch.no_grad():
        lp = model(full).log_softmax(-1)[0]
    for i, t in enumerate(toks):
        row = lp[len(prompt) - 1 + i]
        if greedy:
            assert t == int(row.argmax()) or row.max() - row[t] < 1e-4
        assert abs(out.outputs[0].logprobs[i].logprob - row[t].item()) < 1e-3


def test_mixed_batch_greedy_equals_full_forward(ckpt, model):
    """Short and long prompts (longer than index_topk) submitted together."""
    prompts = prompts_of([3, 10, 40, 70, 150])
    outs = run(make_engine(ckpt, model), prompts, [greedy(12)] * len(prompts))
    for p, o in zip(prompts, outs):
        assert len(o.outputs[0].token_ids) == 12
        check_against_full_forward(model, p, o)


def test_chunked_prefill_equals_one_shot(ckpt, model):
    prompts = prompts_of([150, 90])
    one = run(make_engine(ckpt, model, max_num_batched_tokens=1024), prompts, [greedy(6)] * 2)
    chunked = run(make_engine(ckpt, model, max_num_batched_tokens=37), prompts, [greedy(6)] * 2)
    for a, b in zip(one, chunked):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4


def test_preemption_equals_uninterrupted(ckpt, model):
    prompts = prompts_of([100, 100, 100, 100], seed=5)
    ref = run(make_engine(ckpt, model), prompts, [greedy(40)] * 4)
    # 8 blocks of 64 slots cannot hold 4 x 140 tokens: sequences get preempted and recomputed
    eng = make_engine(ckpt, model, num_blocks=8, max_model_len=256)
    outs = run(eng, prompts, [greedy(40)] * 4)
    assert eng.scheduler.num_preemptions > 0
    for a, b in zip(ref, outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_prefix_hits_equal_cold_runs(ckpt, model):
    shared = prompts_of([200], seed=7)[0]
    p1, p2 = shared + [11, 12, 13], shared + [21, 22]
    cold = run(make_engine(ckpt, model, enable_prefix_caching=False), [p2], [greedy(8)])[0]
    eng = make_engine(ckpt, model)
    first = run(eng, [p1], [greedy(8)])[0]
    warm = run(eng, [p2], [greedy(8)])[0]
    assert first.num_cached_tokens == 0
    assert warm.num_cached_tokens == 192                      # three full blocks of 64
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    m = eng.metrics()
    assert m["prefix_cache_hits"] == 192 and m["kv_cache_usage_perc"] == 0.0


def test_prompt_logprobs_equal_full_forward_chunked_and_after_a_prefix_hit(ckpt, model):
    """Every prompt token's logprob (token 0: None) and its top-k equal log_softmax of a full
    forward, in one-shot and chunked prefill, and when another request cached the prefix."""
    prompt = prompts_of([150], seed=9)[0]
    with torch.no_grad():
        lp = model(torch.tensor([prompt])).log_softmax(-1)[0]
    for batched_tokens in (1024, 37):
        eng = make_engine(ckpt, model, max_num_batched_tokens=batched_tokens)
        run(eng, [prompt], [greedy(2)])                        # caches the prompt's blocks
        out = run(eng, [prompt], [greedy(2, prompt_logprobs=3)])[0]
        assert out.num_cached_tokens == 0                      # computed again, not served from cache
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for j in range(1, len(prompt)):
            row = lp[j - 1]
            assert got[j].token_id == prompt[j] and abs(got[j].logprob - row[prompt[j]].item()) < 1e-3
            assert [t for t, _ in got[j].top] == row.topk(3).indices.tolist()
    assert run(make_engine(ckpt, model), [prompt], [greedy(2)])[0].prompt_logprobs is None


def test_prompt_logprobs_with_several_samples(ckpt, model):
    """n > 1 with prompt logprobs: the forked samples start with the prompt's logprobs (a fork used
    to look as if it still had the prompt to compute and failed the engine step)."""
    prompt = prompts_of([40], seed=4)[0]
    eng = make_engine(ckpt, model)
    one = run(eng, [prompt], [greedy(3, prompt_logprobs=2)])[0]
    two = run(eng, [prompt], [SamplingParams(temperature=1.0, max_tokens=3, n=2, seed=1, prompt_logprobs=2)])[0]
    assert len(two.outputs) == 2 and all(len(o.token_ids) == 3 for o in two.outputs)
    assert [(x.token_id, round(x.logprob, 4)) for x in two.prompt_logprobs[1:]] == \
        [(x.token_id, round(x.logprob, 4)) for x in one.prompt_logprobs[1:]]
    assert eng.metrics()["kv_cache_usage_perc"] == 0.0


def test_abort_frees_every_block(ckpt, model):
    eng = make_engine(ckpt, model)
    total = eng.block_manager.num_free_blocks
    for i, p in enumerate(prompts_of([100, 30, 70])):
        eng.add_request(f"a{i}", p, greedy(50))
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks < total
    for i in range(3):
        out = eng.abort_request(f"a{i}")
        assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not eng.has_unfinished()
    assert eng.block_manager.num_free_blocks == total and eng.metrics()["kv_cache_usage_perc"] == 0.0


def test_seed_reproduces_sampling(ckpt, model):
    prompts = prompts_of([20, 20])
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    a = run(make_engine(ckpt, model), prompts[:1], [sp])[0]
    # same seed in a different batch composition gives the same tokens
    b = run(make_engine(ckpt, model), prompts, [sp, SamplingParams(temperature=1.0, max_tokens=10, seed=9)])[0]
    c = run(make_engine(ckpt, model), prompts[:1], [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10,
                                                                  seed=4321, ignore_eos=True)])[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].token_ids != c.outputs[0].token_ids


def test_n_greater_than_one_shares_the_prompt(ckpt, model):
    prompt = prompts_of([130])[0]
    eng = make_engine(ckpt, model)
    out = run(eng, [prompt], [SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5, ignore_eos=True,
                                             logprobs=0)])[0]
    assert len(out.outputs) == 3 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:                                        # each child continues the shared prompt
        check_against_full_forward(model, prompt, type(out)(out.request_id, prompt, [o]), greedy=False)
    assert eng.metrics()["kv_cache_usage_perc"] == 0.0


def test_stop_strings_cut_correctly(ckpt, model):
    eng = make_engine(ckpt, model)
    prompt = prompts_of([12], seed=2)[0]
    free = run(eng, [prompt], [greedy(20)])[0].outputs[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:6]
    cut = run(eng, [prompt], [greedy(20, stop=[stop])])[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    incl = run(eng, [prompt], [greedy(20, stop=[stop], include_stop_str_in_output=True)])[0].outputs[0]
    assert incl.text == text[: text.index(stop) + len(stop)]
    tok = free.token_ids[4]
    by_id = run(eng, [prompt], [greedy(20, stop_token_ids=[tok])])[0].outputs[0]
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]
    assert by_id.stop_reason == tok
    assert run(eng, [prompt], [greedy(5)])[0].outputs[0].finish_reason == "length"


def bf16_roundtrip(latent: torch.Tensor, index_k: torch.Tensor):
    return latent.to(torch.bfloat16).to(latent.dtype), index_k.to(torch.bfloat16).to(index_k.dtype)


def assert_greedy_over_a_rounding_cache(model, prompt: list[int], tokens: list[int], cache: str, max_len: int):
    """Each token is the argmax of fp32 forwards (prompt, then one token at a time) over a cache of
    max_len tokens that rounds what it stores as the `cache` dtype would (to bf16 and back, or FP8
    quantise-dequantise)."""
    cfg = model.config
    kv = ContiguousKV(cfg.num_hidden_layers + 1, 1, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                      cfg.index_head_dim,
                      quantize=bf16_roundtrip if cache == "bfloat16" else fp8_roundtrip(cfg.kv_lora_rank))
    toks = list(prompt)
    kv.begin(0, len(toks))
    with torch.no_grad():
        logits = model(torch.tensor([toks]), kv=kv)[0, -1]
        for t in tokens:
            assert t == int(logits.argmax())
            toks.append(t)
            kv.begin(len(toks) - 1, 1)
            logits = model(torch.tensor([[t]]), torch.tensor([[len(toks) - 1]]), kv)[0, -1]


@pytest.mark.parametrize("cache", ["fp8", "fp8_e4m3", "bfloat16"])
@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_fp8_and_bf16_caches_equal_a_rounding_reference(ckpt, model, fmt, cache):
    """Eager decode over the FP8 or bf16 cache (fp32), and the native one-row attention over its
    pools (bf16 weights, exact on this bf16 checkpoint), against fp32 forwards over a cache that
    rounds what it stores the same way (quantise-dequantise; to bf16 and back)."""
    prompt = prompts_of([90], seed=9)[0]
    served = model if fmt == "fp32" else load_model(ckpt, weight_format=fmt, progress=False)
    eng = make_engine(ckpt, served, kv_cache_dtype=cache)
    pools = (eng.executor.cache.c, eng.executor.cache.ik) if cache != "bfloat16" else (eng.executor.cache.lat,)
    assert {t.dtype for t in pools} == {torch.bfloat16 if cache == "bfloat16" else torch.float8_e4m3fn}
    out = run(eng, [prompt], [greedy(8)])[0]
    assert_greedy_over_a_rounding_cache(model, prompt, out.outputs[0].token_ids, cache, 128)


@pytest.mark.parametrize("cache", ["fp8", "bfloat16"])
def test_many_heads_over_bf16_and_fp8_caches_equal_a_rounding_reference(tmp_path, cache):
    """32 heads and a top-k of 64: the native attention's shapes that take AMX tiles where the CPU
    has them (amx_attention.cpp: 16+ heads, 64+ rows), in prefill (sparse_prefill, chunks of 48
    tokens over earlier keys) and decode, against fp32 forwards over a rounding cache."""
    path = init_tiny(tmp_path, seed=5, layers=2, heads=32, topk=64, kv_lora=128, index_dim=128, index_heads=16)
    model = load_model(path)
    eng = make_engine(path, model, kv_cache_dtype=cache, max_num_batched_tokens=48)
    prompt = prompts_of([150], seed=11)[0]
    out = run(eng, [prompt], [greedy(6)])[0]
    assert_greedy_over_a_rounding_cache(model, prompt, out.outputs[0].token_ids, cache, 256)


def test_offline_llm_api(ckpt):
    llm = LLM(model=str(ckpt), max_model_len=256, max_num_seqs=4)
    outs = llm.generate(["Hello there", {"prompt_token_ids": [5, 6, 7]}], greedy(4), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    assert outs[0].prompt == "Hello there" and outs[1].prompt_token_ids == [5, 6, 7]


def test_bad_requests_raise_clear_errors(ckpt, model):
    eng = make_engine(ckpt, model, max_model_len=128)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("x", [1] * 100, SamplingParams(max_tokens=50))
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("y", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request("z", [10 ** 7], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)

"""The engine with packed weights: its fast decode (model/decode.py: compiled graphs around the
native attention of each row over the paged cache, ragged batches) against full forwards of the same weights
through the eager reference."""
import pytest
import torch

from dsv32.model import decode
from dsv32.model.block import Block
from dsv32.model.cpu import build, native
from dsv32.model.cpu.compile import kernel
from dsv32.model.cpu.layer import NativeLayer
from dsv32.model.checkpoint import load_model
from dsv32.engine.config import EngineConfig
from dsv32.engine.engine import LLMEngine
from dsv32.model.init_tiny import init_tiny
from dsv32.model.layers import Linear

from .test_engine import check_against_full_forward, greedy, make_engine, prompts_of, run


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("packed_tiny"), seed=3, layers=2, topk=16, index_heads=16)


def test_int8_engine_decode_equals_full_forward(ckpt, monkeypatch):
    """A batch in the compiled graphs (rows past decode.ROWS_MAX: here from two on)."""
    monkeypatch.setattr(decode, "ROWS_MAX", 1)
    model = load_model(ckpt, weight_format="int8", progress=False)
    steps, calls = [], []
    real, attention = decode.step, native.decode_attention
    monkeypatch.setattr(decode, "step", lambda *a: steps.append(a[1].shape[0]) or real(*a))
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(a[6]) or attention(*a))
    prompts = prompts_of([30, 9, 45])                    # sparse selection and all-keys rows, ragged
    outs = run(make_engine(ckpt, model), prompts, [greedy(6)] * 3)
    assert 3 in steps                                    # a decode step of all three rows took it
    assert len(calls) == sum(steps)                      # each row of each block step: one native call
    for m in model.modules():
        if isinstance(m, Block):
            m.forward = m.reference                      # full forwards: eager, T > 1 anyway
    for p, o in zip(prompts, outs):
        check_against_full_forward(model, p, o)


@pytest.mark.parametrize("fmt", ["int8", "fp32"])
def test_small_batches_of_cached_blocks_run_each_row_through_the_native_layer(ckpt, fmt, monkeypatch):
    """Up to decode.ROWS_MAX rows of blocks whose weights fit 1/8 of the CPU's last-level cache:
    each row in the native layer's two calls, equal to full forwards; blocks that would not stay
    cached take the batch graphs."""
    model = load_model(ckpt, weight_format=fmt, progress=False)
    steps, calls = [], []
    real_step, real_attention = decode.step, NativeLayer.attention
    monkeypatch.setattr(decode, "step", lambda *a: steps.append(a[1].shape[0]) or real_step(*a))
    monkeypatch.setattr(NativeLayer, "attention", lambda self, *a: calls.append(1) or real_attention(self, *a))
    monkeypatch.setattr(decode, "cache_bytes", lambda: 1 << 30)         # (read at each step)
    prompts = prompts_of([30, 9, 45])
    outs = run(make_engine(ckpt, model), prompts, [greedy(6)] * 3)
    assert 3 in steps and len(calls) == sum(steps)                      # every row of every block step
    n = decode._native_layer(next(m for m in model.modules() if isinstance(m, Block)))
    monkeypatch.setattr(decode, "cache_bytes", lambda: 8 * n.nbytes - 8)   # no longer fits: graphs
    steps.clear(), calls.clear()
    again = run(make_engine(ckpt, model), prompts, [greedy(6)] * 3)
    assert 3 in steps and len(calls) < sum(steps)
    for m in model.modules():
        if isinstance(m, Block):
            m.forward = m.reference
    for p, o, o2 in zip(prompts, outs, again):
        check_against_full_forward(model, p, o)
        check_against_full_forward(model, p, o2)


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_one_row_decode_runs_the_native_layer_and_equals_full_forward(ckpt, fmt, monkeypatch):
    """One row: each block in two native calls (cpu/layer.py), no compiled graph of a block."""
    model = load_model(ckpt, weight_format=fmt, progress=False)
    calls = []
    real = NativeLayer.attention
    monkeypatch.setattr(NativeLayer, "attention", lambda self, *a: calls.append(1) or real(self, *a))
    prompts = prompts_of([30])
    outs = run(make_engine(ckpt, model), prompts, [greedy(6)])
    assert len(calls) >= 5 * 2                           # every decode step of both blocks
    graphs = kernel(decode._attn_in, "Block", True).bound
    assert not any(m in graphs for m in model.modules())  # no block ran a compiled graph
    for m in model.modules():
        if isinstance(m, Block):
            m.forward = m.reference
    check_against_full_forward(model, prompts[0], outs[0])


def test_one_row_decode_of_blocks_the_native_layer_cannot_take_runs_the_direct_graphs(ckpt, monkeypatch):
    """Where the native row does not fit the block, one row runs the traced graphs (cpu/compile.py)
    with static shapes instead of torch.compile's dynamic ones."""
    model = load_model(ckpt, weight_format="int8", progress=False)
    monkeypatch.setattr(NativeLayer, "fits", staticmethod(lambda block: None))
    prompts = prompts_of([30])
    outs = run(make_engine(ckpt, model), prompts, [greedy(6)])
    k = kernel(decode._attn_in, "Block", True)
    assert k.graphs and all(None not in key[1][2][0] for key in k.graphs)   # static shapes only
    for m in model.modules():
        if isinstance(m, Block):
            m.forward = m.reference
    check_against_full_forward(model, prompts[0], outs[0])


def test_fp32_decode_takes_the_compiled_path_and_without_a_compiler_the_eager_one(ckpt, monkeypatch):
    """fp32 weights on the CPU decode through the same graphs and native attention (equal to full
    forwards); with no C++ compiler found they run the eager blocks, and a warning says so."""
    from dsv32.model.cpu.build import KernelError
    model = load_model(ckpt, progress=False)
    prompts = prompts_of([30, 9])
    steps = []
    real = decode.step
    monkeypatch.setattr(decode, "step", lambda *a: steps.append(a[1].shape[0]) or real(*a))
    monkeypatch.setattr(decode, "ROWS_MAX", 1)           # two rows: the batch graphs, not the native rows
    graphs = kernel(decode._attn_in, "Block", False).graphs
    graphs.clear()
    compiled = run(make_engine(ckpt, model), prompts, [greedy(6)] * 2)
    assert 2 in steps and graphs                          # the fp32 blocks took the batch graphs
    for p, o in zip(prompts, compiled):
        check_against_full_forward(model, p, o)

    def missing():
        raise KernelError("no C++ compiler (test)")
    monkeypatch.setattr(build, "require_compiler", missing)
    build.has_compiler.cache_clear()
    try:
        steps.clear()
        with pytest.warns(UserWarning, match="fp32 CPU decode, the indexer's top-k and head sum and the sparse "
                                             "prefill run their slower eager paths: no C\\+\\+ compiler"):
            eager = run(make_engine(ckpt, model), prompts, [greedy(6)] * 2)
        assert not steps
        assert [o.outputs[0].token_ids for o in eager] == [o.outputs[0].token_ids for o in compiled]
    finally:
        build.has_compiler.cache_clear()


def test_warmup_decodes_batches_before_serving_and_leaves_the_engine_as_it_was(ckpt, monkeypatch):
    """LLMEngine.warmup (the server runs it before it reports ready): 2 rows side by side, and past
    decode.ROWS_MAX where max_num_seqs allows, through the batch graphs; then no request, no block
    held and no token counted; it refuses to run beside requests in flight."""
    model = load_model(ckpt, weight_format="int8", progress=False)
    eng = make_engine(ckpt, model, max_num_seqs=4)
    monkeypatch.setattr(decode, "ROWS_MAX", 2)
    steps = []
    real = decode.step
    monkeypatch.setattr(decode, "step", lambda *a: steps.append(a[1].shape[0]) or real(*a))
    free = eng.block_manager.num_free_blocks
    assert eng.warmup() > 0
    assert {2, 3} <= set(steps)                          # ROWS_MAX + 1 = 3 rows: the graphs' batch
    assert kernel(decode._attn_in, "Block", False).graphs                # the batch graphs were built
    assert not eng.has_unfinished() and eng.block_manager.num_free_blocks == free
    assert all(eng.metrics()[k] == 0 for k in ("prompt_tokens", "generation_tokens", "prefix_cache_queries",
                                               "prefix_cache_hits", "num_preemptions", "spec_draft_tokens"))
    eng.add_request("r0", prompts_of([5])[0], greedy(2))
    with pytest.raises(RuntimeError, match="in flight"):
        eng.warmup()
    tight = make_engine(ckpt, model, max_model_len=4)                   # shorter prompts than the usual 8
    tight.warmup()
    assert not tight.has_unfinished()


def test_bf16_prefill_engine(ckpt):
    """--prefill-dtype bfloat16 reaches the engine's model; its prompts' tokens come from the bf16
    products (the first sampled token is the fast model's own prefill argmax), decode from the GEMV."""
    engine = LLMEngine(EngineConfig(model=str(ckpt), max_model_len=512, weight_format="int8",
                                    prefill_dtype="bfloat16"))
    model = engine.executor.model
    assert {m.prefill_dtype for m in model.modules() if isinstance(m, Linear) and m.packed} == {torch.bfloat16}
    prompts = prompts_of([60, 45])
    outs = run(engine, prompts, [greedy(4)] * 2)
    for p, o in zip(prompts, outs):
        with torch.inference_mode():
            first = model(torch.tensor([p]))[0, -1].argmax().item()
        assert o.outputs[0].token_ids[0] == first and len(o.outputs[0].token_ids) == 4

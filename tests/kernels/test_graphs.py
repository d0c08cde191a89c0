"""GraphedStep: buckets, padding, and (on CUDA) graph replays equal to eager calls."""
import pytest
import torch

from dsv32.engine.cache import PagedCache
from dsv32.kernels.graphs import Arg, GraphedStep, bucket, pad
from dsv32.kernels.layer import STEP_ARGS, FastModel

from .conftest import CUDA, DEVICE
from .test_layer import BS, pack, tiny



def test_bucket_and_pad():
    assert [bucket(n, (1, 4, 16)) for n in (1, 2, 4, 5, 16, 17)] == [1, 4, 4, 16, 16, None]
    x = torch.tensor([[1, 2], [3, 4]])
    assert pad(x, 3, -1, 4).tolist() == [[1, 2, -1, -1], [3, 4, -1, -1], [-1, -1, -1, -1]]
    assert pad(torch.tensor([5, 6]), 4, 0).tolist() == [5, 6, 0, 0]
    assert pad(torch.ones(1, 2, 3), 2, 0).shape == (2, 2, 3)


def test_keys_and_fallback():
    calls = []
    g = GraphedStep(lambda a, t: calls.append((a.shape, t.shape)) or a.float(), [Arg(7), Arg(0, width=True)],
                    batch_buckets=(2, 8), width_buckets=(4, 16))
    assert g.key([torch.zeros(3), torch.zeros(3, 5)]) == (8, 16)
    out = g(torch.arange(3), torch.zeros(3, 5, dtype=torch.long))
    assert calls[-1] == ((8,), (8, 16)) and out.tolist() == [0, 1, 2]
    g(torch.arange(9), torch.zeros(9, 2, dtype=torch.long))            # beyond the buckets: eager
    assert calls[-1] == ((9,), (9, 2)) and g.eager_calls == 1
    with pytest.raises(ValueError):
        g(torch.arange(2))


def decode_inputs(B, ctx):
    """B rows decoding their token at position ctx[b] - 1 over disjoint block tables."""
    nb = -(-max(ctx) // BS)
    tables = torch.arange(B * nb, device=DEVICE).view(B, nb)
    rows = [(c - 1, [(7 * b + c) % 96]) for b, c in enumerate(ctx)]
    ids, pos, slots, _, last = pack(rows, tables)
    return ids, pos, slots, tables, last


@pytest.mark.parametrize("use_graphs", [False] + ([True] if CUDA else []))
def test_padded_step_equals_unpadded(use_graphs):
    """Rows padded into a bucket (batch and table width) give the logits of the unpadded call;
    on CUDA the captured graph's replays equal eager calls, call after call."""
    m = tiny()
    cache = PagedCache(2, 64, 128, 64, 128, block_size=BS, device=DEVICE, fp8=True)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for name in ("c", "pe", "ik"):                           # a filled cache, random contents
        t = getattr(cache, name)
        t.copy_(torch.randn(t.shape, device=DEVICE, generator=g).to(t.dtype))
    cache.c_scale.uniform_(0.01, 0.02, generator=g)
    cache.ik_scale.uniform_(0.01, 0.02, generator=g)
    fast = FastModel(m, cache, "torch")
    step = GraphedStep(fast.step, STEP_ARGS, batch_buckets=(2, 4), width_buckets=(8, 16), use_graphs=use_graphs)
    for ctx in ([9, 30], [17, 5, 28]):
        x = decode_inputs(len(ctx), ctx)
        want = fast.step(*x)
        got = step(*x)
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert step.eager_calls == 0
    if use_graphs:
        assert set(step.graphs) == {(2, 8), (4, 8)}


@pytest.mark.skipif(not CUDA, reason="host synchronisations are detected on a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fast_step_never_syncs(backend):
    m = tiny()
    cache = PagedCache(2, 64, 128, 64, 128, block_size=BS, device=DEVICE, fp8=True)
    fast = FastModel(m, cache, backend)
    x = decode_inputs(3, [9, 30, 12])
    fast.step(*x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast.step(*x)
    finally:
        torch.cuda.set_sync_debug_mode("default")

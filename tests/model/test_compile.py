"""model/cpu/compile.py: kernels that trace a function of a module and tensors once and call the
inductor graph directly; held to the eager function."""
import torch
from torch import nn

from dsv32.model.cpu.compile import dynamic, kernel
from dsv32.model.layers import Linear, RMSNorm

G = torch.Generator().manual_seed(0)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(32, 1e-6)
        self.up = Linear(32, 48)
        self.unused = Linear(32, 1000)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=G))


def _f(m: Tiny, x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.relu(m.up(m.norm(x))) * scale


def test_kernel_equals_eager_and_layers_share_a_graph_not_weights():
    a, b = Tiny(), Tiny()
    x = torch.randn(1, 32, generator=G)
    k = kernel(_f, "share")
    with torch.inference_mode():
        for m in (a, b, a):
            torch.testing.assert_close(k(m, x, 2.0), _f(m, x, 2.0), rtol=1e-5, atol=1e-5)
    assert len(k.graphs) == 1                           # same shapes: one graph, weights are inputs
    bound = k.bound[a][next(iter(k.bound[a]))]
    assert [n for _, n in bound.where] == ["weight", "weight"]     # norm, up: not `unused`

def test_kernel_follows_replaced_weights_shapes_and_static_values():
    m = Tiny()
    k = kernel(_f, "replace")
    x = torch.randn(1, 32, generator=G)
    with torch.inference_mode():
        k(m, x, 1.0)
        m.up.weight = nn.Parameter(torch.randn(48, 32, generator=G))          # a new object
        torch.testing.assert_close(k(m, x, 1.0), _f(m, x, 1.0), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            m.up.weight.mul_(-1)                                              # in place: still read
        torch.testing.assert_close(k(m, x, 1.0), _f(m, x, 1.0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k(m, x, 3.0), _f(m, x, 3.0), rtol=1e-5, atol=1e-5)
        x3 = torch.randn(3, 32, generator=G)
        torch.testing.assert_close(k(m, x3, 1.0), _f(m, x3, 1.0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k(m, dynamic(x3.clone(), 0), 1.0), _f(m, x3, 1.0), rtol=1e-5, atol=1e-5)


def test_a_graph_built_again_comes_from_inductors_cache():
    """What a fresh process does: the same function and shapes traced again hit inductor's FX graph
    cache (no 'No shape env' bypass), instead of compiling every graph for ~10 s again."""
    from torch._dynamo.utils import counters
    m, x = Tiny(), torch.randn(1, 32, generator=G)
    with torch.inference_mode():
        want = kernel(_f, "cache", 1)(m, x, 5.0)                  # built (or already cached on disk)
        before = dict(counters["inductor"])
        got = kernel(_f, "cache", 2)(m, x, 5.0)                   # another key: built again
    hits = counters["inductor"]["fxgraph_cache_hit"] - before.get("fxgraph_cache_hit", 0)
    assert hits == 1 and counters["inductor"]["fxgraph_cache_bypass"] == before.get("fxgraph_cache_bypass", 0)
    torch.testing.assert_close(got, want)


def test_a_dynamic_dim_is_traced_symbolic_into_one_graph_for_every_size():
    """Rows marked `dynamic` (batched decode): one graph, traced on fake tensors and called
    directly for 2, 3 and 9 rows, the module's weights its inputs (a replaced weight is read), the
    module left holding its own tensors after the trace, and no torch.compile (dynamo) frame."""
    from torch._dynamo.utils import counters
    a, b = Tiny(), Tiny()
    weights = [p for p in a.parameters()]
    k = kernel(_f, "symbolic")
    frames = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for m, rows in ((a, 2), (a, 3), (b, 9)):
            x = torch.randn(rows, 32, generator=G)
            torch.testing.assert_close(k(m, dynamic(x.clone(), 0), 0.5), _f(m, x, 0.5), rtol=1e-5, atol=1e-5)
        assert len(k.graphs) == 1 and all(p is q for p, q in zip(a.parameters(), weights))
        assert all(type(p) is nn.Parameter for p in a.parameters())
        a.up.weight = nn.Parameter(torch.randn(48, 32, generator=G))
        x = torch.randn(4, 32, generator=G)
        torch.testing.assert_close(k(a, dynamic(x.clone(), 0), 0.5), _f(a, x, 0.5), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == frames

"""Decode on the common benchmark model (bench/common.py, FP8 weights): greedy tokens of the eager
path (the runner's compute: Transformer.hidden over PagedKV; and the engine itself where its
imports are there) == a greedy loop over FastModel.step replayed as CUDA graphs (GraphedStep),
and ms/token of each at a few contexts. The loops do the runner's per-step host work (build the
step's tensors, copy them, read the token back); they stand in for the engine's runner until it
calls GraphedStep itself.

    python bench/gpu_decode.py [--contexts 1024,8192,32768] [--steps 32] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import bench_model_dir, markdown_table


def step_inputs(rows, tables, device):
    """rows: (first position, tokens) per sequence -> ids, pos, slots, tables, last, ctx, packed as
    the runner packs them (block size 64) on the host and copied like the runner's."""
    from dsv32.engine.batch import pack_tables
    x = pack_tables([(tables[b].tolist(), s, toks) for b, (s, toks) in enumerate(rows)], 64)
    return [t.to(device, non_blocking=True) for t in (x.ids, x.pos, x.slots, x.tables, x.last, x.ctx)]


class Eager:
    """The runner's compute: a PagedKV over the cache, Transformer.hidden, logits of `last`."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    @torch.inference_mode()
    def __call__(self, ids, pos, slots, tables, last, ctx):
        from dsv32.engine.cache import PagedKV
        h = self.model.hidden(ids, pos, PagedKV(self.cache, tables, ctx, slots))
        return self.model.logits(h[torch.arange(h.shape[0], device=h.device), last])


def stepper(model, blocks, device, backend, fast: bool, widths):
    """A step callable over a fresh cache: eager, or FastModel.step through GraphedStep."""
    from dsv32.engine.cache import PagedCache
    cfg = model.config
    cache = PagedCache(cfg.num_hidden_layers, blocks, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim,
                       dtype=model.model.embed_tokens.weight.dtype, device=device)
    if not fast:
        return Eager(model, cache), None
    from dsv32.kernels.graphs import GraphedStep
    from dsv32.kernels.layer import STEP_ARGS, FastModel
    fm = FastModel(model, cache, backend)
    graphed = GraphedStep(fm.step, STEP_ARGS, batch_buckets=(1, 2, 4), width_buckets=widths)
    return (lambda ids, pos, slots, tables, last, ctx: graphed(ids, pos, slots, tables, last)), graphed


def greedy(step, prompts, n, device):
    """Prefill each prompt alone, then decode all rows together: the generated tokens per prompt."""
    tables = torch.arange(len(prompts) * 16).view(len(prompts), 16)
    seqs = [list(p) for p in prompts]
    for b, p in enumerate(prompts):
        seqs[b].append(int(step(*step_inputs([(0, p)], tables[b:b + 1], device))[0].argmax()))
    for _ in range(n - 1):
        logits = step(*step_inputs([(len(s) - 1, [s[-1]]) for s in seqs], tables, device))
        for s, tok in zip(seqs, logits.argmax(-1).tolist()):
            s.append(tok)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def ms_per_token(step, L: int, steps: int, nb: int, device) -> float:
    """Batch-1 decode at context L (the first L-1 cache entries left as allocated): median wall ms
    per token of host prep + the step + reading the token back."""
    tables = torch.arange(nb).view(1, nb)
    tok, times = 1234, []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        tok = int(step(*step_inputs([(L - 1 + i, [tok])], tables, device))[0].argmax())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[3:])


def engine_greedy(path, model, prompts, n, device):
    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[model.model.embed_tokens.weight.dtype]
    eng = LLMEngine(EngineConfig(model=str(path), dtype=dtype, device=device, fp8_storage=True, max_model_len=1024,
                                 enable_prefix_caching=False, num_blocks=64), model=model)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(prompts))]


def compare(name, ref, got) -> str:
    same = sum(a == b for a, b in zip(ref, got))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ref, got)]
    return f"{name}: {same}/{len(ref)} prompts equal (first differing step per prompt: {first})"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 8192, 32768])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (torch backend, no graphs)")
    args = ap.parse_args(argv)
    dev = args.device
    backend = "triton" if dev == "cuda" else "torch"
    torch.backends.cuda.matmul.allow_tf32 = False
    from dsv32.model.checkpoint import load_model
    path = bench_model_dir()
    load = lambda dtype: load_model(path, dtype=dtype, device=dev, fp8_storage=True, progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (n,), generator=g).tolist() for n in (40, 96)]
    out = [f"{dev}, backend {backend}; greedy tokens in fp32 with FP8 weights, 24 per prompt:"]
    ref = greedy(stepper(load(torch.float32), 64, dev, backend, False, ())[0], prompts, 24, dev)
    fast_step, graphed = stepper(load(torch.float32), 64, dev, backend, True, (4, 8, 16))
    got = greedy(fast_step, prompts, 24, dev)
    out.append(compare("runner's eager compute == FastModel + GraphedStep", ref, got)
               + f"; graphs captured {sorted(graphed.graphs)}")
    try:
        out.append(compare("engine (eager) == FastModel + GraphedStep", engine_greedy(path, load(torch.float32),
                                                                                      prompts, 24, dev), got))
        from decode_longctx import dsv32_ms_per_token
        from dsv32.chat import Tokenizer
        engine = (dsv32_ms_per_token, Tokenizer.load(path))
    except ImportError as e:                                     # the GPU image lacks llguidance
        out.append(f"engine not run: {e} (carry its wheel: see bench/gpu_check.sh)")
        engine = None
    print("\n".join(out), flush=True)
    half = torch.bfloat16 if dev == "cuda" else torch.float32
    eager_m, fast_m, engine_m = load(half), load(half), (load(half) if engine else None)
    rows = []
    for L in args.contexts:
        nb = (L + args.steps + 64) // 64 + 1
        e = ms_per_token(stepper(eager_m, nb, dev, backend, False, ())[0], L, args.steps, nb, dev)
        f = ms_per_token(stepper(fast_m, nb, dev, backend, True, (nb,))[0], L, args.steps, nb, dev)
        en = f"{engine[0](engine_m, engine[1], path, L, args.steps):.2f}" if engine else "not run"
        rows.append([L, en, f"{e:.2f}", f"{f:.2f}", f"{e / f:.1f}x"])
        print(rows[-1], flush=True)
    name = "bf16" if dev == "cuda" else "fp32, CPU dry run, no graphs"
    out.append(markdown_table(["context", f"engine ms/token ({name})", f"eager loop ms/token ({name})",
                               f"FastModel + GraphedStep ms/token ({name})", "eager / fast"], rows))
    text = "\n\n".join(out)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()

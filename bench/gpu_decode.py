"""Decode on the common benchmark model (bench/common.py, FP8 weights): greedy tokens of the
engine (eager path) == a greedy loop over FastModel.step replayed as CUDA graphs (GraphedStep),
and ms/token of both at a few contexts. The loop stands in for the engine's runner until the
runner calls GraphedStep itself; it does the runner's per-step host work (build the step's
tensors, copy them, read the token back).

    python bench/gpu_decode.py [--contexts 1024,8192,32768] [--steps 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import bench_model_dir, markdown_table



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


def step_inputs(rows, tables, device):
    """rows: (first position, tokens) per sequence -> ids, pos, slots, tables, last (the runner's
    _pack, block size 64), built on the host and copied like the runner's."""
    B, T = len(rows), max(len(t) for _, t in rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    slots = torch.full((B, T), -1, dtype=torch.long)
    last = torch.zeros(B, dtype=torch.long)
    for b, (s, toks) in enumerate(rows):
        n = len(toks)
        p = torch.arange(s, s + n)
        ids[b, :n], pos[b, :n], pos[b, n:], last[b] = torch.tensor(toks), p, s + n - 1, n - 1
        slots[b, :n] = tables[b][p // 64] * 64 + p % 64
    return [t.to(device, non_blocking=True) for t in (ids, pos, slots, tables, last)]


def fast_greedy(model, prompts, n, device, backend):
    """Prefill each prompt with FastModel.step, then decode all rows together through graphs."""
    from dsv32.engine.cache import PagedCache
    from dsv32.kernels.graphs import GraphedStep
    from dsv32.kernels.layer import STEP_ARGS, FastModel
    cfg = model.config
    cache = PagedCache(cfg.num_hidden_layers, 64, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim,
                       dtype=model.model.embed_tokens.weight.dtype, device=device)
    fast = FastModel(model, cache, backend)
    graphed = GraphedStep(fast.step, STEP_ARGS, batch_buckets=(1, 2, 4), width_buckets=(4, 8, 16))
    tables = torch.arange(len(prompts) * 16).view(len(prompts), 16)
    seqs = [list(p) for p in prompts]
    for b, p in enumerate(prompts):
        logits = fast.step(*step_inputs([(0, p)], tables[b:b + 1], device))
        seqs[b].append(int(logits[0].argmax()))
    for _ in range(n - 1):
        rows = [(len(s) - 1, [s[-1]]) for s in seqs]
        logits = graphed(*step_inputs(rows, tables, device))
        for s, tok in zip(seqs, logits.argmax(-1).tolist()):
            s.append(tok)
    return [s[len(p):] for s, p in zip(seqs, prompts)], graphed


def fast_ms_per_token(model, L: int, steps: int, device, backend) -> float:
    """Batch-1 decode at context L (the first L-1 cache entries left as allocated): wall ms per
    token of host prep + graph replay + reading the token back."""
    from dsv32.engine.cache import PagedCache
    from dsv32.kernels.graphs import GraphedStep
    from dsv32.kernels.layer import STEP_ARGS, FastModel
    cfg = model.config
    nb = (L + steps + 64) // 64 + 1
    cache = PagedCache(cfg.num_hidden_layers, nb, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim,
                       dtype=model.model.embed_tokens.weight.dtype, device=device)
    fast = FastModel(model, cache, backend)
    graphed = GraphedStep(fast.step, STEP_ARGS, batch_buckets=(1,), width_buckets=(nb,))
    tables = torch.arange(nb).view(1, nb)
    tok, times = 1234, []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        logits = graphed(*step_inputs([(L - 1 + i, [tok])], tables, device))
        tok = int(logits[0].argmax())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[3:])


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
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (n,), generator=g).tolist() for n in (40, 96)]
    out = []
    load = lambda dtype: load_model(path, dtype=dtype, device=dev, fp8_storage=True, progress=False)
    ref = engine_greedy(path, load(torch.float32), prompts, 24, dev)
    got, graphed = fast_greedy(load(torch.float32), prompts, 24, dev, backend)
    same = sum(a == b for a, b in zip(ref, got))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ref, got)]
    out.append(f"{dev}, backend {backend}: greedy tokens, fp32, FP8 weights: engine (eager) == FastModel + GraphedStep: {same}/{len(prompts)} "
               f"prompts (first differing step per prompt: {first}); graphs captured {sorted(graphed.graphs)}")
    print(out[-1], flush=True)
    from decode_longctx import dsv32_ms_per_token
    from dsv32.chat import Tokenizer
    tok = Tokenizer.load(path)
    half = torch.bfloat16 if dev == "cuda" else torch.float32
    eager_m, fast_m = load(half), load(half)
    rows = []
    for L in args.contexts:
        e = dsv32_ms_per_token(eager_m, tok, path, L, args.steps)
        f = fast_ms_per_token(fast_m, L, args.steps, dev, backend)
        rows.append([L, f"{e:.2f}", f"{f:.2f}", f"{e / f:.1f}x"])
        print(rows[-1], flush=True)
    name = "bf16" if dev == "cuda" else "fp32 (CPU dry run: no graphs)"
    out.append(markdown_table(["context", f"engine eager {name} ms/token", f"FastModel + graphs {name} ms/token",
                               "speed-up"], rows))
    text = "\n\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()

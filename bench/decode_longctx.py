"""Milliseconds per decoded token at long contexts: dsv32's engine vs Hugging Face transformers on
the same checkpoint (the common benchmark model, or the weight-bound "wide" one), in the same
process, fp32 on CPU.

    python bench/decode_longctx.py [--model bench] [--contexts 1024 4096 8192 32768 65536] [--steps 8]
                                   [--rounds 3] [--hf-max 8192] [--weight-format fp32] [--write-readme]

dsv32's contexts are timed in alternating rounds (every context's engine built first, then `steps`
steps of each in turn, the best round kept), so that a host whose speed drifts by minutes (this
one's does, up to 2x) moves every context alike and the ratio to the first context stays fair.

Both caches are filled directly with random latents and indexer keys instead of spending minutes
on prefill (dsv32: blocks allocated and marked computed, their slots written; transformers: its
DynamicCache). Random keys score like a real context's; zeroed ones would tie every score. dsv32
attends to index_topk=256 gathered latent entries; transformers masks dense scores over the whole
context.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from common import machine, markdown_table, model_dir, write_section

HEADING = "## Decode at long context (bench/decode_longctx.py)"


def engine_at_depth(model, tokenizer, path, L: int, steps: int, kv_cache_dtype: str = "auto"):
    """An engine with one greedy request whose cache holds its first L-1 prompt tokens (blocks
    allocated and marked computed, random values: `fill_random`), room for `steps` more decode steps."""
    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    p = next(model.parameters())
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[model.model.norm.weight.dtype]
    eng = LLMEngine(EngineConfig(model=str(path), max_model_len=L + steps + 64, max_num_seqs=1,
                                 num_blocks=(L + steps + 64) // 64 + 2, enable_prefix_caching=False,
                                 device=str(p.device), dtype=dtype, kv_cache_dtype=kv_cache_dtype),
                    model=model, tokenizer=tokenizer)
    prompt = torch.randint(1000, 100000, (L,)).tolist()
    eng.add_request("d", prompt, SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True))
    seq = eng.scheduler.waiting[0]
    eng.block_manager.allocate(seq, L - 1)
    seq.num_computed_tokens = L - 1
    fill_random(eng.executor.cache)
    return eng


def fill_random(cache, rows: int = 1024) -> None:
    """Random latents and indexer keys in every slot of every layer, `rows` at a time (no transient
    the size of a pool): keys that score like a real context's (zeroed pools tie every score, which
    sends the top-k down its slowest path: ~70 us a layer at 32K)."""
    g = torch.Generator().manual_seed(0)
    n = cache.num_blocks * cache.block_size
    for layer in range(cache.n_layers):
        for s in range(0, n, rows):
            slots = torch.arange(s, min(s + rows, n))
            cache.write(layer, slots, torch.randn(len(slots), cache.kv_rank + cache.rope_dim, generator=g),
                        torch.randn(len(slots), cache.index_dim, generator=g))


def dsv32_ms_per_token(model, tokenizer, path, L: int, steps: int, kv_cache_dtype: str = "auto") -> float:
    return dsv32_rounds(model, tokenizer, path, [L], steps, 1, kv_cache_dtype)[L]


def dsv32_rounds(model, tokenizer, path, contexts: list[int], steps: int, rounds: int,
                 kv_cache_dtype: str = "auto") -> dict[int, float]:
    """{context: ms per step}, the best of `rounds` rounds of `steps` steps at each context in turn."""
    engines = {L: engine_at_depth(model, tokenizer, path, L, steps * rounds, kv_cache_dtype) for L in contexts}
    for eng in engines.values():
        eng.step()                           # last prompt token (a one-token step) + first sample
        eng.step()                           # warm-up decode
    best = dict.fromkeys(contexts, float("inf"))
    for _ in tqdm(range(rounds), desc="rounds", disable=rounds == 1):
        for L, eng in engines.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            best[L] = min(best[L], (time.perf_counter() - t0) / steps * 1e3)
    for eng in engines.values():
        eng.abort_request("d")
    return best


def hf_ms_per_token(hf, L: int, steps: int) -> float:
    from transformers import DynamicCache
    cfg = hf.config
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(1, 1, L, cfg.kv_lora_rank), torch.randn(1, 1, L, cfg.qk_rope_head_dim), layer)
        cache.update_indexer(torch.randn(1, L, cfg.index_head_dim), layer)
    tok = torch.tensor([[1234]])
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            pos = torch.tensor([[L + i]])
            t0 = time.perf_counter()
            out = hf(input_ids=tok, past_key_values=cache, position_ids=pos, use_cache=True)
            times.append(time.perf_counter() - t0)
            tok = out.logits[:, -1:].argmax(-1)
    return sum(times[1:]) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 32768, 65536])
    ap.add_argument("--model", default="bench", choices=["bench", "wide"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of dsv32's contexts (the best kept)")
    ap.add_argument("--hf-max", type=int, default=8192, help="largest context to run transformers at")
    ap.add_argument("--weight-format", default="fp32", choices=["fp32", "bf16", "fp16", "int8", "fp8"],
                    help="dsv32's weight format (transformers stays fp32)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8"],
                    help="dsv32's cache: the compute dtype, bf16, or FP8 latents and indexer keys")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()

    from transformers import DeepseekV32ForCausalLM

    from dsv32.chat import Tokenizer
    from dsv32.model.checkpoint import load_model
    path = model_dir(args.model)
    model, tok = load_model(path, weight_format=args.weight_format), Tokenizer.load(path)
    hf = DeepseekV32ForCausalLM.from_pretrained(path, dtype=torch.float32).eval() if args.hf_max else None

    ours = dsv32_rounds(model, tok, path, args.contexts, args.steps, args.rounds, args.kv_cache_dtype)
    rows, base = [], ours[args.contexts[0]]
    for L in tqdm(args.contexts, desc="transformers", disable=not args.hf_max):
        theirs = hf_ms_per_token(hf, L, args.steps) if L <= args.hf_max else None
        rows.append([L, f"{ours[L]:.1f}", f"{ours[L] / base:.2f}x",
                     f"{theirs:.1f}" if theirs else "not run",
                     f"{theirs / ours[L]:.1f}x" if theirs else "-"])
    table = markdown_table(["context", "dsv32 ms/token", "vs first context", "transformers ms/token",
                            "speed-up"], rows)
    print(table)
    if args.write_readme:
        model_name = {"bench": "Common benchmark model (2 layers, hidden 256, real vocab, index_topk 256)",
                      "wide": "Wide model (4 layers, hidden 2048, real vocab, index_topk 256)"}[args.model]
        write_section(HEADING, f"{model_name}, dsv32 {args.weight_format} weights, {args.kv_cache_dtype} cache, "
                               f"batch 1, {args.steps} decode steps per point; {machine()}.\n\n{table}")


if __name__ == "__main__":
    main()

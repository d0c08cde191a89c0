"""dsv32 against llama.cpp (DeepseekV32ForCausalLM with DSA, commit 0c1e570) on the same
checkpoint, one side-by-side table per weight precision (llama.cpp F32 / F16 / BF16 / Q8_0 vs
dsv32 fp32 / fp16 / bf16 / int8), on the common benchmark model and on a weight-bound "wide" model.

    python bench/vs_llamacpp.py [--models bench wide] [--precisions F32 F16 BF16 Q8_0]
        [--depths 1024 8192 32768 65536] [--prefill 512 8192 32768] [--reps 3] [--kv-cache-dtype bfloat16]
        [--write-readme]
    python bench/vs_llamacpp.py --quick        # end-to-end smoke run: 1K decode, 512 prefill

A benchmark, not a test (never run in CI). llama.cpp is built once into ~/.cache/dsv32/llama.cpp
(bench/llamacpp.py) and converts the checkpoint with its own convert_hf_to_gguf.py. Both sides
use 2 threads; llama.cpp runs as llama-bench does by default here (f16 KV cache, flash attention
on), dsv32 with an fp32 KV cache (or `--kv-cache-dtype bfloat16`: llama.cpp's cache bytes, or
`fp8`: the deployment layout). Every measurement is a fresh process: its peak RSS is its own
(dsv32's without Triton, as installed for `dsv32 serve`).
Decode at depth D: llama-bench prefills D tokens, then times generation; dsv32 marks D cache slots
computed, writes random latents and indexer keys into them (decode_longctx.fill_random: scores like
a real context's, no ties) and times decode steps.
Parity: llama-debug's fp32 logits (-fa off, f32 KV cache) for a prompt longer than index_topk
against dsv32 fp32 on llama.cpp's own token ids.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import llamacpp
from common import machine, markdown_table, model_dir, write_section

HEADING = "## dsv32 vs llama.cpp (bench/vs_llamacpp.py)"
PRECISIONS = {"F32": ("f32", "fp32"), "F16": ("f16", "fp16"), "BF16": ("bf16", "bf16"), "Q8_0": ("q8_0", "int8")}
GIB = 1 << 30


# ---- dsv32 side (child processes) -----------------------------------------------------------------

def decode_bytes(model) -> int:
    """Weight bytes one decode token reads: every matrix and its scales except the embedding table
    and the MTP layer, and of the routed experts only the active ones' share."""
    cfg, total = model.config, 0
    # every name: the MTP layer shares the main head's tensor, and named_parameters() would list
    # that tensor once, under the MTP layer's name, which is skipped here
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() != 2 or "embed_tokens" in name or ".layers.%d." % cfg.num_hidden_layers in name:
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".mlp.experts." in name else 1.0
        total += p.numel() * p.element_size() * share
    return int(total)


def child_decode(path: str, fmt: str, depth: int, steps: int, kv: str = "auto") -> dict:
    from decode_longctx import dsv32_ms_per_token
    from dsv32.chat import Tokenizer
    from dsv32.model.checkpoint import load_model
    model = load_model(path, weight_format=fmt, progress=False)
    ms = dsv32_ms_per_token(model, Tokenizer.load(path), path, depth, steps, kv)
    return {"ms": ms, "decode_bytes": decode_bytes(model)}


def child_prefill(path: str, fmt: str, L: int, kv: str = "auto", prefill_dtype: str = "float32") -> dict:
    import torch

    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    eng = LLMEngine(EngineConfig(model=path, max_model_len=L + 64, max_num_seqs=1, enable_prefix_caching=False,
                                 weight_format=fmt, kv_cache_dtype=kv, prefill_dtype=prefill_dtype))
    warm = torch.randint(1000, 8000, (64,)).tolist()      # compile the kernels outside the timing
    eng.add_request("w", warm, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    eng.add_request("p", torch.randint(1000, 8000, (L,)).tolist(),
                    SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    t0 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    return {"tok_s": L / (time.perf_counter() - t0)}


def child_parity(path: str, fmt: str, tokens: list[int]) -> dict:
    import torch

    from dsv32.model.checkpoint import load_model
    model = load_model(path, weight_format=fmt, progress=False)
    with torch.inference_mode():
        return {"logits": model(torch.tensor([tokens]))[0, -1].tolist()}


def child_bandwidth() -> dict:
    from weight_kernels import bandwidth_gbs
    return {"gbs": bandwidth_gbs()}


def dsv32(kind: str, *args) -> dict:
    """A fresh dsv32 process (its peak RSS measured from outside, like llama.cpp's)."""
    out, rss = llamacpp.timed([sys.executable, __file__, "--child", kind, json.dumps(args)])
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": rss}


# ---- the comparison -------------------------------------------------------------------------------

def parity(path: Path, prec: str, fmt: str) -> str:
    """llama.cpp's logits (this precision) and dsv32's (this format) against dsv32 fp32."""
    import numpy as np
    words = "the of and a to in is was for on that with as by at from his her it an were which".split()
    rng = np.random.default_rng(0)
    prompt = " ".join(rng.choice(words, 600))             # > index_topk tokens: the indexer selects
    toks, theirs = llamacpp.logits(llamacpp.convert(path, PRECISIONS[prec][0]), prompt, 2048,
                                   llamacpp.CACHE / "parity", repack=prec == "F32")
    ref = np.array(dsv32("parity", str(path), "fp32", toks.tolist())["logits"], dtype=np.float32)
    ours = ref if fmt == "fp32" else np.array(dsv32("parity", str(path), fmt, toks.tolist())["logits"], dtype=np.float32)
    return (f"{len(toks)} tokens: max |llama.cpp {prec} - dsv32 fp32| = {np.abs(theirs - ref).max():.2e}, "
            f"max |dsv32 {fmt} - dsv32 fp32| = {np.abs(ours - ref).max():.2e} (logit scale "
            f"{np.abs(ref).max():.1f}); same argmax: llama.cpp {theirs.argmax() == ref.argmax()}, "
            f"dsv32 {ours.argmax() == ref.argmax()}")


def compare(name: str, prec: str, args, bw: float) -> str:
    path = model_dir(name)
    outtype, fmt = PRECISIONS[prec]
    gguf = llamacpp.convert(path, outtype)
    repack = prec == "F32"                                 # F16 / Q8_0 need --repack 0
    rows, rss = [], {"llama.cpp": 0, "dsv32": 0}
    nbytes = floor = None
    for d in args.depths:
        ts, sd, r1 = llamacpp.bench(gguf, gen=args.gen, depth=d, reps=args.reps, repack=repack)
        ours = dsv32("decode", str(path), fmt, d, args.steps, args.kv_cache_dtype)
        rss["llama.cpp"], rss["dsv32"] = max(rss["llama.cpp"], r1), max(rss["dsv32"], ours["peak_rss"])
        nbytes = ours["decode_bytes"]
        floor = nbytes / bw / 1e6
        rows.append([f"decode ms/token @{d}", f"{1e3 / ts:.2f} (±{1e3 * sd / ts ** 2:.2f})", f"{ours['ms']:.2f}",
                     f"{ours['ms'] * ts / 1e3:.2f}x", f"{ours['ms'] / floor:.2f}x"])
    for L in args.prefill:
        ts, sd, r1 = llamacpp.bench(gguf, prompt=L, reps=args.reps, repack=repack)
        ours = dsv32("prefill", str(path), fmt, L, args.kv_cache_dtype,
                     "float32" if fmt == "fp32" else args.prefill_dtype)
        rss["llama.cpp"], rss["dsv32"] = max(rss["llama.cpp"], r1), max(rss["dsv32"], ours["peak_rss"])
        rows.append([f"prefill tok/s @{L}", f"{ts:.0f} (±{sd:.0f})", f"{ours['tok_s']:.0f}",
                     f"{ours['tok_s'] / ts:.2f}x", "-"])
    rows.append(["peak RSS GiB (all runs)", f"{rss['llama.cpp'] / GIB:.2f}", f"{rss['dsv32'] / GIB:.2f}",
                 f"{rss['dsv32'] / rss['llama.cpp']:.2f}x", "-"])
    ours = f"dsv32 {fmt}" + {"auto": "", "bfloat16": ", bf16 cache", "fp8": ", FP8 cache"}[args.kv_cache_dtype]
    ours += ", bf16 prefill" if args.prefill_dtype == "bfloat16" and fmt != "fp32" and args.prefill else ""
    table = markdown_table(["test", f"llama.cpp {prec}", ours, "dsv32 / llama.cpp", "dsv32 / floor"], rows)
    floors = "" if nbytes is None else (f"Weight bytes per decode token (dsv32 {fmt}): {nbytes / 1e6:.0f} MB, "
                                        f"floor {floor:.2f} ms at {bw:.1f} GB/s. ")
    return f"### {name} model, llama.cpp {prec} vs {ours}\n\n{table}\n\n{floors}Parity: {parity(path, prec, fmt)}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["bench", "wide"], choices=["bench", "wide"])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--depths", type=int, nargs="*", default=[1024, 8192, 32768, 65536])
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 8192, 32768])
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--gen", type=int, default=32, help="llama-bench tokens generated per decode test")
    ap.add_argument("--steps", type=int, default=32, help="dsv32 decode steps timed per depth")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8"],
                    help="dsv32's cache: the compute dtype (fp32), bf16 (the bytes of llama.cpp's f16 cache: "
                         "1408 a token a layer), or FP8 latents and indexer keys (788)")
    ap.add_argument("--prefill-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dsv32's prefill products for the packed formats (fp32 stays exact): "
                         "bfloat16 is llama.cpp's numerics for 16-bit weights")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1K decode, 512 prefill, 1 repetition")
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        # as under `dsv32 serve`'s install (README: no test extra), which has no Triton: the test
        # extra's Triton would be imported by inductor wherever installed (+72 MB RSS, never run on CPU)
        sys.modules["triton"] = None
        kind, a = args.child[0], json.loads(args.child[1])
        fn = {"decode": child_decode, "prefill": child_prefill, "parity": child_parity,
              "bandwidth": child_bandwidth}[kind]
        print(json.dumps(fn(*a)))
        return
    if args.quick:
        args.depths, args.prefill, args.reps, args.gen, args.steps = [1024], [512], 1, 8, 8
    llamacpp.build()
    bw = dsv32("bandwidth")["gbs"]                      # in a child: this process stays small
    parts = []
    for name in args.models:
        for prec in args.precisions:
            parts.append(compare(name, prec, args, bw))
            print(parts[-1] + "\n", flush=True)
    text = (f"{machine()}; read bandwidth {bw:.1f} GB/s (bench/weight_kernels.py probe).\n\n" + "\n\n".join(parts))
    if args.write_readme:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()

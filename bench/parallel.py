"""Per-rank resident memory and generation tokens/s: one process vs tensor parallel (and expert
parallel) with 2 processes on the common benchmark model, CPU + gloo, run back to back, each setup
in a fresh process (so rank 0's peak RSS is its own).

    python bench/parallel.py [--prompts 8] [--tokens 32] [--write-readme]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import bench_model_dir, machine, markdown_table, write_section

HEADING = "## Tensor / expert parallelism (bench/parallel.py)"


def peak_rss(pid: str | int = "self") -> int:
    """Peak resident set (VmHWM) of a process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def run(path, tp: int, ep: bool, n: int, tokens: int) -> dict:
    import torch

    from dsv32.engine.llm import LLM
    from dsv32.engine.sequence import SamplingParams
    llm = LLM(model=str(path), max_model_len=1024, max_num_seqs=n, tensor_parallel_size=tp,
              enable_expert_parallel=ep)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (256,), generator=g).tolist() for _ in range(n)]
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)      # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    group = llm.engine.executor.group
    rss = [peak_rss()] + [peak_rss(p.pid) for p in (group.workers if group else [])]
    llm.engine.shutdown()
    return {"tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / dt, "rss": rss,
            "tokens": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)   # TP EP
    args = ap.parse_args()
    path = bench_model_dir()
    if args.child:
        print(json.dumps(run(path, args.child[0], bool(args.child[1]), args.prompts, args.tokens)))
        return
    rows, base = [], None
    for name, tp, ep in [("1 process", 1, False), ("TP=2", 2, False), ("TP=2 + EP", 2, True)]:
        out = subprocess.run([sys.executable, __file__, "--prompts", str(args.prompts), "--tokens",
                              str(args.tokens), "--child", str(tp), str(int(ep))],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        base = base or r
        same = "yes" if r["tokens"] == base["tokens"] else "no"
        gib = 1 << 30
        rows.append([name, f"{r['tok_s']:.1f}", f"{r['tok_s'] / base['tok_s']:.2f}x",
                     " / ".join(f"{x / gib:.2f}" for x in r["rss"]), same])
        print(rows[-1], flush=True)
    table = markdown_table(["setup", "tokens/s", "vs 1 process", "peak RSS per rank GiB", "same greedy tokens"],
                           rows)
    print(table)
    if args.write_readme:
        write_section(HEADING, f"Common benchmark model, fp32, {args.prompts} prompts of 256 tokens, "
                               f"{args.tokens} output tokens each, gloo on CPU; {machine()}. Every rank "
                               f"holds the whole latent cache and its slice of the weights.\n\n{table}")


if __name__ == "__main__":
    main()

"""Load time and peak RSS for a generated ~1 GB FP8 checkpoint, in both weight storage modes.

    python bench/load.py [--dir DIR] [--readme bench/README.md]

Each load runs in a fresh subprocess, so its peak RSS (ru_maxrss) belongs to that mode alone.
Target: peak RSS below 1.5x the resident weight bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without install

# FP8-dominated like the real model (experts are ~95% of it): 4 MoE layers (incl. MTP) of 64
# experts, one dense layer, and a small vocab so bf16 embeddings/heads stay a minor part.
DIMS = dict(layers=4, hidden=2048, heads=16, q_lora=512, kv_lora=256, nope=64, rope=32, v=64,
            inter=4096, moe_inter=512, experts=64, groups=8, topk_group=4, active=6, index_heads=8,
            index_dim=64, topk=256, vocab=8192)
SHARDS = 10
MODES = [  # (name, load_model kwargs)
    ("fp8 storage, bf16 compute", dict(fp8_storage=True, dtype="bfloat16")),
    ("dequantised to bf16", dict(fp8_storage=False, dtype="bfloat16")),
    ("dequantised to fp32", dict(fp8_storage=False, dtype="float32")),
]
HEADING = "## Loading (bench/load.py)"


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str, kwargs: dict) -> None:
    """Runs in the subprocess: load once, print one JSON line."""
    import torch

    import dsv32
    from dsv32.model import checkpoint, transformer  # noqa: F401  (code, counted in the baseline)

    kwargs = {**kwargs, "dtype": getattr(torch, kwargs["dtype"])}
    base = rss_bytes()
    t = time.perf_counter()
    model = dsv32.load_model(path, progress=False, **kwargs)
    secs = time.perf_counter() - t
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB
    print(json.dumps(dict(seconds=secs, weights=weights, peak=peak, baseline=base, after=rss_bytes())))


def run_mode(path: Path, kwargs: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), json.dumps(kwargs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def machine() -> str:
    import torch
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| mode | load s | resident weights | peak RSS | peak / resident | baseline RSS | (peak - baseline) / resident |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['seconds']:.2f} | {gib(r['weights'])} | {gib(r['peak'])} | "
                     f"{r['peak'] / r['weights']:.2f} | {gib(r['baseline'])} | "
                     f"{(r['peak'] - r['baseline']) / r['weights']:.2f} |")
    from common import host_load
    return "\n".join(lines) + "\n\n" + host_load()


def intro(ckpt_bytes: int) -> str:
    return (f"`dsv32.load_model` on a generated FP8 checkpoint ({gib(ckpt_bytes)} on disk, e4m3 with 128x128 "
            f"block scales, {SHARDS} shards; `init_tiny` dims: {', '.join(f'{k}={v}' for k, v in DIMS.items())}), "
            "each mode in a fresh process. Peak RSS is the child's `ru_maxrss`; it includes the "
            "interpreter and torch (baseline = RSS after imports, before loading). Above the baseline "
            "the loader holds the weights plus at most one 64 MiB window of a memory-mapped shard and "
            "one tensor in flight. Target: peak RSS below 1.5x the resident weights. One table per "
            "machine:\n\n    python bench/load.py [--dir DIR] [--label NAME]")


def write_readme(readme: Path, label: str, ckpt_bytes: int, body: str) -> None:
    """Rewrite this script's section, replacing only this machine's table (other sections stay)."""
    from common import read_section, write_section

    tables = {}                                          # "### label" sub-sections already there
    for part in read_section(HEADING, readme).split("\n### ")[1:]:
        name, _, table_ = part.partition("\n")
        tables[name.strip()] = table_.strip("\n")
    tables[label] = body
    write_section(HEADING, f"{intro(ckpt_bytes)}\n\n" + "\n\n".join(
        f"### {k}\n\n{v}" for k, v in tables.items()), readme)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, help="checkpoint directory to reuse or create (default: a temp dir)")
    ap.add_argument("--readme", type=Path, default=Path(__file__).with_name("README.md"))
    ap.add_argument("--label", help="sub-heading for this machine's table (default: arch, CPUs, versions)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], json.loads(args.child[1]))

    from dsv32.model.init_tiny import init_tiny

    path = args.dir or Path(tempfile.mkdtemp(prefix="dsv32-bench-"))
    try:
        if not (path / "model.safetensors.index.json").exists():
            init_tiny(path, fp8=True, shards=SHARDS, seed=0, progress=True, **DIMS)
        ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        rows = []
        for name, kwargs in MODES:
            r = run_mode(path, kwargs)
            rows.append((name, r))
            print(f"{name}: {r['seconds']:.2f}s, weights {gib(r['weights'])}, peak RSS {gib(r['peak'])} "
                  f"({r['peak'] / r['weights']:.2f}x)", flush=True)
        body = table(rows)
        print("\n" + body)
        write_readme(args.readme, args.label or machine(), ckpt_bytes, body)
    finally:
        if args.dir is None:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: the common benchmark model, tables, README sections, RSS."""
from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                     # run from a checkout without install

# The common benchmark model: 2 layers, hidden 256, the real vocabulary, index_topk 256; MLA
# latent of the real model (kv_lora 512 + rope 64) and indexer head dim 128.
BENCH_DIMS = dict(layers=2, hidden=256, heads=4, q_lora=256, kv_lora=512, nope=128, rope=64, v=128,
                  inter=512, moe_inter=256, experts=8, groups=4, topk_group=2, active=2,
                  index_heads=8, index_dim=128, topk=256, dense=1)
# A weight-bound model: hidden 2048, the real MLA and indexer dims, 2 dense layers (inter 16384)
# and 2 MoE layers (16 experts of 2048, 2 active + 1 shared), the real vocabulary (llama.cpp's
# converter needs every tokenizer id inside the vocabulary, so bench/load.py's 8192 cannot be
# converted); ~585M parameters read per decode token, ~1.2B resident; bf16 checkpoint.
WIDE_DIMS = dict(layers=4, hidden=2048, heads=16, q_lora=512, kv_lora=512, nope=128, rope=64, v=128,
                 inter=16384, moe_inter=2048, experts=16, groups=4, topk_group=2, active=2, dense=2,
                 index_heads=8, index_dim=128, topk=256)
README = Path(__file__).with_name("README.md")


def bench_model_dir() -> Path:
    """Generate (once) the common benchmark checkpoint under bench/out/."""
    from dsv32.model.init_tiny import init_tiny
    path = ROOT / "bench" / "out" / "bench_model"
    if not (path / "model.safetensors.index.json").exists():
        init_tiny(path, seed=0, progress=True, **BENCH_DIMS)
    return path


def model_dir(name: str) -> Path:
    """The checkpoint of the common benchmark model ("bench") or the weight-bound one ("wide"),
    generated once under bench/out/."""
    if name == "bench":
        return bench_model_dir()
    from dsv32.model.init_tiny import init_tiny
    path = ROOT / "bench" / "out" / "wide_model"
    if not (path / "model.safetensors.index.json").exists():
        init_tiny(path, seed=0, progress=True, **WIDE_DIMS)
    return path


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"


def host_load() -> str:
    """The host's load average, printed next to every table: timings from a busy host (1-minute
    load above ~1.2 on this 2-core machine) are not comparable."""
    return "(host load average, 1 / 5 / 15 min: %.2f / %.2f / %.2f)" % os.getloadavg()


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table, followed by the host load at the time it was made (see host_load)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + host_load()


def read_section(heading: str, readme: Path = README) -> str:
    """The body of the `heading` section of bench/README.md ("" when there is none)."""
    text = readme.read_text() if readme.exists() else ""
    if heading not in text:
        return ""
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    return text[start: nxt if nxt >= 0 else len(text)].strip("\n")


def write_section(heading: str, body: str, readme: Path = README) -> None:
    """Replace (or append) the `heading` section of bench/README.md."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    readme.write_text(text)

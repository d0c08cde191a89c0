"""Accuracy of each weight format against fp32 on the common benchmark model: logit error and
top-1 agreement over every position of a few prompts longer than index_topk (so the indexer's
selection is exercised), plus the resident weight bytes.

    python bench/formats.py [--prompts 4] [--length 600] [--write-readme]

fp8 is measured on an FP8 copy of the bench model (init_tiny --fp8: e4m3 with 128x128 block
scales) twice: against that checkpoint dequantised exactly into fp32 (the cost of converting e4m3
to int8 blocks) and against the bf16 original (FP8 as a whole).
"""
from __future__ import annotations

import argparse

import torch

from common import BENCH_DIMS, ROOT, bench_model_dir, machine, markdown_table, write_section

HEADING = "## Weight-format accuracy (bench/formats.py)"


def fp8_model_dir():
    from dsv32.model.init_tiny import init_tiny
    path = ROOT / "bench" / "out" / "bench_model_fp8"
    if not (path / "model.safetensors.index.json").exists():
        init_tiny(path, fp8=True, seed=0, progress=True, **BENCH_DIMS)
    return path


def logits(path, fmt: str, ids: torch.Tensor, prefill_dtype: str = "float32") -> tuple[torch.Tensor, int]:
    """Logits [P, T, V] of every prompt (one forward each: the prefill's products), and the bytes
    of the model's matrices."""
    from dsv32.model.checkpoint import load_model
    model = load_model(path, weight_format=fmt, prefill_dtype=prefill_dtype, progress=False)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
    with torch.inference_mode():
        out = torch.cat([model(ids[i:i + 1]) for i in range(ids.shape[0])])
    return out, nbytes


def compare(got: torch.Tensor, ref: torch.Tensor) -> list[str]:
    d = (got - ref).abs()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return [f"{d.max().item():.3g}", f"{d.mean().item():.3g}", f"{100 * top1:.1f}%"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=600)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    ids = torch.randint(1000, 100000, (args.prompts, args.length), generator=torch.Generator().manual_seed(0))
    path, fp8_path = bench_model_dir(), fp8_model_dir()
    ref, ref_bytes = logits(path, "fp32", ids)
    rows = [["fp32", "bf16 checkpoint", f"{ref_bytes / 2**20:.0f}", "fp32", "0", "0", "100.0%"]]
    for fmt, prefill in (("bf16", "float32"), ("fp16", "float32"), ("int8", "float32"), ("bf16", "bfloat16"),
                         ("int8", "bfloat16")):
        got, nbytes = logits(path, fmt, ids, prefill)
        name = fmt + (", bf16 prefill" if prefill == "bfloat16" else "")
        rows.append([name, "bf16 checkpoint", f"{nbytes / 2**20:.0f}", "fp32"] + compare(got, ref))
        print(rows[-1], flush=True)
    exact, _ = logits(fp8_path, "fp32", ids)
    got, nbytes = logits(fp8_path, "fp8", ids)
    rows.append(["fp8", "FP8 checkpoint", f"{nbytes / 2**20:.0f}", "the FP8 checkpoint in fp32"] + compare(got, exact))
    rows.append(["fp8", "FP8 checkpoint", f"{nbytes / 2**20:.0f}", "fp32 (bf16 checkpoint)"] + compare(got, ref))
    rows.append(["fp32", "FP8 checkpoint", f"{ref_bytes / 2**20:.0f}", "fp32 (bf16 checkpoint)"] + compare(exact, ref))
    table = markdown_table(["format", "checkpoint", "matrices MiB", "against", "max abs logit error",
                            "mean abs logit error", "top-1 agreement"], rows)
    text = (f"Common benchmark model, {args.prompts} random prompts of {args.length} tokens, logits of every "
            f"position (logit std ~1); {machine()}.\n\n{table}")
    print(text)
    if args.write_readme:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()

"""FP8 block-scaled GEMMs at the real model's Linear shapes: error against a float64 reference and
time, for the eager path (dequantise + matmul per call), a bf16 weight dequantised once (cuBLAS),
the Triton kernel (W8A16, W8A8) and blockwise scaled_mm (W8A8, where supported).

    python bench/gpu_fp8_gemm.py [--ms 1,16,64,4096]        (a CUDA GPU with triton)

Errors are ||y - ref|| / ||ref|| with ref in float64 from the same bf16 activations and the exact
dequantised weight (W8A8 rows: ref of the per-128 quantised activations). Times: medians of
triton.testing.do_bench (L2 flushed between calls); GB/s = weight bytes / time, TFLOP/s = 2MNK / time.
"""
from __future__ import annotations

import argparse

import torch

from common import markdown_table

SHAPES = [("q_a", 1536, 7168), ("q_b", 24576, 1536), ("kv_a", 576, 7168), ("o_proj", 7168, 16384),
          ("idx wq_b", 8192, 1536), ("expert gate+up", 4096, 7168), ("expert down", 7168, 2048)]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 4096])
    args = ap.parse_args(argv)
    import triton.testing
    from dsv32.kernels.fp8_gemm import act_quant, fp8_linear, fp8_linear_ref, scaled_mm_variant
    from dsv32.model.fp8 import FP8, act_quant_dequant, block_dequant
    dev = torch.device("cuda")
    variant = scaled_mm_variant(dev)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}: "
          f"blockwise scaled_mm {variant or 'not supported'}", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, N, K in SHAPES:
        w = (torch.randn(N, K, device=dev, generator=g) * 32).clamp_(-448, 448).to(FP8)
        s = torch.rand(-(-N // 128), -(-K // 128), device=dev, generator=g).add_(0.5).div_(32 * K ** 0.5)
        w_bf16 = block_dequant(w, s, (128, 128), torch.bfloat16)
        w64 = block_dequant(w, s, (128, 128), torch.float64)
        for M in args.ms:
            x = torch.randn(M, K, device=dev, generator=g).bfloat16()
            ref = x.double() @ w64.T
            ref8 = act_quant_dequant(x).double() @ w64.T
            cases = {"eager (dequant per call)": (lambda: fp8_linear_ref(x, w, s), ref),
                     "bf16 weight (cuBLAS)": (lambda: x @ w_bf16.T, ref),
                     "triton w8a16": (lambda: fp8_linear(x, w, s, "w8a16", "triton"), ref)}
            if K % 128 == 0:
                from dsv32.kernels.triton.fp8_gemm import fp8_gemm
                xq, xs = act_quant(x)
                cases["triton w8a8 (x quantised)"] = (lambda: fp8_gemm(xq, w, s, x_scale=xs, out_dtype=torch.bfloat16), ref8)
                if variant and N % 128 == 0:
                    cases["scaled_mm w8a8 (x quantised)"] = (lambda: fp8_linear(x, w, s, "w8a8", "triton"), ref8)
            for case, (fn, r) in cases.items():
                try:
                    y = fn()
                    err = ((y.double() - r).norm() / r.norm()).item()
                    t = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3
                except Exception as e:                            # noqa: BLE001 - reported in the table
                    rows.append([name, M, N, K, case, f"failed: {type(e).__name__}: {str(e)[:80]}", "", ""])
                    continue
                rate = f"{N * K / t / 1e9:.0f} GB/s" if M <= 64 else f"{2 * M * N * K / t / 1e12:.0f} TFLOP/s"
                rows.append([name, M, N, K, case, f"{err:.1e}", f"{1e3 * t:.4f}", rate])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    text = markdown_table(["weight", "M", "N", "K", "path", "rel. error", "ms", "rate"], rows)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()

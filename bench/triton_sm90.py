"""Compile the Triton kernels for Hopper (sm_90) without a GPU and report what the compiler made
of them: registers, spill stack / local memory, shared memory, matrix instructions (HMMA = mma.sync,
HGMMA/QGMMA = wgmma bf16/fp8). Configurations are those the real model's shapes pick.

    python bench/triton_sm90.py [--only NAME]        (needs triton; runs on CPU)
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMEM_LIMIT = 227 * 1024     # H100: dynamic shared memory per block


def configs():
    """(name, kernel, pointer dtypes, constexprs, launch options) at the real model's shapes."""
    from dsv32.kernels.triton.fp8_gemm import _fp8_gemm, gemm_launch
    from dsv32.kernels.triton.indexer import LAUNCH as INDEXER_LAUNCH, _indexer
    from dsv32.kernels.triton.moe_gemm import _moe_gemm, launch as moe_launch
    from dsv32.kernels.triton.sparse_mla import LAUNCH as MLA_LAUNCH, _sparse_mla
    out = []
    g = dict(a_ptr="bf16", as_ptr="fp32", w_ptr="fp8e4nv", ws_ptr="fp32", c_ptr="bf16")
    for bm, bn in ((16, 64), (64, 64), (128, 64)):
        out.append((f"fp8_gemm w8a16 BM{bm} BN{bn}", _fp8_gemm, g,
                    dict(A_FP8=False, PREC="tf32", F32DOT=False, BM=bm, BN=bn, BK=128), gemm_launch(bm, bn, 2, 1)))
    out.append(("fp8_gemm w8a8 BM128 BN64", _fp8_gemm, {**g, "a_ptr": "fp8e4nv"},
                dict(A_FP8=True, PREC="tf32", F32DOT=False, BM=128, BN=64, BK=128), gemm_launch(128, 64, 1, 1)))
    m = dict(a_ptr="bf16", w_ptr="fp8e4nv", ws_ptr="fp32", c_ptr="bf16", rows_ptr="i64", bexp_ptr="i64", rw_ptr="fp32")
    for bm, mul in ((16, False), (16, True), (64, True)):
        bn = 64
        out.append((f"moe_gemm BM{bm} BN{bn}{' *w' if mul else ''}", _moe_gemm, m,
                    dict(HAS_SCALE=True, MUL_W=mul, F32DOT=False, PREC="tf32", BM=bm, BN=bn, BK=128),
                    moe_launch(bm, 2)))
    ix = dict(q_ptr="bf16", w_ptr="fp32", pos_ptr="i64", tab_ptr="i64", k_ptr="fp8e4nv", ks_ptr="fp32", out_ptr="fp32")
    for bt in (1, 2):
        out.append((f"indexer BT{bt} BH64 BS64", _indexer, ix,
                    dict(DI=128, G=1, FP8=True, F32DOT=False, BT=bt, BH=64, BS=64), INDEXER_LAUNCH))
    ml = dict(q_ptr="bf16", idx_ptr="i64", tab_ptr="i64", c_ptr="fp8e4nv", cs_ptr="fp32", pe_ptr="bf16",
              o_ptr="fp32", lse_ptr="fp32")
    out.append(("sparse_mla BH16 BK16", _sparse_mla, ml,
                dict(C=512, R=64, G=4, FP8=True, F32DOT=False, BH=16, BK=16), MLA_LAUNCH))
    return out


def compile_sm90(kernel, ptrs: dict, const: dict, launch: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {}
    for name in kernel.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(kernel, sig, const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch)


def report(k) -> dict:
    """Resource usage and instruction mix of a compiled kernel (cuobjdump from triton's wheel)."""
    import triton
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        res = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", res))
    ops = collections.Counter(re.findall(r"\b(HGMMA|QGMMA|HMMA|LDL|STL|LDGSTS|UTMALDG)\b", sass))
    return dict(regs=int(usage.get("REG", 0)), stack=int(usage.get("STACK", 0)), local=int(usage.get("LOCAL", 0)),
                smem=k.metadata.shared, ops=dict(ops))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="compile only the configurations whose name contains this")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")          # silence triton 3.9's notice
    rows = []
    for name, kernel, ptrs, const, launch in configs():
        warps, st = launch["num_warps"], launch["num_stages"]
        if args.only and args.only not in name:
            continue
        try:
            r = report(compile_sm90(kernel, ptrs, const, launch))
        except Exception as e:                                    # noqa: BLE001 - a compile error is the finding
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        r.update(name=name, warps=warps, stages=st)
        rows.append(r)
        if "error" in r:
            print(f"| {name} | {warps} | {st} | compile error: {r['error']} |", flush=True)
        else:
            flag = " OVER" if r["smem"] > SMEM_LIMIT else ""
            mma = ", ".join(f"{o} {c}" for o, c in sorted(r["ops"].items())) or "-"
            print(f"| {name} | {warps} | {st} | {r['regs']} | {r['stack']} / {r['local']} | "
                  f"{r['smem'] // 1024} KiB{flag} | {mma} |", flush=True)
    return rows


if __name__ == "__main__":
    print("| kernel (sm_90) | warps | stages | registers | stack / local bytes | shared | SASS matrix / spill ops |")
    print("|---|---|---|---|---|---|---|")
    main()

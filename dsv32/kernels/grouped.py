"""Sync-free MoE experts: the experts' weights stacked per projection, tokens sorted by expert on
the device (static shapes, no `.tolist()`), and grouped SwiGLU over the stacked weights.

`PackedExperts.from_moe` stacks the routed experts (and the shared expert, as expert E, when it
has their shape) and re-points every expert Linear at its slice of the stack, so no weight is held
twice. Backends: "torch" gathers each assignment's weights (small problems, the reference for the
kernel); "triton" runs the grouped GEMM (`triton/moe_gemm.py`). `MoE.routed` is the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import check_backend


def align_by_expert(ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [N, k] -> (rows [P]: assignment ids (n*k + j) grouped by expert, each group
    padded to a multiple of block_m with the id N*k; block_expert [P / block_m]: the expert of each
    block, n_experts past the end). P = the static bound cdiv(N*k + E*(block_m-1), block_m)*block_m."""
    flat = ids.flatten()                                                   # [A]
    A, dev = flat.numel(), flat.device
    counts = torch.zeros(n_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m                  # [E]
    pend = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)                              # assignments by expert
    se = flat[order]
    dest = (pend - padded)[se] + torch.arange(A, device=dev) - (counts.cumsum(0) - counts)[se]
    P = -(-(A + n_experts * (block_m - 1)) // block_m) * block_m
    rows = torch.full((P,), A, dtype=torch.long, device=dev).scatter_(0, dest, order)
    starts = torch.arange(0, P, block_m, device=dev)
    return rows, torch.searchsorted(pend, starts, right=True)


def _dequant(w: torch.Tensor, s: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stacked weights [A, R, C] (e4m3 + block scales [A, R/128, C/128]) -> [A, R, C] in dtype,
    rounded as `block_dequant` rounds (fp32 product, then dtype)."""
    if s is None:
        return w.to(dtype)
    R, C = w.shape[-2:]
    full = s.float().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :R, :C]
    return (w.float() * full).to(dtype)


def _block_m(assignments: int, experts: int) -> int:
    per = assignments / max(1, min(experts, assignments))                 # rows per touched expert
    return 16 if per <= 16 else 32 if per <= 32 else 64   # 128 spills on sm_90 (bench/triton_sm90.py)


class PackedExperts:
    """Stacked expert weights and their sync-free SwiGLU dispatch (routed + folded shared expert).

    Not an nn.Module: the stacks share storage with the experts' parameters, so pack after the
    model has reached its device and dtype (moving the model afterwards leaves the stacks behind).
    """

    def __init__(self, w13: torch.Tensor, s13: torch.Tensor | None, w2: torch.Tensor,
                 s2: torch.Tensor | None, n_routed: int, shared_folded: bool, backend: str = "torch"):
        # w13 [E', 2I, D] (gate rows then up rows), w2 [E', D, I]; scales per 128x128 block or None
        self.w13, self.s13, self.w2, self.s2 = w13, s13, w2, s2
        self.n_routed, self.shared_folded = n_routed, shared_folded
        self.inter = w2.shape[-1]
        self.backend = check_backend(backend)

    @classmethod
    @torch.no_grad()
    def from_moe(cls, moe: nn.Module, backend: str = "torch") -> "PackedExperts":
        """Stack `moe`'s experts; its Linears then hold views into the stacks."""
        experts = list(moe.experts)
        if any(e is None for e in experts):
            raise ValueError("PackedExperts: expert-parallel MoE (some experts on other ranks)")
        sh = moe.shared_experts
        fold = sh.gate_proj.weight.shape == experts[0].gate_proj.weight.shape and \
            sh.gate_proj.weight.dtype == experts[0].gate_proj.weight.dtype
        mlps = experts + ([sh] if fold else [])
        fp8 = experts[0].gate_proj.fp8_block is not None
        I = experts[0].gate_proj.out_features
        if fp8 and (experts[0].gate_proj.fp8_block != (128, 128) or I % 128):
            raise ValueError(f"PackedExperts: FP8 experts need 128x128 blocks and an inner size "
                             f"divisible by 128 (got {I})")

        def stack(lins: list[list[nn.Module]], attr: str):
            first = [getattr(l, attr) for l in lins[0]]
            rows = sum(p.shape[0] for p in first)
            t = torch.empty(len(lins), rows, *first[0].shape[1:], dtype=first[0].dtype, device=first[0].device)
            for e, ls in enumerate(lins):          # copy in, then re-point at the stack (no 2nd copy)
                start = 0
                for lin in ls:
                    p = getattr(lin, attr)
                    t[e, start:start + p.shape[0]].copy_(p)
                    setattr(lin, attr, nn.Parameter(t[e, start:start + p.shape[0]], requires_grad=False))
                    start += p.shape[0]
            return t
        gu = [[m.gate_proj, m.up_proj] for m in mlps]
        dn = [[m.down_proj] for m in mlps]
        w13, w2 = stack(gu, "weight"), stack(dn, "weight")
        s13 = stack(gu, "weight_scale_inv") if fp8 else None
        s2 = stack(dn, "weight_scale_inv") if fp8 else None
        return cls(w13, s13, w2, s2, len(experts), fold, backend)

    def assignments(self, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing [N, k] -> [N, k'] with the folded shared expert appended (weight 1)."""
        if not self.shared_folded:
            return weights, ids
        N = ids.shape[0]
        ids = torch.cat((ids, ids.new_full((N, 1), self.n_routed)), 1)
        return torch.cat((weights, weights.new_ones(N, 1)), 1), ids

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, D], routing weights/ids [N, k] -> sum of the routed experts (and the folded shared
        expert) [N, D]; no host synchronisation."""
        weights, ids = self.assignments(weights, ids)
        if self.backend == "torch":
            return self.gathered(x, weights, ids)
        from .triton.moe_gemm import moe_gemm
        N, k = ids.shape
        E = self.w13.shape[0]
        bm = _block_m(N * k, E)
        rows, bexp = align_by_expert(ids, E, bm)
        h = moe_gemm(x, self.w13, self.s13, rows, bexp, N * k, k, bm)               # [A, 2I]
        act = F.silu(h[:, : self.inter]) * h[:, self.inter:]                       # [A, I]
        w = weights.flatten().float()
        out = moe_gemm(act, self.w2, self.s2, rows, bexp, N * k, 1, bm, row_weight=w)  # [A, D]
        return out.view(N, k, -1).sum(1)

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each assignment with its expert's gathered weights (bmm): reads k'*N expert matrices."""
        N, k = ids.shape
        a = ids.flatten()                                                      # [A]
        xa = x.repeat_interleave(k, 0).unsqueeze(-1)                           # [A, D, 1]
        s13 = None if self.s13 is None else self.s13[a]
        h = torch.bmm(_dequant(self.w13[a], s13, x.dtype), xa).squeeze(-1)     # [A, 2I]
        act = (F.silu(h[:, : self.inter]) * h[:, self.inter:]).unsqueeze(-1)   # [A, I, 1]
        s2 = None if self.s2 is None else self.s2[a]
        out = torch.bmm(_dequant(self.w2[a], s2, x.dtype), act).squeeze(-1)    # [A, D]
        out = out * weights.flatten().unsqueeze(-1).to(x.dtype)
        return out.view(N, k, -1).sum(1)

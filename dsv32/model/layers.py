"""Basic layers: Linear (plain or FP8 block-quantised storage), RMSNorm, YaRN rotary embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fp8 import FP8, act_quant_dequant, block_dequant, block_quant, scale_shape
from .cpu.layer import embedding_fits, embedding_rows as native_embedding_rows
from .cpu.packed import dense_linear, dequantize, embedding_rows, group_size, packed_linear, quantize_int8

PACKED = {"int8": torch.int8, "bf16": torch.bfloat16, "fp16": torch.float16}   # packed storage dtypes
NATIVE_ROWS = 64            # packed embeddings: up to this many tokens in one native call (cpu/layer.py)


def _packed_params(mod: nn.Module, fmt: str, values: torch.Tensor) -> None:
    """Give `mod` a packed `weight` (and, for int8, `weight_scale_inv` [N, K/G]) of `fmt`: the
    current values quantised, or empty storage when they live on the meta device."""
    if fmt not in PACKED:
        raise ValueError(f"unknown packed format {fmt!r} (one of {sorted(PACKED)})")
    N, K = values.shape
    if values.is_meta:
        w = torch.empty(N, K, dtype=PACKED[fmt], device="meta")
        s = torch.empty(N, K // group_size(K), device="meta") if fmt == "int8" else None
    elif fmt == "int8":
        w, s = quantize_int8(values)
    else:
        w, s = values.to(PACKED[fmt]), None
    mod.packed = fmt
    mod.weight = nn.Parameter(w, requires_grad=False)
    if s is None:
        mod.register_parameter("weight_scale_inv", None)
    else:
        mod.weight_scale_inv = nn.Parameter(s, requires_grad=False)


class Linear(nn.Module):
    """y = x W^T with W kept in the compute dtype, or as FP8 e4m3 plus 128x128 block scales.

    In FP8 storage mode the weight is dequantised block by block at every call, so the resident
    cost is about one byte per parameter. `fp8_act` simulates dynamic per-128 activation
    quantisation (deployment numerics); it is off by default (exact arithmetic).
    Packed (`pack`): int8 with per-(row, 128 columns) scales, or bf16/fp16, for fp32 compute: read
    once per call by the kernels in cpu/packed.py, never dequantised whole.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, fp8_block: tuple[int, int] | None = None,
                 fp8_act: bool = False, shard: tuple[int, int, int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # tensor parallelism: this weight is rows (dim 0) or columns (dim 1) [start, stop) of the
        # checkpoint's full tensor; the loader reads only that slice
        self.shard = shard
        self.fp8_block = tuple(fp8_block) if fp8_block else None
        self.fp8_act = fp8_act
        self.packed: str | None = None      # "int8" / "bf16" / "fp16" after pack()
        self.prefill_dtype = torch.float32  # packed: the products' dtype over GEMV rows (formats.PREFILL_DTYPES)
        if self.fp8_block:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
            self.weight_scale_inv = nn.Parameter(
                torch.empty(scale_shape((out_features, in_features), self.fp8_block), dtype=torch.float32),
                requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
            self.register_parameter("weight_scale_inv", None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def use_fp8_storage(self, block: tuple[int, int] = (128, 128)) -> None:
        """Switch to FP8 storage (e4m3 weight + block scales), quantising the current values
        unless the weight lives on the meta device (the checkpoint loader fills it afterwards)."""
        w = self.weight
        if w.is_meta:
            q = torch.empty(w.shape, dtype=FP8, device=w.device)
            s = torch.empty(scale_shape(tuple(w.shape), block), dtype=torch.float32, device=w.device)
        else:
            q, s = block_quant(self.dense_weight(torch.float32), block)
        self.fp8_block = tuple(block)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(s, requires_grad=False)

    def pack(self, fmt: str, prefill_dtype: torch.dtype = torch.float32) -> None:
        """Store the weight packed as `fmt` ("int8", "bf16" or "fp16") for fp32 compute (products of
        many rows, a prefill's, in `prefill_dtype`: formats.PREFILL_DTYPES)."""
        if self.fp8_act:
            raise ValueError("packed weights compute in fp32: fp8_act (activation FP8 simulation) is not supported")
        values = self.weight if self.weight.is_meta else self.dense_weight(torch.float32)
        self.fp8_block = None
        self.prefill_dtype = prefill_dtype
        _packed_params(self, fmt, values)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype` (dequantised when stored as FP8 or packed)."""
        if self.fp8_block:
            return block_dequant(self.weight, self.weight_scale_inv, self.fp8_block, dtype)
        if self.packed:
            return dequantize(self.weight, self.weight_scale_inv, dtype)
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return packed_linear(x, self.weight, self.weight_scale_inv, self.bias, self.prefill_dtype)
        if self.fp8_act and x.shape[-1] % 128 == 0:
            x = act_quant_dequant(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return dense_linear(x, self.dense_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        fp8 = f", fp8_block={self.fp8_block}" if self.fp8_block else ""
        packed = f", packed={self.packed}" if self.packed else ""
        packed += ", prefill_dtype=bfloat16" if self.prefill_dtype == torch.bfloat16 else ""
        shard = f", shard={self.shard}" if self.shard else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{fp8}{packed}{shard}"


class VocabParallelEmbedding(nn.Embedding):
    """Token embedding whose rows (the vocabulary) are split across tensor-parallel ranks."""

    def __init__(self, vocab: int, dim: int, dtype: torch.dtype | None = None, pc=None):
        from dsv32.parallel.context import SINGLE
        self.pc = pc or SINGLE
        start, stop = self.pc.split(vocab, "vocab_size")
        super().__init__(stop - start, dim, dtype=dtype)
        self.shard = (0, start, stop) if self.pc.enabled else None
        self.packed: str | None = None      # "int8" / "bf16" / "fp16" after pack(): rows come out fp32
        self.register_parameter("weight_scale_inv", None)

    def reset_parameters(self) -> None:
        # nothing to draw on the meta device (load_model's build), where torch's normal_ would
        # import dynamo (+~100 MB RSS) to run its decomposition
        if not self.weight.is_meta:
            super().reset_parameters()

    def pack(self, fmt: str) -> None:
        """Store the table packed as `fmt` ("int8", "bf16" or "fp16"); looked-up rows are fp32."""
        values = self.weight if self.weight.is_meta else dequantize(self.weight, self.weight_scale_inv)
        _packed_params(self, fmt, values)

    def use_mapped(self, table: torch.Tensor) -> None:
        """Read rows from `table` in place: the whole bf16 table mapped from the checkpoint
        (mapping.py), or another embedding's weight made so (one Parameter: the MTP layer's tie)."""
        if self.shard or table.dtype != torch.bfloat16 or table.shape != self.weight.shape:
            raise ValueError(f"a mapped table is the whole bf16 [{self.num_embeddings}, {self.embedding_dim}] "
                             f"table; got {table.dtype} {tuple(table.shape)}{' for a shard' if self.shard else ''}")
        self.packed = "bf16"
        self.weight = table if isinstance(table, nn.Parameter) else nn.Parameter(table, requires_grad=False)
        self.register_parameter("weight_scale_inv", None)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed:
            if ids.numel() <= NATIVE_ROWS and ids.device.type == "cpu" and embedding_fits(self.weight, self.weight_scale_inv):
                return native_embedding_rows(ids, self.weight, self.weight_scale_inv)    # a decode step's tokens
            return embedding_rows(ids, self.weight, self.weight_scale_inv, torch.float32)
        return F.embedding(ids, self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.pc.enabled:
            return self._rows(ids)
        start, stop = self.shard[1], self.shard[2]
        outside = (ids < start) | (ids >= stop)
        x = self._rows((ids - start).masked_fill(outside, 0))
        return self.pc.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings (YaRN)
# ---------------------------------------------------------------------------------------------

def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [rope_dim/2] with YaRN interpolation of long wavelengths (on the
    CPU: under load_model's meta device, torch's arange would import its symbolic shapes, ~60 MB)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    rs = cfg.rope_scaling
    if rs is None or rs.factor <= 1.0:
        return inv_freq.float()

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high-frequency dims kept), 0: interpolate (divide by factor)
    return (inv_freq / rs.factor * (1 - keep) + inv_freq * keep).float()


class Rotary(nn.Module):
    """cos/sin of `positions x inv_freq`, computed on the fly (no table of max_position rows)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", yarn_inv_freq(cfg).to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [..., rope/2]
        return angles.cos(), angles.sin()


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA layout: pairs (x0,x1), (x2,x3), ... each rotate by one frequency. x: [..., T, (H,) rope]."""
    xf = x.float().unflatten(-1, (-1, 2))                                # [..., rope/2, 2]
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Indexer layout: x_i pairs with x_{i+rope/2} (non-interleaved)."""
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard rotation of the last dim (a power of two), scale d^-0.5."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"hadamard: dim {d} is not a power of two")
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    h = 1
    while h < d:
        y = y.unflatten(-1, (d // (2 * h), 2, h))                        # [..., blocks, 2, h]
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * d ** -0.5).to(x.dtype)

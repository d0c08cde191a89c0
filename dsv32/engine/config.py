"""Engine settings: the `EngineConfig` dataclass, the command-line flags that fill it (declared here
once for `dsv32 serve`, `generate` and `chat`, with the dataclass's defaults), and what follows
from it once the model's config is known (context length, cache blocks, speculation)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from dsv32.model.config import ModelConfig
from dsv32.model.formats import PREFILL_DTYPES, WEIGHT_FORMATS, WeightFormat

from .cache import PagedCache
from .device import AUTO, resolve_device
from .sequence import Sequence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the paged cache's storage: the compute dtype, bf16 (2 bytes a value, what llama.cpp's f16 cache
# costs), or the FP8 deployment layout (e4m3 + group scales; "fp8_e4m3" names the same, as vLLM does)
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3")
KERNELS = ("off", "torch", "triton")
DEFAULT_MAX_MODEL_LEN = 8192    # when not given: min(this, the model's max_position_embeddings)
# tokens a step computes when not given: on the CPU 512 (llama.cpp's micro-batch; prefill chunks of
# 512 ran as fast as 2048's or faster, 1.0-1.4x, with a third to a quarter of their temporaries:
# bench/README.md, "Prefill chunk: 512 tokens a step"), on an accelerator 2048 (vLLM's default for serving)
CPU_BATCHED_TOKENS, ACCELERATOR_BATCHED_TOKENS = 512, 2048


@dataclass
class EngineConfig:
    """Engine settings (the CLIs fill these in from `add_engine_args`)."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"                     # or "auto": resolve_device's choice
    max_model_len: int | None = None        # default: min(config max positions, 8192)
    max_num_seqs: int = 32
    max_num_batched_tokens: int | None = None  # default: CPU_ / ACCELERATOR_BATCHED_TOKENS
    num_blocks: int | None = None           # default: enough for max_num_seqs full-length sequences
    kv_cache_memory: int | None = None      # bytes; alternative way to size the cache
    kv_cache_dtype: str = "auto"            # one of KV_CACHE_DTYPES
    enable_prefix_caching: bool = True
    fp8_storage: bool = False               # keep FP8 weights, dequantise per block on the fly
    weight_format: WeightFormat = "fp32"    # CPU: fp32 | bf16 | fp16 | int8 | fp8 (model/formats.py)
    prefill_dtype: str = "float32"          # packed formats: bfloat16 products over many rows (formats.py)
    tensor_parallel_size: int = 1           # ranks sharing every layer (heads, inner dims, vocab)
    enable_expert_parallel: bool = False    # partition routed experts across the ranks instead
    num_speculative_tokens: int = 0         # 1: MTP speculative decoding (the model's MTP layer drafts)
    kernels: str = "off"                    # "torch" / "triton": decode and prefill through dsv32.kernels

    def __post_init__(self):
        self.device = resolve_device(self.device)
        try:
            kind = torch.device(self.device).type
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r} is not a torch device: {e}") from None
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = CPU_BATCHED_TOKENS if kind == "cpu" else ACCELERATOR_BATCHED_TOKENS
        for name, allowed in (("dtype", DTYPES), ("kv_cache_dtype", KV_CACHE_DTYPES), ("kernels", KERNELS),
                              ("prefill_dtype", PREFILL_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.prefill_dtype != "float32" and self.weight_format == "fp32":
            raise ValueError(f"prefill_dtype {self.prefill_dtype} needs a packed weight_format (bf16, fp16, int8, "
                             f"fp8): fp32 weights stay exact")
        if self.kernels != "off" and self.cache_dtype != self.torch_dtype and not self.cache_fp8:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} with kernels {self.kernels} needs dtype "
                             f"{self.kv_cache_dtype} (dsv32.kernels read a plain cache in the compute dtype)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: str) -> EngineConfig:
        """The settings `add_engine_args` parsed, for the checkpoint `model`."""
        return cls(model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                   kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=not args.no_prefix_caching,
                   fp8_storage=args.fp8_storage, tensor_parallel_size=args.tensor_parallel_size,
                   enable_expert_parallel=args.enable_expert_parallel,
                   num_speculative_tokens=args.num_speculative_tokens, kernels=args.kernels,
                   weight_format=args.weight_format, prefill_dtype=args.prefill_dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cache_fp8(self) -> bool:
        """The paged cache keeps the FP8 deployment layout."""
        return self.kv_cache_dtype in ("fp8", "fp8_e4m3")

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the paged cache's pools, where not FP8: the compute dtype or bf16."""
        return torch.bfloat16 if self.kv_cache_dtype == "bfloat16" else self.torch_dtype

    @property
    def speculative(self) -> bool:
        """MTP speculative decoding is on."""
        return self.num_speculative_tokens == 1

    def model_len(self, mc: ModelConfig) -> int:
        """The longest sequence (prompt + output) the engine serves for this model."""
        n = self.max_model_len or min(mc.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if n > mc.max_position_embeddings:
            raise ValueError(f"max_model_len {n} exceeds the model's "
                             f"max_position_embeddings {mc.max_position_embeddings}")
        return n

    def cache_layers(self, mc: ModelConfig) -> int:
        """Layers the paged cache holds: the main stack, and the MTP layer only when it drafts."""
        return mc.num_hidden_layers + (mc.num_nextn_predict_layers if self.speculative else 0)

    def cache_blocks(self, mc: ModelConfig, max_model_len: int) -> int:
        """Number of 64-token cache blocks: given, from a memory budget, or max_num_seqs full sequences."""
        bs = Sequence.block_size
        blocks_per_seq = -(-max_model_len // bs)
        num_blocks = self.num_blocks
        if num_blocks is None and self.kv_cache_memory:
            per_block = bs * self.cache_layers(mc) * PagedCache.bytes_per_token(
                mc.kv_lora_rank, mc.qk_rope_head_dim, mc.index_head_dim, self.cache_dtype, self.cache_fp8)
            num_blocks = self.kv_cache_memory // per_block
        if num_blocks is None:
            num_blocks = blocks_per_seq * self.max_num_seqs
        if num_blocks < blocks_per_seq:
            raise ValueError(f"KV cache of {num_blocks} blocks cannot hold one sequence of "
                             f"max_model_len {max_model_len} ({blocks_per_seq} blocks)")
        return num_blocks

    def check_speculation(self, mc: ModelConfig) -> None:
        """ValueError unless speculation is off, or one token drafted by a model that has an MTP layer."""
        if self.num_speculative_tokens not in (0, 1):
            raise ValueError(f"num_speculative_tokens must be 0 or 1 (one MTP layer drafts one token), "
                             f"not {self.num_speculative_tokens}")
        if self.num_speculative_tokens and mc.num_nextn_predict_layers < 1:
            raise ValueError("num_speculative_tokens 1 needs a model with an MTP layer "
                             "(num_nextn_predict_layers >= 1)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags (defaults: EngineConfig's); `EngineConfig.from_args` reads them back."""
    d = EngineConfig
    p.add_argument("--model", default=None,
                   help="checkpoint directory, HF layout (default: the bundled model, else a generated tiny one)")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES))
    p.add_argument("--device", default=AUTO, help="cpu, cuda, cuda:N, or auto (default): cuda when present, else cpu")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help=f"longest prompt + output (default: the model's, at most {DEFAULT_MAX_MODEL_LEN})")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens computed in one step (prefills are chunked to fit; default: 512 on the CPU, "
                        "2048 on a GPU)")
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                   help="the paged cache's storage: auto (the compute dtype), bfloat16 (half of fp32's memory), "
                        "fp8 / fp8_e4m3 (the deployment layout: e4m3 + a scale per 128 values, bf16 rope)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt blocks")
    p.add_argument("--fp8-storage", action="store_true",
                   help="keep FP8 checkpoint weights in FP8 (dequantised per block on the fly)")
    p.add_argument("--weight-format", default=d.weight_format, choices=list(WEIGHT_FORMATS),
                   help="how matrices are stored for fp32 compute on CPU: fp32 (exact), bf16/fp16 (2 bytes), "
                        "int8 (~1 byte, group scales), fp8 (the checkpoint's FP8 as int8); see README")
    p.add_argument("--prefill-dtype", default=d.prefill_dtype, choices=list(PREFILL_DTYPES),
                   help="a packed weight format's products over many rows (prefill): float32 (exact), "
                        "bfloat16 (llama.cpp's numerics, ~2x faster prefill on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size,
                   help="processes sharing every layer (started by the engine, or by torchrun: docs/deploy.md)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="partition routed experts across the tensor-parallel ranks")
    p.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens, choices=[0, 1],
                   help="1: MTP speculative decoding (same tokens, fewer steps when drafts are accepted)")
    p.add_argument("--kernels", default=d.kernels, choices=KERNELS,
                   help="the fast paths (dsv32.kernels: FP8 GEMMs, paged DSA, packed experts; CUDA graphs on "
                        "a GPU) for plain forwards; off: the eager reference")

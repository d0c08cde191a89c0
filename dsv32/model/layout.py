"""The published checkpoint layout: every tensor's name, shape and on-disk dtype (the one place
that knows tensor names), and the names around it (scales, shards, tied MTP tensors)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"          # "x.weight" -> "x.weight_scale_inv"
MAP_WINDOW = 64 << 20               # bytes read from one mapping of a shard before re-mapping it
READ_WINDOW = 16 << 20              # bytes of rows read from one mapping of a larger plain matrix
FP8_VOCAB = ("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")
FP32_PINNED = ("mlp.gate.e_score_correction_bias", "self_attn.indexer.weights_proj.weight")

# safetensors dtype strings we accept: plain floats, and e4m3 for block-quantised weights
FLOAT_DTYPES = ("BF16", "F16", "F32")
FLOAT_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
FP8_DTYPES = ("F8_E4M3",)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: the message names the tensor and the file."""


@dataclass(frozen=True)
class TensorSpec:
    """One published tensor: its shape, its dtype on disk, whether FP8 checkpoints block-quantise it."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16
    quantised: bool = False


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def is_fp8_vocab(name: str) -> bool:
    """Embeddings and LM heads: bf16 in the published checkpoint, but a small model may store them
    in FP8 with block scales too (its vocabulary is nearly all of its bytes); they load dequantised."""
    return name.endswith(FP8_VOCAB)


def is_fp32_pinned(name: str) -> bool:
    """Tensors the model keeps in fp32 whatever the compute dtype (routing bias, indexer head weights)."""
    return name.endswith(FP32_PINNED)


def _decoder_layer(cfg: ModelConfig, p: str, moe: bool) -> dict[str, TensorSpec]:
    h, H = cfg.hidden_size, cfg.num_attention_heads
    Q = lambda *s: TensorSpec(tuple(s), quantised=True)    # noqa: E731  block-quantised linear
    B = lambda *s: TensorSpec(tuple(s))                    # noqa: E731  plain bf16
    a = p + "self_attn."
    out = {
        p + "input_layernorm.weight": B(h),
        p + "post_attention_layernorm.weight": B(h),
        a + "q_a_proj.weight": Q(cfg.q_lora_rank, h),
        a + "q_a_layernorm.weight": B(cfg.q_lora_rank),
        a + "q_b_proj.weight": Q(H * cfg.qk_head_dim, cfg.q_lora_rank),
        a + "kv_a_proj_with_mqa.weight": Q(cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        a + "kv_a_layernorm.weight": B(cfg.kv_lora_rank),
        a + "kv_b_proj.weight": Q(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        a + "o_proj.weight": Q(h, H * cfg.v_head_dim),
        a + "indexer.wq_b.weight": Q(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
        a + "indexer.wk.weight": Q(cfg.index_head_dim, h),
        a + "indexer.k_norm.weight": B(cfg.index_head_dim),
        a + "indexer.k_norm.bias": B(cfg.index_head_dim),
        a + "indexer.weights_proj.weight": B(cfg.index_n_heads, h),
    }

    def mlp(q: str, inter: int) -> None:
        out[q + "gate_proj.weight"] = Q(inter, h)
        out[q + "up_proj.weight"] = Q(inter, h)
        out[q + "down_proj.weight"] = Q(h, inter)

    if not moe:
        mlp(p + "mlp.", cfg.intermediate_size)
        return out
    out[p + "mlp.gate.weight"] = B(cfg.n_routed_experts, h)
    out[p + "mlp.gate.e_score_correction_bias"] = TensorSpec((cfg.n_routed_experts,), torch.float32)
    for j in range(cfg.n_routed_experts):
        mlp(f"{p}mlp.experts.{j}.", cfg.moe_intermediate_size)
    mlp(p + "mlp.shared_experts.", cfg.moe_intermediate_size * cfg.n_shared_experts)
    return out


def checkpoint_layout(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of the published HF checkpoint (scales excluded), in file order."""
    h, V = cfg.hidden_size, cfg.vocab_size
    out = {"model.embed_tokens.weight": TensorSpec((V, h))}
    for i in range(cfg.num_hidden_layers):
        out.update(_decoder_layer(cfg, f"model.layers.{i}.", cfg.is_moe_layer(i)))
    for k in range(cfg.num_nextn_predict_layers):   # MTP: layers after the main stack
        i = cfg.num_hidden_layers + k
        p = f"model.layers.{i}."
        out[p + "embed_tokens.weight"] = TensorSpec((V, h))
        out[p + "enorm.weight"] = TensorSpec((h,))
        out[p + "hnorm.weight"] = TensorSpec((h,))
        out[p + "eh_proj.weight"] = TensorSpec((h, 2 * h))
        out.update(_decoder_layer(cfg, p, cfg.is_moe_layer(i)))
        out[p + "shared_head.norm.weight"] = TensorSpec((h,))
        out[p + "shared_head.head.weight"] = TensorSpec((V, h))
    out["model.norm.weight"] = TensorSpec((h,))
    out["lm_head.weight"] = TensorSpec((V, h))
    return out


def mtp_vocab_sources(cfg: ModelConfig) -> dict[str, str]:
    """The MTP layers' embedding and output head -> the main model's tensor they equal. The paper
    shares them; the published checkpoint stores copies, which a checkpoint may leave out (the
    loader then reads the main tensor)."""
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{cfg.num_hidden_layers + k}."
        out[p + "embed_tokens.weight"] = "model.embed_tokens.weight"
        out[p + "shared_head.head.weight"] = "lm_head.weight"
    return out


def block_size(cfg: ModelConfig) -> tuple[int, int]:
    q = cfg.quantization_config
    return tuple(q.weight_block_size) if q else (128, 128)

"""Engine flags are declared once: `dsv32 serve`, `generate` and `chat` take the same engine flags,
with EngineConfig's defaults."""
import argparse

import pytest
import torch

from dsv32.cli import build_parser
from dsv32.engine.config import EngineConfig, add_engine_args


def actions(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def subparser(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


@pytest.mark.parametrize("command", ["serve", "generate", "chat"])
def test_every_command_takes_the_engine_flags_with_one_set_of_defaults(command):
    own = argparse.ArgumentParser()
    add_engine_args(own)
    engine = actions(own)
    flags = actions(subparser(command))
    for dest, a in engine.items():
        assert flags[dest].option_strings == a.option_strings and flags[dest].default == a.default, dest
    args = build_parser().parse_args([command])
    assert EngineConfig.from_args(args, "m") == EngineConfig(model="m")


def test_the_flags_fill_every_field_they_name():
    args = build_parser().parse_args(
        ["serve", "--dtype", "bfloat16", "--device", "cuda", "--max-model-len", "4096", "--max-num-seqs", "16",
         "--max-num-batched-tokens", "1024", "--kv-cache-dtype", "fp8", "--no-prefix-caching", "--fp8-storage",
         "--tensor-parallel-size", "8", "--enable-expert-parallel", "--num-speculative-tokens", "1",
         "--weight-format", "int8", "--kernels", "torch", "--prefill-dtype", "bfloat16"])
    assert EngineConfig.from_args(args, "m") == EngineConfig(
        model="m", dtype="bfloat16", device="cuda", max_model_len=4096, max_num_seqs=16,
        max_num_batched_tokens=1024, kv_cache_dtype="fp8", enable_prefix_caching=False, fp8_storage=True,
        tensor_parallel_size=8, enable_expert_parallel=True, num_speculative_tokens=1,
        weight_format="int8", kernels="torch", prefill_dtype="bfloat16")


def test_a_step_computes_512_tokens_on_the_cpu_and_2048_on_a_gpu_unless_told():
    """Prefill chunks of 512 run as fast as 2048's on the CPU with a quarter of the temporaries."""
    assert EngineConfig(model="m").max_num_batched_tokens == 512
    assert EngineConfig(model="m", device="cuda:1").max_num_batched_tokens == 2048
    assert EngineConfig(model="m", max_num_batched_tokens=96).max_num_batched_tokens == 96
    args = build_parser().parse_args(["serve", "--device", "cuda"])
    assert EngineConfig.from_args(args, "m").max_num_batched_tokens == 2048
    for field in ("max_num_batched_tokens", "max_num_seqs"):
        with pytest.raises(ValueError, match=f"{field} must be at least 1, not 0"):
            EngineConfig(model="m", **{field: 0})
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        EngineConfig(model="m", device="gpu")
    assert EngineConfig(model="m", device="auto").device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_settings_are_refused_by_name():
    """A typo in a setting is an error that names it, not a silent default (an unknown cache dtype
    once gave the plain cache)."""
    for field, bad in (("kv_cache_dtype", "fp16"), ("dtype", "bf16"), ("kernels", "cuda"), ("prefill_dtype", "bf16")):
        with pytest.raises(ValueError, match=f"{field} must be one of .*not '{bad}'"):
            EngineConfig(model="m", **{field: bad})
    with pytest.raises(ValueError, match="prefill_dtype bfloat16 needs a packed weight_format"):
        EngineConfig(model="m", prefill_dtype="bfloat16")              # fp32 weights stay exact
    with pytest.raises(ValueError, match="kv_cache_dtype bfloat16 with kernels triton needs dtype bfloat16"):
        EngineConfig(model="m", kv_cache_dtype="bfloat16", kernels="triton")
    both = EngineConfig(model="m", kv_cache_dtype="bfloat16", kernels="triton", dtype="bfloat16")
    assert both.cache_dtype == torch.bfloat16
    e4m3 = EngineConfig(model="m", kv_cache_dtype="fp8_e4m3")
    assert e4m3.cache_fp8 and EngineConfig(model="m", kv_cache_dtype="fp8").cache_fp8
    assert not EngineConfig(model="m", kv_cache_dtype="bfloat16").cache_fp8


def test_a_memory_budget_holds_twice_the_blocks_in_bf16(tiny_fp8_ue8m0):
    from dsv32.model.config import ModelConfig
    mc = ModelConfig.from_json(tiny_fp8_ue8m0)
    blocks = {kv: EngineConfig(model="m", kv_cache_dtype=kv, kv_cache_memory=1 << 26).cache_blocks(mc, 128)
              for kv in ("auto", "bfloat16", "fp8")}
    assert blocks["bfloat16"] in (2 * blocks["auto"], 2 * blocks["auto"] + 1) and blocks["fp8"] > blocks["bfloat16"]

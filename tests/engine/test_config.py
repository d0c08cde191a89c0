"""Engine flags are declared once: `dsv32 serve`, `generate` and `chat` take the same engine flags,
with EngineConfig's defaults."""
import argparse

import pytest

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
         "--max-num-batched-tokens", "512", "--kv-cache-dtype", "fp8", "--no-prefix-caching", "--fp8-storage",
         "--tensor-parallel-size", "8", "--enable-expert-parallel", "--num-speculative-tokens", "1",
         "--weight-format", "int8", "--kernels", "torch"])
    assert EngineConfig.from_args(args, "m") == EngineConfig(
        model="m", dtype="bfloat16", device="cuda", max_model_len=4096, max_num_seqs=16,
        max_num_batched_tokens=512, kv_cache_dtype="fp8", enable_prefix_caching=False, fp8_storage=True,
        tensor_parallel_size=8, enable_expert_parallel=True, num_speculative_tokens=1,
        weight_format="int8", kernels="torch")

"""bench/gpu_layers.py cannot rot: its --small run (CPU, seconds) and its floors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_floors import fp8_bytes, layer_work, touched_experts  # noqa: E402
from gpu_layers import REAL, make_config  # noqa: E402


def test_floors_at_real_dims():
    cfg = make_config(REAL, 1)
    expert = 3 * fp8_bytes(2048, 7168)
    assert expert == 3 * (2048 * 7168 + 4 * 16 * 56)
    assert touched_experts(cfg, 1) == pytest.approx(8)
    assert touched_experts(cfg, 64) == pytest.approx(256 * (1 - (248 / 256) ** 64))
    w = layer_work(cfg, 1, 1, 4095)                          # decode the 4096th token
    attn = sum(o * i for o, i in [(1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384),
                                  (8192, 1536), (128, 7168)])
    assert attn < w.weight_bytes - 9 * expert < attn * 1.05   # 8 routed + 1 shared expert, scales, gate
    assert w.attn_flops == 2 * 4096 * 64 * 128 + 2 * 2048 * 128 * (576 + 512)
    assert layer_work(cfg, 1, 1, 32767).cache_bytes - w.cache_bytes == (32768 - 4096) * 132   # index keys
    assert layer_work(cfg, 1, 4096, 28672).attn_flops > 100 * w.attn_flops


def test_small_run(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_layers.py"), "--small", "--layers", "1",
                        "--contexts", "96", "--batches", "2", "--prefill", "16", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(x["step"], x["batch"]) for x in data["rows"]] == [("decode", 2), ("prefill 16", 1)]
    for row in data["rows"]:
        assert not [k for k in row if k.endswith("_error")], row
        assert row["eager"] > 0 and row["fast"] > 0 and row["hbm_floor"] > 0 and row["flop_floor"] > 0
    assert len(data["prefill_dsa"]) == 1 and data["prefill_dsa"][0]["sparse_mla"] > 0
    assert "| decode | 2 | 96 |" in r.stdout


def test_sm90_report_compiles_without_gpu():
    """bench/triton_sm90.py: a kernel compiled for sm_90 on this machine (a process without the
    interpreter), no spills reported."""
    pytest.importorskip("triton", reason="triton is not installed (pip install dsv32[kernels])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "triton_sm90.py"), "--only", "w8a16 BM16"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    row = [line for line in r.stdout.splitlines() if "w8a16 BM16" in line]
    assert len(row) == 1 and "| 0 / 0 |" in row[0] and "HMMA" in row[0], r.stdout

"""Engines own their processes: a tensor-parallel LLM closes its group and workers (shutdown, `with`,
garbage collection), engines follow one another in one process, and a worker that dies while the
group starts fails the start within seconds, naming the worker and its error."""
import gc
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from dsv32.engine.group import Group
from dsv32.engine.llm import LLM
from dsv32.engine.sequence import SamplingParams
from dsv32.model.init_tiny import init_tiny

ROOT = Path(__file__).resolve().parents[2]       # the checkout under test, first on the scripts' path
PROMPT = [5, 6, 7, 8, 9] * 5
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_tiny(tmp_path_factory.mktemp("tp_life"), seed=2, layers=1, topk=16)


def tokens(llm) -> list[int]:
    return llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_engines_one_after_another_in_one_process(ckpt):
    """shutdown(), an LLM dropped without it, then `with`: each next engine makes its own group."""
    llm = LLM(model=str(ckpt), max_model_len=128, tensor_parallel_size=2)
    workers = list(llm.engine.executor.group.workers)
    ref = tokens(llm)
    llm.shutdown()
    llm.shutdown()                                  # a second call does nothing
    assert not dist.is_initialized() and not any(p.is_alive() for p in workers)

    dropped = LLM(model=str(ckpt), max_model_len=128, tensor_parallel_size=2)
    workers = list(dropped.engine.executor.group.workers)
    assert tokens(dropped) == ref
    del dropped
    gc.collect()
    assert not dist.is_initialized() and not any(p.is_alive() for p in workers)

    with LLM(model=str(ckpt), max_model_len=128, tensor_parallel_size=2) as llm:
        assert tokens(llm) == ref
        workers = list(llm.engine.executor.group.workers)
    assert not dist.is_initialized() and not any(p.is_alive() for p in workers)


def test_a_live_engine_keeps_its_group(ckpt):
    """While an engine holds its group, a second is refused (its group is not torchrun's)."""
    with LLM(model=str(ckpt), max_model_len=128, tensor_parallel_size=2) as llm:
        with pytest.raises(RuntimeError, match="already runs a tensor-parallel engine"):
            LLM(model=str(ckpt), max_model_len=128, tensor_parallel_size=2)
        assert tokens(llm)


def serve_and_fail(rank: int, world: int, local_rank: int) -> None:
    """A worker that joins the group and then fails setting up (spawn imports it by name)."""
    raise RuntimeError("no device for this rank")


def test_a_worker_failing_after_it_joined_is_named_with_its_error():
    group = Group.start(2, "cpu", serve_and_fail)
    try:
        group.workers[0].join(timeout=60)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 .*no device for this rank"):
            group.send(("compute", ()))
        assert time.monotonic() - t0 < 30
    finally:
        group.close()
    assert not dist.is_initialized()


def run_script(tmp_path, body: str, stdin: bool) -> tuple[subprocess.CompletedProcess, float]:
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(body)
    t0 = time.monotonic()
    if stdin:
        proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=240)
    else:
        path = tmp_path / "start.py"
        path.write_text(script)
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=240)
    return proc, time.monotonic() - t0


def test_a_script_read_on_stdin_fails_fast(ckpt, tmp_path):
    """Spawned workers cannot re-import `<stdin>`: said at once, instead of a 30-minute rendezvous."""
    proc, took = run_script(tmp_path, f"""
        from dsv32.engine.llm import LLM
        LLM(model={str(ckpt)!r}, max_model_len=128, tensor_parallel_size=2)
        """, stdin=True)
    assert proc.returncode != 0 and took < 120
    assert "'<stdin>' cannot be re-imported" in proc.stderr


def test_a_worker_dying_before_it_joins_fails_the_start_fast(ckpt, tmp_path):
    """The spawned worker re-imports the script, whose top level raises there: rank 0 sees the
    worker exit while waiting for it and names it."""
    proc, took = run_script(tmp_path, f"""
        if __name__ == "__mp_main__":
            raise RuntimeError("this script only runs as the main module")
        from dsv32.engine.llm import LLM
        try:
            LLM(model={str(ckpt)!r}, max_model_len=128, tensor_parallel_size=2)
        except RuntimeError as e:
            print("FAILED:", e)
        """, stdin=False)
    assert proc.returncode == 0 and took < 120, proc.stderr
    assert "FAILED: tensor-parallel worker rank 1 exited with code 1 before joining the group" in proc.stdout
    assert "only runs as the main module" in proc.stderr          # the worker's own traceback

"""Entry point for torchrun: rank 0 runs a `dsv32` command, the other ranks serve as workers.

    torchrun --nproc-per-node 8 -m dsv32.launch serve --model DIR --tensor-parallel-size 8
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m dsv32.launch serve --model DIR --tensor-parallel-size 16

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the process group is
joined with `init_method="env://"`. The command's --tensor-parallel-size must equal WORLD_SIZE.
"""
from __future__ import annotations

import os
import sys

import torch.distributed as dist

from dsv32.cli import main as cli_main
from dsv32.engine.executor import serve_worker
from dsv32.engine.group import TIMEOUT, backend_for


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "RANK" not in os.environ:
        raise SystemExit("dsv32.launch runs under torchrun (RANK/WORLD_SIZE are not set)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = "cuda" if "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda") else "cpu"
    dist.init_process_group(backend_for(device), init_method="env://", timeout=TIMEOUT)
    if rank == 0:
        return cli_main(argv)
    serve_worker(rank, world, local_rank)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensors read in place from a safetensors file: a private mapping of the file's pages, of which
only those read become resident (llama.cpp maps its whole model so). Used for token embeddings,
whose decode steps read a few rows of a table as large as the LM head. The file must stay as it
is while the model lives (a truncated file faults the process on its next read)."""
from __future__ import annotations

import json
import mmap
from pathlib import Path

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def header(file: Path) -> tuple[int, dict]:
    """(where the data begins, the header's {name: {dtype, shape, data_offsets}})."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def mapped_tensor(file: Path, name: str) -> torch.Tensor:
    """Tensor `name` of `file` (a plain float dtype), its storage the file's pages mapped
    copy-on-write: reading it pages the file in, nothing is copied or written back."""
    base, head = header(file)
    info = head[name]
    dtype = DTYPES[info["dtype"]]
    start, stop = info["data_offsets"]
    with open(file, "rb") as f:
        pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)   # writable: frombuffer takes it silently
    count = (stop - start) // dtype.itemsize
    return torch.frombuffer(pages, dtype=dtype, count=count, offset=base + start).view(info["shape"])

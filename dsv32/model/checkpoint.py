"""Reading a checkpoint in the published layout (sharded safetensors, FP8 with block scales, ue8m0
too) into a model, dequantised, kept in FP8, or packed in a CPU weight format."""
from __future__ import annotations

import json
from collections import defaultdict, deque
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .config import ModelConfig
from .formats import PREFILL_DTYPES, packed_storage, prepare_load
from .convert import copy_into
from .fp8 import FP8, scale_shape
from .mapping import header, mapped_tensor
from .meta import to_empty
from .layout import (FLOAT_BYTES, FLOAT_DTYPES, FP8_DTYPES, INDEX_FILE, MAP_WINDOW, READ_WINDOW, SCALE_SUFFIX,
                     SINGLE_FILE, CheckpointError, TensorSpec, block_size, checkpoint_layout, is_fp8_vocab,
                     is_fp32_pinned, mtp_vocab_sources, scale_name)


def _weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index (or the single file's header)."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        out = {}
        for name, fname in wm.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{index}: tensor {name} is listed in file {fname}, "
                                      f"which does not exist ({f})")
            out[name] = f
        return out
    single = path / SINGLE_FILE
    if single.is_file():
        with _open(single) as f:
            return {n: single for n in f.keys()}
    raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module | None, str]:
    """The module holding tensor `name` and the leaf name; None for an absent (non-local) expert."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model
    for part in mod_name.split("."):
        if not hasattr(mod, part):
            raise CheckpointError(f"model has no parameter {name} (checkpoint layout tensor)")
        mod = getattr(mod, part)
        if mod is None:
            if ".mlp.experts." not in name:
                raise CheckpointError(f"model has no parameter {name} (checkpoint layout tensor)")
            return None, leaf
    return mod, leaf


def _packs(mod: nn.Module, name: str, spec: TensorSpec, weight_format: str) -> str | None:
    """The packed storage this layout tensor gets under `weight_format` (formats.py), or None."""
    from .layers import Linear, VocabParallelEmbedding

    if not isinstance(mod, (Linear, VocabParallelEmbedding)) or len(spec.shape) != 2 or is_fp32_pinned(name):
        return None
    return packed_storage(weight_format, spec.quantised)


def _materialise(model: nn.Module, layout: dict[str, TensorSpec], device, dtype,
                 fp8_storage: bool, block: tuple[int, int], cfg: ModelConfig,
                 weight_format: str = "fp32", prefill_dtype: str = "float32") -> list[str]:
    """Put the model in the requested storage mode and give meta tensors real (empty) storage.
    Returns the layout names the model holds (experts held by other processes are left out)."""
    from .layers import Linear, Rotary, yarn_inv_freq

    held = []
    for name, spec in layout.items():
        mod, leaf = _owner(model, name)
        if mod is None:
            continue
        held.append(name)
        p = getattr(mod, leaf)
        if not isinstance(p, torch.Tensor):
            raise CheckpointError(f"model has no parameter {name} (checkpoint layout tensor)")
        packed = _packs(mod, name, spec, weight_format)
        if packed:
            if mod.packed != packed and isinstance(mod, Linear):
                mod.pack(packed, PREFILL_DTYPES[prefill_dtype])
            elif mod.packed != packed:
                mod.pack(packed)
        elif spec.quantised and isinstance(mod, Linear):
            if fp8_storage and mod.fp8_block != block:
                mod.use_fp8_storage(block)
            elif dtype is not None and not mod.fp8_block and p.dtype != dtype:
                mod.weight = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        elif is_fp32_pinned(name):
            if p.dtype != torch.float32:
                setattr(mod, leaf, nn.Parameter(p.detach().float(), requires_grad=p.requires_grad))
        elif dtype is not None and p.is_floating_point() and p.dtype != dtype:
            setattr(mod, leaf, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))

    meta_buffers = [n for n, b in model.named_buffers() if b.is_meta]
    if meta_buffers or any(t.is_meta for t in model.parameters()):
        to_empty(model, device)
    else:
        model.to(device)
    # buffers built on the meta device carry no values: recompute them
    for n in meta_buffers:
        mod_name, _, leaf = n.rpartition(".")
        mod = model.get_submodule(mod_name)
        if hasattr(mod, "reset_buffers"):
            mod.reset_buffers()
        elif isinstance(mod, Rotary) and leaf == "inv_freq":
            mod.inv_freq = yarn_inv_freq(cfg).to(device)
        else:
            raise CheckpointError(f"model buffer {n} was built on the meta device and "
                                  f"{type(mod).__name__} has no reset_buffers() to recompute it")
    return held


def _shard(model: nn.Module, name: str) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the slice of tensor `name` this process holds (tensor parallelism)."""
    mod, leaf = _owner(model, name)
    return getattr(mod, "shard", None) if leaf == "weight" else None


def _local_shape(shape: tuple[int, ...], shard) -> tuple[int, ...]:
    if shard is None:
        return shape
    dim, start, stop = shard
    return shape[:dim] + (stop - start,) + shape[dim + 1:]


def _check_model(model: nn.Module, layout: dict[str, TensorSpec], held: list[str]
                 ) -> dict[str, torch.Tensor]:
    """The model's state tensors by name; they must be exactly the layout (plus FP8 scales)."""
    state = model.state_dict(keep_vars=True)
    for n, t in state.items():
        base = n[: -len(SCALE_SUFFIX)] if n.endswith(SCALE_SUFFIX) else n
        if base not in layout:
            raise CheckpointError(f"model parameter {n} is not part of the checkpoint layout")
        want = _local_shape(layout[n].shape, _shard(model, n)) if n == base else None
        if n == base and tuple(t.shape) != want:
            raise CheckpointError(f"model parameter {n} has shape {tuple(t.shape)}, "
                                  f"the checkpoint layout says {want}")
    for n in held:
        if n not in state:
            raise CheckpointError(f"model has no parameter {n} (checkpoint layout tensor)")
    return state


@torch.no_grad()
def load_checkpoint(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", fp8_storage: bool = False,
                    progress: bool = True, weight_format: str = "fp32", prefill_dtype: str = "float32") -> nn.Module:
    """Copy a checkpoint into `model` tensor by tensor (memory-mapped shards, one open at a time).

    `model` may live on the meta device; it is materialised on `device`. `fp8_storage`: quantised
    Linears keep FP8 weights + block scales (dequantised per call); otherwise they are dequantised
    into the compute dtype. `dtype`: if given, the float parameters other than FP8 weights and the
    fp32-pinned ones are stored in it. `weight_format` (formats.py): how matrices are stored for
    fp32 compute on CPU; each tensor is converted as it is read; `prefill_dtype`: their products over
    many rows (formats.PREFILL_DTYPES). Raises CheckpointError naming the tensor and the file.
    """
    prepare_load(weight_format, fp8_storage, dtype, device, prefill_dtype)
    path = Path(path)
    cfg = ModelConfig.from_json(path)
    layout, block = checkpoint_layout(cfg), block_size(cfg)
    where = _weight_map(path)
    src_desc = path / INDEX_FILE if (path / INDEX_FILE).exists() else path / SINGLE_FILE

    # names: every layout tensor present, nothing else (scales only beside quantised weights);
    # absent MTP embedding/head copies are read from the main model's tensors
    source = {n: n for n in layout} | {n: main for n, main in mtp_vocab_sources(cfg).items() if n not in where}
    for n in layout:
        if source[n] not in where:
            raise CheckpointError(f"missing tensor {n}: not found in {src_desc}")
    for n, f in where.items():
        base = n[: -len(SCALE_SUFFIX)] if n.endswith(SCALE_SUFFIX) else None
        if n not in layout and not (base in layout and (layout[base].quantised or is_fp8_vocab(base))):
            raise CheckpointError(f"unexpected tensor {n} in {f}: not part of the DeepSeek-V3.2 layout")

    held = _materialise(model, layout, device, dtype, fp8_storage, block, cfg, weight_format, prefill_dtype)
    tied = _tie_mtp_vocab(model, cfg, where, source, held)
    state = _check_model(model, layout, held)
    mapped = _map_vocab(model, cfg, layout, where, source, tied)
    held = [n for n in held if n not in tied and n not in mapped]

    by_file: dict[Path, list[str]] = defaultdict(list)
    for n in held:
        by_file[where[source[n]]].append(n)
    # progress: a bar on a terminal only (None: tqdm's own isatty check), never in a server's log
    bar = tqdm(total=len(held), desc=f"loading {path.name}", unit="tensor", disable=None if progress else True)
    for file in sorted(by_file):
        with _open(file) as f:
            keys = set(f.keys())
            windowed = [n for n in by_file[file]
                        if source[n] in keys and _windowed(f, source[n], state[n], _shard(model, n))]
        todo = deque(n for n in by_file[file] if n not in windowed)
        while todo:                                 # re-map every MAP_WINDOW bytes: pages already
            with _open(file) as f:                  # copied stop counting as resident memory
                keys, mapped = set(f.keys()), 0
                while todo and mapped < MAP_WINDOW:
                    n = todo.popleft()
                    if source[n] not in keys:
                        raise CheckpointError(f"tensor {source[n]}: the index lists it in {file}, "
                                              f"which does not contain it")
                    shard = _shard(model, n)
                    w, scale = _read(f, file, source[n], layout[n], where, block, keys, shard)
                    fp8_first = weight_format == "fp8" and layout[n].quantised and scale is None
                    copy_into(state[n], state.get(scale_name(n)), w, scale, block, cfg, n, file, shard, fp8_first)
                    mapped += w.numel() * w.element_size()
                    bar.update()
            del f, w, scale                         # unmap before mapping again
        for n in windowed:
            fp8_first = weight_format == "fp8" and layout[n].quantised
            _copy_windows(file, source[n], n, layout[n], state[n], state.get(scale_name(n)), block, cfg, fp8_first)
            bar.update()
    bar.close()
    return model


def _map_vocab(model: nn.Module, cfg: ModelConfig, layout: dict[str, TensorSpec], where: dict[str, Path],
               source: dict[str, str], tied: set[str]) -> set[str]:
    """Token embeddings of a packed weight format, whole in this process and bf16 in the checkpoint,
    read in place (mapping.py: only the rows of tokens seen become resident). Returns their names."""
    from .layers import VocabParallelEmbedding

    tables, mapped = {}, set()
    for n, spec in layout.items():
        mod, leaf = _owner(model, n)
        if not isinstance(mod, VocabParallelEmbedding) or leaf != "weight" or not mod.packed or mod.shard:
            continue
        src = mtp_vocab_sources(cfg)[n] if n in tied else source[n]     # tied: one table, the main one
        info = header(where[src])[1][src]
        if info["dtype"] != "BF16" or tuple(info["shape"]) != spec.shape:
            continue                                                    # read and converted as before
        mod.use_mapped(tables[src] if src in tables else mapped_tensor(where[src], src))
        tables[src] = mod.weight
        mapped.add(n)
    return mapped


def _windowed(f, name: str, dst: torch.Tensor, shard) -> bool:
    """Whether a tensor is read in row windows of READ_WINDOW bytes, each from a mapping of its own
    (a plain float matrix over the window, whole in this process, not stored as FP8): the mapped
    pages of the whole matrix then never count as resident beside its copy (each vocabulary matrix
    of the published model: 1.85 GB)."""
    sl = f.get_slice(name)
    dt, shape = sl.get_dtype(), sl.get_shape()
    return (shard is None and dt in FLOAT_DTYPES and len(shape) == 2 and dst.dtype != FP8
            and shape[0] * shape[1] * FLOAT_BYTES[dt] > READ_WINDOW)


def _copy_windows(file: Path, name: str, n: str, spec: TensorSpec, dst: torch.Tensor,
                  dst_scale: torch.Tensor | None, block, cfg: ModelConfig, fp8_first: bool) -> None:
    """copy_into `dst` (and its int8 row scales) the plain tensor `name`, READ_WINDOW bytes of rows
    (whole row blocks) at a time, one mapping a window."""
    rows, cols = spec.shape
    with _open(file) as f:
        dt = f.get_slice(name).get_dtype()
    step = block[0] * max(1, READ_WINDOW // (cols * FLOAT_BYTES[dt] * block[0]))
    for r in range(0, rows, step):
        with _open(file) as f:
            w, _ = _read(f, file, name, spec, {}, block, set(), (0, r, min(rows, r + step)))
        copy_into(dst[r:r + step], None if dst_scale is None else dst_scale[r:r + step], w, None, block, cfg,
                  n, file, None, fp8_first)
        del w


def _slice_rows(file: Path, name: str, start: int, rows: int) -> tuple[torch.Tensor, tuple]:
    """Rows [start, start + rows) of one tensor (a window of one mapping) and its (dtype, shape)."""
    with _open(file) as f:
        sl = f.get_slice(name)
        return sl[start:start + rows], (sl.get_dtype(), tuple(sl.get_shape()))


def _same_tensor(where: dict[str, Path], a: str, b: str) -> bool:
    """Whether checkpoint tensors `a` and `b` (and their scales) hold equal values, compared
    READ_WINDOW bytes of rows at a time, one mapping open at a time (nothing is loaded whole)."""
    names = [(a, b)] + ([(scale_name(a), scale_name(b))] if scale_name(a) in where or scale_name(b) in where else [])
    for x, y in names:
        if x not in where or y not in where:
            return False
        start, rows, n = 0, 1, 1
        while start < n:
            tx, meta_x = _slice_rows(where[x], x, start, rows)
            ty, meta_y = _slice_rows(where[y], y, start, rows)
            if meta_x != meta_y or not torch.equal(tx, ty):
                return False
            n = meta_x[1][0]
            start += rows
            rows = max(1, READ_WINDOW // max(1, tx[:1].numel() * tx.element_size()))
    return True


def _tie_mtp_vocab(model: nn.Module, cfg: ModelConfig, where: dict[str, Path], source: dict[str, str],
                   held: list[str]) -> set[str]:
    """The MTP layers' embedding and head become the main model's tensors (one copy in memory,
    as training ties them) when the checkpoint leaves them out or stores equal copies. Returns
    the tied names (not read again)."""
    tied = set()
    for n, main in mtp_vocab_sources(cfg).items():
        if n not in held or main not in held or not (source[n] == main or _same_tensor(where, n, main)):
            continue
        (mod, _), (main_mod, _) = _owner(model, n), _owner(model, main)
        mod.weight = main_mod.weight
        if getattr(main_mod, "weight_scale_inv", None) is not None:
            mod.weight_scale_inv = main_mod.weight_scale_inv
        tied.add(n)
    return tied


def _read(f, file: Path, name: str, spec: TensorSpec, where: dict[str, Path], block, keys: set,
          shard=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check one tensor's header (dtype, shape, scale) and read it (and its scale), or only
    this process's `shard` (dim, start, stop) of it and the scale blocks that cover it."""
    sl = f.get_slice(name)
    dt, shape = sl.get_dtype(), tuple(sl.get_shape())
    if shape != spec.shape:
        raise CheckpointError(f"tensor {name} in {file}: wrong shape {shape}, expected {spec.shape}")
    sname = scale_name(name)
    if dt in FP8_DTYPES:
        if not spec.quantised and not is_fp8_vocab(name):
            raise CheckpointError(f"tensor {name} in {file}: dtype {dt} is not allowed for a tensor "
                                  f"that is never quantised")
        if sname not in where:
            raise CheckpointError(f"tensor {name} in {file}: FP8 weight without its scale {sname}")
        scale = _read_scale(f if sname in keys else None, where[sname], sname, shape, block)
        if shard is not None:
            dim, start, stop = shard
            b = block[dim]
            scale = scale.narrow(dim, start // b, -(-stop // b) - start // b)
        return _get(f, file, name, shard), scale
    if dt not in FLOAT_DTYPES:
        kind = "weight dtype / quantisation" if spec.quantised else "dtype"
        raise CheckpointError(f"tensor {name} in {file}: unsupported {kind} {dt} "
                              f"(expected BF16/F16/F32{' or F8_E4M3 with block scales' if spec.quantised else ''})")
    if sname in where:
        raise CheckpointError(f"unexpected tensor {sname} in {where[sname]}: "
                              f"its weight {name} is {dt}, not FP8")
    return _get(f, file, name, shard), None


def _read_scale(f, file: Path, sname: str, wshape: tuple[int, int], block) -> torch.Tensor:
    if f is None:                                   # scale stored in another shard
        with _open(file) as g:
            return _read_scale(g, file, sname, wshape, block)
    sl = f.get_slice(sname)
    dt, shape, want = sl.get_dtype(), tuple(sl.get_shape()), scale_shape(wshape, block)
    if dt not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {sname} in {file}: unsupported scale dtype {dt} (expected F32)")
    if shape != want:
        raise CheckpointError(f"tensor {sname} in {file}: scale shape {shape} does not match the "
                              f"weight {wshape} in {block[0]}x{block[1]} blocks (expected {want})")
    return _get(f, file, sname).float()


def _get(f, file: Path, name: str, shard=None) -> torch.Tensor:
    try:
        if shard is None:
            return f.get_tensor(name)
        dim, start, stop = shard
        sl = f.get_slice(name)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"tensor {name} in {file}: cannot be read ({e})") from None


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               fp8_storage: bool = False, progress: bool = True, weight_format: str = "fp32",
               prefill_dtype: str = "float32", **model_kwargs) -> nn.Module:
    """Build the Transformer from `path/config.json` on the meta device, load the weights, eval
    mode. `weight_format`: "fp32" | "bf16" | "fp16" | "int8" | "fp8"; `prefill_dtype`: "float32" |
    "bfloat16" (see formats.py)."""
    from .transformer import Transformer

    cfg = ModelConfig.from_json(path)
    with torch.device("meta"):
        model = Transformer(cfg, dtype=dtype, **model_kwargs)
    load_checkpoint(model, path, dtype=dtype, device=device, fp8_storage=fp8_storage, progress=progress,
                    weight_format=weight_format, prefill_dtype=prefill_dtype)
    return model.eval()

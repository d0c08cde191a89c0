"""The native kernels' build: C++ source -> a Python extension module, compiled once with the C++
compiler on PATH and kept in ~/.cache/dsv32/kernels (or, where that is not writable, under /tmp),
keyed by everything the binary depends on.

Not inductor's toolchain: importing it (torch._inductor.codecache / cpp_builder, with sympy and
torch.fx) costs 150-190 MB of RSS and a second or two of start-up in a process that never traces a
graph, as a single-stream decode no longer does (bench/README.md, "dsv32 vs llama.cpp"). The flags
are the ones inductor's took effect with: no FMA contraction (the kernels' sums round as written)
and IEEE semantics otherwise (signed zeros: an FP8 cache stores -0 as the byte 0x80). OpenMP is
GCC's libgomp, whose soname torch's own copy shares: the process keeps one OpenMP runtime.

Each kernel's `extern "C" void kernel(...)` is wrapped by a generated entry point that takes tensors
(or ints) for pointers, ints and floats (anything else: TypeError), releases the GIL while the kernel
runs, and turns a C++ exception into a RuntimeError.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

CACHE = Path.home() / ".cache" / "dsv32" / "kernels"
COMPILERS = ("g++", "c++", "clang++")
FLAGS = ["-O3", "-DNDEBUG", "-march=native", "-ffp-contract=off",
         "-fno-tree-loop-vectorize", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-Wall", "-Wno-unknown-pragmas",
         "-Wno-unused-function", "-Wno-unused-variable"]


class KernelError(RuntimeError):
    """A native kernel could not be built; the message names what is missing."""


@functools.cache
def compiler() -> str | None:
    """The C++ compiler on PATH (g++, c++ or clang++), or None."""
    return next((p for p in map(shutil.which, COMPILERS) if p), None)


def require_compiler() -> str:
    """The C++ compiler, or KernelError saying that none is installed."""
    cxx = compiler()
    if cxx is None:
        raise KernelError("the packed weight formats (bf16/fp16/int8/fp8) and the native CPU kernels are C++ "
                          f"built on first use, which needs a C++ compiler on PATH (one of {', '.join(COMPILERS)})")
    return cxx


@functools.cache
def has_compiler() -> bool:
    """Whether a C++ compiler is here. Paths that only run faster with one (the fp32 CPU decode's
    graphs, the indexer's native top-k and head sum, the in-place sparse prefill) take their eager
    reference without it, and a warning says so once."""
    try:
        require_compiler()
        return True
    except KernelError as e:
        warnings.warn(f"fp32 CPU decode, the indexer's top-k and head sum and the sparse prefill run their "
                      f"slower eager paths: {e}", stacklevel=2)
        return False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (x86's "flags", Arm's "Features"; empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    line = next((ln for ln in lines if ln.split(":")[0].strip() in ("flags", "Features")), "")
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cache_bytes() -> int:
    """The size of the CPU's last-level cache as Linux lists it (0 where it does not)."""
    units, sizes = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}, {}
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, size = int((d / "level").read_text()), (d / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if size[:-1].isdigit() and size[-1:] in units:
            sizes[level] = max(sizes.get(level, 0), int(size[:-1]) * units[size[-1]])
    return sizes[max(sizes)] if sizes else 0


def _parse(c_type: str, i: int) -> str:
    """The C expression reading argument i (PyObject* a[i]) as `c_type`."""
    t = c_type.replace("const", "").strip()
    if t.endswith("*"):
        return f"({t})ptr(a[{i}])"
    if t == "int64_t":
        return f"(int64_t)PyLong_AsLongLong(a[{i}])"
    if t == "float":
        return f"(float)PyFloat_AsDouble(a[{i}])"
    raise ValueError(f"native kernel argument type {c_type!r}: pointers, int64_t and float only")


def wrapper(name: str, args: list[str]) -> str:
    """The entry point `name.kernel(*args)` of a module named `name` around `kernel`."""
    params = ", ".join(f"{t} a{i}" for i, t in enumerate(args))
    values = ", ".join(f"v{i}" for i in range(len(args)))
    reads = "\n".join(f"    auto v{i} = {_parse(t, i)};" for i, t in enumerate(args))
    return f"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string>
extern "C" void kernel({params});
static void* (*tensor_data)(PyObject*) = nullptr;        // torch's: a tensor's data pointer
static PyTypeObject* tensor_type = nullptr;                 // torch.Tensor
static inline void* ptr(PyObject* o) {{
    if (PyLong_Check(o)) return PyLong_AsVoidPtr(o);
    if (PyObject_TypeCheck(o, tensor_type)) return tensor_data(o);
    PyErr_Format(PyExc_TypeError, "kernel: a pointer argument must be a tensor or an int, not %s", Py_TYPE(o)->tp_name);
    return nullptr;
}}
static PyObject* call(PyObject*, PyObject* const* a, Py_ssize_t n) {{
    if (n != {len(args)}) return PyErr_Format(PyExc_TypeError, "kernel takes {len(args)} arguments, got %zd", n);
{reads}
    if (PyErr_Occurred()) return nullptr;
    std::string error;
    Py_BEGIN_ALLOW_THREADS
    try {{ kernel({values}); }}
    catch (const std::exception& e) {{ error = e.what(); if (error.empty()) error = "kernel failed"; }}
    catch (...) {{ error = "kernel failed"; }}
    Py_END_ALLOW_THREADS
    if (!error.empty()) {{ PyErr_SetString(PyExc_RuntimeError, error.c_str()); return nullptr; }}
    Py_RETURN_NONE;
}}
static PyObject* bind(PyObject*, PyObject* const* a, Py_ssize_t n) {{     // (data pointer function, torch.Tensor)
    if (n != 2 || !PyType_Check(a[1])) return PyErr_Format(PyExc_TypeError, "bind(address, torch.Tensor)");
    tensor_data = (void* (*)(PyObject*))PyLong_AsVoidPtr(a[0]);
    if (PyErr_Occurred()) return nullptr;
    tensor_type = (PyTypeObject*)a[1];
    Py_INCREF(a[1]);
    Py_RETURN_NONE;
}}
static PyMethodDef methods[] = {{{{"kernel", (PyCFunction)(void (*)(void))call, METH_FASTCALL, nullptr}},
                                {{"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL, nullptr}},
                                {{nullptr, nullptr, 0, nullptr}}}};
static PyModuleDef module = {{PyModuleDef_HEAD_INIT, "{name}", nullptr, -1, methods}};
PyMODINIT_FUNC PyInit_{name}(void) {{ return PyModule_Create(&module); }}
"""


def _tensor_data_address() -> int:
    """The address of torch's C function from a tensor PyObject* to its data pointer."""
    try:
        return int(torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr)
    except AttributeError as e:
        raise KernelError(f"this torch ({torch.__version__}) lacks the C function the native kernels read "
                          f"tensors' data pointers with: {e}") from e


def _key(source: str, args: list[str], cxx: str) -> str:
    """A digest of everything the binary depends on: source, signature and entry point, flags,
    compiler, CPU (-march=native), Python."""
    st = os.stat(cxx)
    parts = [source, wrapper("name", args), *FLAGS, cxx, str(st.st_size), str(st.st_mtime_ns), *sorted(cpu_flags()),
             platform.machine(), sys.version, sysconfig.get_paths()["include"]]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _compile(source: str, out: Path, cxx: str) -> None:
    """Compile `source` into the shared library `out` (written whole, then renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "kernel.cpp", Path(tmp) / out.name
        src.write_text(source)
        cmd = [cxx, str(src), *FLAGS, f"-I{sysconfig.get_paths()['include']}", "-o", str(lib)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise KernelError(f"{' '.join(cmd[:2])} ... failed ({p.returncode}):\n{p.stderr[-3000:]}")
        os.replace(lib, out)


def _cache_dir() -> Path:
    """CACHE, or (a home without a writable ~/.cache) a directory of this user's under /tmp."""
    for d in (CACHE, Path(tempfile.gettempdir()) / f"dsv32-kernels-{os.getuid()}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            pass
    raise KernelError(f"no writable directory for the native kernels' binaries ({CACHE} or {tempfile.gettempdir()})")


def load(source: str, args: list[str], what: str) -> Callable:
    """`kernel` of the C++ `source` (args: its C parameter types) as a Python callable, built once
    (`what` names it in errors)."""
    cxx = require_compiler()
    key = _key(source, args, cxx)
    name = f"dsv32_kernel_{key}"
    path = CACHE / f"{name}.so"
    if not path.exists():
        path = _cache_dir() / path.name
    if not path.exists():
        try:
            _compile(source + wrapper(name, args), path, cxx)
        except (OSError, KernelError) as e:
            raise KernelError(f"could not build the native kernel {what}: {e}") from e
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bind(_tensor_data_address(), torch.Tensor)
    return module.kernel

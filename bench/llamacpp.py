"""llama.cpp for the side-by-side benchmark: built once from the pinned PyPI sdist into a cache
directory, its own converter, llama-bench and llama-debug (logits for the parity check).

Facts this encodes (llama.cpp commit 0c1e570, vendored in llama-cpp-python 0.3.36):
  * the sdist's vendor/llama.cpp/.git is a dangling gitfile that makes CMake loop: moved aside;
  * the DeepSeek converter asserts `tokenizer.add_bos_token`; transformers 5 drops that key from
    tokenizer_config.json whenever tokenizer.json exists, so the converter runs under a shim that
    sets it on the loaded tokenizer (the staged tokenizer_config.json says true as well);
  * F16 and Q8_0 models need `llama-bench --repack 0` (llama-debug: `--no-repack`): with
    repacking the CPU backend asserts (GGML_ASSERT(*cur_backend_id != -1));
  * peak RSS is measured by GNU time (/usr/bin/time -f %M), never by a child of this process:
    the kernel carries a parent's RSS high-water mark through fork and exec;
  * llama.cpp's flash attention and f16 KV cache round to f16: the fp32 parity check runs
    llama-debug with `-fa off -ctk f32 -ctv f32` (2.6e-6 on the common benchmark model).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path.home() / ".cache" / "dsv32" / "llama.cpp"
SRC = CACHE / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
BIN = CACHE / "build" / "bin"
TARGETS = ("llama-bench", "llama-debug")
SHIM = '''import runpy, sys
import transformers
_orig = transformers.AutoTokenizer.from_pretrained.__func__
def _from_pretrained(cls, *a, **k):
    tok = _orig(cls, *a, **k)
    tok.add_bos_token = True        # what the staged tokenizer_config.json says
    return tok
transformers.AutoTokenizer.from_pretrained = classmethod(_from_pretrained)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _run(cmd: list, log: Path, **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}); see {log}")


def build() -> Path:
    """llama-bench and llama-debug, built once (nice 19, 2 jobs) into CACHE/build/bin."""
    if all((BIN / t).exists() for t in TARGETS):
        return BIN
    CACHE.mkdir(parents=True, exist_ok=True)
    if not SRC.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
              "-d", CACHE], CACHE / "download.log")
        with tarfile.open(next(CACHE.glob("llama_cpp_python-0.3.36.tar.gz"))) as t:
            t.extractall(CACHE, filter="data")
    if (SRC / ".git").is_file():
        (SRC / ".git").rename(SRC / ".git.dangling")         # a gitfile pointing nowhere: CMake loops
    _run(["nice", "-n", "19", "cmake", "-S", SRC, "-B", CACHE / "build", "-DCMAKE_BUILD_TYPE=Release",
          "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DGGML_NATIVE=ON"], CACHE / "cmake.log")
    _run(["nice", "-n", "19", "cmake", "--build", CACHE / "build", "-j", "2", "--target", *TARGETS],
         CACHE / "build.log")
    return BIN


def convert(model_dir: Path, outtype: str) -> Path:
    """The checkpoint converted by llama.cpp's own convert_hf_to_gguf.py (f32 / f16 / q8_0)."""
    out = CACHE / "gguf" / f"{model_dir.name}-{outtype}.gguf"
    if out.exists():
        return out
    stage = CACHE / "stage" / model_dir.name
    stage.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json" and not (stage / f.name).exists():
            (stage / f.name).symlink_to(f.resolve())
    tc = json.loads((model_dir / "tokenizer_config.json").read_text())
    (stage / "tokenizer_config.json").write_text(json.dumps({**tc, "add_bos_token": True}))
    shim = CACHE / "convert_shim.py"
    shim.write_text(SHIM)
    out.parent.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{SRC / 'gguf-py'}{os.pathsep}{SRC}"}
    tmp = out.with_suffix(".part")
    _run(["nice", "-n", "19", sys.executable, shim, SRC / "convert_hf_to_gguf.py", stage,
          "--outtype", outtype, "--outfile", tmp], CACHE / f"convert-{out.stem}.log", env=env)
    tmp.rename(out)
    return out


def timed(cmd: list, env: dict | None = None) -> tuple[str, int]:
    """Run `cmd`; its stdout and its own peak RSS in bytes, measured by GNU time (/usr/bin/time):
    a child forked from this (larger) process would inherit its peak RSS (the kernel keeps the
    high-water mark across fork and exec)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", f.name] + [str(c) for c in cmd],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {' '.join(str(c) for c in cmd)[:500]}\n"
                               f"{p.stderr[-2000:]}")
        return p.stdout, int(f.read().split()[-1]) * 1024


def bench(gguf: Path, *, prompt: int = 0, gen: int = 0, depth: int = 0, reps: int = 3, threads: int = 2,
          repack: bool = True) -> tuple[float, float, int]:
    """One llama-bench test (f16 KV cache, flash attention on): mean tokens/s, its stddev, peak RSS."""
    cmd = [BIN / "llama-bench", "-m", gguf, "-p", prompt, "-n", gen, "-d", depth, "-r", reps, "-t", threads,
           "-fa", "on", "-ctk", "f16", "-ctv", "f16", "-o", "json", "--repack", int(repack)]
    out, rss = timed(cmd)
    row = json.loads(out)[0]
    return row["avg_ts"], row["stddev_ts"], rss


def logits(gguf: Path, prompt: str, ctx: int, workdir: Path, repack: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's token ids for `prompt` and the logits [vocab] after its last token, in fp32
    end to end (flash attention off, f32 KV cache)."""
    shutil.rmtree(workdir, ignore_errors=True)
    timed([BIN / "llama-debug", "-m", gguf, "-p", prompt, "--save-logits", "--logits-output-dir", workdir,
            "-t", 2, "-c", ctx, "-fa", "off", "-ctk", "f32", "-ctv", "f32"] + ([] if repack else ["--no-repack"]))
    stem = workdir / f"llamacpp-{gguf.stem}"
    return (np.fromfile(f"{stem}-tokens.bin", dtype=np.int32),
            np.fromfile(f"{stem}.bin", dtype=np.float32))

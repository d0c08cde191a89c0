"""Serving load: requests/s, output tokens/s, time to first token and inter-token latency (p50/p99)
at several concurrencies, against a `dsv32 serve` spawned on the common benchmark model.

    python bench/serve_load.py [--model DIR] [--concurrency 1 4 16] [--max-tokens 24] [--readme]

Each client streams `/v1/completions` (ignore_eos, so every request makes exactly --max-tokens
tokens) back to back; a level runs `--requests-per-client` requests per client. TTFT is measured at
the client from sending to the first text chunk, inter-token latency from the gaps between chunks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import README, bench_model_dir, machine, markdown_table, write_section

HEADING = "## Serving (bench/serve_load.py)"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. " * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(model: Path, port: int, max_num_seqs: int, device: str, dtype: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsv32.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-num-seqs", str(max_num_seqs), "--max-model-len", "1024", "--log-level", "warning",
           "--device", device, "--dtype", dtype]
    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready")


async def one_request(http, max_tokens: int) -> tuple[float, list[float], int]:
    """(ttft, inter-chunk gaps, completion tokens) of one streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 1.0, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk["choices"]):
                times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:])]
    return times[0] - start, gaps, tokens


async def level(url: str, concurrency: int, per_client: int, max_tokens: int) -> dict:
    import httpx
    ttfts, gaps, tokens = [], [], 0

    async def client(http):
        nonlocal tokens
        for _ in range(per_client):
            t, g, n = await one_request(http, max_tokens)
            ttfts.append(t)
            gaps.extend(g)
            tokens += n

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await one_request(http, 2)                                   # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    n = concurrency * per_client
    return {"concurrency": concurrency, "requests": n, "req_s": n / elapsed, "tok_s": tokens / elapsed,
            "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "itl_p50": pct(gaps, 50),
            "itl_p99": pct(gaps, 99)}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def write_readme(label: str, table: str, args) -> None:
    """Rewrite this script's section of bench/README.md, replacing only the table under `label`."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    tables: dict[str, str] = {}
    if HEADING in text:
        start = text.index(HEADING)
        end = text.find("\n## ", start)
        section = text[start:] if end < 0 else text[start:end]
        for part in section.split("\n### ")[1:]:
            name, _, body = part.partition("\n")
            tables[name.strip()] = body.strip("\n")
    tables[label] = table
    model = "the common benchmark model (bench/common.py)" if args.model is None else f"`{args.model}`"
    intro = (f"`dsv32 serve` on {model}; each client streams `/v1/completions` requests back to back "
             f"({args.requests_per_client} per client, a {len(PROMPT.split())}-word prompt, {args.max_tokens} "
             "output tokens with ignore_eos). TTFT is measured by the client (send to first text chunk), "
             "ITL from the gaps between streamed chunks; the server and the clients share the machine. "
             "One table per machine:\n\n    python bench/serve_load.py --readme [--device cuda --label NAME]")
    body = intro + "\n\n" + "\n\n".join(f"### {k}\n\n{v}" for k, v in tables.items())
    write_section(HEADING, body, README)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the common bench model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--label", default=None, help="table heading (default: the machine)")
    ap.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    args = ap.parse_args()

    model = args.model or bench_model_dir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn(model, port, max(args.concurrency), args.device, args.dtype)
    try:
        wait_ready(url, proc)
        rows = []
        for c in args.concurrency:
            r = asyncio.run(level(url, c, args.requests_per_client, args.max_tokens))
            rows.append(r)
            print(f"c={c:>3}  {r['req_s']:.2f} req/s  {r['tok_s']:.1f} tok/s  "
                  f"TTFT p50 {r['ttft_p50'] * 1e3:.0f} ms p99 {r['ttft_p99'] * 1e3:.0f} ms  "
                  f"ITL p50 {r['itl_p50'] * 1e3:.1f} ms p99 {r['itl_p99'] * 1e3:.1f} ms", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    table = markdown_table(
        ["concurrency", "requests", "req/s", "output tok/s", "TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)",
         "ITL p99 (ms)"],
        [[r["concurrency"], r["requests"], f"{r['req_s']:.2f}", f"{r['tok_s']:.1f}", f"{r['ttft_p50'] * 1e3:.0f}",
          f"{r['ttft_p99'] * 1e3:.0f}", f"{r['itl_p50'] * 1e3:.1f}", f"{r['itl_p99'] * 1e3:.1f}"] for r in rows])
    print(table)
    if args.readme:
        label = args.label or f"{args.device}, {args.dtype}: {machine()}"
        write_readme(label, table, args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

"""Cost of grammar-constrained decoding per decode step, on the common benchmark model.

    python bench/grammar.py [--batches 1 16] [--tokens 48] [--repeats 3] [--write-readme]

Each run decodes `--tokens` tokens for a batch of chat requests (temperature 1, seeded), once per
grammar: none (`--no-safety-net`), the safety net of a request without tools (free text that cannot
start a call), tools offered with tool_choice auto, and a json_object answer. A step's time is the
engine's `step()` wall time after every prompt is prefilled; "in grammar" is the time spent inside
the processors (matcher advance, mask, applying it to the logits). Runs alternate between grammars
and the table keeps each one's median over `--repeats`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from common import bench_model_dir, machine, markdown_table, write_section

HEADING = "## Grammar-constrained decoding (bench/grammar.py)"
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object", "properties": {k: {"type": "string"} for k in keys}, "required": list(keys)}}}
    for n, keys in [("calculator", ["expression"]), ("get_weather", ["city", "date"]),
                    ("convert_units", ["value", "from_unit", "to_unit"])]]
GRAMMARS = {"none": {}, "safety net, no tools": {}, "tools, auto": {"tools": TOOLS},
            "json_object": {"response_format": {"type": "json_object"}}}


class Timed:
    """A logits processor that adds the time spent in it to a shared counter."""

    def __init__(self, proc, seconds: list[float]):
        self.proc, self.seconds = proc, seconds

    def clone(self) -> "Timed":
        return Timed(self.proc.clone(), self.seconds)

    def __call__(self, ids, logits):
        t = time.perf_counter()
        out = self.proc(ids, logits)
        self.seconds[0] += time.perf_counter() - t
        return out


def run(model, tok, path, B: int, tokens: int, name: str) -> tuple[float, float]:
    """(mean step ms, mean ms per step inside the processors) of one decode run."""
    from dsv32.engine.chat import ChatRequest, prepare_chat
    from dsv32.engine.engine import EngineConfig, LLMEngine
    from dsv32.engine.sequence import SamplingParams
    eng = LLMEngine(EngineConfig(model=str(path), max_model_len=2048, max_num_seqs=B), model=model, tokenizer=tok)
    prompt = prepare_chat(ChatRequest([{"role": "user", "content": "What is 12 * 7?"}], **GRAMMARS[name]),
                          eng.grammars, safety_net=name != "none")
    seconds = [0.0]
    procs = [Timed(p, seconds) for p in prompt.processors]
    for i in range(B):
        eng.add_request(f"r{i}", prompt.text, SamplingParams(temperature=1.0, seed=i, max_tokens=tokens,
                                                             ignore_eos=True, logits_processors=procs))
    steps, grammar = [], 0.0
    while eng.has_unfinished():
        decoding = all(s.num_output_tokens >= 1 for s in eng.scheduler.running) and not eng.scheduler.waiting
        before, t = seconds[0], time.perf_counter()
        eng.step()
        if decoding:
            steps.append(time.perf_counter() - t)
            grammar += seconds[0] - before
    return 1e3 * statistics.mean(steps), 1e3 * grammar / len(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()

    from dsv32.chat import Tokenizer
    from dsv32.model.checkpoint import load_model
    path = bench_model_dir()
    model, tok = load_model(path, progress=False), Tokenizer.load(path)
    load = os.getloadavg()[0]
    rows = []
    for B in args.batches:
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in GRAMMARS}
        run(model, tok, path, B, 4, "json_object")           # warm-up: tokenizer view, compiled grammars
        for _ in range(args.repeats):
            for name in GRAMMARS:
                runs[name].append(run(model, tok, path, B, args.tokens, name))
        base = statistics.median(s for s, _ in runs["none"])
        for name, results in runs.items():
            step, inside = statistics.median(s for s, _ in results), statistics.median(g for _, g in results)
            rows.append([B, name, f"{step:.2f}", f"{inside:.2f}", f"{100 * inside / step:.1f}%",
                         f"{step / base:.3f}"])
            print(rows[-1], flush=True)
    table = markdown_table(["batch", "grammar", "step ms", "in grammar ms/step", "share of the step",
                            "step vs none"], rows)
    text = (f"Common benchmark model, fp32, {args.tokens} decode steps per run, median of {args.repeats} "
            f"alternating runs; {machine()}; load average before: {load:.2f}, after: {os.getloadavg()[0]:.2f}."
            f"\n\n{table}")
    print(text)
    if args.write_readme:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()

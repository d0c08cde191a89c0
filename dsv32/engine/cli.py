"""`dsv32 generate` (batch from the command line or a file) and `dsv32 chat` (terminal chat)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .sequence import SamplingParams


def _engine_args(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="processes sharing the model")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="partition routed experts across the tensor-parallel ranks")
    p.add_argument("--num-speculative-tokens", type=int, default=0, choices=[0, 1],
                   help="1: MTP speculative decoding (same tokens, fewer steps when drafts are accepted)")


def _engine(args):
    from .engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(**_engine_kwargs(args), model=args.model))


def _engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, kv_cache_dtype=args.kv_cache_dtype,
                tensor_parallel_size=args.tensor_parallel_size,
                enable_expert_parallel=args.enable_expert_parallel,
                num_speculative_tokens=args.num_speculative_tokens)


def _params(args, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, **kw)


def read_prompts(args) -> list:
    """Prompts from --prompt flags and/or --file (text: one per line; .jsonl: strings, or objects
    with "prompt", "prompt_token_ids" or "messages")."""
    prompts: list = list(args.prompt or [])
    if args.file:
        path = Path(args.file)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: invalid JSON ({e})")
            else:
                prompts.append(line)
    if not prompts:
        raise SystemExit("dsv32 generate: give --prompt TEXT and/or --file FILE")
    return prompts


def cmd_generate(args) -> int:
    from dsv32.chat import encode_messages

    from .llm import LLM
    llm = LLM(model=args.model, **_engine_kwargs(args))
    mode = "thinking" if args.thinking else "chat"
    prompts = []
    for p in read_prompts(args):
        if isinstance(p, dict) and "messages" in p:
            p = encode_messages(p["messages"], thinking_mode=mode, tools=p.get("tools"))
        elif isinstance(p, str) and args.chat:
            p = encode_messages([{"role": "user", "content": p}], thinking_mode=mode)
        prompts.append(p)
    try:
        outs = llm.generate(prompts, _params(args), use_tqdm=sys.stderr.isatty())
    finally:
        llm.engine.shutdown()
    for out in outs:
        o = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}, ensure_ascii=False))
        else:
            print(o.text)
    return 0


def cmd_chat(args) -> int:
    from dsv32.chat import ReasoningDelta, StreamParser, encode_messages, parse_completion
    engine = _engine(args)
    mode = "chat" if args.no_thinking else "thinking"
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    dim, reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
    print("dsv32 chat: /clear resets the conversation, /exit quits.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/clear":
            history = history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt = encode_messages(history, thinking_mode=mode)
        rid = f"chat-{turn}"
        turn += 1
        engine.add_request(rid, prompt, _params(args, skip_special_tokens=False))
        parser, text, in_reasoning = StreamParser(mode), "", False
        while engine.has_unfinished():
            for out in engine.step():
                new = out.outputs[0].text[len(text):]
                text = out.outputs[0].text
                for ev in parser.feed(new):
                    if isinstance(ev, ReasoningDelta):
                        if not in_reasoning:
                            print(f"{dim}[thinking] ", end="")
                            in_reasoning = True
                        print(ev.text, end="", flush=True)
                    elif hasattr(ev, "text") and ev.text:
                        if in_reasoning:
                            print(reset)
                            in_reasoning = False
                        print(ev.text, end="", flush=True)
        print(reset if in_reasoning else "")
        msg = parse_completion(text, mode)
        for call in msg["tool_calls"]:
            print(f"[tool call] {call['function']['name']}({call['function']['arguments']})")
        history.append({k: v for k, v in msg.items() if k in ("role", "content", "reasoning_content")
                        and v is not None} | ({"tool_calls": msg["tool_calls"]} if msg["tool_calls"] else {}))
    engine.shutdown()
    return 0


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate completions for prompts (batch)")
    _engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--file", help="prompts file: text lines, or .jsonl")
    g.add_argument("--chat", action="store_true", help="wrap plain prompts as one user message")
    g.add_argument("--thinking", action="store_true", help="thinking mode for chat prompts")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser("chat", help="interactive terminal chat (shows the thinking)")
    _engine_args(c)
    c.add_argument("--no-thinking", action="store_true", help="non-thinking (chat) mode")
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=cmd_chat, temperature=0.6)

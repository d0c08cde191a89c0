"""`dsv32 generate` (batch from the command line or a file) and `dsv32 chat` (terminal chat).

Both run the bundled model unless `--model` names a checkpoint. In `dsv32 chat`, Ctrl-C stops the
answer being generated (the turn is dropped) and, at the prompt, quits.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

from dsv32.model.bundled import default_model

from .config import EngineConfig, add_engine_args
from .sequence import SamplingParams

EXIT_INTERRUPTED = 130      # the shell's status for a command ended by Ctrl-C


def _engine_args(p) -> None:
    """The engine's flags (declared once, in engine/config.py) and the sampling flags."""
    add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)


def _model(args) -> str:
    """The checkpoint to run: --model, else the bundled model; exits when it has no config.json."""
    model = args.model if args.model is not None else default_model()
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"dsv32 {args.command}: no checkpoint at {model} (config.json missing)")
    return str(model)


def _config(args) -> EngineConfig:
    return EngineConfig.from_args(args, _model(args))


def _start(args, factory):
    """`factory` (LLM, LLMEngine) started with the flags' settings; a setting it refuses (a cache
    layout the model's dimensions do not take, a context past its positions) ends the command with
    its message, not a traceback."""
    try:
        return factory(_config(args))
    except ValueError as e:
        raise SystemExit(f"dsv32 {args.command}: {e}") from None


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
    from dataclasses import asdict, replace

    from .chat import ChatRequest, prepare_chat
    from .llm import LLM
    llm = _start(args, lambda cfg: LLM(**asdict(cfg)))
    params, prompts, plist = _params(args), [], []
    for p in read_prompts(args):
        if isinstance(p, str) and args.chat:
            p = {"messages": [{"role": "user", "content": p}]}
        if isinstance(p, dict) and "messages" in p:      # a chat: its prompt and its grammar
            request = ChatRequest(p["messages"], thinking=args.thinking, tools=p.get("tools"),
                                  tool_choice=p.get("tool_choice"),
                                  response_format=p.get("response_format", _response_format(args)))
            try:
                chat = prepare_chat(request, llm.engine.grammars)
            except ValueError as e:
                raise SystemExit(f"dsv32 generate: {e}")
            p = chat.text
            plist.append(replace(params, logits_processors=chat.processors))
        else:
            plist.append(params)
        prompts.append(p)
    with llm:
        outs = llm.generate(prompts, plist, use_tqdm=sys.stderr.isatty())
    for out in outs:
        o = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}, ensure_ascii=False))
        else:
            print(o.text)
    return 0


def _response_format(args) -> dict | None:
    """--response-format / --json-schema as a response_format object."""
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"dsv32 generate: --json-schema {args.json_schema}: {e}")
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return {"type": args.response_format} if args.response_format != "text" else None


def cmd_chat(args) -> int:
    """The terminal chat; 0 at /exit or end of input, 130 when Ctrl-C quits it."""
    from .engine import LLMEngine
    with _start(args, LLMEngine) as engine:
        try:
            return _chat_loop(engine, args)
        except KeyboardInterrupt:       # a second Ctrl-C while an answer was being stopped
            print(file=sys.stderr)
            return EXIT_INTERRUPTED


def _chat_loop(engine, args) -> int:
    from .chat import ChatRequest, prepare_chat
    mode = "chat" if args.no_thinking else "thinking"
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print("dsv32 chat: /clear resets the conversation, /exit quits, Ctrl-C stops an answer.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        if line in ("/exit", "/quit"):
            return 0
        if line == "/clear":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        chat = prepare_chat(ChatRequest(history + [{"role": "user", "content": line}], thinking=mode == "thinking"),
                            engine.grammars)     # no tools: the grammar lets no call start
        params = _params(args, skip_special_tokens=False, logits_processors=chat.processors)
        answer = _answer(engine, f"chat-{turn}", chat.text, params, chat.mode)
        turn += 1
        if answer is not None:
            history += [{"role": "user", "content": line}, answer]


def _answer(engine, request_id: str, prompt: str, params: SamplingParams, mode: str) -> dict | None:
    """Generate and print one answer; None when it was not sent or Ctrl-C stopped it.

    No tools are offered: the grammar lets no function_calls block start, and the parser would keep
    one as content anyway, so the turn never ends on a call nobody can answer."""
    from dsv32.chat import MessageBuilder, StreamParser
    try:
        engine.add_request(request_id, prompt, params)
    except ValueError as exc:       # e.g. the conversation outgrew --max-model-len
        print(f"(not sent: {exc})", file=sys.stderr)
        return None
    builder, printer = MessageBuilder(mode), _Printer()
    try:
        for event in _stream(engine, request_id, StreamParser(mode, tool_calls=False)):
            printer.show(event)
            builder.apply(event)
    except _Stopped:
        printer.end()
        print("(stopped; this turn is left out of the conversation)", file=sys.stderr)
        return None
    printer.end()
    message = builder.message()
    return {key: message[key] for key in ("role", "content", "reasoning_content")}


class _Stopped(Exception):
    """Ctrl-C stopped the answer being generated."""


def _stream(engine, request_id: str, parser):
    """The parser's events as the request generates; on Ctrl-C, aborts the request and raises _Stopped."""
    text = ""
    with _ctrl_c() as stop:
        for outputs in engine.steps():
            for out in outputs:
                new, text = out.outputs[0].text[len(text):], out.outputs[0].text
                yield from parser.feed(new)
            if stop.is_set() and engine.has_unfinished():
                engine.abort_request(request_id)
                raise _Stopped
    yield from parser.finish()


@contextlib.contextmanager
def _ctrl_c():
    """While open, Ctrl-C sets the yielded event instead of interrupting; a second one interrupts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class _Printer:
    """Prints reasoning (dimmed on a terminal, after `[thinking]`) and content as they stream."""

    def __init__(self):
        self.dim, self.reset = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
        self.in_reasoning = False

    def show(self, event) -> None:
        from dsv32.chat import ContentDelta, ReasoningDelta
        if isinstance(event, ReasoningDelta) and not self.in_reasoning:
            print(f"{self.dim}[thinking] ", end="")
            self.in_reasoning = True
        elif isinstance(event, ContentDelta) and self.in_reasoning:
            print(self.reset)
            self.in_reasoning = False
        if isinstance(event, (ReasoningDelta, ContentDelta)):
            print(event.text, end="", flush=True)

    def end(self) -> None:
        print(self.reset if self.in_reasoning else "")
        self.in_reasoning = False


def add_parser(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate completions for prompts (batch)")
    _engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--file", help="prompts file: text lines, or .jsonl")
    g.add_argument("--chat", action="store_true", help="wrap plain prompts as one user message")
    g.add_argument("--thinking", action="store_true", help="thinking mode for chat prompts")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.add_argument("--response-format", default="text", choices=["text", "json_object"],
                   help="json_object: each chat answer is one JSON object (grammar-constrained)")
    g.add_argument("--json-schema", default=None, metavar="FILE",
                   help="each chat answer is JSON under the schema in FILE (grammar-constrained)")
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser("chat", help="interactive terminal chat (shows the thinking)")
    _engine_args(c)
    c.add_argument("--no-thinking", action="store_true", help="non-thinking (chat) mode")
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=cmd_chat, temperature=0.6)

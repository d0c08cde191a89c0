"""`dsv32 serve`: the OpenAI/DeepSeek-compatible HTTP server (uvicorn; SIGTERM drains gracefully)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dsv32.engine.config import EngineConfig, add_engine_args
from dsv32.model.bundled import BUNDLED_MODEL, default_model  # noqa: F401 (BUNDLED_MODEL: re-exported)

log = logging.getLogger("dsv32.server")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI/DeepSeek-compatible HTTP server",
                              description=__doc__)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: directory name)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this bearer key (repeatable; also $DSV32_API_KEY, ignored when empty); "
                        "none: no auth")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences allowed to wait beyond --max-num-seqs; more get HTTP 429")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run; then it ends with finish_reason "
                        "insufficient_system_resource (0: no limit)")
    p.add_argument("--reasoning-only", action="store_true",
                   help="DeepSeek-V3.2-Speciale weights: thinking always on, requests with tools get 400")
    p.add_argument("--no-safety-net", action="store_true",
                   help="raw model behaviour: do not constrain answers that ask for nothing (tool calls may "
                        "then name tools never offered); JSON response_format, tool_choice required/named "
                        "and strict tools are still enforced")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight before cutting them (a stream "
                        "then ends with an error event, a non-streamed request gets 503); exit status 0")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import create_app
    from .shutdown import DrainingServer, serve
    from .state import ServerConfig

    try:
        keys = api_keys(args.api_key, os.environ.get("DSV32_API_KEY"))
    except ValueError as e:
        print(f"dsv32 serve: {e}", file=sys.stderr)
        return 2
    model = args.model if args.model is not None else default_model(log)
    if not (Path(model) / "config.json").is_file():
        print(f"dsv32 serve: no checkpoint at {model} (config.json missing)", file=sys.stderr)
        return 2
    engine = EngineConfig.from_args(args, str(model))
    cfg = ServerConfig(engine=engine, served_model_name=args.served_model_name or Path(model).resolve().name,
                       api_keys=keys, max_queue=args.max_queue,
                       request_timeout=args.request_timeout or None, reasoning_only=args.reasoning_only,
                       safety_net=not args.no_safety_net)
    app = create_app(cfg)
    state = app.state.server
    server = DrainingServer(app, state, args.shutdown_timeout, host=args.host, port=args.port,
                            access_log=False, log_level=args.log_level)
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    log.info("serving %s as %r on http://%s:%d (aliases deepseek-chat, deepseek-reasoner); %s", model,
             cfg.served_model_name, args.host, args.port,
             f"API key required ({len(keys)} accepted)" if keys else "no API key: open to every client")
    signalled = serve(server)
    if state.load_error or not server.started:
        return 1
    if signalled:
        log.info("shut down on signal: %s", f"{state.cut_count} request(s) cut at the timeout"
                 if state.cut_count else "every request in flight finished")
    return 0


def api_keys(flags: list[str], env: str | None) -> list[str]:
    """The accepted keys: every --api-key (an empty one is an error, not "no auth"), then
    $DSV32_API_KEY unless it is unset or blank (surrounding whitespace stripped)."""
    from .state import check_api_key

    for key in flags:
        try:
            check_api_key(key)
        except ValueError as e:
            raise ValueError(f"--api-key: {e}") from None
    if env is None or not env.strip():
        if env is not None:
            log.warning("$DSV32_API_KEY is set but empty: ignored")
        return list(flags)
    try:
        check_api_key(env.strip())
    except ValueError as e:
        raise ValueError(f"$DSV32_API_KEY: {e}") from None
    return [*flags, env.strip()]

"""`dsv32 serve`: the OpenAI/DeepSeek-compatible HTTP server (uvicorn; SIGTERM drains gracefully)."""
from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from pathlib import Path

from dsv32.engine.config import EngineConfig, add_engine_args
from dsv32.model.bundled import BUNDLED_MODEL, default_model  # noqa: F401 (BUNDLED_MODEL: re-exported)

from .tls import TLSConfig, cert_reqs

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
    add_network_args(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .app import create_app
    from .shutdown import DrainingServer, serve
    from .state import ServerConfig

    try:
        keys = api_keys(args.api_key, os.environ.get("DSV32_API_KEY"))
        tls = tls_config(args)
    except ValueError as e:
        print(f"dsv32 serve: {e}", file=sys.stderr)
        return 2
    model = args.model if args.model is not None else default_model(log)
    if not (Path(model) / "config.json").is_file():
        print(f"dsv32 serve: no checkpoint at {model} (config.json missing)", file=sys.stderr)
        return 2
    engine = EngineConfig.from_args(args, str(model))
    try:
        cfg = ServerConfig(engine=engine, served_model_name=args.served_model_name or Path(model).resolve().name,
                           api_keys=keys, max_queue=args.max_queue,
                           request_timeout=args.request_timeout or None, reasoning_only=args.reasoning_only,
                           safety_net=not args.no_safety_net, **network_settings(args))
        app = create_app(cfg)
    except ValueError as e:      # a key file that cannot be used, limits without keys
        print(f"dsv32 serve: {e}", file=sys.stderr)
        return 2
    state = app.state.server
    server = DrainingServer(app, state, args.shutdown_timeout, host=args.host, port=args.port,
                            access_log=False, log_level=args.log_level, **tls.uvicorn_kwargs())
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    log.info("serving %s as %r on %s://%s:%d (aliases deepseek-chat, deepseek-reasoner); device %s%s; %s",
             model, cfg.served_model_name, "https" if tls.enabled else "http", args.host, args.port, engine.device,
             " (auto)" if args.device == "auto" else "", access_summary(state, tls, len(args.api_key) < len(keys)))
    signalled = serve(server, on_hangup=state.reload_keys if cfg.api_key_file is not None else None)
    if state.load_error or not server.started:
        return 1
    if signalled:
        log.info("shut down on signal: %s", f"{state.cut_count} request(s) cut at the timeout"
                 if state.cut_count else "every request in flight finished")
    return 0


def api_keys(flags: list[str], env: str | None) -> list[str]:
    """The accepted keys: every --api-key (an empty one is an error, not "no auth"), then
    $DSV32_API_KEY unless it is unset or blank (surrounding whitespace stripped)."""
    from .keys import check_api_key

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


# ---- serving on a network: key file, per-key limits, /metrics, TLS (dsv32/server/README.md) ----------
def add_network_args(p) -> None:
    g = p.add_argument_group("serving on a network")
    g.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="named keys, one per line `NAME: KEY [max_concurrent=N] [tpm=N]` (# comments); "
                        "read again on SIGHUP; keys out of `ps` and shell history")
    g.add_argument("--max-concurrent-per-key", type=int, default=None, metavar="N",
                   help="requests in flight per key on the generation routes; more get HTTP 429")
    g.add_argument("--tokens-per-minute-per-key", type=int, default=None, metavar="N",
                   help="prompt + completion tokens per key in a sliding minute; over it: HTTP 429")
    g.add_argument("--metrics-public", action="store_true", help="serve /metrics without a key")
    g.add_argument("--ssl-certfile", type=Path, default=None, metavar="PEM", help="serve HTTPS with this certificate")
    g.add_argument("--ssl-keyfile", type=Path, default=None, metavar="PEM",
                   help="its private key (unencrypted; default: in --ssl-certfile)")
    g.add_argument("--ssl-ca-certs", type=Path, default=None, metavar="PEM",
                   help="CA of client certificates (mutual TLS; then required unless --ssl-cert-reqs says)")
    g.add_argument("--ssl-cert-reqs", type=cert_reqs, default=None, metavar="none|optional|required",
                   help="client certificates (uvicorn's 0, 1, 2 also accepted)")


def network_settings(args: argparse.Namespace) -> dict:
    """The ServerConfig fields of the network flags."""
    return dict(api_key_file=args.api_key_file, max_concurrent_per_key=args.max_concurrent_per_key,
                tokens_per_minute_per_key=args.tokens_per_minute_per_key, metrics_public=args.metrics_public)


def tls_config(args: argparse.Namespace) -> TLSConfig:
    """The TLS flags, checked (ValueError: what is wrong)."""
    tls = TLSConfig(certfile=args.ssl_certfile, keyfile=args.ssl_keyfile, ca_certs=args.ssl_ca_certs,
                    cert_reqs=args.ssl_cert_reqs)
    tls.check()
    return tls


def access_summary(state, tls: TLSConfig, env_key: bool) -> str:
    """Who may connect, for the start-up log: key names (never keys), client certificates."""
    names = state.keys.names()
    if not names:
        who = "no API key: open to every client"
    else:
        fixed = len(state.cfg.api_keys)
        origin = f" (api-key-{fixed} is $DSV32_API_KEY)" if env_key else ""
        who = f"API key required ({len(names)} accepted: {', '.join(names)}){origin}"
    if tls.enabled and tls.client_cert_reqs != ssl.CERT_NONE:
        mode = "required" if tls.client_cert_reqs == ssl.CERT_REQUIRED else "optional"
        who += f"; client certificates {mode} (CA {tls.ca_certs})"
    return who

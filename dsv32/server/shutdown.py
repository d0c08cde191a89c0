"""Graceful shutdown for `dsv32 serve`: on SIGTERM (or Ctrl-C) the requests in flight get
`drain_timeout` seconds to finish; the ones left are then cut (a stream ends with an `error` event
and `[DONE]`, a non-streamed answer gets a 503 error body), and the process exits with status 0."""
from __future__ import annotations

import asyncio
import signal
import threading
from typing import Callable

import uvicorn

from .state import ServerState

CUT_GRACE_S = 5.0   # after the cut, how long uvicorn waits for the cut answers before cancelling them


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown starts the drain clock of the app's state first; uvicorn
    itself cancels what is left CUT_GRACE_S after the cut."""

    def __init__(self, app, state: ServerState, drain_timeout: float, **config):
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=drain_timeout + CUT_GRACE_S, **config))
        self.app_state, self.drain_timeout = state, drain_timeout

    async def shutdown(self, sockets=None) -> None:
        self.app_state.start_draining(self.drain_timeout)
        await super().shutdown(sockets)


def serve(server: uvicorn.Server, on_hangup: Callable[[], None] | None = None) -> bool:
    """Run the server until it stops; True when SIGTERM or SIGINT stopped it. uvicorn re-raises the
    signal it caught once it has shut down; the handlers installed here take it, so that a drained
    server exits normally rather than being killed by its own SIGTERM (or KeyboardInterrupt).
    `on_hangup` runs on the event loop at each SIGHUP (connections are not touched)."""
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return False
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: caught.append(sig)) for sig in _SIGNALS}
    if on_hangup is not None:
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda sig, frame: _on_loop(on_hangup))
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return bool(caught)


def _on_loop(callback: Callable[[], None]) -> None:
    """Run `callback` on the event loop running in this (the main) thread, soon, rather than inside
    a signal handler that may have interrupted the loop anywhere (a log line half written, say)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:      # before the loop starts or after it stops
        callback()
        return
    loop.call_soon_threadsafe(callback)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)

"""Run the server: uvicorn binds first (answering 503 while the model loads), then serves.

SIGINT/SIGTERM start a graceful shutdown: the listening socket closes, new requests on
open connections get 503, requests in flight finish (up to `shutdown_timeout` s, then
they are aborted), then the engine thread stops.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from specserve.server.app import ServerConfig, create_app


class _Server(uvicorn.Server):
    """uvicorn's server, flagging the app as draining as soon as a shutdown signal comes."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn re-raises the shutdown signal once it has drained; after a clean drain, exit 0 instead."""
        with super().capture_signals():
            yield
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()


def run_server(
    loader: Callable[[], Any],
    config: ServerConfig,
    host: str,
    port: int,
    log_level: str = "warning",
) -> int:
    """Serve until a shutdown signal; returns the exit code (1 when the model failed to load)."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="specserve: %(levelname)s %(message)s",
    )
    failed: list[BaseException] = []
    server: _Server | None = None

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        print(
            f"specserve serve: error: cannot load the model: {' '.join(str(exc).split())}",
            file=sys.stderr,
        )
        if server is not None:
            server.should_exit = True

    app = create_app(config, loader, on_load_error)

    def drain() -> None:
        app.state.draining = True

    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=config.shutdown_timeout,
    )
    server = _Server(uv_config, drain)
    server.run()
    if failed:
        return 1
    return 0 if server.started else 1

"""Run the app with uvicorn: `moeplex serve`, and a background server on an ephemeral port for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from moeplex.engine import LLM, EngineConfig
from moeplex.server.app import ServerSettings, create_app


class DrainingServer(uvicorn.Server):
    """uvicorn server that marks the app as draining (new requests get 503) as soon as shutdown begins."""

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.server.begin_drain()
        super().handle_exit(sig, frame)


def serve(store: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None, engine_config: EngineConfig | None = None, log_level: str = "info") -> None:
    """Serve every variant of the store until interrupted; on SIGINT/SIGTERM running requests finish first."""
    settings = settings or ServerSettings()
    app = create_app(LLM(store, engine_config or EngineConfig()), settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=settings.drain_timeout_seconds)
    DrainingServer(config).run()


class BackgroundServer:
    """The app served on 127.0.0.1 at an ephemeral port from a thread; `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app, startup_timeout: float = 30.0):
        self.app, self.startup_timeout = app, startup_timeout
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # a TCP proto, so asyncio turns Nagle off on accepted sockets
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = DrainingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="moeplex-http", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.handle_exit(None, None)
        self._thread.join()
        self.socket.close()

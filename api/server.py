"""uvicorn on uvloop serving the app: `ApiServer(app, ServerConfig(host, port)).run()` blocks
until SIGINT / SIGTERM (uvicorn handles both when run on the main thread); `wait_started`
tells another thread when connections are accepted."""

from __future__ import annotations

import time
from dataclasses import dataclass

import uvicorn


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "warning"
    timeout_graceful_shutdown_s: float = 5.0


class ApiServer:
    def __init__(self, app, config: ServerConfig):
        self.config = config
        self.server = uvicorn.Server(uvicorn.Config(
            app, host=config.host, port=config.port, loop="uvloop", http="auto", lifespan="on",
            log_level=config.log_level, timeout_graceful_shutdown=config.timeout_graceful_shutdown_s,
        ))

    def run(self) -> None:
        """Serve until asked to stop (a signal, or `stop()` from another thread)."""
        self.server.run()

    def stop(self) -> None:
        self.server.should_exit = True

    def wait_started(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server.started:
                return True
            time.sleep(0.02)
        return self.server.started

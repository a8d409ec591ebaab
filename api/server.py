"""uvicorn on uvloop serving the app: `ApiServer(app, ServerConfig(host, port)).run()` blocks
until SIGINT / SIGTERM (uvicorn handles both when run on the main thread); `wait_started`
tells another thread when connections are accepted."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

import uvicorn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
        """Serve until asked to stop (SIGINT / SIGTERM, or `stop()` from another thread), then
        return normally so the caller's cleanup runs.

        uvicorn shuts down gracefully on those signals and then re-raises them to the handlers
        it found; ours only ask it to stop, so the process is not killed by the re-raise.
        """
        on_main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, lambda *_: self.stop()) for sig in STOP_SIGNALS} if on_main else {}
        try:
            self.server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self.server.should_exit = True

    def wait_started(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server.started:
                return True
            time.sleep(0.02)
        return self.server.started

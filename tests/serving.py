"""Run `tandem serve` / `tandem node` as real processes for the end-to-end tests.

A `Served` starts the CLI in its own session, waits until /health answers 200, and on stop sends
SIGTERM and checks the launcher's exit. `descendants()` lists the process tree (to find an actor
to kill, and to prove none is left behind).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`python -m actors.cli <argv>` in the background; `url` is its api base."""

    def __init__(self, argv: list[str], host: str = "127.0.0.1", port: int | None = None,
                 prefix: list[str] = (), log: Path | None = None, wait_health: bool = True):
        self.port = port or free_port()
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self.argv = [*prefix, sys.executable, "-m", "actors.cli", *argv, "--port", str(self.port)]
        self.log_path = log
        self.wait_health = wait_health
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Served":
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        self.process = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        if self.wait_health:
            self.wait_until_healthy()
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.stop()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def wait_until_healthy(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tandem exited with {self.process.returncode} before it was healthy:\n{self.log()}")
            if self.health() == 200:
                return
            time.sleep(0.25)
        raise RuntimeError(f"tandem not healthy after {timeout_s} s:\n{self.log()}")

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def actor_process(self, kind: str) -> psutil.Process:
        for proc in self.descendants():
            try:
                cmd = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "actors.main" in cmd and cmd[cmd.index("--actor") + 1] == kind:
                return proc
        raise LookupError(f"no {kind} actor among {[p.pid for p in self.descendants()]}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM the launcher; returns its exit code once every process of the run is gone."""
        tree = [self.process.pid, *(p.pid for p in self.descendants())]
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise RuntimeError(f"tandem did not stop within {timeout_s} s:\n{self.log()}")
        left = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes outlived the launcher: {left}"
        return code

"""The launcher: starts one node's share of a topology, supervises it, shuts it down cleanly.

- Start: a private run directory (Unix sockets live there), one `actors.main` process per actor
  replica on this node, then a wait until every one has sent `ActorReady` (an actor that exits
  first fails the start, naming it and its exit code).
- Supervise: every child is polled every `POLL_S`; a dead one is seen within a second. The api is
  told at once (`ActorStatus` down: it ends the requests in flight with a clear error and
  reports itself unhealthy), the run's leftover shared-memory KV segments are removed, and the
  actor is restarted; once it is ready again the api hears it is back. An actor that dies
  `restart_limit` times within `restart_window_s` stays down and the server stays unhealthy.
- Stop (SIGINT / SIGTERM, or `stop()`): SIGTERM to every child, SIGKILL after a grace period,
  then the run directory and the run's shared-memory segments are removed and the actors'
  traces merged. Children also get SIGTERM from the kernel if the launcher itself dies
  (PR_SET_PDEATHSIG), so no actor outlives it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path


from topology.config import Topology, load_topology, with_api_overrides, with_model_overrides, with_speculative
from topology.wiring import API, ActorId, plan_wiring

from .messages import STARTUP_STATUS, ActorReady, ActorStatus
from .security import topology_context
from .transport import pull, push

POLL_S = 0.2
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """The topology could not be started; says which actor and why."""


def with_model(topology: Topology, model: str | None) -> Topology:
    """The topology with its model path replaced (`tandem serve --model PATH`); checked here."""
    if model is None:
        return topology
    if model != "default" and not (Path(model) / "config.json").is_file():
        raise LaunchError(f"--model {model!r}: expected a checkpoint directory holding config.json")
    path = model if model == "default" else str(Path(model).resolve())
    return replace(topology, model=replace(topology.model, path=path))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def with_draft_model(topology: Topology) -> Topology:
    """The topology with its assistant checkpoint checked and its path made absolute."""
    spec = topology.speculative
    if spec is None:
        return topology
    if spec.draft_model_path == "default":
        if topology.model.path != "default":
            raise LaunchError("speculative draft model 'default' is the embedded model's assistant; "
                              "name the assistant checkpoint of the model being served")
        return topology
    path = Path(spec.draft_model_path)
    if not (path / "config.json").is_file():
        raise LaunchError(f"speculative draft model {spec.draft_model_path!r}: expected a Gemma 4 assistant "
                          "checkpoint directory holding config.json")
    return replace(topology, speculative=replace(spec, draft_model_path=str(path.resolve())))


@dataclass
class Child:
    actor: ActorId
    process: subprocess.Popen
    deaths: deque = field(default_factory=lambda: deque(maxlen=16))
    given_up: bool = False


@dataclass(frozen=True)
class LaunchOptions:
    node: str | None = None  # None: the topology's only node (or the api's node)
    model: str | None = None  # overrides the topology's model.path
    api_overrides: tuple[tuple[str, object], ...] = ()  # [api] fields from the command line
    speculative: tuple[tuple[str, object], ...] = ()  # [speculative] fields from the command line
    scheduler: tuple[tuple[str, int], ...] = ()  # [model] scheduler fields from the command line
    trace_dir: Path | None = None
    api_key: str | None = None
    host: str | None = None  # overrides of the api's listen address
    port: int | None = None
    ready_timeout_s: float = 180.0
    stop_grace_s: float = 10.0
    restart_limit: int = 3
    restart_window_s: float = 60.0
    verbose: bool = True  # a log line per actor as it starts, gets ready, dies or restarts


class Launcher:
    def __init__(self, topology_path: str | Path, options: LaunchOptions = LaunchOptions()):
        self.topology_path = str(Path(topology_path).resolve())
        topology = with_api_overrides(with_model(load_topology(self.topology_path), options.model),
                                      dict(options.api_overrides))
        topology = with_model_overrides(topology, dict(options.scheduler))
        self.topology: Topology = with_draft_model(with_speculative(topology, dict(options.speculative)))
        self.options = options
        self.node = options.node or self.topology.api_node
        if self.node not in self.topology.nodes:
            raise LaunchError(f"node {self.node!r} is not in the topology; declared: {sorted(self.topology.nodes)}")
        self.run_id = uuid.uuid4().hex[:10]
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"tandem-{self.run_id}-"))
        self.wiring = plan_wiring(self.topology, self.run_dir)
        self.children: dict[ActorId, Child] = {}
        self.zctx = topology_context(self.topology.curve_keys)
        self.control = pull(self.zctx, self.wiring.controls[self.node])
        self.notices = push(self.zctx, self.wiring.api_control)
        self._stopping = threading.Event()
        self.events: list[tuple[float, str]] = []  # (time, what happened): deaths, restarts

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn every actor of this node and wait until all are ready (or raise LaunchError)."""
        mine = self.wiring.actors_on(self.node)
        if self.node != self.topology.api_node and any(a.kind == API for a in mine):
            mine = [a for a in mine if a.kind != API]
        try:
            for actor in mine:
                self.children[actor] = Child(actor, self._spawn(actor))
                self._log(f"starting {actor.name} (pid {self.children[actor].process.pid})")
            self._wait_ready(set(mine))
        except BaseException:
            self.stop()
            raise
        # the api reports healthy once every node's launcher has said this
        self.notices.send(ActorStatus(STARTUP_STATUS, 0, True, self.node))

    def _command(self, actor: ActorId) -> list[str]:
        o = self.options
        cmd = [sys.executable, "-m", "actors.main", "--topology", self.topology_path, "--actor", actor.kind,
               "--replica", str(actor.replica), "--run-dir", str(self.run_dir), "--run-id", self.run_id]
        if o.trace_dir:
            cmd += ["--trace-dir", str(o.trace_dir)]
        if o.model:
            cmd += ["--model", self.topology.model.path]
        if o.scheduler:  # the engines' step limits
            cmd += ["--model-overrides", json.dumps(dict(o.scheduler))]
        if o.api_overrides:  # the api's front door, and preprocess's media rules
            cmd += ["--api-overrides", json.dumps(dict(o.api_overrides))]
        if self.topology.speculative is not None:  # the resolved section (flags applied, its path absolute)
            cmd += ["--speculative", json.dumps({k: v for k, v in vars(self.topology.speculative).items()
                                                 if v is not None})]
        if actor.kind == API:
            cmd += [flag for flag, value in (("--host", o.host), ("--port", o.port)) if value is not None
                    for flag in (flag, str(value))]
        return cmd

    def _spawn(self, actor: ActorId) -> subprocess.Popen:
        env = dict(os.environ)
        if self.options.api_key and actor.kind == API:
            env["TANDEM_API_KEY"] = self.options.api_key  # not on the command line, where ps shows it
        return subprocess.Popen(self._command(actor), env=env, preexec_fn=_die_with_parent)

    def _wait_ready(self, waiting: set[ActorId]) -> None:
        started = time.monotonic()
        deadline = started + self.options.ready_timeout_s
        while waiting:
            for actor in list(waiting):
                code = self.children[actor].process.poll()
                if code is not None:
                    raise LaunchError(f"actor {actor.name} exited with code {code} before it was ready")
            if time.monotonic() > deadline:
                names = ", ".join(sorted(a.name for a in waiting))
                raise LaunchError(f"not ready after {self.options.ready_timeout_s:.0f} s: {names}")
            msg = self.control.recv(timeout_ms=100)
            if isinstance(msg, ActorReady) and ActorId(msg.actor, msg.replica) in waiting:
                waiting.discard(ActorId(msg.actor, msg.replica))
                self._log(f"{msg.actor}-{msg.replica} ready after {time.monotonic() - started:.1f} s")

    def _log(self, line: str) -> None:
        if self.options.verbose:
            print(f"tandem[{self.node}]: {line}", flush=True)

    # -- supervise ---------------------------------------------------------------------------
    def supervise(self) -> None:
        """Watch the children until `stop()`; restart the dead ones."""
        while not self._stopping.wait(POLL_S):
            for child in list(self.children.values()):
                if child.given_up or self._stopping.is_set():
                    continue
                code = child.process.poll()
                if code is not None:
                    self._on_death(child, code)

    def _on_death(self, child: Child, code: int) -> None:
        now = time.monotonic()
        actor = child.actor
        self.events.append((now, f"{actor.name} exited with code {code}"))
        self._log(f"{actor.name} exited with code {code}")
        self.notices.send(ActorStatus(actor.kind, actor.replica, False, f"{actor.name} exited with code {code}"))
        self._cleanup_shared_memory()
        child.deaths.append(now)
        recent = [t for t in child.deaths if now - t < self.options.restart_window_s]
        if len(recent) > self.options.restart_limit:
            child.given_up = True
            self.events.append((now, f"{actor.name} not restarted: {len(recent)} deaths in "
                                     f"{self.options.restart_window_s:.0f} s"))
            self._log(f"{actor.name} not restarted ({len(recent)} deaths): the server stays unhealthy")
            return
        child.process = self._spawn(actor)
        try:
            self._wait_ready({actor})
        except LaunchError as exc:
            self.events.append((time.monotonic(), f"restart of {actor.name} failed: {exc}"))
            return  # the next poll sees it dead and counts another death
        self.events.append((time.monotonic(), f"{actor.name} restarted"))
        self._log(f"{actor.name} restarted")
        self.notices.send(ActorStatus(actor.kind, actor.replica, True, f"{actor.name} restarted"))
        if actor.kind == API:  # a new api waits for every node's start-up notice: the nodes were up
            for node in self.topology.nodes:
                self.notices.send(ActorStatus(STARTUP_STATUS, 0, True, node))

    # -- stop --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Terminate every child, remove sockets and shared memory, merge traces. Idempotent."""
        if self._stopping.is_set() and not self.children:
            return
        self._stopping.set()
        for child in self.children.values():
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.options.stop_grace_s
        for child in self.children.values():
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.children.clear()
        for channel in (self.control, self.notices):
            channel.close()
        self.zctx.term()
        self._cleanup_shared_memory()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self._merge_traces()
        self._log("stopped: every actor exited, run directory and shared memory removed")

    def _cleanup_shared_memory(self) -> None:
        try:
            from transfer.shm import cleanup_run
        except ImportError:  # no shared-memory backend in this build
            return
        cleanup_run(self.run_id)

    def _merge_traces(self) -> None:
        if not self.options.trace_dir:
            return
        from .tracing import merge_chrome_trace

        out = Path(self.options.trace_dir)
        if any(out.glob("*.jsonl")):
            merge_chrome_trace(out, out / f"trace-{self.run_id}.json")

    # -- whole lifetime ----------------------------------------------------------------------
    def run_until_signalled(self) -> int:
        """start, supervise until SIGINT/SIGTERM, stop. The exit status of `tandem serve`."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopping.set())
        try:
            self.start()
            print(f"tandem: {self.topology.name} ready on node {self.node}"
                  f" (api http://{self.options.host or self.topology.api.host}:{self.options.port or self.topology.api.port})",
                  flush=True)
            self.supervise()
        except LaunchError as exc:
            print(f"tandem: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            self.stop()
        return 0

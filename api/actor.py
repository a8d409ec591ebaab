"""The api actor's process: the HTTP server, its ZeroMQ backend, and the launcher's notices.

Started by the launcher like every actor (`python -m actors.main --actor api ...`). It serves
the OpenAI routes on the topology's api address, sends requests to the preprocess replicas,
receives every actor's token batches, and listens for `ActorStatus` notices: when an actor
dies, the requests it may have held are sent again if they have streamed nothing, or end with
a 503 that names it (`ZmqBackend.actor_down`), and /health turns 503 until the launcher reports
it back. It says `ActorReady` once the server accepts connections.
"""

from __future__ import annotations

import threading

import zmq

from actors.main import ActorContext, announce_ready, checkpoint_dir
from actors.messages import STARTUP_STATUS, ActorStatus
from actors.security import topology_context
from actors.tracing import Tracer
from actors.transport import pull

from .app import create_app
from .backend import ZmqBackend
from .server import ApiServer, ServerConfig

ENGINE_KINDS = ("engine", "prefill", "decode")
ENCODER_KINDS = ("vision_encoder", "audio_encoder")  # cancels drop their queued jobs too


def served_model_name(ctx: ActorContext) -> str:
    return "tandem-default" if ctx.topology.model.path == "default" else checkpoint_dir(ctx.topology).name


def watch_notices(zctx: zmq.Context, endpoint: str, backend: ZmqBackend, stop: threading.Event,
                  nodes: tuple[str, ...] = ()) -> None:
    """Apply the launchers' notices to the backend until `stop`: unhealthy until the launcher of
    every node in `nodes` says all its actors are ready, then while any actor is down."""
    inbox = pull(zctx, endpoint)
    down: dict[str, str] = {f"{STARTUP_STATUS}-{node}": f"node {node}: actors starting" for node in nodes}
    backend.set_health(not down, "; ".join(down.values()) if down else "ok")
    try:
        while not stop.is_set():
            msg = inbox.recv(timeout_ms=100)
            if not isinstance(msg, ActorStatus):
                continue
            name = f"{msg.actor}-{msg.detail if msg.actor == STARTUP_STATUS else msg.replica}"
            if msg.up:
                down.pop(name, None)
            else:
                down[name] = msg.detail
                backend.actor_down(msg.actor, msg.replica, msg.detail)  # re-send what has not streamed
            backend.set_health(not down, "; ".join(down.values()) if down else "ok")
    finally:
        inbox.close()


def run_api(ctx: ActorContext) -> int:
    from transformers import AutoTokenizer

    wiring = ctx.wiring
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir(ctx.topology))
    cancels = [endpoint for kind in (*ENGINE_KINDS, *ENCODER_KINDS) for endpoint in wiring.of_kind(kind)]
    zctx = topology_context(ctx.topology.curve_keys)  # CURVE on TCP links when the topology has keys
    backend = ZmqBackend(wiring.of_kind("preprocess"), wiring.results, cancels, context=zctx,
                         max_in_flight=ctx.topology.admission_limit())
    tracer = Tracer(ctx.actor.name, ctx.trace_dir)
    api = ctx.topology.api
    app = create_app(backend, tokenizer, served_model_name(ctx), api_key=ctx.api_key, tracer=tracer,
                     max_body_bytes=api.max_body_bytes, request_timeout_s=api.request_timeout_s,
                     allowed_media_hosts=api.allowed_media_hosts, cors_origins=api.cors_origins,
                     default_chat_template_kwargs=dict(api.default_chat_template_kwargs),
                     media_kinds=ctx.topology.media_kinds)
    server = ApiServer(app, ServerConfig(host=ctx.host or api.host, port=ctx.port or api.port))
    stop = threading.Event()
    notices = threading.Thread(target=watch_notices, args=(zctx, wiring.api_control, backend, stop,
                                                           tuple(ctx.topology.nodes)), daemon=True)
    notices.start()

    def ready_when_listening() -> None:
        if server.wait_started(timeout_s=120):
            announce_ready(zctx, ctx)

    threading.Thread(target=ready_when_listening, daemon=True).start()
    try:
        server.run()  # on the main thread: uvicorn handles SIGINT / SIGTERM
    finally:
        stop.set()
        tracer.flush()
        notices.join(timeout=2)
        zctx.destroy(linger=0)
    return 0

"""A real in-process Tandem pipeline for the api tests: preprocess and a colocated engine in
threads over ZeroMQ ipc sockets, the backend, and the app served by uvicorn on a free port."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from actors.engine_actor import EngineActor
from actors.main import stop_token_ids
from actors.preprocess import Preprocessor, PreprocessActor
from actors.transport import pull, push
from api.app import create_app
from api.backend import ZmqBackend
from api.server import ApiServer, ServerConfig
from default_model import CHECKPOINT
from gemma4_model.engine import Engine
from gemma4_model.grammar import GrammarBook
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder

MODEL_NAME = "tandem-default"
API_KEY = "test-key"
PAGE_SIZE = 16
KV_PAGES = 64  # 1024 tokens of full-attention KV: a longer prompt is refused with 413


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pipeline:
    base_url: str
    backend: ZmqBackend
    tokenizer: object
    model: object
    config: object
    engine: Engine
    server: ApiServer
    stop_tokens: list[int]

    def offline_engine(self) -> Engine:
        """A second engine over the same weights, for expected outputs."""
        return Engine(self.model, PagedKVCache(self.config.text, page_size=PAGE_SIZE, num_pages=KV_PAGES))


def start_pipeline(run_dir: Path, stack, **app_options) -> Pipeline:
    """Start everything; `stack` (an ExitStack) stops it all in reverse order. `app_options`
    go to `create_app` (front-door settings)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    config, model = load_text_decoder(CHECKPOINT, device="cpu", dtype=torch.float32)
    stops = stop_token_ids(CHECKPOINT)
    grammars = GrammarBook.from_checkpoint(CHECKPOINT, config.text.vocab_size, sorted(set(stops) | set(config.text.eos_token_ids)))
    engine = Engine(model, PagedKVCache(config.text, page_size=PAGE_SIZE, num_pages=KV_PAGES), grammars=grammars)
    endpoints = {name: f"ipc://{run_dir}/{name}" for name in ("preprocess.in", "engine.in", "api.results")}
    zctx = zmq.Context()
    stack.callback(zctx.destroy, linger=0)
    stop = threading.Event()

    backend = ZmqBackend([endpoints["preprocess.in"]], endpoints["api.results"], [endpoints["engine.in"]])
    backend.start()  # binds the results socket before the actors connect to it
    stack.callback(backend.close)

    preprocess = PreprocessActor(Preprocessor(tokenizer, stops), pull(zctx, endpoints["preprocess.in"]),
                                 push(zctx, endpoints["engine.in"]), push(zctx, endpoints["api.results"]))
    engine_actor = EngineActor(engine, pull(zctx, endpoints["engine.in"]), push(zctx, endpoints["api.results"]),
                               stats_interval_s=0.05)
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in (preprocess, engine_actor)]
    for t in threads:
        t.start()

    def stop_actors() -> None:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        for ch in (preprocess.inbox, *preprocess.downstream, preprocess.errors, engine_actor.inbox, engine_actor.outbox):
            ch.close()

    stack.callback(stop_actors)

    port = free_port()
    options = {"max_body_bytes": 64 << 10, "default_max_tokens": 32, **app_options}
    app = create_app(backend, tokenizer, MODEL_NAME, api_key=API_KEY, **options)
    server = ApiServer(app, ServerConfig(host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def stop_server() -> None:
        server.stop()
        thread.join(timeout=10)

    stack.callback(stop_server)
    assert server.wait_started(timeout_s=30), "uvicorn did not start"
    return Pipeline(f"http://127.0.0.1:{port}", backend, tokenizer, model, config, engine, server, stops)

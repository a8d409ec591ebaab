"""A tiny OpenAI-style streaming server with known timings, for testing the benchmark client.

`FakeOpenAI(config)` runs starlette on uvicorn in a thread on a free port. Each streamed answer
waits `ttft_s`, sends its first token, then one token every `itl_s` until `max_tokens`, then a
usage chunk and `[DONE]`, so TTFT, ITL, TPOT and throughput are known in advance. Requests can be
made to fail: every `http_error_every`-th request gets an HTTP 500, every `midstream_error_every`-th
an error event after `error_after_tokens` tokens (numbers count from 1 in arrival order).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from tests.serving import free_port


@dataclass(frozen=True)
class FakeConfig:
    ttft_s: float = 0.05
    itl_s: float = 0.01
    model: str = "fake-model"
    http_error_every: int = 0  # 0: never
    midstream_error_every: int = 0
    error_after_tokens: int = 2
    send_usage: bool = True


class FakeOpenAI:
    """The server; `url` is its base, `bodies` the JSON bodies it received (in arrival order)."""

    def __init__(self, config: FakeConfig = FakeConfig()):
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.bodies: list[dict] = []
        app = Starlette(routes=[Route("/v1/models", self._models),
                                Route("/v1/completions", self._generate, methods=["POST"]),
                                Route("/v1/chat/completions", self._generate, methods=["POST"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     lifespan="off", access_log=False))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake OpenAI server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.config.model, "object": "model"}]})

    async def _generate(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        number = len(self.bodies)
        config = self.config
        if config.http_error_every and number % config.http_error_every == 0:
            return JSONResponse({"error": {"message": f"fake overload on request {number}", "type": "server_error",
                                           "code": 500}}, status_code=500)
        chat = request.url.path.endswith("chat/completions")
        tokens = int(body["max_tokens"])
        prompt_tokens = len(body["prompt"]) if "prompt" in body else 7

        def chunk(choices: list, usage=None) -> bytes:
            return b"data: " + json.dumps({"object": "chunk", "choices": choices, "usage": usage}).encode() + b"\n\n"

        def token(i: int) -> dict:
            finish = "length" if i == tokens - 1 else None
            if chat:
                return {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": finish}
            return {"index": 0, "text": f" t{i}", "finish_reason": finish}

        async def events():
            if chat:  # a role-only chunk first, as OpenAI sends it: no output, no TTFT
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            await asyncio.sleep(config.ttft_s)
            start = time.perf_counter()
            for i in range(tokens):
                if i:  # absolute schedule, so sleep overshoot does not accumulate
                    await asyncio.sleep(max(0.0, start + i * config.itl_s - time.perf_counter()))
                if (config.midstream_error_every and number % config.midstream_error_every == 0
                        and i == config.error_after_tokens):
                    yield b"data: " + json.dumps({"error": {"message": f"fake decode crash on request {number}",
                                                            "type": "server_error", "code": 503}}).encode() + b"\n\n"
                    return
                yield chunk([token(i)])
            if config.send_usage:
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                 "total_tokens": prompt_tokens + tokens})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

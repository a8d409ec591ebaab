"""The OpenAI-compatible HTTP app (starlette): routes, auth, body limits, and the glue from a
validated request to its `Generation` and back to a JSON body or an SSE stream.

POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (503 when
unhealthy), GET /metrics. Every error is OpenAI-shaped (`errors.py`). A streaming request
waits for the first result of each choice before sending its 200 headers, so an error before
any token (a prompt too long: 413, a full server: 429 / 503) is a proper status code; a later
error is sent as an SSE error event and ends the stream. A client that goes away cancels its
requests in the engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from actors.tracing import Tracer

from .backend import ZmqBackend
from .errors import ApiError, error_response
from .formats import ChatFormat, CompletionFormat, ResponseFormat
from .chat_output import SpecialIds
from .generation import Generation, chat_output_config, engine_requests
from .logprobs import TokenText
from .media import check_media
from .metrics import ApiMetrics
from .schema import ChatCompletionRequest, CompletionRequest, parse_body
from .streaming import DONE, EventStreamResponse, sse

log = logging.getLogger("tandem.api")

MAX_JSON_DEPTH = 64  # request bodies nesting deeper are refused (400) before anything recurses over them
CLIENT_CLOSED = 499  # nginx's status for a client that went away (metrics only: nobody reads it)


@dataclass(frozen=True)
class AppConfig:
    model_name: str
    api_key: str | None
    max_body_bytes: int
    default_max_tokens: int
    request_timeout_s: float | None = None  # None: no limit
    allowed_media_hosts: tuple[str, ...] = ()
    media_kinds: frozenset[str] = frozenset()  # media the topology has encoders for
    default_chat_template_kwargs: tuple[tuple[str, object], ...] = ()  # e.g. (("enable_thinking", True),)


class OpenAIRoutes:
    """The handlers, sharing the backend, tokenizer, metrics and config."""

    def __init__(self, backend: ZmqBackend, tokenizer, config: AppConfig, tracer: Tracer | None = None):
        self.backend = backend
        self.tracer = tracer or Tracer("api-0", None)
        self.tokenizer = tokenizer
        self.names = TokenText(tokenizer)
        self.special = SpecialIds.of(tokenizer)
        self.config = config
        self.metrics = ApiMetrics(backend.actor_stats, lambda: backend.in_flight,
                                  lambda: getattr(backend, "retried", 0))

    # --- checks -----------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    async def read_json(self, request: Request):
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes")
        try:
            value = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            value = None  # nested past the parser's recursion limit
        if value is None and body.strip() != b"null" or _depth_exceeds(value, MAX_JSON_DEPTH):
            raise ApiError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels")
        return value

    def check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    # --- routes -----------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "/v1/chat/completions", ChatCompletionRequest, ChatFormat)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/completions", CompletionRequest, CompletionFormat)

    async def models(self, request: Request) -> Response:
        try:
            self.check_auth(request)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "tandem"}]})

    async def health(self, request: Request) -> Response:
        ok, detail = self.backend.health()
        return JSONResponse({"status": "ok" if ok else "unhealthy", "detail": detail}, status_code=200 if ok else 503)

    async def metrics_route(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    # --- generation -------------------------------------------------------------------------
    async def _generate(self, request: Request, route: str, schema, format_cls) -> Response:
        try:
            self.check_auth(request)
            body = parse_body(schema, await self.read_json(request))
            if isinstance(body, ChatCompletionRequest) and self.config.default_chat_template_kwargs:
                kwargs = {**dict(self.config.default_chat_template_kwargs), **(body.chat_template_kwargs or {})}
                body = body.model_copy(update={"chat_template_kwargs": kwargs})  # the request's own win
            self.check_model(body.model)
            if isinstance(body, ChatCompletionRequest):
                check_media(body.messages, self.config.allowed_media_hosts, self.config.media_kinds)
            if getattr(body, "echo", False):
                raise ApiError(400, "echo is not supported", param="echo")
            output = chat_output_config(body) if isinstance(body, ChatCompletionRequest) else None
            generation = Generation(self.backend, self.tokenizer, engine_requests(body, self.config.default_max_tokens),
                                    body.stop_strings, timeout_s=self.config.request_timeout_s,
                                    output=output, special=self.special)
            fmt = format_cls(self.names, self.config.model_name, len(generation.choices),
                             body.top_count is not None, generation.requests[0].request_id.rsplit("-", 1)[0])
            generation.submit()
        except ApiError as exc:
            self.metrics.count(route, exc.status)
            return error_response(exc)
        try:
            if body.stream:
                return await self._stream(request, route, body, generation, fmt)
            return await self._complete(request, route, body, generation, fmt)
        except ApiError as exc:
            self.metrics.count(route, exc.status)
            return error_response(exc)
        except BaseException:
            generation.abort()  # a bug or a cancelled handler must not leave engine requests running
            raise

    async def _complete(self, request, route, body, generation: Generation, fmt: ResponseFormat) -> Response:
        async def collect() -> None:
            async for index, delta in generation.results():
                fmt.collect(index, delta)

        if not await _unless_disconnected(request, collect(), generation):
            self.metrics.count(route, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        self._observe(generation)
        self.metrics.count(route, 200)
        choices = [fmt.full_choice(c) for c in generation.choices]
        if body.return_token_ids:
            for choice, state in zip(choices, generation.choices):
                choice["token_ids"] = state.token_ids
        return JSONResponse(fmt.envelope(False, choices, generation.usage(body.n)))

    async def _stream(self, request, route, body, generation: Generation, fmt: ResponseFormat) -> Response:
        results = generation.results()
        early: list = []

        async def first_of_each() -> None:  # errors before any token become the status code
            waiting = set(range(len(generation.choices)))
            while waiting:
                index, delta = await results.__anext__()
                early.append((index, delta))
                waiting.discard(index)

        if not await _unless_disconnected(request, first_of_each(), generation):
            self.metrics.count(route, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        include_usage = body.include_usage
        outcome = {"status": CLIENT_CLOSED}

        def chunk_choice(index: int, delta) -> dict:
            choice = fmt.chunk_choice(index, delta)
            if body.return_token_ids:
                choice["token_ids"] = delta.token_ids
            return choice

        async def events() -> AsyncIterator[bytes]:
            try:
                for index, delta in early:
                    yield sse(fmt.envelope(True, [chunk_choice(index, delta)], with_usage=include_usage))
                async for index, delta in results:
                    yield sse(fmt.envelope(True, [chunk_choice(index, delta)], with_usage=include_usage))
            except ApiError as exc:  # mid-stream: an error event ends the stream
                outcome["status"] = exc.status
                yield sse(exc.body())
                return
            except Exception:
                log.exception("unhandled error while streaming")
                outcome["status"] = 500
                yield sse(ApiError(500, "internal server error").body())
                return
            finally:
                with contextlib.suppress(Exception):
                    await results.aclose()
            if include_usage:
                yield sse(fmt.usage_chunk(generation.usage(body.n)))
            outcome["status"] = 200
            self._observe(generation)
            yield DONE

        def on_close() -> None:
            generation.abort()
            self.metrics.count(route, outcome["status"])

        return EventStreamResponse(events(), on_close)

    def _observe(self, generation: Generation) -> None:
        now, now_ns = time.monotonic(), time.time_ns()
        for choice, request in zip(generation.choices, generation.requests):
            self.metrics.observe(generation.started_at, choice.first_token_at, now, choice.completion_tokens)
            first = choice.first_token_at  # the api's own TTFT: the engine's first token reached it
            self.tracer.record("request", generation.started_ns, now_ns, request.request_id,
                               tokens=choice.completion_tokens, prompt_tokens=choice.prompt_tokens,
                               ttft_ms=None if first is None else round((first - generation.started_at) * 1e3, 3))


def _depth_exceeds(value, limit: int) -> bool:
    """Whether JSON `value` nests arrays / objects deeper than `limit` (iterative: no recursion).
    Later steps (validation, the chat template, re-encoding) recurse over the body."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


async def _unless_disconnected(request: Request, work, generation: Generation) -> bool:
    """Run `work` (raising its ApiError) unless the client disconnects first; then cancel it all."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            generation.abort()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
    task.result()
    return True


def create_app(backend: ZmqBackend, tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 4 << 20, default_max_tokens: int = 256, tracer: Tracer | None = None,
               request_timeout_s: float | None = None, allowed_media_hosts: tuple[str, ...] = (),
               cors_origins: tuple[str, ...] = (), default_chat_template_kwargs: dict | None = None,
               media_kinds: frozenset[str] = frozenset()) -> Starlette:
    """The app; its lifespan starts the backend and closes it (ending every request) at shutdown.
    `tracer` records one `request` span per engine request (arrival to last token); CORS is off
    unless `cors_origins` names the browser origins to allow; `media_kinds` are the media the
    topology has encoders for (others are refused with a 400)."""
    config = AppConfig(model_name, api_key, max_body_bytes, default_max_tokens, request_timeout_s,
                       tuple(allowed_media_hosts), frozenset(media_kinds),
                       default_chat_template_kwargs=tuple((default_chat_template_kwargs or {}).items()))
    routes = OpenAIRoutes(backend, tokenizer, config, tracer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        backend.start()
        try:
            yield
        finally:
            backend.close()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(ApiError(500, "internal server error"))

    app = Starlette(exception_handlers={HTTPException: http_error, Exception: internal_error}, routes=[
        Route("/v1/chat/completions", routes.chat, methods=["POST"]),
        Route("/v1/completions", routes.completions, methods=["POST"]),
        Route("/v1/models", routes.models, methods=["GET"]),
        Route("/health", routes.health, methods=["GET"]),
        Route("/metrics", routes.metrics_route, methods=["GET"]),
    ], lifespan=lifespan)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.state.routes = routes
    return app

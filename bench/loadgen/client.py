"""Stream one OpenAI request and time it: when each chunk with output arrives, usage, errors.

A chunk counts as output when one of its choices carries text (`text`, `delta.content`,
`delta.reasoning_content` / `reasoning`, `delta.tool_calls`) or `token_ids`; role-only and
usage-only chunks do not. TTFT is the first such chunk's arrival, ITL the gaps between them (chunks
read from the socket together share one arrival time, so their gap is 0, as in
sglang.bench_serving), E2E the end of the stream. Output tokens
are the server's `usage.completion_tokens` (stream_options.include_usage); only where the server
sends no usage are chunks counted instead (`usage_reported` False says so).

Every failure is kept with its message: an HTTP status other than 200, an error event in the
stream, a stream that ends without `[DONE]` or a finish_reason, one without any output, a
transport error, or the run's per-request timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from .workload import PreparedRequest

MAX_ERROR_CHARS = 500


@dataclass
class RequestResult:
    """What one request measured; times in seconds from the moment it was sent."""

    index: int
    success: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each output chunk
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_len_asked: int = 0
    usage_reported: bool = False
    finish_reason: str | None = None
    start: float = 0.0  # perf_counter when sent (for the run's timeline)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1), as sglang.bench_serving; None for one token."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _has_output(choice: dict) -> bool:
    if choice.get("text") or choice.get("token_ids"):
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                or delta.get("tool_calls"))


def _error_message(status: int, raw: bytes) -> str:
    text = raw.decode(errors="replace")
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            text = error["message"]
        elif isinstance(error, str):
            text = error
    except (ValueError, AttributeError):
        pass
    return f"HTTP {status}: {text.strip()[:MAX_ERROR_CHARS]}"


def _event_error(event: dict) -> str:
    error = event["error"]
    message = error.get("message", error) if isinstance(error, dict) else error
    code = error.get("code") or error.get("type") if isinstance(error, dict) else None
    return f"error event{f' ({code})' if code else ''}: {str(message)[:MAX_ERROR_CHARS]}"


class EventStream:
    """Splits a byte stream, in pieces of any size, into its server-sent events' data payloads
    (LF or CRLF line ends; comment and other field lines ignored; multi-line data joined)."""

    def __init__(self) -> None:
        self.buffer = b""

    @staticmethod
    def _data(event: bytes) -> bytes | None:
        lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        return b"\n".join(lines) if lines else None

    def feed(self, piece: bytes) -> list[bytes]:
        self.buffer = (self.buffer + piece).replace(b"\r\n", b"\n")  # a CR may end one piece, its LF start the next
        *events, self.buffer = self.buffer.split(b"\n\n")
        return [d for d in map(self._data, events) if d is not None]

    def close(self) -> list[bytes]:
        """Whatever the stream left without a closing blank line."""
        rest, self.buffer = self.buffer, b""
        data = self._data(rest.rstrip(b"\r\n"))
        return [data] if data is not None else []


async def _sse_payloads(response: aiohttp.ClientResponse):
    """Yield (arrival time, data payload) for each server-sent event of the response."""
    events = EventStream()
    async for piece in response.content.iter_any():
        now = time.perf_counter()
        for payload in events.feed(piece):
            yield now, payload
    for payload in events.close():
        yield time.perf_counter(), payload


async def send_request(http: aiohttp.ClientSession, base_url: str, request: PreparedRequest,
                       timeout_s: float | None, headers: dict[str, str] | None = None) -> RequestResult:
    """POST `request` with streaming and time it; never raises for a failed request."""
    result = RequestResult(request.index, output_len_asked=request.output_len)
    result.start = start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await _stream(http, base_url, request, headers or {}, result, start)
    except TimeoutError:  # the run's limit, or aiohttp's connect timeout
        result.error = (f"timeout: no complete answer within {timeout_s:g} s" if timeout_s is not None
                        else "timeout while connecting")
    except (aiohttp.ClientError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS] or 'transport error'}"
    except (ValueError, KeyError, TypeError) as exc:
        result.error = f"malformed stream: {type(exc).__name__}: {str(exc)[:MAX_ERROR_CHARS]}"
    result.success = result.error is None
    if result.success:
        if not result.usage_reported:
            result.output_tokens = len(result.chunk_times)
        if result.prompt_tokens == 0:
            result.prompt_tokens = request.input_len
    return result


async def _stream(http, base_url, request, headers, result: RequestResult, start: float) -> None:
    done = False
    async with http.post(base_url + request.route, data=request.body,
                         headers={"Content-Type": "application/json", **headers}) as response:
        if response.status != 200:
            result.error = _error_message(response.status, await response.read())
            return
        async for now, payload in _sse_payloads(response):
            if payload == b"[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event and event["error"]:
                result.error = _event_error(event)
                return
            if event.get("usage"):
                result.usage_reported = True
                result.prompt_tokens = int(event["usage"].get("prompt_tokens") or 0)
                result.output_tokens = int(event["usage"].get("completion_tokens") or 0)
            for choice in event.get("choices") or ():
                if _has_output(choice):
                    if result.ttft is None:
                        result.ttft = now - start
                    result.chunk_times.append(now - start)
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
        result.e2e = time.perf_counter() - start
    if not done and result.finish_reason is None:
        result.error = "the stream ended without [DONE] or a finish_reason"
    elif result.ttft is None:
        result.error = "the stream finished without any output"

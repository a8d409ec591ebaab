"""Server-sent events: `data: <json>\\n\\n` per chunk, `data: [DONE]` at the end.

`EventStreamResponse` is a small ASGI response that sends the events while listening for the
client's disconnect; whichever ends first, the event generator is closed and `on_close` runs
(the generation cancels what is unfinished), so a client that goes away frees its pages.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Callable

DONE = b"data: [DONE]\n\n"
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse:
    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        sender, watcher = asyncio.create_task(pump()), asyncio.create_task(watch())
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher):
                task.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            try:
                await self.events.aclose()
            finally:
                self.on_close()

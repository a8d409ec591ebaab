"""ZeroMQ sockets wrapped once: send and receive typed messages, zero-copy, size-limited.

Each edge of the pipeline uses one socket pattern chosen on purpose: PUSH/PULL for the
one-way request path (api -> preprocess -> prefill -> decode) and for token streams back to
the api. Received frames are decoded by `actors.messages.decode`, which validates everything;
`MAX_MESSAGE_BYTES` bounds what a peer can make us buffer.
"""

from __future__ import annotations

import sys
from typing import Any

import zmq

from .messages import MessageError, decode, encode
from .security import secure_socket

MAX_MESSAGE_BYTES = 1 << 30


class Channel:
    """One ZeroMQ socket carrying registered messages."""

    def __init__(self, ctx: zmq.Context, kind: int, endpoint: str, *, bind: bool, drop_malformed: bool = False):
        """`drop_malformed`: `recv` skips (and counts, with a line on stderr) a message that does not
        decode instead of raising `MessageError` (an actor's inbox: one bad peer must not stop it)."""
        self.drop_malformed = drop_malformed
        self.malformed = 0
        self.socket = ctx.socket(kind)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.socket.setsockopt(zmq.LINGER, 0)  # shutdown never blocks on unsent messages
        secure_socket(ctx, self.socket, endpoint, server=bind)  # CURVE over TCP when the topology has keys
        (self.socket.bind if bind else self.socket.connect)(endpoint)
        self.endpoint = endpoint

    def send(self, msg: Any) -> None:
        self.socket.send_multipart(encode(msg), copy=False)

    def recv(self, timeout_ms: int | None = None) -> Any | None:
        """The next message, or None if none arrived within `timeout_ms`."""
        if timeout_ms is not None and not self.socket.poll(timeout_ms):
            return None
        frames = self.socket.recv_multipart(copy=False)
        try:
            return decode([f.buffer for f in frames])
        except MessageError as exc:
            if not self.drop_malformed:
                raise
            self.malformed += 1
            print(f"tandem: dropped a malformed message on {self.endpoint}: {exc}", file=sys.stderr, flush=True)
            return None

    def close(self) -> None:
        self.socket.close(linger=0)


def push(ctx: zmq.Context, endpoint: str, bind: bool = False) -> Channel:
    return Channel(ctx, zmq.PUSH, endpoint, bind=bind)


def pull(ctx: zmq.Context, endpoint: str, bind: bool = True, drop_malformed: bool = False) -> Channel:
    return Channel(ctx, zmq.PULL, endpoint, bind=bind, drop_malformed=drop_malformed)

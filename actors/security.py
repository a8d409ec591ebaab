"""Authenticated links between nodes: ZeroMQ CURVE on every TCP endpoint, keys from the topology.

A topology's `[security]` table names a directory of two ZeroMQ certificates, `server` and
`client` (`tandem keys DIR` writes them with `zmq.auth.create_certificates`; every node holds
the same directory). Over TCP, a bound socket is a CURVE server with the server's secret key and
a connecting socket a CURVE client that knows the server's public key and proves the client
key; each process runs a ZAP authenticator that admits only that client key. Traffic is then
encrypted and a peer without the keys can neither connect nor read. Local `ipc://` sockets are
left as they are: the run directory's permissions guard them.

`secure_context(keys)` gives the process's ZeroMQ context with the keys attached;
`transport.Channel` applies them to each TCP socket it opens. Without keys it is a plain context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER, CLIENT = "server", "client"


class SecurityError(ValueError):
    """Keys that cannot be used (missing or unreadable certificate files)."""


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def make_keys(directory: str | Path) -> Path:
    """Write a server and a client certificate into `directory` (created), for `[security]`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in (SERVER, CLIENT):
        zmq.auth.create_certificates(str(directory), name)
    for secret in directory.glob("*.key_secret"):
        secret.chmod(0o600)
    return directory


def load_keys(directory: str | Path) -> CurveKeys:
    """The keys `make_keys` wrote (SecurityError naming the file at fault)."""
    pairs = {}
    for name in (SERVER, CLIENT):
        path = Path(directory) / f"{name}.key_secret"
        try:
            public, secret = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as exc:
            raise SecurityError(f"{path}: not a readable ZeroMQ secret certificate ({exc})") from exc
        if not public or not secret:
            raise SecurityError(f"{path}: holds no secret key")
        pairs[name] = (public, secret)
    return CurveKeys(*pairs[SERVER], *pairs[CLIENT])


class _ClientKeyOnly:
    """ZAP credentials check: only the cluster's client key gets in."""

    def __init__(self, client_public: bytes):
        self.client_public = client_public

    def callback(self, domain: str, key: bytes) -> bool:  # key: z85, as the certificates hold it
        return key == self.client_public


class SecureContext(zmq.Context):
    """A ZeroMQ context carrying the CURVE keys its TCP sockets use (None: plain)."""

    curve: CurveKeys | None = None
    authenticator: ThreadAuthenticator | None = None

    def destroy(self, linger: int | None = None) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        super().destroy(linger=linger)

    def term(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        super().term()


def secure_context(keys: CurveKeys | None) -> zmq.Context:
    """This process's context: with `keys`, TCP sockets are CURVE-authenticated and encrypted."""
    ctx = SecureContext()
    if keys is not None:
        ctx.curve = keys
        ctx.authenticator = ThreadAuthenticator(ctx)
        ctx.authenticator.start()
        ctx.authenticator.configure_curve_callback("*", _ClientKeyOnly(keys.client_public))
    return ctx


def topology_context(curve_keys: str | None) -> zmq.Context:
    """The context for a process of a topology whose `[security] curve_keys` is `curve_keys`."""
    return secure_context(load_keys(curve_keys) if curve_keys else None)


def apply_curve(socket: zmq.Socket, keys: CurveKeys, server: bool) -> None:
    """CURVE options for one socket, before it binds (server) or connects (client)."""
    if server:
        socket.curve_secretkey = keys.server_secret
        socket.curve_publickey = keys.server_public
        socket.curve_server = True
    else:
        socket.curve_secretkey = keys.client_secret
        socket.curve_publickey = keys.client_public
        socket.curve_serverkey = keys.server_public


def secure_socket(ctx: zmq.Context, socket: zmq.Socket, endpoint: str, server: bool) -> None:
    """Apply the context's keys to `socket` when it goes over TCP."""
    keys = getattr(ctx, "curve", None)
    if keys is not None and endpoint.startswith("tcp://"):
        apply_curve(socket, keys, server)

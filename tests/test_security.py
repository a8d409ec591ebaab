"""CURVE on TCP links: the topology's keys admit their holders only; ipc sockets stay plain."""

from __future__ import annotations

import copy
import socket
import tomllib

import pytest
import zmq

from actors.messages import CancelRequest
from actors.security import SecurityError, load_keys, make_keys, secure_context
from actors.transport import pull, push
from topology.config import EXAMPLES, TopologyError, parse_topology


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return load_keys(make_keys(tmp_path_factory.mktemp("keys")))


def exchange(receiver_ctx, sender_ctx, endpoint: str, wait_ms: int = 1500):
    inbox = pull(receiver_ctx, endpoint)
    outbox = push(sender_ctx, endpoint)
    try:
        outbox.send(CancelRequest("r-1"))
        return inbox.recv(timeout_ms=wait_ms)
    finally:
        inbox.close(), outbox.close()


def test_holders_of_the_keys_talk_over_tcp(keys):
    server, client = secure_context(keys), secure_context(keys)
    try:
        msg = exchange(server, client, f"tcp://127.0.0.1:{free_port()}")
        assert msg == CancelRequest("r-1")
    finally:
        server.destroy(linger=0), client.destroy(linger=0)


def test_a_peer_without_the_keys_gets_nothing_through(keys, tmp_path):
    other = load_keys(make_keys(tmp_path / "other"))  # another cluster's certificates
    cases = {"plain": None, "other client": other}
    for name, peer_keys in cases.items():
        server, peer = secure_context(keys), secure_context(peer_keys)
        try:
            assert exchange(server, peer, f"tcp://127.0.0.1:{free_port()}", wait_ms=600) is None, name
        finally:
            server.destroy(linger=0), peer.destroy(linger=0)


def test_only_the_client_key_is_admitted(keys, tmp_path):
    """A peer that knows the server's public key but holds another client key is refused."""
    other = load_keys(make_keys(tmp_path / "other"))
    impostor = type(keys)(keys.server_public, b"", other.client_public, other.client_secret)
    server, peer = secure_context(keys), secure_context(impostor)
    try:
        assert exchange(server, peer, f"tcp://127.0.0.1:{free_port()}", wait_ms=600) is None
    finally:
        server.destroy(linger=0), peer.destroy(linger=0)


def test_ipc_sockets_are_left_plain(keys, tmp_path):
    server, plain = secure_context(keys), zmq.Context()
    try:
        assert exchange(server, plain, f"ipc://{tmp_path}/local") == CancelRequest("r-1")
    finally:
        server.destroy(linger=0), plain.destroy(linger=0)


def test_the_topology_names_the_keys(tmp_path):
    raw = tomllib.loads((EXAMPLES / "cpu_two_node.toml").read_text())
    assert parse_topology(raw).curve_keys is None
    secured = copy.deepcopy(raw)
    secured["security"] = {"curve_keys": str(make_keys(tmp_path / "k"))}
    assert parse_topology(secured).curve_keys == str(tmp_path / "k")
    secured["security"] = {"curve_keys": str(tmp_path / "nothing")}
    with pytest.raises(TopologyError) as err:
        parse_topology(secured)
    assert err.value.field == "security.curve_keys" and "tandem keys" in str(err.value)
    with pytest.raises(SecurityError):
        load_keys(tmp_path / "nothing")

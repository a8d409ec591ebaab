"""Topology -> endpoints: every actor and every launcher derive the same addresses."""

from topology.config import EXAMPLES, load_topology, parse_topology
from topology.wiring import API, ActorId, actor_ids, plan_wiring


def test_single_node_uses_unix_sockets_in_the_run_directory():
    wiring = plan_wiring(load_topology(EXAMPLES / "cpu_disaggregated.toml"), "/tmp/tandem-run")
    endpoints = [*wiring.inboxes.values(), wiring.results, wiring.api_control, *wiring.controls.values()]
    assert all(e.startswith("ipc:///tmp/tandem-run/") for e in endpoints)
    assert len(set(endpoints)) == len(endpoints)
    assert set(wiring.inboxes) == {ActorId(kind, 0) for kind in ("preprocess", "vision_encoder", "audio_encoder",
                                                                 "prefill", "decode")}
    assert wiring.nodes[ActorId(API, 0)] == "local"


def test_two_nodes_use_tcp_on_each_nodes_host_and_ports_and_agree_across_processes():
    topology = load_topology(EXAMPLES / "cpu_two_node.toml")
    first, second = plan_wiring(topology, "/tmp/a"), plan_wiring(topology, "/tmp/b")
    assert first.inboxes == second.inboxes and first.results == second.results  # run dirs do not matter
    assert first.nodes[ActorId("decode", 0)] == "back" and first.nodes[ActorId(API, 0)] == "front"
    back_ports = {int(e.rsplit(":", 1)[1]) for a, e in first.inboxes.items() if first.nodes[a] == "back"}
    assert all(5700 <= p < 5800 for p in back_ports)
    assert first.kv_data[0].startswith("tcp://") and first.controls["back"] != first.controls["front"]


def test_replicas_each_get_an_inbox_and_the_api_comes_last():
    raw = {"nodes": {"n": {}}, "actors": [{"kind": "preprocess", "replicas": 2}, {"kind": "engine", "replicas": 3}]}
    topology = parse_topology(raw)
    ids = actor_ids(topology)
    assert ids[-1] == ActorId(API, 0) and [a.kind for a in ids[:3]] == ["engine"] * 3
    assert len(plan_wiring(topology, "/tmp/r").of_kind("engine")) == 3

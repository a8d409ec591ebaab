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


def test_gpu_data_plane_endpoints_come_after_every_other_port_of_their_node():
    one = plan_wiring(load_topology(EXAMPLES / "gpu_two.toml"), "/tmp/r")
    assert one.kv_release == {0: "ipc:///tmp/r/prefill-0.release"}
    assert one.kv_store == {0: "tcp://127.0.0.1:5600"}  # a TCP store even on one node (nccl rendezvous)
    two = plan_wiring(load_topology(EXAMPLES / "gpu_two_node.toml"), "/tmp/r")
    endpoints = [*two.inboxes.values(), two.results, two.api_control, *two.controls.values(), *two.kv_data.values(),
                 *two.kv_release.values(), *two.kv_store.values()]
    assert len(set(endpoints)) == len(endpoints)
    back = [int(e.rsplit(":", 1)[1]) for a, e in two.inboxes.items() if two.nodes[a] == "back"]
    store = int(two.kv_store[0].rsplit(":", 1)[1])
    assert two.kv_release[0].startswith("tcp://") and store > max(back) and 5700 <= store < 5800
    before = plan_wiring(load_topology(EXAMPLES / "cpu_two_node.toml"), "/tmp/r")
    assert before.kv_data[0] == "tcp://127.0.0.1:5702"  # where it was before the GPU endpoints existed

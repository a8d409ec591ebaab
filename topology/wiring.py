"""Where every actor's sockets live: the one place that turns a topology into endpoints.

Every launcher of a run (one per node) and every actor process computes the same `Wiring`
from the same topology file, so nobody has to be told an address. On a single node all
endpoints are Unix sockets (`ipc://`) inside the run directory, which the launcher removes at
shutdown; when a topology spans nodes every endpoint is TCP, on its node's host, with ports
counted up from the node's `base_port` in a fixed order.

Edges (all ZeroMQ PUSH/PULL; the receiving side binds):
- api -> preprocess replicas (`GenerateRequest`), round-robin;
- preprocess -> engine or prefill replicas (`PrefillJob`), one socket each, taken in turn;
- preprocess -> vision / audio encoder replicas (`EncodeJob`), one socket each, by content hash;
- encoders -> engine or prefill replicas (`EncodeResult`), the replica each job names;
- prefill -> decode replicas (`KVHandoff`), round-robin;
- api -> every engine / prefill / decode / encoder replica (`CancelRequest`), one socket each;
- every actor -> api results (`TokenBatch`, `RequestError`, `ActorStats`);
- every actor -> its node's launcher control (`ActorReady`);
- launchers -> api control (actor down / up notices);
- prefill -> decode KV data, one endpoint per decode replica (the `tcp` transfer backend);
- decode -> prefill KV releases, one endpoint per prefill replica (the `cuda_ipc` backend);
- one process-group rendezvous store per decode replica (the `nccl` backend): always TCP, on the
  decode replica's node, its port counted after every other endpoint of that node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .config import Topology

API = "api"  # the api actor is implied by [api]; it runs on `Topology.api_node`


@dataclass(frozen=True)
class ActorId:
    kind: str
    replica: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.replica}"


@dataclass(frozen=True)
class Wiring:
    run_dir: str
    inboxes: Mapping[ActorId, str]  # every actor's PULL inbox (the api's is its request-free control)
    results: str  # the api's PULL for token batches and errors
    api_control: str  # the api's PULL for launcher notices
    controls: Mapping[str, str]  # node name -> its launcher's PULL control endpoint
    kv_data: Mapping[int, str]  # decode replica -> its PULL for KV data (tcp backend)
    nodes: Mapping[ActorId, str]  # actor -> node name
    kv_release: Mapping[int, str] = field(default_factory=dict)  # prefill replica -> its KVRelease PULL (cuda_ipc)
    kv_store: Mapping[int, str] = field(default_factory=dict)  # decode replica -> its TCPStore, tcp:// (nccl)

    def of_kind(self, kind: str) -> list[str]:
        return [addr for actor, addr in sorted(self.inboxes.items(), key=lambda kv: kv[0].replica)
                if actor.kind == kind]

    def actors_on(self, node: str) -> list[ActorId]:
        return [actor for actor, where in self.nodes.items() if where == node]


def actor_ids(topology: Topology) -> list[ActorId]:
    """Every actor process of the run, the api included, in start order."""
    ids = [ActorId(spec.kind, r) for spec in topology.actors for r in range(spec.replicas)]
    order = ("engine", "decode", "prefill", "vision_encoder", "audio_encoder", "preprocess")
    ids.sort(key=lambda a: (order.index(a.kind), a.replica))
    return ids + [ActorId(API, 0)]


def plan_wiring(topology: Topology, run_dir: str | Path) -> Wiring:
    run_dir = str(run_dir)
    ids = actor_ids(topology)
    spec_node = {spec.kind: spec.node for spec in topology.actors}
    nodes = {a: (topology.api_node if a.kind == API else spec_node[a.kind]) for a in ids}
    multi_node = len(set(nodes.values()) | {topology.api_node}) > 1 or len(topology.nodes) > 1
    next_port = {name: node.base_port for name, node in topology.nodes.items()}

    def endpoint(node: str, name: str) -> str:
        if not multi_node:
            return f"ipc://{run_dir}/{name}"
        port = next_port[node]
        next_port[node] += 1
        return f"tcp://{topology.nodes[node].host}:{port}"

    controls = {name: endpoint(name, f"launcher-{name}.control") for name in sorted(topology.nodes)}
    results = endpoint(topology.api_node, "api.results")
    api_control = endpoint(topology.api_node, "api.control")
    inboxes = {a: endpoint(nodes[a], f"{a.name}.in") for a in ids if a.kind != API}
    kv_data = {a.replica: endpoint(nodes[a], f"{a.name}.kv") for a in ids if a.kind == "decode"}
    kv_release = {a.replica: endpoint(nodes[a], f"{a.name}.release") for a in ids if a.kind == "prefill"}
    kv_store = {}
    for a in ids:
        if a.kind == "decode":
            kv_store[a.replica] = f"tcp://{topology.nodes[nodes[a]].host}:{next_port[nodes[a]]}"
            next_port[nodes[a]] += 1
    return Wiring(run_dir, inboxes, results, api_control, controls, kv_data, nodes, kv_release, kv_store)

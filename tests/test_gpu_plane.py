"""The GPU data plane: `transfer/device_pages.py`, `transfer/nccl.py`, `transfer/cuda_ipc.py`.

On CPU: the pure parts (which pages a handoff moves, the batched gather into one buffer per
group and the scatter into another pool, holding pages past their sequence), the cuda_ipc
sender's hold-until-release bookkeeping, and the whole nccl protocol between real processes
over gloo ("nccl protocol over gloo": the nccl backend's code with a gloo process group in
place of the NCCL one). Marked `gpu` (skipped on CPU with a reason; run on a 2-GPU machine
with `python -m pytest -q -m gpu tests/test_gpu_plane.py`): CUDA IPC between two processes on
one GPU and on two, NCCL between two GPUs, and `tandem serve` on the gpu_* example topologies.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from actors.handoff import handoff_message
from actors.messages import (ActorStats, CancelRequest, KVRelease, PrefillJob, SamplingSpec, TokenBatch, decode,
                             encode, per_request)
from actors.transport import pull, push
from gemma4_model.config import FULL, SLIDING
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.sampling import SamplingParams
from tests.serving import REPO, free_port
from transfer import cuda_ipc
from transfer.backend import TransferBackendError, make_receiver, make_sender
from transfer.device_pages import (handoff_logical, held_pages, hold, pack_payload, page_fields, parse_shapes, release,
                                   shapes_of, unpack_payload)
from transfer.kv_pages import PayloadError, check_payload, export_pages, import_pages

PAGE = 4
def python_path() -> str:
    """The repo first, then whatever the caller's PYTHONPATH holds (packages installed beside it)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_text_decoder(tiny_checkpoint("e4b"))


def prefilled(model, n=45, seed=3, pages=64):
    """An engine whose one sequence has its first token (chunked prefill), and that sequence."""
    config, decoder = model
    prompt = torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    engine = Engine(decoder, PagedKVCache(config.text, page_size=PAGE, num_pages=pages), SchedulerLimits(chunk_size=16))
    seq = engine.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    while not seq.output:
        engine.step()
    return engine, seq


# -- the pure parts -------------------------------------------------------------------------
@pytest.mark.parametrize("reach_back", [0, 3])  # 3: an MTP assistant downstream reads older sliding positions
def test_packed_pages_are_exactly_what_export_copies(model, reach_back):
    engine, seq = prefilled(model)
    cache = engine.cache
    held = held_pages(cache, seq.seq_id, reach_back)
    exported = export_pages(cache, seq.seq_id, reach_back)
    assert held.groups == [FULL, SLIDING] and held.num_tokens == exported.num_tokens == 45
    assert {n: held.logical[n] for n in held.groups} == {n: g.logical for n, g in exported.groups.items()}
    assert len(held.logical[FULL]) == 12 and len(held.logical[SLIDING]) < 12  # the window only
    buffers = pack_payload(cache, held)
    for name, buffer in buffers.items():
        assert buffer.is_contiguous() and buffer.shape[0] == 2 and buffer.shape[2] == len(held.logical[name])
    shapes = parse_shapes(shapes_of(cache, held), held.logical)
    assert {n: tuple(b.shape[1:]) for n, b in buffers.items()} == shapes
    payload = unpack_payload(held.num_tokens, held.logical, buffers)
    assert payload.nbytes == exported.nbytes
    for name, group in exported.groups.items():
        assert torch.equal(payload.groups[name].k, group.k) and torch.equal(payload.groups[name].v, group.v)
    engine.cancel(seq)


def test_packed_pages_scatter_into_another_pool_at_its_own_pages(model):
    engine, seq = prefilled(model)
    source = engine.cache
    held = held_pages(source, seq.seq_id)
    payload = unpack_payload(held.num_tokens, held.logical, pack_payload(source, held))
    config, _ = model
    target = PagedKVCache(config.text, page_size=PAGE, num_pages=64)
    target.adopt_sequence(99, 3, {FULL: [0]})  # occupy a page, so the pages land elsewhere than in the source
    import_pages(target, 7, payload)
    for name in held.groups:
        there = [target.page_table(7, name)[j] for j in held.logical[name]]
        assert there != list(held.physical[name])
        for part in ("k", "v"):
            src, dst = getattr(source.groups[name], part), getattr(target.groups[name], part)
            assert torch.equal(dst[:, there], src[:, list(held.physical[name])])
    target.free_sequence(7), target.free_sequence(99)
    engine.cancel(seq)


def test_held_pages_outlive_their_sequence_until_released(model):
    engine, seq = prefilled(model)
    cache = engine.cache
    held = held_pages(cache, seq.seq_id)
    hold(cache, held)
    engine.cancel(seq)  # the sequence is gone ...
    assert cache.pages_in_use() == {n: len(held.physical[n]) for n in held.groups}  # ... its pages are not
    before = {n: cache.groups[n].k[:, list(held.physical[n])].clone() for n in held.groups}
    other = engine.add_request(list(range(3, 60)), SamplingParams(max_tokens=2, ignore_eos=True))
    while other.output == [] or len(other.output) < 2:
        engine.step()  # another request allocates and writes pages meanwhile
    for n in held.groups:
        assert torch.equal(cache.groups[n].k[:, list(held.physical[n])], before[n])  # held pages untouched
    release(cache, held)
    assert cache.pages_in_use() == {n: 0 for n in cache.groups}


def test_inconsistent_layouts_are_refused():
    logical = {FULL: [0, 1, 2], SLIDING: [2]}
    assert parse_shapes([1, 3, 4, 2, 8, 2, 1, 4, 1, 16], logical) == {FULL: (1, 3, 4, 2, 8), SLIDING: (2, 1, 4, 1, 16)}
    for shapes, match in (([1, 3, 4, 2, 8], "per group"), ([1, 2, 4, 2, 8, 2, 1, 4, 1, 16], "page list"),
                          ([1, 3, 4, 2, 0, 2, 1, 4, 1, 16], "bad shape"), ([1, 3, 4, 2, -8, 2, 1, 4, 1, 16], "bad")):
        with pytest.raises(PayloadError, match=match):
            parse_shapes(shapes, logical)


def test_held_pages_travel_as_handoff_fields_and_payloads_are_checked(model):
    engine, seq = prefilled(model)
    cache = engine.cache
    held = held_pages(cache, seq.seq_id)
    assert all(cache.page_table(seq.seq_id, n)[j] == p for n in held.groups
               for j, p in zip(held.logical[n], held.physical[n]))
    msg = dataclasses.replace(handoff_message("r", np.arange(45, dtype=np.int32), 5, SamplingSpec(), None),
                              **page_fields(held))
    assert handoff_logical(decode(encode(msg))) == {n: list(held.logical[n]) for n in held.groups}
    for bad in (np.zeros((2, 3), dtype=np.int32), np.array([0.5, 1.0], dtype=np.float32)):
        with pytest.raises(PayloadError, match="flat array of page numbers"):
            handoff_logical(dataclasses.replace(msg, full_pages=bad))
    exported = export_pages(cache, seq.seq_id)
    check_payload(cache, exported, 45)  # what export gives passes
    full, sliding = exported.groups[FULL], exported.groups[SLIDING]
    cases = ((FULL, (0, 2, 1, *full.logical[3:]), "not distinct, sorted"),
             (FULL, (0, 0, *full.logical[2:]), "not distinct, sorted"),
             (FULL, (*full.logical[:-1], 12), "below 12"),
             (FULL, (*full.logical[:4], *full.logical[5:], 12)[:len(full.logical) - 1], "pages \\[4\\] are missing"),
             (SLIDING, sliding.logical[:-1], "pages \\[11\\] are missing"))
    for name, logical, match in cases:
        group = exported.groups[name]
        part = dataclasses.replace(group, logical=logical, k=group.k[:, :len(logical)], v=group.v[:, :len(logical)])
        with pytest.raises(PayloadError, match=match):
            check_payload(cache, dataclasses.replace(exported, groups={**exported.groups, name: part}), 45)
    engine.cancel(seq)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_gpu_backends_say_clearly_that_cuda_is_absent():
    ctx = zmq.Context()
    try:
        with pytest.raises(TransferBackendError, match="no CUDA device"):
            make_sender("cuda_ipc", zctx=ctx, decode_inboxes=["inproc://x"], kv_release_endpoint="inproc://r")
        with pytest.raises(TransferBackendError, match="no CUDA device"):
            make_receiver("cuda_ipc", zctx=ctx, kv_release_endpoints=["inproc://r"])
        with pytest.raises(TransferBackendError, match="needs CUDA devices"):
            make_sender("nccl", zctx=ctx, decode_inboxes=["inproc://x"], kv_store_endpoints=["tcp://127.0.0.1:1"])
        with pytest.raises(TransferBackendError, match="'nccl' or 'gloo'"):
            make_receiver("nccl", process_group="mpi", kv_store_endpoint="tcp://127.0.0.1:1")
    finally:
        ctx.destroy(linger=0)


def test_nccl_is_refused_between_two_processes_of_one_gpu():
    from topology.config import EXAMPLES, TopologyError, load_topology, parse_topology
    import tomllib

    raw = tomllib.loads((EXAMPLES / "gpu_split.toml").read_text())
    raw["transfer"]["backend"] = "nccl"
    with pytest.raises(TopologyError, match="one GPU.*cuda_ipc"):
        parse_topology(raw)
    assert load_topology(EXAMPLES / "gpu_two_node.toml").transfer == "nccl"  # one GPU per node: fine


def test_cuda_ipc_sender_keeps_pages_until_release_or_timeout(model, monkeypatch):
    """The sender's bookkeeping, with a stand-in for the pool's IPC handles (CUDA-free) and a
    clock of its own."""
    fake = cuda_ipc.PoolHandles((b"h",) * 4, (b"r",) * 4, (b"e",) * 4, (0,) * 24)
    monkeypatch.setattr(cuda_ipc, "share_pool", lambda cache, groups: fake)
    now = [100.0]
    ctx = zmq.Context()
    inboxes = [pull(ctx, f"inproc://ipc-decode-{r}") for r in range(2)]
    sender = cuda_ipc.CudaIpcSender([push(ctx, f"inproc://ipc-decode-{r}") for r in range(2)],
                                    pull(ctx, "inproc://ipc-release"), source=0, hold_timeout_s=30,
                                    clock=lambda: now[0])
    release_out = push(ctx, "inproc://ipc-release")
    engine, first = prefilled(model)
    second = engine.add_request(list(range(5, 40)), SamplingParams(max_tokens=4, ignore_eos=True))
    while not second.output:
        engine.step()
    cache, sent = engine.cache, []
    for rid, seq in (("a", first), ("b", second)):
        held = sender.export(cache, seq.seq_id)
        engine.cancel(seq)
        report = sender.send(handoff_message(rid, seq.prompt, seq.output[0], SamplingSpec(), None), held)
        sent.append((report, held))
    msgs = [inbox.recv(timeout_ms=2000) for inbox in inboxes]  # round-robin: one to each replica
    assert [m.request_id for m in msgs] == ["a", "b"] and all(m.full_k is None for m in msgs)
    for m, (report, held) in zip(msgs, sent):
        pages = m.device_pages
        assert pages.physical == held.flat_physical() and pages.serial == 1 and pages.pool_handles == [b"h"] * 4
        assert list(m.full_pages) == list(held.logical[FULL]) and report.pages == held.num_pages
    both = sum(h.num_pages for _, h in sent)
    assert sum(cache.pages_in_use().values()) == both and sender.pending() == 2
    release_out.send(KVRelease(1, 1, "b"))  # decode-1 copied b
    release_out.send(KVRelease(0, 7, "a"))  # a serial never sent: ignored
    deadline = time.monotonic() + 5
    while sender.pending() == 2 and time.monotonic() < deadline:
        sender.poll()
        time.sleep(0.01)
    now[0] += 29
    sender.poll()
    assert sender.pending() == 1 and sum(cache.pages_in_use().values()) == sent[0][1].num_pages
    now[0] += 2
    sender.poll()  # a's release never came (its decode died): freed after the bound
    assert sender.pending() == 0 and sender.expired == 1 and sum(cache.pages_in_use().values()) == 0
    sender.close(), release_out.close(), [i.close() for i in inboxes]
    ctx.destroy(linger=0)


# -- the nccl protocol between processes ---------------------------------------------------------
class Actors:
    """Prefill and decode replicas as processes (`tests/handoff_actor.py`); the api's results here."""

    def __init__(self, tmp_path: Path, checkpoint: Path, backend: str, process_group: str,
                 devices: dict[str, str], decodes: int = 1, dtype: str = "float32"):
        self.run = tmp_path / "run"
        self.run.mkdir()
        self.ctx = zmq.Context()
        self.api = pull(self.ctx, f"ipc://{self.run}/api.results")
        stores = ",".join(f"tcp://127.0.0.1:{free_port()}" for _ in range(decodes))
        common = [sys.executable, "-m", "tests.handoff_actor", "--backend", backend, "--process-group", process_group,
                  "--checkpoint", str(checkpoint), "--run-dir", str(self.run), "--stores", stores,
                  "--decodes", str(decodes), "--dtype", dtype]
        env = {**os.environ, "PYTHONPATH": python_path()}
        self.logs = {}
        self.procs = {}
        for role, replica in [("decode", r) for r in range(decodes)] + [("prefill", 0)]:
            name = f"{role}-{replica}"
            self.logs[name] = tmp_path / f"{name}.log"
            self.procs[name] = subprocess.Popen(
                [*common, "--role", role, "--replica", str(replica), "--device", devices[role]],
                cwd=REPO, env=env, stdout=open(self.logs[name], "w"), stderr=subprocess.STDOUT)
        self.prefill = push(self.ctx, f"ipc://{self.run}/prefill-0.in")
        self.decode_in = [push(self.ctx, f"ipc://{self.run}/decode-{r}.in") for r in range(decodes)]

    def log(self) -> str:
        return "\n".join(f"--- {n}\n{p.read_text()}" for n, p in self.logs.items())

    def collect(self, ids: set[str], timeout_s: float = 180.0) -> dict:
        """Every answer until each of `ids` has finished or failed; fails at once if an actor exits."""
        got, waiting, deadline = {}, set(ids), time.monotonic() + timeout_s
        while waiting:
            dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
            assert not dead and time.monotonic() < deadline, f"waiting for {waiting}, exited {dead}\n{self.log()}"
            msg = self.api.recv(timeout_ms=500)
            if msg is None or isinstance(msg, ActorStats):  # nothing yet, or load figures
                continue
            for item in per_request(msg):  # a step's tokens travel as one StepTokens
                got.setdefault(item.request_id, []).append(item)
                if not isinstance(item, TokenBatch) or item.finish_reason is not None:
                    waiting.discard(item.request_id)
        return got

    def stop(self) -> dict[str, int]:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = "hung"
        for channel in (self.api, self.prefill, *self.decode_in):
            channel.close()
        self.ctx.destroy(linger=0)
        return codes


def job(rid, n, seed, max_tokens=8):
    ids = torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).numpy().astype(np.int32)
    return PrefillJob(rid, ids, SamplingSpec(max_tokens=max_tokens, ignore_eos=True))


def run_pair(tmp_path, checkpoint, backend, process_group, devices, colocated_device, dtype="float32", decodes=2):
    """Prefill -> `decodes` decode replicas over `backend`: the same greedy tokens as one colocated
    engine on `colocated_device`; a handoff whose request was cancelled at decode is received
    and dropped, and the handoffs after it on the same pair still arrive; no page left held."""
    jobs = [job(f"j{i}", 17 + 7 * i, seed=60 + i) for i in range(4)]
    config, decoder = load_text_decoder(checkpoint, device=colocated_device, dtype=getattr(torch, dtype))
    cache = PagedKVCache(config.text, page_size=PAGE, num_pages=80, device=colocated_device,
                         dtype=getattr(torch, dtype))
    offline = Engine(decoder, cache).generate([j.token_ids.tolist() for j in jobs],
                                              SamplingParams(max_tokens=8, ignore_eos=True))
    actors = Actors(tmp_path, checkpoint, backend, process_group, devices, decodes=decodes, dtype=dtype)
    try:
        for channel in actors.decode_in:  # the api's cancel reaches every decode replica before the handoff
            channel.send(CancelRequest("cancelled"))
        time.sleep(1.0)  # an actor on a loaded machine may not poll its inbox for a while
        actors.prefill.send(job("cancelled", 30, seed=5))  # goes to decode-0, like j1 and j3 after it
        for j in jobs:
            actors.prefill.send(j)
        got = actors.collect({j.request_id for j in jobs})
        time.sleep(1.0)  # whatever decode would still say about the cancelled request
        while (msg := actors.api.recv(timeout_ms=100)) is not None:
            if not isinstance(msg, ActorStats):  # not the actors' load figures
                for item in per_request(msg):
                    got.setdefault(item.request_id, []).append(item)
    finally:
        codes = actors.stop()
    log = actors.log()
    for j, seq in zip(jobs, offline):
        assert [t for m in got[j.request_id] for t in m.token_ids] == seq.output, log
        assert got[j.request_id][-1].finish_reason == "length"
    # the cancelled request: its first token (from prefill), nothing from decode
    assert [(type(m), len(m.token_ids)) for m in got["cancelled"]] == [(TokenBatch, 1)], log
    assert codes == {name: 0 for name in codes}, log  # every process: no page in use, nothing held
    return got, log


def test_nccl_protocol_over_gloo_between_processes_equals_colocated(tmp_path, tiny_checkpoint):
    got, log = run_pair(tmp_path, tiny_checkpoint("e4b"), "nccl", "gloo", {"prefill": "cpu", "decode": "cpu"}, "cpu")
    assert "failed sends: []" in log
    # decode-0 received the cancelled request's pages in full and dropped them; decode-1 two jobs
    assert "received 3 dropped 1 pending 0" in log and "received 2 dropped 0 pending 0" in log


# -- on GPUs ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("decode_device", ["cuda:0", pytest.param("cuda:1", marks=TWO_GPUS)],
                         ids=["split_one_gpu", "two_gpus"])
def test_cuda_ipc_between_processes_equals_colocated(tmp_path, tiny_checkpoint, decode_device):
    run_pair(tmp_path, tiny_checkpoint("e4b"), "cuda_ipc", "nccl", {"prefill": "cuda:0", "decode": decode_device},
             "cuda:0")


@pytest.mark.gpu
@pytest.mark.parametrize("decode_device", ["cuda:0", pytest.param("cuda:1", marks=TWO_GPUS)],
                         ids=["split_one_gpu", "two_gpus"])
def test_cuda_ipc_maps_another_process_pool_and_releases_its_pages(tmp_path, tiny_checkpoint, decode_device):
    """A pool of known content in another process: the pages decode copies out of the mapped
    pool are exactly that content, on decode's device; the release frees them at the owner."""
    from tests.handoff_actor import pool_values

    checkpoint = tiny_checkpoint("e4b")
    ctx = zmq.Context()
    inbox = pull(ctx, f"ipc://{tmp_path}/decode-0.in")
    receiver = make_receiver("cuda_ipc", zctx=ctx, device=decode_device,
                             kv_release_endpoints=[f"ipc://{tmp_path}/prefill-0.release"])
    owner = subprocess.Popen([sys.executable, "-m", "tests.handoff_actor", "--role", "pool-owner", "--backend",
                              "cuda_ipc", "--checkpoint", str(checkpoint), "--run-dir", str(tmp_path),
                              "--device", "cuda:0", "--pages", "32"], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": python_path()}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        handoff = inbox.recv(timeout_ms=120_000)
        assert handoff is not None, owner.communicate(timeout=5)[0] if owner.poll() is not None else "no handoff"
        receiver.accept(handoff)
        deadline, arrivals = time.monotonic() + 30, []
        while not arrivals and time.monotonic() < deadline:
            arrivals = receiver.poll()
        [arrival] = arrivals
        assert arrival.error is None, arrival.error
        assert receiver.mapped_on == {0: "cuda:0"}  # where the owner's pool lives
        from gemma4_model.config import load_config
        from transfer.device_pages import DTYPES

        cfg = load_config(checkpoint).text
        target = PagedKVCache(cfg, page_size=PAGE, num_pages=32, device=decode_device,
                              dtype=DTYPES[handoff.kv_dtype])
        import_pages(target, 1, arrival.payload)  # copy_pages out of the mapped pool, per pool tensor
        receiver.imported(arrival.request_id)
        while receiver.pending() and time.monotonic() < deadline:  # the release goes once the copy is done
            receiver.poll()
        assert receiver.pending() == 0
        output = owner.communicate(timeout=60)[0]
    finally:
        if owner.poll() is None:
            owner.kill()
    assert owner.returncode == 0, output  # the release reached the owner and freed its pages
    cache = PagedKVCache(cfg, page_size=PAGE, num_pages=32)  # the owner's pool shapes
    physical = handoff.device_pages.physical
    for salt, (name, group) in enumerate(cache.groups.items()):  # the owner's fill order
        pages = arrival.payload.groups[name]
        assert pages.logical[-1] == 11  # 45 positions, page 4
        assert name != FULL or pages.logical == tuple(range(12))  # sliding: the last window only
        index = physical[(0 if name == FULL else len(arrival.payload.groups[FULL].logical)):][:len(pages.logical)]
        assert 0 not in index  # the owner's other sequence holds page 0 of each group
        mine = torch.tensor([target.page_table(1, name)[j] for j in pages.logical])
        assert torch.equal(target.groups[name].k[:, mine].float().cpu(), pool_values(group.k.shape, 2 * salt)[:, index])
        assert torch.equal(target.groups[name].v[:, mine].float().cpu(),
                           pool_values(group.v.shape, 2 * salt + 1)[:, index])
    target.free_sequence(1)
    receiver.close(), inbox.close()
    ctx.destroy(linger=0)


@pytest.mark.gpu
@TWO_GPUS
def test_nccl_between_two_gpus_equals_colocated(tmp_path, tiny_checkpoint):
    got, log = run_pair(tmp_path, tiny_checkpoint("e4b"), "nccl", "nccl",
                        {"prefill": "cuda:0", "decode": "cuda:1"}, "cuda:0")
    assert "failed sends: []" in log
    assert "received 3 dropped 1 pending 0" in log and "received 2 dropped 0 pending 0" in log


# -- `tandem serve` on the GPU example topologies ------------------------------------------------------
SERVE_PROMPTS = 6


def _serve_tokens(url: str, bodies: list[dict]) -> list[list[int]]:
    from tests.test_serve import _chat

    return [_chat(url, body)["choices"][0]["token_ids"] for body in bodies]  # one at a time: batch 1 throughout


@pytest.fixture(scope="module")
def serve_bodies():
    from default_model.tasks import make_set
    from tests.test_serve import TEXT_KINDS, _chat_body

    return [_chat_body(inst) for inst in make_set(23, SERVE_PROMPTS, heldout=True, kinds=TEXT_KINDS)]


@pytest.fixture(scope="module")
def gpu_colocated_tokens(tmp_path_factory, serve_bodies):
    from tests.serving import Served

    with Served(["serve", "--topology", "gpu_colocated"], log=tmp_path_factory.mktemp("gpu-colocated") / "log") as s:
        return _serve_tokens(s.url, serve_bodies)


@pytest.mark.gpu
@pytest.mark.parametrize("topology", ["gpu_split", pytest.param("gpu_two", marks=TWO_GPUS)])
def test_serve_gpu_topology_answers_like_gpu_colocated(tmp_path, topology, serve_bodies, gpu_colocated_tokens):
    """The default model in bf16 over CUDA IPC (one GPU shared, or two): greedy tokens equal the
    colocated engine's on the same GPU kind, and the server stops cleanly."""
    from tests.serving import Served

    with Served(["serve", "--topology", topology], log=tmp_path / "log") as served:
        assert _serve_tokens(served.url, serve_bodies) == gpu_colocated_tokens, served.log()
        assert served.stop() == 0, served.log()


@pytest.mark.gpu
@TWO_GPUS
def test_serve_gpu_two_node_over_nccl_answers_like_gpu_colocated(tmp_path, serve_bodies, gpu_colocated_tokens):
    """gpu_two_node as two launchers on one host (the two "nodes"), decode moved to the second
    GPU (NCCL refuses two ranks on one device): KV over NCCL, no IPC."""
    import httpx

    from topology.config import EXAMPLES
    from tests.serving import Served

    text = (EXAMPLES / "gpu_two_node.toml").read_text()
    decode = text.index('kind = "decode"')
    topology = tmp_path / "gpu_two_node.toml"
    topology.write_text(text[:decode] + text[decode:].replace('device = "cuda:0"', 'device = "cuda:1"', 1))
    back = Served(["node", "--topology", str(topology), "--node", "back"], log=tmp_path / "back.log",
                  wait_health=False)
    front = Served(["node", "--topology", str(topology), "--node", "front"], log=tmp_path / "front.log",
                   wait_health=False)
    with back, front:
        deadline = time.monotonic() + 300
        while front.health() != 200:
            for node in (front, back):
                assert node.process.poll() is None, node.log()
            assert time.monotonic() < deadline, front.log() + back.log()
            time.sleep(0.5)
        assert _serve_tokens(front.url, serve_bodies) == gpu_colocated_tokens, front.log() + back.log()
        metrics = httpx.get(f"{front.url}/metrics", timeout=5).text
        assert front.stop() == 0 and back.stop() == 0, front.log() + back.log()
    assert "tandem" in metrics or metrics  # the api answered throughout

"""The KV handoff's data plane: every CPU backend moves a real exported payload intact, and
prefill -> decode over shm and tcp gives the colocated tokens; unmatched, bad and cancelled
handoffs end their request (or vanish) without hurting the decode actor; no segment outlives
its read or the run."""

import threading
import time
import uuid

import numpy as np
import pytest
import torch
import zmq

from actors.engine_actor import EngineActor
from actors.handoff import handoff_message, page_arrays
from actors.messages import CancelRequest, KVData, KVHandoff, PrefillJob, RequestError, SamplingSpec, TokenBatch
from actors.tracing import Tracer, read_spans
from actors.transport import pull, push
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.sampling import SamplingParams
from transfer import shm
from transfer.backend import (
    ShmReceiver,
    TcpReceiver,
    TransferBackendError,
    make_receiver,
    make_sender,
)
from tests.test_engine_actor import collect
from transfer.kv_pages import export_pages

PAGE = 4


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_text_decoder(tiny_checkpoint("e4b"))


@pytest.fixture()
def exported(model):
    """A real payload: a 45-token prompt prefilled in a chunked engine, its pages exported."""
    config, decoder = model
    prompt = torch.randint(3, 250, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    cache = PagedKVCache(config.text, page_size=PAGE, num_pages=64)
    engine = Engine(decoder, cache, SchedulerLimits(chunk_size=16))
    seq = engine.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    while not seq.output:
        engine.step()
    payload = export_pages(cache, seq.seq_id)
    engine.cancel(seq)
    control = handoff_message("r0", prompt, seq.output[0], SamplingSpec(max_tokens=8, ignore_eos=True), None)
    return control, payload


@pytest.fixture()
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture()
def run_id():
    rid = "t" + uuid.uuid4().hex[:10]
    yield rid
    shm.cleanup_run(rid)


def wait_arrivals(receiver, n=1, timeout_s=5.0):
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += receiver.poll()
        time.sleep(0.002)
    return got


def same_payload(a, b):
    assert a.num_tokens == b.num_tokens and set(a.groups) == set(b.groups) and a.nbytes == b.nbytes
    for name, group in a.groups.items():
        other = b.groups[name]
        assert other.logical == group.logical
        assert torch.equal(other.k, group.k) and torch.equal(other.v, group.v)


@pytest.mark.parametrize("backend", ["inline", "shm", "tcp"])
def test_each_backend_round_trips_a_real_payload(exported, zctx, run_id, backend):
    control, payload = exported
    inbox = pull(zctx, f"inproc://decode-in-{backend}")
    receiver = make_receiver(backend, zctx=zctx, kv_data_endpoint=f"inproc://kv-{backend}", run_id=run_id)
    sender = make_sender(backend, zctx=zctx, decode_inboxes=[f"inproc://decode-in-{backend}"],
                         kv_data_endpoints=[f"inproc://kv-{backend}"], run_id=run_id)
    report = sender.send(control, payload)
    assert report.replica == 0 and report.nbytes == payload.nbytes > 0
    assert report.pages == sum(len(g.logical) for g in payload.groups.values())
    msg = inbox.recv(timeout_ms=5000)
    assert isinstance(msg, KVHandoff) and msg.num_tokens == 45
    if backend == "inline":
        assert msg.data_ref is None and msg.full_k is not None
    else:  # the control message carries only a reference
        assert msg.data_ref is not None and msg.full_k is None and msg.sliding_k is None
    if backend == "shm":
        assert [p.name for p in shm.run_segments(run_id)] == [msg.data_ref]
    receiver.accept(msg)
    [arrival] = wait_arrivals(receiver)
    assert arrival.error is None and arrival.handoff is msg and arrival.nbytes == payload.nbytes
    same_payload(payload, arrival.payload)
    assert shm.run_segments(run_id) == []  # the receiver unlinked the segment it read
    assert receiver.pending() == 0
    sender.close(), receiver.close(), inbox.close()


def test_an_unknown_backend_is_refused(zctx):
    # the GPU backends' errors on a machine without CUDA: tests/test_gpu_plane.py
    with pytest.raises(TransferBackendError, match="unknown"):
        make_receiver("carrier-pigeon")
    with pytest.raises(TransferBackendError, match="unknown"):
        make_sender("carrier-pigeon", zctx=zctx, decode_inboxes=["inproc://x"])


def _kv_data(control, payload, ref):
    arrays, kv_dtype = page_arrays(payload)
    return KVData(ref, control.request_id, payload.num_tokens, kv_dtype, **arrays)


def test_tcp_matches_data_and_control_in_either_order(exported, zctx):
    control, payload = exported
    data_out = push(zctx, "inproc://kv-order", bind=False)
    receiver = TcpReceiver(pull(zctx, "inproc://kv-order"))
    # data first: it waits until its control comes
    data_out.send(_kv_data(control, payload, "a"))
    time.sleep(0.05)
    assert receiver.poll() == [] and receiver.pending() == 1
    receiver.accept(control.__class__(**{**control.__dict__, "data_ref": "a", "num_tokens": 45}))
    [first] = receiver.poll()
    same_payload(payload, first.payload)
    # control first: nothing is ready until the data arrives
    receiver.accept(control.__class__(**{**control.__dict__, "request_id": "r1", "data_ref": "b"}))
    assert receiver.poll() == [] and receiver.pending() == 1
    data_out.send(KVData(**{**_kv_data(control, payload, "b").__dict__, "request_id": "r1"}))
    [second] = wait_arrivals(receiver)
    assert second.request_id == "r1" and second.error is None and receiver.pending() == 0
    same_payload(payload, second.payload)
    data_out.close(), receiver.close()


def test_tcp_unmatched_parts_time_out_and_are_bounded(exported, zctx):
    control, payload = exported
    data_out = push(zctx, "inproc://kv-bound", bind=False)
    receiver = TcpReceiver(pull(zctx, "inproc://kv-bound"), timeout_s=0.2, max_pending=2)
    ref = lambda rid, r: control.__class__(**{**control.__dict__, "request_id": rid, "data_ref": r})  # noqa: E731
    receiver.accept(ref("c1", "x1"))
    receiver.accept(ref("c2", "x2"))
    receiver.accept(ref("c3", "x3"))  # one too many: the oldest fails at once
    [full] = receiver.poll()
    assert (full.request_id, full.code) == ("c1", 503) and "full" in full.error and receiver.pending() == 2
    data_out.send(KVData(**{**_kv_data(control, payload, "orphan").__dict__, "request_id": "d1"}))
    [full] = wait_arrivals(receiver)  # data counts against the bound too: c2 is now the oldest
    assert (full.request_id, full.code) == ("c2", 503) and receiver.pending() == 2
    time.sleep(0.3)
    expired = {a.request_id: a for a in wait_arrivals(receiver, n=2)}
    assert set(expired) == {"c3", "d1"} and receiver.pending() == 0
    assert all(a.code == 504 and a.payload is None for a in expired.values())
    assert expired["d1"].handoff is None and "handoff did not" in expired["d1"].error
    assert "did not arrive" in expired["c3"].error
    data_out.close(), receiver.close()


def test_shm_segments_are_gone_after_cleanup_run_and_names_are_confined(run_id, tmp_path):
    arrays = {"full_pages": np.arange(3, dtype=np.int32), "full_k": np.ones((1, 3, 4, 1, 8), np.float32)}
    for i in range(2):
        shm.write_segment(f"{shm.segment_prefix(run_id)}1-{i}", run_id, 10, "float32", arrays)
    other = "o" + run_id[1:]
    shm.write_segment(f"{shm.segment_prefix(other)}1-0", other, 10, "float32", arrays)
    assert len(shm.run_segments(run_id)) == 2
    assert shm.cleanup_run(run_id) == 2 and shm.run_segments(run_id) == []
    assert len(shm.run_segments(other)) == 1  # another run's segment is left alone
    shm.cleanup_run(other)
    for name in ("../../etc/passwd", f"tandem-{other}-kv-1-0", f"{shm.segment_prefix(run_id)}1-0/../x"):
        with pytest.raises(shm.SegmentError):
            shm.read_segment(name, run_id)


def test_a_corrupt_or_missing_segment_fails_its_request_only(exported, run_id):
    control, _ = exported
    receiver = ShmReceiver(run_id)
    name = f"{shm.segment_prefix(run_id)}9-0"
    (shm.SHM_DIR / name).write_bytes(b"TKV1" + b"\xff" * 60)
    for rid, ref in (("bad", name), ("gone", f"{shm.segment_prefix(run_id)}9-1"), ("evil", "../../etc/passwd")):
        receiver.accept(control.__class__(**{**control.__dict__, "request_id": rid, "data_ref": ref}))
    arrivals = {a.request_id: a for a in receiver.poll()}
    assert {r: a.code for r, a in arrivals.items()} == {"bad": 502, "gone": 502, "evil": 502}
    assert "header length" in arrivals["bad"].error and "does not exist" in arrivals["gone"].error
    assert shm.run_segments(run_id) == []  # even the corrupt one is unlinked


def test_cancel_discards_a_pending_handoff_and_frees_its_segment(exported, zctx, run_id):
    control, payload = exported
    inbox = pull(zctx, "inproc://decode-cancel")
    sender = make_sender("shm", zctx=zctx, decode_inboxes=["inproc://decode-cancel"], run_id=run_id)
    receiver = make_receiver("shm", run_id=run_id)
    sender.send(control, payload)
    receiver.discard("r0")  # the api's cancel reaches decode before the handoff does
    receiver.accept(inbox.recv(timeout_ms=5000))
    assert receiver.poll() == [] and shm.run_segments(run_id) == []
    # tcp: data waiting for its control is dropped by the cancel, and so is the late control
    data_out = push(zctx, "inproc://kv-cancel", bind=False)
    tcp = TcpReceiver(pull(zctx, "inproc://kv-cancel"))
    data_out.send(_kv_data(control, payload, "z"))
    time.sleep(0.05)
    tcp.poll()
    assert tcp.pending() == 1
    tcp.discard("r0")
    tcp.accept(control.__class__(**{**control.__dict__, "data_ref": "z"}))
    assert tcp.pending() == 0 and tcp.poll() == []
    sender.close(), inbox.close(), data_out.close(), tcp.close()


# -- through the engine actors -------------------------------------------------------------
def job(rid, n, seed, max_tokens=8):
    ids = torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).numpy().astype(np.int32)
    return PrefillJob(rid, ids, SamplingSpec(max_tokens=max_tokens, ignore_eos=True))


class Pipeline:
    """One prefill actor and `replicas` decode actors in threads, wired like `run_engine` does."""

    def __init__(self, model, zctx, backend, run_id, replicas=2, trace_dir=None, decode_pages=80):
        config, decoder = model
        self.caches = [PagedKVCache(config.text, page_size=PAGE, num_pages=80)]
        self.api = pull(zctx, f"inproc://api-{backend}")
        inboxes = [f"inproc://{backend}-decode-{r}.in" for r in range(replicas)]
        decode_in = [pull(zctx, e) for e in inboxes]
        receivers = [make_receiver(backend, zctx=zctx, kv_data_endpoint="tcp://127.0.0.1:*", run_id=run_id)
                     if backend == "tcp" else make_receiver(backend, run_id=run_id) for _ in range(replicas)]
        kv_data = [r.data.socket.getsockopt(zmq.LAST_ENDPOINT).decode() for r in receivers] if backend == "tcp" else []
        sender = make_sender(backend, zctx=zctx, decode_inboxes=inboxes, kv_data_endpoints=kv_data, run_id=run_id)
        self.client = push(zctx, f"inproc://{backend}-prefill.in", bind=False)
        out = lambda: push(zctx, f"inproc://api-{backend}")  # noqa: E731
        tracer = lambda name: Tracer(name, trace_dir)  # noqa: E731
        self.actors = [EngineActor(Engine(decoder, self.caches[0], SchedulerLimits(chunk_size=16)),
                                   pull(zctx, f"inproc://{backend}-prefill.in"), out(), role="prefill",
                                   sender=sender, tracer=tracer("prefill-0"))]
        for r in range(replicas):
            cache = PagedKVCache(config.text, page_size=PAGE, num_pages=decode_pages)
            self.caches.append(cache)
            self.actors.append(EngineActor(Engine(decoder, cache), decode_in[r], out(), role="decode",
                                           receiver=receivers[r], tracer=tracer(f"decode-{r}")))
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=a.run, args=(self.stop,)) for a in self.actors]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)
        for a in self.actors:
            a.tracer.flush()
        for cache in self.caches:
            assert cache.pages_in_use() == {k: 0 for k in cache.groups}


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_disaggregated_decode_over_backend_equals_colocated(model, zctx, run_id, tmp_path, backend):
    config, decoder = model
    jobs = [job(f"{backend}{i}", 17 + 7 * i, seed=60 + i) for i in range(4)]
    offline = Engine(decoder, PagedKVCache(config.text, page_size=PAGE, num_pages=80)).generate(
        [j.token_ids.tolist() for j in jobs], SamplingParams(max_tokens=8, ignore_eos=True))
    with Pipeline(model, zctx, backend, run_id, trace_dir=tmp_path) as pipe:
        for j in jobs:
            pipe.client.send(j)
        got = collect(pipe.api, {j.request_id for j in jobs})
    for j, seq in zip(jobs, offline):
        assert [t for m in got[j.request_id] for t in m.token_ids] == seq.output
        assert got[j.request_id][-1].finish_reason == "length"
    assert shm.run_segments(run_id) == []
    spans = read_spans(tmp_path)
    sent = [s for s in spans if s.stage == "handoff_send"]
    received = [s for s in spans if s.stage == "handoff_receive"]
    expected = sorted(j.request_id for j in jobs)
    assert sorted(s.requests[0] for s in sent) == sorted(s.requests[0] for s in received) == expected
    assert {s.attrs["replica"] for s in sent} == {0, 1}  # round-robin over both replicas
    for s in sent:  # the receiving replica is the one the sender chose (data and control met there)
        [r] = [x for x in received if x.requests == s.requests]
        assert r.actor == f"decode-{s.attrs['replica']}" and r.attrs["bytes"] == s.attrs["bytes"] > 0
        assert r.attrs["pages"] == s.attrs["pages"] > 0 and s.attrs["backend"] == backend


def test_a_bad_payload_ends_its_request_and_decode_goes_on(model, zctx, run_id, exported):
    control, payload = exported
    arrays, _ = page_arrays(payload)
    half = {**arrays, "full_k": arrays["full_k"][..., :4].copy(), "full_v": arrays["full_v"][..., :4].copy()}
    as_bf16 = {k: (a if k.endswith("pages") else torch.from_numpy(a).bfloat16().view(torch.uint16).numpy())
               for k, a in arrays.items()}
    holes = {**arrays, "full_pages": arrays["full_pages"][1:], "full_k": arrays["full_k"][:, 1:].copy(),
             "full_v": arrays["full_v"][:, 1:].copy()}
    with Pipeline(model, zctx, "inline", run_id, replicas=1) as pipe:
        decode_inbox = push(zctx, "inproc://inline-decode-0.in", bind=False)
        for rid, fields, kv_dtype in (("shape", half, "float32"), ("dtype", as_bf16, "bfloat16"),
                                      ("holes", holes, "float32"), ("ok", arrays, "float32")):
            decode_inbox.send(KVHandoff(**{**control.__dict__, **fields, "request_id": rid, "kv_dtype": kv_dtype}))
        pipe.client.send(job("good", 20, seed=1, max_tokens=4))
        got = collect(pipe.api, {"shape", "dtype", "holes", "ok", "good"})
        decode_inbox.close()
    assert got["shape"][0].code == 502 and "shape" in got["shape"][0].message
    assert got["dtype"][0].code == 502 and "bfloat16" in got["dtype"][0].message
    assert got["holes"][0].code == 502 and "missing" in got["holes"][0].message
    assert got["ok"][-1].finish_reason == "length"  # the same arrays, intact, decode fine
    assert got["good"][-1].finish_reason == "length" and sum(len(m.token_ids) for m in got["good"]) == 4


def test_a_cancel_before_the_handoff_drops_it_and_frees_its_segment(model, zctx, run_id, exported):
    control, payload = exported
    with Pipeline(model, zctx, "shm", run_id, replicas=1) as pipe:
        decode_inbox = push(zctx, "inproc://shm-decode-0.in", bind=False)
        side = make_sender("shm", zctx=zctx, decode_inboxes=["inproc://shm-decode-0.in"], run_id=run_id)
        decode_inbox.send(CancelRequest("r0"))
        time.sleep(0.1)  # the cancel is handled first
        side.send(control, payload)
        pipe.client.send(job("after", 20, seed=2, max_tokens=3))
        got = collect(pipe.api, {"after"})
        assert "r0" not in got and shm.run_segments(run_id) == []
        decode_inbox.close(), side.close()
    assert isinstance(got["after"][-1], TokenBatch)

"""Per-stage tracing: spans on one clock per actor, files per actor, a merged Chrome trace with
one track per actor, and the per-request stage breakdown (`tandem trace DIR`)."""

import json
import threading
import time
import uuid

import numpy as np
import pytest
import zmq
from transformers import AutoTokenizer

from actors.cli import main as tandem
from actors.engine_actor import EngineActor
from actors.messages import GenerateRequest, PrefillJob, SamplingSpec, TokenBatch, per_request
from actors.preprocess import Preprocessor, PreprocessActor
from actors.tracing import (Span, Tracer, chrome_trace, format_breakdown, merge_chrome_trace, read_spans, stage_breakdown,
                            step_summary)
from actors.transport import pull, push
from default_model import CHECKPOINT
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from transfer import shm
from transfer.backend import make_receiver, make_sender


def test_a_tracer_without_a_directory_records_nothing(tmp_path):
    tracer = Tracer("decode-0", None)
    with tracer.span("decode", ["r"], batch=1) as attrs:
        attrs["tokens"] = 1
    tracer.record("decode", 1, 2, "r")
    tracer.flush()
    assert not tracer.enabled and tracer._buffer == [] and list(tmp_path.iterdir()) == []


def test_spans_carry_requests_times_and_attributes_and_flush_per_actor(tmp_path):
    tracer = Tracer("prefill-0", tmp_path, flush_interval_s=3600)
    before = time.time_ns()
    with tracer.span("handoff_send", "r1", backend="shm") as attrs:
        time.sleep(0.01)
        attrs.update(bytes=4096, pages=3)
    tracer.record("prefill", 100, 250, ["r1", "r2"], tokens=32, batch=2)
    assert not (tmp_path / "prefill-0.jsonl").exists()  # buffered until a flush
    tracer.flush()
    with open(tmp_path / "prefill-0.jsonl", "a") as f:
        f.write('{"actor": "prefill-0", "stage": "torn')  # an actor killed mid-write
    spans = read_spans(tmp_path)
    assert [s.stage for s in spans] == ["prefill", "handoff_send"]  # sorted by start
    send = spans[1]
    assert send.actor == "prefill-0" and send.requests == ("r1",)
    assert send.attrs == {"backend": "shm", "bytes": 4096, "pages": 3}
    assert before <= send.start_ns and send.end_ns - send.start_ns >= 10_000_000
    assert spans[0] == Span("prefill-0", "prefill", 100, 250, ("r1", "r2"), {"tokens": 32, "batch": 2})
    periodic = Tracer("decode-0", tmp_path, flush_interval_s=0)  # flushes as it goes
    periodic.record("decode", 1, 2, "r1")
    assert (tmp_path / "decode-0.jsonl").read_text().count("\n") == 1


def test_tick_writes_the_last_spans_once_the_interval_has_passed(tmp_path):
    tracer = Tracer("encoder-0", tmp_path, flush_interval_s=0.05)
    tracer.flush()
    tracer.record("encode", 1, 2, "r1")
    tracer.tick()
    assert read_spans(tmp_path) == []  # still inside the interval
    time.sleep(0.06)
    tracer.tick()
    assert [s.requests for s in read_spans(tmp_path)] == [("r1",)]


def test_breakdown_sums_each_requests_stages():
    ms = 1_000_000
    spans = [
        Span("preprocess-0", "tokenize", 0, 1 * ms, ("a",), {"tokens": 9}),
        Span("preprocess-0", "tokenize", 1 * ms, 2 * ms, ("b",), {"tokens": 5}),
        Span("prefill-0", "prefill", 2 * ms, 5 * ms, ("a", "b"), {"tokens": 14, "batch": 2}),
        Span("prefill-0", "handoff_send", 5 * ms, 6 * ms, ("a",), {"bytes": 1000, "pages": 2}),
        Span("decode-0", "handoff_receive", 6 * ms, 7 * ms, ("a",), {"bytes": 1000, "pages": 2}),
        Span("decode-0", "decode", 7 * ms, 9 * ms, ("a",), {"batch": 1}),
        Span("decode-0", "decode", 9 * ms, 12 * ms, ("a",), {"batch": 1}),
    ]
    a, b = stage_breakdown(spans)
    assert a.request_id == "a" and b.request_id == "b"
    assert {k: (v.ns // ms, v.spans) for k, v in a.stages.items()} == {
        "tokenize": (1, 1), "prefill": (3, 1), "handoff_send": (1, 1), "handoff_receive": (1, 1), "decode": (5, 2)}
    assert a.stages["handoff_send"].bytes == 1000 and a.stages["handoff_receive"].bytes == 0
    assert (a.end_ns - a.start_ns) // ms == 12 and set(b.stages) == {"tokenize", "prefill"}
    table = format_breakdown([a, b]).splitlines()
    assert table[0].split() == ["request", "tokenize", "prefill", "handoff_send", "handoff_receive", "decode",
                                "wall", "kv", "bytes"]
    assert table[2].split() == ["a", "1.00", "3.00", "1.00", "1.00", "5.00", "x2", "12.00", "1000"]
    assert table[3].split() == ["b", "1.00", "3.00", "-", "-", "-", "4.00", "0"]


def test_step_summary_splits_steps_gaps_and_batches_per_engine_actor(tmp_path, capsys):
    ms = 1_000_000
    spans = [  # engine-0: a mixed step, two decode-only steps; a 2 ms, a 1 ms and a 900 ms (idle) gap
        Span("engine-0", "prefill", 0, 10 * ms, ("c",), {"tokens": 512, "batch": 1}),
        Span("engine-0", "decode", 0, 10 * ms, ("a", "b"), {"tokens": 2, "batch": 2}),
        Span("engine-0", "decode", 12 * ms, 16 * ms, ("a", "b", "c"), {"tokens": 3, "batch": 3}),
        Span("engine-0", "decode", 17 * ms, 23 * ms, ("a", "b", "c"), {"tokens": 3, "batch": 3}),
        Span("engine-0", "gc", 23 * ms, 25 * ms, (), {"generation": 2}),
        Span("engine-0", "prefill", 923 * ms, 925 * ms, ("d",), {"tokens": 7, "batch": 1}),
        Span("preprocess-0", "tokenize", 0, 1 * ms, ("a",), {"tokens": 9}),
    ]
    summary = step_summary(spans)
    assert list(summary) == ["engine-0"]
    e = summary["engine-0"]
    assert e["steps"] == 4 and e["prefill_tokens"] == 519 and e["decode_tokens"] == 8
    assert e["decode_only_ms"]["n"] == 2 and e["decode_only_ms"]["mean"] == 5.0
    assert e["with_prefill_ms"]["n"] == 2 and e["with_prefill_ms"]["median"] == 10.0
    assert e["gaps_ms"]["n"] == 2 and e["gaps_ms"]["mean"] == 1.5  # the idle 900 ms is not host overhead
    assert e["in_steps_share"] == round(22 / 25, 4) and e["gc_ms"] == 2.0
    assert e["decode_batch"]["median"] == 3.0
    tracers = {actor: Tracer(actor, tmp_path) for actor in ("engine-0", "preprocess-0")}
    for s in spans:
        tracers[s.actor].record(s.stage, s.start_ns, s.end_ns, s.requests, **s.attrs)
    for tracer in tracers.values():
        tracer.flush()
    out = tmp_path / "steps.json"
    assert tandem(["trace", str(tmp_path), "--steps", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    assert "step timeline" in capsys.readouterr().out


def test_chrome_trace_has_one_named_track_per_actor():
    spans = [Span("decode-0", "decode", 2_000, 5_000, ("a",)), Span("prefill-0", "prefill", 1_000, 2_000, ("a",)),
             Span("decode-1", "decode", 3_000, 4_500, ("b",), {"batch": 1})]
    trace = json.loads(json.dumps(chrome_trace(spans)))
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    threads = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert sorted(names.values()) == ["decode-0", "decode-1", "prefill-0"] and names == threads
    assert list(names.values())[0] == "prefill-0"  # tracks follow the request path
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    first = next(e for e in events if names[e["pid"]] == "prefill-0")
    assert first["ts"] == 0 and first["dur"] == 1.0 and first["tid"] == first["pid"]
    last = next(e for e in events if names[e["pid"]] == "decode-1")
    assert (last["ts"], last["dur"], last["args"]) == (2.0, 1.5, {"batch": 1, "requests": ["b"]})


@pytest.fixture(scope="module")
def default_model():
    config, model = load_text_decoder(CHECKPOINT)
    return config, model, Preprocessor(AutoTokenizer.from_pretrained(CHECKPOINT), [1, 106])


def test_a_disaggregated_run_traces_every_actor_and_every_stage(default_model, tmp_path, capsys):
    """preprocess -> prefill -> (shm) -> decode in threads, each with its tracer, as in a run."""
    config, model, preprocessor = default_model
    run_id = "t" + uuid.uuid4().hex[:10]
    zctx = zmq.Context()
    api = pull(zctx, "inproc://api")
    out = lambda: push(zctx, "inproc://api")  # noqa: E731
    tracers = {name: Tracer(name, tmp_path) for name in ("preprocess-0", "prefill-0", "decode-0")}
    caches = [PagedKVCache(config.text, page_size=8, num_pages=64) for _ in range(2)]
    decode_in = pull(zctx, "inproc://decode-0.in")
    actors = [
        PreprocessActor(preprocessor, pull(zctx, "inproc://pre.in"), push(zctx, "inproc://prefill.in"), out(),
                        tracer=tracers["preprocess-0"]),
        EngineActor(Engine(model, caches[0], SchedulerLimits(chunk_size=16)), pull(zctx, "inproc://prefill.in"),
                    out(), role="prefill", tracer=tracers["prefill-0"],
                    sender=make_sender("shm", zctx=zctx, decode_inboxes=["inproc://decode-0.in"], run_id=run_id)),
        EngineActor(Engine(model, caches[1]), decode_in, out(), role="decode", tracer=tracers["decode-0"],
                    receiver=make_receiver("shm", run_id=run_id)),
    ]
    client = push(zctx, "inproc://pre.in", bind=False)
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop,)) for a in actors]
    for t in threads:
        t.start()
    try:
        questions = ["What is 3 + 4?", "Reverse the word lantern.", "Copy: blue green"]
        for i, q in enumerate(questions):
            client.send(GenerateRequest(f"q{i}", json.dumps({"messages": [{"role": "user", "content": q}]}),
                                        SamplingSpec(max_tokens=5, ignore_eos=True)))
        done, deadline = set(), time.monotonic() + 30
        while len(done) < 3 and time.monotonic() < deadline:
            msg = api.recv(timeout_ms=1000)
            done |= {m.request_id for m in per_request(msg) if isinstance(m, TokenBatch) and m.finish_reason}
        assert done == {"q0", "q1", "q2"}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        for tracer in tracers.values():
            tracer.flush()
        zctx.destroy(linger=0)
        shm.cleanup_run(run_id)
    assert {p.name for p in tmp_path.glob("*.jsonl")} == {f"{n}.jsonl" for n in tracers}

    out_path = merge_chrome_trace(tmp_path, tmp_path / "trace.json")
    trace = json.loads(out_path.read_text())
    tracks = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert sorted(tracks.values()) == sorted(tracers)
    stages = {(tracks[e["pid"]], e["name"]) for e in trace["traceEvents"] if e["ph"] == "X"}
    assert stages == {("preprocess-0", "tokenize"), ("prefill-0", "prefill"), ("prefill-0", "handoff_send"),
                      ("decode-0", "handoff_receive"), ("decode-0", "decode")}

    spans = read_spans(tmp_path)
    breakdown = {r.request_id: r for r in stage_breakdown(spans)}
    assert set(breakdown) == {"q0", "q1", "q2"}
    for rid, r in breakdown.items():
        assert list(r.stages)[:1] == ["tokenize"]
        assert set(r.stages) == {"tokenize", "prefill", "handoff_send", "handoff_receive", "decode"}
        assert r.stages["decode"].spans == 4  # max_tokens 5: the first token came from prefill
        assert r.stages["handoff_send"].bytes > 0
        tokenize = next(s for s in spans if s.stage == "tokenize" and s.requests == (rid,))
        send = next(s for s in spans if s.stage == "handoff_send" and s.requests == (rid,))
        receive = next(s for s in spans if s.stage == "handoff_receive" and s.requests == (rid,))
        assert tokenize.end_ns <= send.start_ns <= receive.end_ns  # one clock across actors
        assert receive.attrs["bytes"] == send.attrs["bytes"] and receive.attrs["pages"] == send.attrs["pages"]
    steps = [s for s in spans if s.stage in ("prefill", "decode")]
    assert all(s.attrs["batch"] == len(s.requests) and s.attrs["tokens"] >= s.attrs["batch"] for s in steps)

    assert tandem(["trace", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert all(rid in printed for rid in breakdown) and "handoff_receive" in printed
    assert tandem(["trace", str(tmp_path / "nothing")]) == 1


def test_a_colocated_engine_traces_prefill_and_decode_steps(tiny_checkpoint, tmp_path):
    config, model = load_text_decoder(tiny_checkpoint("e2b"))
    zctx = zmq.Context()
    inbox, outbox = pull(zctx, "inproc://jobs"), push(zctx, "inproc://tokens", bind=True)
    client, api = push(zctx, "inproc://jobs", bind=False), pull(zctx, "inproc://tokens", bind=False)
    actor = EngineActor(Engine(model, PagedKVCache(config.text, page_size=4, num_pages=64)), inbox, outbox,
                        tracer=Tracer("engine-0", tmp_path))
    stop = threading.Event()
    thread = threading.Thread(target=actor.run, args=(stop,))
    thread.start()
    try:
        for i, n in enumerate((9, 30)):
            ids = np.arange(3 + 100 * i, 3 + 100 * i + n, dtype=np.int32)  # no shared prefix to reuse
            client.send(PrefillJob(f"c{i}", ids, SamplingSpec(max_tokens=4, ignore_eos=True)))
        finished = 0
        while finished < 2:
            msg = api.recv(timeout_ms=20_000)
            assert msg is not None
            finished += sum(isinstance(m, TokenBatch) and m.finish_reason is not None for m in per_request(msg))
    finally:
        stop.set()
        thread.join(timeout=10)
        actor.tracer.flush()
        zctx.destroy(linger=0)
    breakdown = {r.request_id: r for r in stage_breakdown(read_spans(tmp_path))}
    for rid in ("c0", "c1"):
        assert breakdown[rid].stages["decode"].spans == 3  # the prefill step's token, then 3 decode steps
    prefill_tokens = sum(s.attrs["tokens"] for s in read_spans(tmp_path) if s.stage == "prefill")
    assert prefill_tokens == 39  # every prompt token computed once, and counted once


def test_garbage_collector_pauses_become_gc_spans(tmp_path):
    import gc

    tracer = Tracer("engine-0", tmp_path)
    tracer.watch_gc(min_ms=0.0)
    try:
        gc.collect()
    finally:
        tracer.unwatch_gc()
    gc.collect()  # not recorded any more
    tracer.flush()
    full = [s for s in read_spans(tmp_path) if s.stage == "gc" and s.attrs["generation"] == 2]
    assert len(full) == 1 and full[0].end_ns >= full[0].start_ns and full[0].attrs["collected"] >= 0
    off = Tracer("engine-0", None)
    before = len(gc.callbacks)
    off.watch_gc()
    assert len(gc.callbacks) == before  # no trace directory: no callback

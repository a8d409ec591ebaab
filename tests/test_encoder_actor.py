"""The encoder actor (batching, content-hash cache, replies to the named engine replica, errors)
and the prefill side's wait for encoder results (either arrival order, failures, timeouts, the
spans handed on to decode), with a stand-in encoder so only the actors' logic is under test."""

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from actors.encoder_actor import EncoderActor, EncoderCache
from actors.media_wait import MediaWaiter, handoff_media, spans_from_handoff
from actors.messages import CancelRequest, EncodeJob, EncodeResult, KVHandoff, PrefillJob, SamplingSpec
from actors.tracing import Tracer, read_spans
from actors.transport import pull, push

HIDDEN = 4


class CountingEncoder:
    """Embeddings = the job's pixel mean repeated per patch; remembers every batch it ran."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, jobs):
        self.batches.append([j.content_key for j in jobs])
        if any(j.content_key == self.fail_on for j in jobs):
            raise ValueError("patches do not fit")
        return [(np.full((j.pixel_values.shape[1], HIDDEN), j.pixel_values.mean(), np.float32), "float32")
                for j in jobs]


def image_job(rid, key, value, reply_to=0, patches=3, index=0, kind="image"):
    return EncodeJob(rid, index, kind, key, reply_to, pixel_values=np.full((1, patches, 6), value, np.float32),
                     position_ids=np.zeros((1, patches, 2), np.int32))


def test_cache_is_bounded_by_bytes_and_drops_the_least_recently_used():
    cache = EncoderCache(max_bytes=3 * 16)
    for key in "abc":
        cache.put(key, (np.zeros(4, np.float32), "float32"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", (np.zeros(4, np.float32), "float32"))
    assert set(cache.entries) == {"a", "c", "d"} and cache.nbytes == 48
    cache.put("huge", (np.zeros(100, np.float32), "float32"))  # larger than the whole cache: not kept
    assert "huge" not in cache.entries


def run_actor(encoder, jobs, replicas=2, tracer=None):
    """Send `jobs` (and cancels) to an EncoderActor over inproc sockets; collect replies per replica."""
    ctx = zmq.Context()
    inbox = pull(ctx, "inproc://enc-in")
    outs = [pull(ctx, f"inproc://engine-{r}") for r in range(replicas)]
    replies = [push(ctx, f"inproc://engine-{r}") for r in range(replicas)]
    client = push(ctx, "inproc://enc-in")
    for job in jobs:  # queued before the actor starts, so they drain as one batch
        client.send(job)
    actor = EncoderActor("vision_encoder", encoder, inbox, replies, tracer=tracer)
    stop = threading.Event()
    thread = threading.Thread(target=actor.run, args=(stop,))
    thread.start()
    expected = sum(isinstance(j, EncodeJob) for j in jobs) - 2 * sum(isinstance(j, CancelRequest) for j in jobs)
    got: list[list[EncodeResult]] = [[] for _ in range(replicas)]
    deadline = time.monotonic() + 10
    try:
        while sum(map(len, got)) < expected and time.monotonic() < deadline:
            for r, out in enumerate(outs):
                msg = out.recv(timeout_ms=20)
                if msg is not None:
                    got[r].append(msg)
        time.sleep(0.1)
        for r, out in enumerate(outs):  # nothing more than expected
            msg = out.recv(timeout_ms=0)
            assert msg is None, msg
    finally:
        stop.set()
        thread.join(timeout=10)
        for ch in (inbox, client, *outs, *replies):
            ch.close()
        ctx.term()
    return actor, got


def test_repeats_are_encoded_once_and_results_reach_the_named_replica(tmp_path):
    encoder = CountingEncoder()
    tracer = Tracer("vision_encoder-0", tmp_path)
    jobs = [image_job("r1", "k1", 1.0, reply_to=0), image_job("r2", "k1", 1.0, reply_to=1),
            image_job("r3", "k2", 2.0, reply_to=1, patches=5)]
    actor, got = run_actor(encoder, jobs, tracer=tracer)
    assert encoder.batches == [["k1", "k2"]]  # one batch, the repeat encoded once
    assert [r.request_id for r in got[0]] == ["r1"] and sorted(r.request_id for r in got[1]) == ["r2", "r3"]
    by_id = {r.request_id: r for rs in got for r in rs}
    assert by_id["r3"].embeddings.shape == (5, HIDDEN) and np.all(by_id["r3"].embeddings == 2.0)
    assert np.array_equal(by_id["r1"].embeddings, by_id["r2"].embeddings)
    # later the same content is a cache hit: no new forward
    sent = []
    actor.replies = [type("Collect", (), {"send": staticmethod(sent.append)})()]
    actor.process([image_job("r4", "k2", 2.0)])
    assert encoder.batches == [["k1", "k2"]] and actor.cache.hits == 1
    assert sent[0].cached and np.all(sent[0].embeddings == 2.0)
    tracer.flush()
    spans = [s for s in read_spans(tmp_path) if s.stage == "encode"]
    assert {s.requests[0] for s in spans} == {"r1", "r2", "r3", "r4"}
    assert [s.attrs["cached"] for s in spans if s.requests[0] == "r4"] == [True]
    assert all(s.attrs["tokens"] > 0 and s.end_ns >= s.start_ns for s in spans)


def test_failures_come_back_as_error_results_and_cancel_drops_queued_jobs():
    encoder = CountingEncoder(fail_on="bad")
    jobs = [image_job("ok", "k1", 1.0), image_job("gone", "k9", 9.0), CancelRequest("gone"),
            image_job("broken", "bad", 3.0), image_job("audio", "k3", 1.0, kind="audio"),
            image_job("nowhere", "k4", 1.0, reply_to=7)]
    _, got = run_actor(encoder, jobs, replicas=1)
    by_id = {r.request_id: r for r in got[0]}
    assert set(by_id) == {"ok", "broken", "audio"}  # "gone" cancelled; "nowhere" has no replica to reach
    assert by_id["ok"].error is None
    assert by_id["broken"].embeddings is None and "patches do not fit" in by_id["broken"].error
    assert "cannot encode audio" in by_id["audio"].error


def multimodal_job(rid="r", spans=((0, 2, 3), (1, 7, 2), (0, 10, 1))):
    return PrefillJob(rid, np.zeros(12, np.int32), SamplingSpec(), ["video", "audio"], ["aa", "bb"],
                      np.asarray(spans, np.int32))


def result(rid, index, tokens, value=0.0, error=None):
    emb = None if error else np.arange(tokens * HIDDEN, dtype=np.float32).reshape(tokens, HIDDEN) + value
    return EncodeResult(rid, index, emb, error=error)


@pytest.mark.parametrize("results_first", [False, True])
def test_waiter_cuts_each_items_embeddings_into_its_runs(results_first):
    waiter = MediaWaiter("cpu", torch.float32)
    parts = [result("r", 0, 4), result("r", 1, 2, 100.0)]
    if results_first:
        for r in parts:
            waiter.add_result(r)
        waiter.add_job(multimodal_job())
    else:
        waiter.add_job(multimodal_job())
        waiter.add_result(parts[0])
        assert waiter.ready() == [] and waiter.pending()
        waiter.add_result(parts[1])
    [(job, spans, failure)] = waiter.ready()
    assert failure is None and not waiter.pending()
    assert [(s.start, len(s.embeddings), s.kind) for s in spans] == [(2, 3, "video"), (7, 2, "audio"), (10, 1, "video")]
    video = torch.from_numpy(parts[0].embeddings)
    assert torch.equal(spans[0].embeddings, video[:3]) and torch.equal(spans[2].embeddings, video[3:])
    assert spans[0].content_key != spans[2].content_key  # each run its own prefix-cache key
    # the spans survive the trip to decode
    fields = handoff_media(spans)
    msg = KVHandoff("r", np.zeros(12, np.int32), 5, SamplingSpec(), 12, "float32", **fields)
    back = spans_from_handoff(msg, "cpu", torch.float32)
    assert [(s.start, s.kind, s.content_key) for s in back] == [(s.start, s.kind, s.content_key) for s in spans]
    assert all(torch.equal(a.embeddings, b.embeddings) for a, b in zip(back, spans))


def test_waiter_ends_requests_whose_media_failed_mismatched_or_timed_out():
    waiter = MediaWaiter("cpu", torch.float32, timeout_s=0.05)
    waiter.add_job(multimodal_job("err"))
    waiter.add_result(result("err", 1, 0, error="audio could not be decoded"))
    waiter.add_job(multimodal_job("short"))
    waiter.add_result(result("short", 0, 3))  # 3 soft tokens for 4 placeholders
    waiter.add_result(result("short", 1, 2))
    outcome = {job.request_id: failure for job, _, failure in waiter.ready()}
    assert outcome["err"] == (400, "audio could not be decoded")
    assert outcome["short"][0] == 502 and "fewer than its placeholders" in outcome["short"][1]
    waiter.add_job(multimodal_job("slow"))
    waiter.add_result(result("cancelled", 0, 1))
    waiter.discard("cancelled")
    time.sleep(0.1)
    assert [(rid, code) for rid, code, _ in waiter.expired()] == [("slow", 504)]
    assert not waiter.pending() and not waiter.early


class TimedInbox:
    """An inbox whose messages become available at given times after it is made (recv honours
    its timeout as a socket does)."""

    def __init__(self, timed: list[tuple[float, object]]):
        self.t0 = time.monotonic()
        self.timed = sorted(timed, key=lambda pair: pair[0])

    def recv(self, timeout_ms: int):
        end = time.monotonic() + timeout_ms / 1000
        while True:
            now = time.monotonic() - self.t0
            if self.timed and self.timed[0][0] <= now:
                return self.timed.pop(0)[1]
            if time.monotonic() >= end:
                return None
            time.sleep(0.001)


def sibling(rid, index, siblings=2):
    return dataclasses.replace(image_job(rid, f"{rid}-{index}", float(index), index=index), siblings=siblings)


def gather_from(timed, wait_s=0.5):
    inbox = TimedInbox(timed)
    actor = EncoderActor("vision_encoder", CountingEncoder(), inbox, [], sibling_wait_s=wait_s)
    return actor.gather(inbox.recv(timeout_ms=1000)), inbox


def test_a_requests_jobs_arriving_apart_share_one_batch():
    batch, inbox = gather_from([(0.0, sibling("r1", 0)), (0.05, sibling("r1", 1))])
    assert [(j.request_id, j.media_index) for j in batch] == [("r1", 0), ("r1", 1)]
    # a job of a request with all its jobs here does not wait for later arrivals
    batch, inbox = gather_from([(0.0, sibling("r2", 0, siblings=1)), (0.2, sibling("r3", 0, siblings=1))])
    assert [j.request_id for j in batch] == ["r2"] and inbox.timed


def test_a_missing_sibling_is_waited_for_at_most_sibling_wait_s():
    start = time.monotonic()
    batch, inbox = gather_from([(0.0, sibling("r1", 0)), (2.0, sibling("r1", 1))], wait_s=0.1)
    waited = time.monotonic() - start
    assert [j.media_index for j in batch] == [0] and 0.09 <= waited < 1.0
    # a cancel while waiting drops the request's jobs
    batch, _ = gather_from([(0.0, sibling("r1", 0)), (0.02, CancelRequest("r1")), (0.02, sibling("r4", 0, 1))])
    assert [j.request_id for j in batch] == ["r4"]


def test_padded_stacks_along_frames_and_pads_patches_with_the_fill():
    from actors.encoder_actor import _padded

    a = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    b = np.ones((1, 5, 2), np.float32)
    got = _padded([a, b], -1.0)
    assert got.shape == (3, 5, 2) and got.dtype == np.float32
    assert np.array_equal(got[:2, :3], a) and np.all(got[:2, 3:] == -1.0) and np.array_equal(got[2], b[0])
    assert _padded([a], 0.0) is a  # alone and full length: passed through, not copied
    masks = _padded([np.ones((1, 2), bool), np.ones((1, 4), bool)], False)
    assert masks.tolist() == [[True, True, False, False], [True, True, True, True]]


class RecordingTower:
    """A media encoder that keeps the pixels it was given and returns each frame's row sums."""

    def encode(self, pixels, positions):
        self.pixels, self.positions = pixels, positions
        return list(pixels.sum(-1, keepdim=True))

    def encode_video(self, pixels, positions, frames_per_video):
        self.pixels, self.positions = pixels, positions
        return list(pixels.sum(-1, keepdim=True).split(frames_per_video))


def test_eight_bit_pixels_are_looked_up_in_their_jobs_tables_on_the_device():
    """uint8 patches with per-job tables give the very float pixels (zero padding included) that
    the float32 jobs of the same values give; a mixed batch too; bad tables are refused."""
    from actors.encoder_actor import make_batch_encoder
    from actors.media_inputs import pixel_lookup

    rng = np.random.default_rng(0)

    def job(i, patches, frames=1, eight_bit=True, kind="image"):
        codes = rng.integers(0, 256, (frames, patches, 12), dtype=np.uint8)
        table = rng.standard_normal((3, 256)).astype(np.float32)
        pos = np.zeros((frames, patches, 2), np.int32)  # all real patches
        if eight_bit:
            return EncodeJob("r", i, kind, f"k{i}", 0, pixel_values=codes, position_ids=pos, pixel_table=table)
        return EncodeJob("r", i, kind, f"k{i}", 0, pixel_values=pixel_lookup(codes, table), position_ids=pos)

    tower = RecordingTower()
    encode = make_batch_encoder(tower, "cpu", torch.float32)
    for kind, frames in (("image", 1), ("video", 2)):
        jobs = [job(0, 5, frames, kind=kind), job(1, 3, frames, kind=kind), job(2, 4, frames, kind=kind)]
        floats = [dataclasses.replace(j, pixel_values=pixel_lookup(j.pixel_values, j.pixel_table), pixel_table=None)
                  for j in jobs]
        got = encode(jobs)
        got_pixels = tower.pixels.clone()
        want = encode(floats)
        assert got_pixels.shape == (3 * frames, 5, 12) and got_pixels.dtype == torch.float32
        torch.testing.assert_close(got_pixels, tower.pixels, rtol=0, atol=0)
        assert (got_pixels[frames:2 * frames, 3:] == 0).all()  # padding patches are zeros, as float jobs pad
        for (a, _), (b, _) in zip(got, want):
            np.testing.assert_array_equal(a, b)
        encode([jobs[0], floats[1]])  # one job of each kind of pixels
        padded = torch.nn.functional.pad(torch.from_numpy(floats[1].pixel_values), (0, 0, 0, 2))
        want_pixels = torch.cat([torch.from_numpy(floats[0].pixel_values), padded])
        assert want_pixels.shape == (2 * frames, 5, 12)
        torch.testing.assert_close(tower.pixels, want_pixels, rtol=0, atol=0)
    with pytest.raises(ValueError, match="need a pixel_table"):
        encode([dataclasses.replace(job(0, 2), pixel_table=None)])
    with pytest.raises(ValueError, match=r"\[3, 256\]"):
        encode([dataclasses.replace(job(0, 2), pixel_table=np.zeros((3, 255), np.float32))])

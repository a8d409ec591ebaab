"""The one message schema: round trips, zero-copy arrays, and refusal of malformed frames."""

import msgpack
import numpy as np
import pytest

from actors.messages import (
    MESSAGE_TYPES,
    EncodeResult,
    GenerateRequest,
    MessageError,
    PrefillJob,
    SamplingSpec,
    StepTokens,
    TokenBatch,
    decode,
    encode,
    per_request,
)


def test_round_trip_with_nested_spec_and_arrays():
    spans = np.array([[0, 2, 3], [1, 5, 1]], dtype=np.int32)
    job = PrefillJob("r1", np.arange(7, dtype=np.int32), SamplingSpec(max_tokens=5, stop_token_ids=[1, 106]),
                     ["image", "audio"], ["k0", "k1"], spans)
    frames = encode(job)
    assert len(frames) == 3
    back = decode([bytes(f) for f in frames])
    assert back.request_id == "r1" and back.sampling == job.sampling
    assert back.media_kinds == ["image", "audio"] and back.media_keys == ["k0", "k1"]
    assert np.array_equal(back.media_spans, spans)
    assert np.array_equal(back.token_ids, job.token_ids) and back.token_ids.dtype == np.int32


def test_arrays_are_views_of_their_frames():
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    header, frame = encode(EncodeResult("r", 0, emb))
    buffer = bytearray(frame)
    back = decode([header, buffer])
    buffer[:4] = np.float32(42.0).tobytes()
    assert back.embeddings[0, 0] == 42.0  # no copy was made


def test_every_message_type_round_trips_defaults():
    assert {"GenerateRequest", "PrefillJob", "EncodeResult", "TokenBatch", "RequestError", "CancelRequest",
            "ActorReady", "SamplingSpec"} <= set(MESSAGE_TYPES)
    for msg in (GenerateRequest("a", "[]", SamplingSpec()), TokenBatch("a", [1, 2], "stop")):
        assert decode(encode(msg)) == msg


def test_step_tokens_round_trip_and_split_into_batches():
    batches = [TokenBatch("a", [1, 2], None, 7, 0), TokenBatch("b", [3], "stop")]
    step = decode(encode(StepTokens.of(batches)))
    assert step.counts == [2, 1] and step.token_ids == [1, 2, 3]
    assert per_request(step) == batches and per_request(batches[1]) == [batches[1]]


@pytest.mark.parametrize("fields, problem", [
    ({"counts": [1, 2]}, "differ in length"),
    ({"counts": [0]}, "positive"),
    ({"token_ids": [1, 2]}, "add up"),
    ({"finish_reasons": [5]}, "does not match"),
])
def test_malformed_step_tokens_are_refused(fields, problem):
    base = {"request_ids": ["a"], "counts": [1], "token_ids": [4], "finish_reasons": [None], "prompt_tokens": [None],
            "cached_tokens": [None]}
    frames = [msgpack.packb({"type": "StepTokens", "fields": {**base, **fields}, "arrays": []})]
    with pytest.raises(MessageError, match=problem):
        decode(frames)


@pytest.mark.parametrize("fields, ok", [
    ({"max_tokens": 5, "temperature": 1}, True),  # an int where a float is declared
    ({"max_tokens": True}, False),  # a bool is no int
    ({"temperature": False}, False),  # nor a float
    ({"seed": None, "logprobs": None}, True),  # optional
    ({"max_tokens": None}, False),  # not optional
    ({"stop_token_ids": [1, 2]}, True),
    ({"stop_token_ids": [1, True]}, False),  # list items by exact type
    ({"stop_token_ids": [1.0]}, False),
    ({"grammar": "x", "ignore_eos": True}, True),
    ({"ignore_eos": 1}, False),
])
def test_field_kinds_are_checked_against_their_declarations(fields, ok):
    frames = [msgpack.packb({"type": "SamplingSpec", "fields": fields, "arrays": []})]
    if ok:
        assert decode(frames) == SamplingSpec(**fields)
    else:
        with pytest.raises(MessageError, match="does not match"):
            decode(frames)
    nested = {"request_id": "r", "messages_json": "[]", "sampling": {"max_tokens": 3}, "prompt_ids": [1, 2]}
    assert decode([msgpack.packb({"type": "GenerateRequest", "fields": nested, "arrays": []})]).sampling.max_tokens == 3


def _header(**over):
    base = {"type": "TokenBatch", "fields": {"request_id": "x", "token_ids": [1]}, "arrays": []}
    base.update(over)
    return msgpack.packb(base)


@pytest.mark.parametrize(
    "frames, problem",
    [
        ([], "no frames"),
        ([b"\xc1\xc1garbage"], "not msgpack"),
        ([msgpack.packb([1, 2])], "header must be"),
        ([_header(type="Pickle")], "unknown message type"),
        ([_header(fields={"request_id": "x", "token_ids": [1], "evil": 1})], "unknown fields"),
        ([_header(fields={"request_id": 5, "token_ids": [1]})], "does not match"),
        ([_header(fields={"request_id": "x", "token_ids": ["a"]})], "does not match"),
        ([_header(fields={"token_ids": [1]})], "request_id"),
        ([_header(arrays=[{"field": "token_ids", "dtype": "int32", "shape": [2]}])], "frames sent"),
        ([_header(arrays=[{"field": "token_ids", "dtype": "object", "shape": [2]}]), b"12345678"], "not allowed"),
        ([_header(arrays=[{"field": "token_ids", "dtype": "int32", "shape": [3]}]), b"12345678"], "bytes"),
        ([_header(fields={"request_id": "x"}, arrays=[{"field": "token_ids", "dtype": "int32", "shape": [2]}]),
          b"12345678"], "array"),
    ],
)
def test_malformed_frames_are_refused(frames, problem):
    with pytest.raises(MessageError, match=problem):
        decode(frames)


def test_unregistered_objects_cannot_be_encoded():
    with pytest.raises(TypeError):
        encode({"type": "TokenBatch"})


def test_a_chat_request_with_inline_media_fits_in_a_header():
    """Base64 media ride in messages_json: a body at the api's largest limit must still decode."""
    from topology.config import parse_topology

    big = GenerateRequest("r", '{"messages": "' + "A" * (40 << 20) + '"}', SamplingSpec())
    assert decode(encode(big)).messages_json == big.messages_json
    with pytest.raises(Exception, match="max_body_bytes"):
        parse_topology({"nodes": {"n": {}}, "actors": [{"kind": "preprocess"}, {"kind": "engine"}],
                        "api": {"max_body_bytes": 200 << 20}})


def test_an_inbox_drops_malformed_messages_and_goes_on():
    import zmq

    from actors.transport import pull, push

    ctx = zmq.Context()
    inbox, raw = pull(ctx, "inproc://inbox", drop_malformed=True), ctx.socket(zmq.PUSH)
    raw.connect("inproc://inbox")
    out = push(ctx, "inproc://inbox")
    try:
        raw.send_multipart([b"not msgpack at all"])
        out.send(TokenBatch("a", [1]))
        assert inbox.recv(timeout_ms=1000) is None and inbox.malformed == 1
        assert inbox.recv(timeout_ms=1000) == TokenBatch("a", [1])
    finally:
        raw.close(linger=0)
        inbox.close()
        out.close()
        ctx.term()

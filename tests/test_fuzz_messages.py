"""Property-based fuzzing of the wire decoder (issue 10): `decode` on arbitrary frames, on
msgpack headers shaped like messages with wrong kinds, names, dtypes and shapes, and on valid
messages with corrupted bytes, either returns a registered message (which encodes again) or
raises `MessageError`, never another exception."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
from hypothesis import example, given, strategies as st

from actors.messages import (_REGISTRY, ALLOWED_DTYPES, MESSAGE_TYPES, GenerateRequest, KVHandoff, MessageError,
                             PrefillJob, SamplingSpec, TokenBatch, decode, encode)
from tests.fuzzing import fuzz_settings

_keys = st.one_of(st.text(max_size=10), st.binary(max_size=6))
_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                  st.floats(allow_nan=True), st.text(max_size=10), st.binary(max_size=10))
_msgpack = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(_keys, inner, max_size=4)), max_leaves=10)
_dims = st.one_of(st.integers(0, 8), st.integers(-2, 2**64 - 1), st.booleans(), st.text(max_size=2))


@st.composite
def _shaped_frames(draw):
    """A header naming a real message type, its fields (right or wrong kinds, unknown names,
    bytes keys), array specs (any field, dtype, shape) and frames of any length."""
    name = draw(st.sampled_from(MESSAGE_TYPES + ("Nope",)))
    names = [f.name for f in dataclasses.fields(_REGISTRY[name])] if name in _REGISTRY else ["x"]
    fields = draw(st.dictionaries(st.one_of(st.sampled_from(names), _keys), _msgpack, max_size=len(names) + 1))
    if name in _REGISTRY and draw(st.booleans()):  # often start from a valid field set
        fields = {**_defaults(name), **fields}
    specs = draw(st.lists(st.one_of(
        st.fixed_dictionaries({"field": st.one_of(st.sampled_from(names), _leaf),
                               "dtype": st.one_of(st.sampled_from(sorted(ALLOWED_DTYPES) + ["object", "float64"]),
                                                  _leaf),
                               "shape": st.one_of(st.lists(_dims, max_size=4), _leaf)}),
        _msgpack), max_size=3))
    frames = [msgpack.packb({"type": name, "fields": fields, "arrays": specs}, use_bin_type=True)]
    for spec in specs:
        size = _nbytes(spec)
        frames.append(bytes(size) if size is not None and size <= 4096 and draw(st.booleans())
                      else draw(st.binary(max_size=64)))
    if draw(st.booleans()):
        frames = frames[:draw(st.integers(0, len(frames)))] + draw(st.lists(st.binary(max_size=8), max_size=2))
    return frames


def _defaults(name: str) -> dict:
    return {"GenerateRequest": {"request_id": "r", "messages_json": "[]", "sampling": {}},
            "TokenBatch": {"request_id": "r", "token_ids": [1]},
            "PrefillJob": {"request_id": "r", "sampling": {}},
            "RequestError": {"request_id": "r", "code": 400, "message": "m"}}.get(name, {})


def _nbytes(spec) -> int | None:
    try:
        size = math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
    except Exception:  # not a shape or not a dtype: any frame will do
        return None
    return size if isinstance(size, int) and size >= 0 else None


def _check(frames):
    try:
        msg = decode(frames)
    except MessageError:
        return
    assert type(msg) in _REGISTRY.values()
    again = decode(encode(msg))  # what decode accepts is a message that travels again
    assert type(again) is type(msg)


_VALID = [
    encode(GenerateRequest("a", '{"messages": []}', SamplingSpec(max_tokens=3, seed=7, stop_token_ids=[1, 2]))),
    encode(TokenBatch("b", [1, 2], "stop", 3, 0, [-0.5, -1.0], np.zeros((2, 2), np.int32),
                      np.zeros((2, 2), np.float32))),
    encode(PrefillJob("c", np.arange(5, dtype=np.int32), SamplingSpec(), ["image"], ["k"],
                      np.zeros((1, 3), np.int32))),
    encode(KVHandoff("d", np.arange(3, dtype=np.int32), 4, SamplingSpec(), 3, "float32",
                     full_pages=np.arange(2, dtype=np.int32), full_k=np.zeros((1, 2, 4, 1, 2), np.float32))),
]


_arrays = st.sampled_from(sorted(ALLOWED_DTYPES)).flatmap(lambda dtype: st.lists(st.integers(0, 3), min_size=1,
                                                                               max_size=3).flatmap(
    lambda shape: st.binary(min_size=math.prod(shape) * np.dtype(dtype).itemsize,
                            max_size=math.prod(shape) * np.dtype(dtype).itemsize).map(
        lambda raw: np.frombuffer(raw, dtype=dtype).reshape(shape))))


@fuzz_settings(200)
@given(_arrays, _arrays, st.lists(st.integers(0, 2**31 - 1), max_size=3))
@example(np.zeros((1, 0), np.int32), np.zeros((1, 0), np.float32), [5])  # logprobs with no top alternatives
def test_arrays_of_any_dtype_and_shape_round_trip(top_ids, top_logprobs, tokens):
    """Empty arrays included: a TokenBatch for `logprobs: 0` carries [n, 0] alternatives."""
    back = decode(encode(TokenBatch("r", tokens, None, top_ids=top_ids, top_logprobs=top_logprobs)))
    for sent, got in ((top_ids, back.top_ids), (top_logprobs, back.top_logprobs)):
        assert got.dtype == sent.dtype and got.shape == sent.shape and got.tobytes() == sent.tobytes()
    assert back.token_ids == tokens


@fuzz_settings(300)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_arbitrary_frames(frames):
    _check(frames)


@fuzz_settings(300)
@given(_shaped_frames())
@example([msgpack.packb({"type": "TokenBatch", "fields": {"request_id": "r", "token_ids": [1], b"k": 1, "z": 2},
                         "arrays": []}, use_bin_type=True)])
@example([msgpack.packb({"type": "TokenBatch", "fields": {"request_id": "r", "token_ids": [1]},
                         "arrays": [{"field": 5, "dtype": "int32", "shape": [0]}, {"field": "top_ids", "dtype": "int32", "shape": [0]}]},
                        use_bin_type=True), b"", b""])
@example([msgpack.packb({"type": "TokenBatch", "fields": {"request_id": "r", "token_ids": [1]},
                         "arrays": [{"field": "top_ids", "dtype": "int32", "shape": [2**64 - 1, 2**64 - 1]}]},
                        use_bin_type=True), b""])
@example([msgpack.packb({"type": "TokenBatch", "fields": {"request_id": "r", "token_ids": [1]},
                         "arrays": [{"field": "top_ids", "dtype": "int32", "shape": [0, 2**62, 2**62]}]},
                        use_bin_type=True), b""])
def test_message_shaped_headers(frames):
    _check(frames)


@fuzz_settings(300)
@given(st.sampled_from(_VALID), st.data())
def test_valid_messages_with_corrupted_bytes(frames, data):
    frames = [bytearray(f) for f in frames]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frames) - 1))
        if not frames[i]:
            continue
        j = data.draw(st.integers(0, len(frames[i]) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            frames[i][j] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del frames[i][j:]
        else:
            frames[i][j:j] = data.draw(st.binary(min_size=1, max_size=4))
    _check([bytes(f) for f in frames])

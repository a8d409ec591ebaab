"""Every message that crosses a socket between actors, and its one wire encoding.

A message is a frozen dataclass registered here. On the wire it is a list of ZeroMQ frames:
frame 0 is a msgpack map {"type", "fields", "arrays"}; each array field travels as one more
frame of raw bytes (dtype and shape in the header), sent and received without a copy. No
pickle anywhere. Decoding checks the type name, the field names and kinds, array dtypes and
every size against limits, so a malformed or hostile message is a `MessageError`, never a crash.
Arrays are numpy (the api actor imports no torch); tensors convert with `torch.from_numpy`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

MAX_HEADER_BYTES = 128 << 20  # a chat request carries its inline media (base64) in the header: above any body limit
MAX_ARRAY_BYTES = 1 << 30
MAX_ARRAYS = 64
ALLOWED_DTYPES = frozenset({"bool", "uint8", "int8", "int32", "int64", "float16", "float32", "uint16"})
# bfloat16 has no numpy dtype: such tensors travel as uint16 views with `bfloat16` noted by the sender.


class MessageError(ValueError):
    """A frame list that is not a valid message."""


_REGISTRY: dict[str, type] = {}


def message(cls):
    """Class decorator: a frozen dataclass that may travel between actors."""
    cls = dataclass(frozen=True)(cls)
    if cls.__name__ in _REGISTRY:
        raise TypeError(f"message type {cls.__name__} declared twice")
    _REGISTRY[cls.__name__] = cls
    cls._hints = typing.get_type_hints(cls)
    cls._specs = {name: _FieldSpec.of(hint) for name, hint in cls._hints.items()}
    return cls


def _is_array_field(hint: Any) -> bool:
    return hint is np.ndarray or np.ndarray in typing.get_args(hint)  # np.ndarray or np.ndarray | None


def _union_args(hint: Any) -> tuple:
    union = typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)
    return typing.get_args(hint) if union else (hint,)


@dataclass(frozen=True)
class _FieldSpec:
    """What a field's declaration accepts, worked out once per message type (decoding checks
    every field of every message: no typing introspection per value)."""

    hint: Any
    array: bool
    none: bool  # None is allowed
    number: type | None  # int or float (a bool is neither; an int is a float)
    lists: tuple[frozenset | None, ...]  # per list option its exact item types (None: any)
    instances: tuple[type, ...]  # str, bool, dict
    nested: type | None  # a message type, travelling as a map

    @classmethod
    def of(cls, hint: Any) -> "_FieldSpec":
        options = _union_args(hint)
        bases = [typing.get_origin(o) or o for o in options]
        lists = tuple(frozenset(_union_args(typing.get_args(o)[0])) if typing.get_args(o) else None
                      for o, b in zip(options, bases) if b is list)
        number = float if float in bases else int if int in bases else None
        nested = next((b for b in bases if b in _REGISTRY.values()), None)
        return cls(hint, _is_array_field(hint), type(None) in options, number, lists,
                   tuple(b for b in bases if b in (str, bool, dict)), nested)

    def check(self, name: str, value: Any) -> None:
        """Refuse a value whose kind does not match the declaration (shallow, cheap; list items
        by exact type, checked at C speed: a handoff lists thousands of pages)."""
        kind = type(value)
        if (value is None and self.none) or (self.nested is not None and kind is dict) \
                or (self.number is not None and kind is not bool and isinstance(value, int if self.number is int
                                                                                   else (int, float))) \
                or isinstance(value, self.instances):
            return
        if kind is list and any(items is None or set(map(type, value)) <= items for items in self.lists):
            return
        raise MessageError(f"field {name!r}: {kind.__name__} does not match {self.hint}")


@message
class SamplingSpec:
    """Decoding settings carried with a request (OpenAI-style names)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    # Structured output (gemma4_model/grammar.py): kind "json_schema" / "ebnf" / "structural_tag" and its text;
    # with grammar_after_token_id the grammar starts after that token (the end of a thinking block);
    # with grammar_open_token_id too, only if the output opens with that token (thinking is optional).
    grammar_kind: str | None = None
    grammar: str | None = None
    grammar_after_token_id: int | None = None
    grammar_open_token_id: int | None = None
    tool_choice: str | None = None  # "required" / "function:NAME": a call the grammar must force (tools in messages_json)


@message
class GenerateRequest:
    """api -> preprocess: one request, after validation, before tokenization.

    Exactly one prompt form: `messages_json` (chat: the OpenAI messages, tools and
    chat_template_kwargs as JSON text), `prompt_text` or `prompt_ids` (completions).
    """

    request_id: str
    messages_json: str
    sampling: SamplingSpec
    stream: bool = True
    prompt_text: str | None = None
    prompt_ids: list[int] | None = None


@message
class PrefillJob:
    """preprocess -> prefill (or the colocated engine): token ids ready to run.

    A multimodal prompt keeps its placeholder token ids; each media item's embeddings arrive
    from an encoder as an `EncodeResult`, and the job runs once all of them are in.
    """

    request_id: str
    token_ids: np.ndarray  # int32 [n]
    sampling: SamplingSpec
    media_kinds: list[str] = field(default_factory=list)  # per media item: "image", "video" or "audio"
    media_keys: list[str] = field(default_factory=list)  # per item: its content hash (prefix-cache key)
    # int32 [spans, 3]: (item index, first prompt position, length) of each placeholder run, in
    # prompt order; an item's embeddings fill its runs in order (a video has one run per frame)
    media_spans: np.ndarray | None = None


@message
class EncodeJob:
    """preprocess -> vision / audio encoder: one media item of a request, processed and ready.

    The encoder answers the engine replica `reply_to` (its index among the topology's engine or
    prefill replicas) with an `EncodeResult`; `content_key` keys its cache of outputs.
    """

    request_id: str
    media_index: int
    kind: str  # "image", "video" or "audio"
    content_key: str
    reply_to: int
    pixel_values: np.ndarray | None = None  # [frames, patches, patch_dim] (an image is one frame): float32 values,
    # or uint8 8-bit values whose float is `pixel_table`[column % 3, value] (patches are HWC)
    position_ids: np.ndarray | None = None  # int32 [frames, patches, 2]; (-1, -1) marks padding patches
    pixel_table: np.ndarray | None = None  # float32 [3, 256], with uint8 pixel_values
    features: np.ndarray | None = None  # audio: float32 [frames, features]
    feature_mask: np.ndarray | None = None  # audio: bool [frames], True where valid
    siblings: int = 1  # jobs of this request sent to this encoder replica (this one included): encoded together


@message
class EncodeResult:
    """vision / audio encoder -> prefill: one media item's soft tokens in LM space, or why not."""

    request_id: str
    media_index: int
    embeddings: np.ndarray | None  # [tokens, hidden]; bfloat16 travels as uint16 (`dtype` says which)
    dtype: str = "float32"
    cached: bool = False  # served from the encoder's cache
    error: str | None = None  # set (and embeddings None) when the item could not be encoded


@message
class DevicePages:
    """Where the pages of a `KVHandoff` are when they move over the GPU data plane (transfer
    backends `nccl` and `cuda_ipc`, `transfer/nccl.py`, `transfer/cuda_ipc.py`): sizes and
    places only, never page data. Groups travel full then sliding; their logical page numbers
    are the handoff's `full_pages` / `sliding_pages`."""

    source: int  # the prefill replica that sent the handoff
    serial: int  # counts that replica's handoffs to this decode replica from 1 (nccl: the order of the transfers)
    shapes: list[int]  # per group that travels: layers, pages, page_size, kv_heads, head_dim
    # cuda_ipc only: the pages' places in prefill's pool (full then sliding, in the order of the
    # logical ones) and, per pool tensor (full k, full v, sliding k, sliding v), what
    # `torch.UntypedStorage._share_cuda_` gives: handle, ref-counter name, event handle, and the
    # ints device, storage bytes, storage offset bytes, ref-counter offset, event sync (0/1),
    # pages in the pool (6 per tensor)
    physical: list[int] = field(default_factory=list)
    pool_handles: list[bytes] = field(default_factory=list)
    pool_ref_counters: list[bytes] = field(default_factory=list)
    pool_events: list[bytes] = field(default_factory=list)
    pool_ints: list[int] = field(default_factory=list)


@message
class KVHandoff:
    """prefill -> decode: a prefilled request, its first token and the KV pages decode needs.

    Per layer group (sliding, full): the logical page numbers and K/V arrays [layers, pages,
    page_size, kv_heads, head_dim]; bfloat16 travels as uint16 (`kv_dtype` says which).
    """

    request_id: str
    prompt_ids: np.ndarray  # int32 [n]
    first_token: int
    sampling: SamplingSpec
    num_tokens: int
    kv_dtype: str
    full_pages: np.ndarray | None = None
    full_k: np.ndarray | None = None
    full_v: np.ndarray | None = None
    sliding_pages: np.ndarray | None = None
    sliding_k: np.ndarray | None = None
    sliding_v: np.ndarray | None = None
    data_ref: str | None = None  # set when the pages travel apart (transfer backend shm or tcp); arrays then absent
    device_pages: DevicePages | None = None  # set when the pages travel over the GPU data plane (nccl, cuda_ipc)
    # A multimodal prompt's media, so that decode can recompute the prompt after a preemption:
    # spans as in `PrefillJob.media_spans`, embeddings of every span concatenated in span order
    media_kinds: list[str] = field(default_factory=list)
    media_keys: list[str] = field(default_factory=list)
    media_spans: np.ndarray | None = None
    media_embeddings: np.ndarray | None = None
    media_dtype: str = "float32"
    # The target's final-norm hidden state [hidden] of the position that produced `first_token`:
    # what decode's MTP assistant drafts the second token from (None: decode drafts from its second).
    first_hidden: np.ndarray | None = None
    hidden_dtype: str = "float32"


@message
class KVData:
    """prefill -> decode over the decode replica's `kv_data` channel (transfer backend `tcp`): the
    page arrays of one handoff, matched with its `KVHandoff` by `ref` (= its `data_ref`), in
    either arrival order. Array fields as in `KVHandoff`."""

    ref: str
    request_id: str
    num_tokens: int
    kv_dtype: str
    full_pages: np.ndarray | None = None
    full_k: np.ndarray | None = None
    full_v: np.ndarray | None = None
    sliding_pages: np.ndarray | None = None
    sliding_k: np.ndarray | None = None
    sliding_v: np.ndarray | None = None


@message
class KVRelease:
    """decode -> prefill over the prefill replica's `kv_release` channel (transfer backend
    `cuda_ipc`): decode has copied handoff `serial` out of prefill's pool, or dropped it;
    prefill may now free those pages."""

    replica: int  # the decode replica
    serial: int  # `DevicePages.serial` of the handoff
    request_id: str


@message
class TokenBatch:
    """decode (or prefill, for the first token) -> api: new tokens of one request."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # on a request's first batch: its prompt length
    cached_tokens: int | None = None  # on the first batch: prompt tokens reused from the prefix cache
    logprobs: list[float] | None = None  # per token: the chosen token's logprob (when asked)
    top_ids: np.ndarray | None = None  # int32 [tokens, k]: the top-k alternatives (when asked)
    top_logprobs: np.ndarray | None = None  # float32 [tokens, k]


@message
class StepTokens:
    """engine / decode -> api: one step's new tokens for each request it advanced that asked for
    no logprobs, in one message (those that did get a `TokenBatch` each). At a hundred running
    requests, a message per request per step cost the engine and the api more than the step."""

    request_ids: list[str]
    counts: list[int]  # each request's new tokens
    token_ids: list[int]  # all of them, request after request
    finish_reasons: list[str | None]
    prompt_tokens: list[int | None]  # as `TokenBatch`: set on a request's first batch
    cached_tokens: list[int | None]

    def __post_init__(self):
        n = len(self.request_ids)
        if not len(self.counts) == len(self.finish_reasons) == len(self.prompt_tokens) == len(self.cached_tokens) == n:
            raise MessageError("StepTokens: its per-request lists differ in length")
        if any(c < 1 for c in self.counts) or sum(self.counts) != len(self.token_ids):
            raise MessageError("StepTokens: counts must be positive and add up to the tokens")

    @classmethod
    def of(cls, batches: Sequence[TokenBatch]) -> "StepTokens":
        """Batches without logprobs, one per request, as one message."""
        assert all(b.logprobs is None and b.top_ids is None for b in batches), "logprobs travel as TokenBatch"
        return cls([b.request_id for b in batches], [len(b.token_ids) for b in batches],
                   [t for b in batches for t in b.token_ids], [b.finish_reason for b in batches],
                   [b.prompt_tokens for b in batches], [b.cached_tokens for b in batches])

    def batches(self) -> list[TokenBatch]:
        """One `TokenBatch` per request, in order."""
        out, at = [], 0
        for rid, n, reason, prompt, cached in zip(self.request_ids, self.counts, self.finish_reasons,
                                                  self.prompt_tokens, self.cached_tokens):
            out.append(TokenBatch(rid, self.token_ids[at : at + n], reason, prompt, cached))
            at += n
        return out


def per_request(msg: Any) -> list[Any]:
    """The per-request results a message of the results socket carries: a `StepTokens`' batches,
    any other message itself."""
    return msg.batches() if isinstance(msg, StepTokens) else [msg]


@message
class RequestError:
    """any actor -> api: the request ended with an error the client must see."""

    request_id: str
    code: int  # HTTP-like status
    message: str
    param: str | None = None  # the request field at fault, when known (e.g. response_format)


@message
class CancelRequest:
    """api -> every actor: the client went away; drop the request and free its pages."""

    request_id: str


@message
class ActorReady:
    """actor -> launcher: started, sockets bound, model loaded."""

    actor: str
    replica: int
    pid: int


STARTUP_STATUS = "startup"  # ActorStatus.actor of a launcher's "all my actors are ready"


@message
class ActorStatus:
    """launcher -> api: an actor died (`up` False; its requests in flight are lost) or is back;
    or, with `actor` = `STARTUP_STATUS`, that every actor of a node (`detail`) is ready."""

    actor: str
    replica: int
    up: bool
    detail: str


@message
class ActorStats:
    """engine / prefill / decode -> api: load figures for /metrics, sent at most every few tenths of a second."""

    actor: str
    replica: int
    waiting: int
    running: int
    kv_pages_used: int
    kv_pages_total: int
    decode_batch: int  # sequences that got a token in the last step
    steps: int
    peak_batch: int = 0  # the most sequences that got a token in one step so far
    drafted_tokens: int = 0  # MTP: draft tokens verified so far
    accepted_tokens: int = 0  # MTP: draft tokens accepted so far
    verify_runs: int = 0  # MTP: sequence-steps that verified drafts


def _as_dict(value: Any) -> dict[str, Any]:
    """A nested message as a dict, its lists shared, not copied (`dataclasses.asdict` deep-copies
    every item: milliseconds for a handoff's thousands of page numbers)."""
    return {f.name: _as_dict(v) if dataclasses.is_dataclass(v := getattr(value, f.name)) else v
            for f in dataclasses.fields(value)}


def encode(msg: Any) -> list[bytes | memoryview]:
    """Message -> frames (header first, then one raw frame per array field)."""
    cls = type(msg)
    if _REGISTRY.get(cls.__name__) is not cls:
        raise TypeError(f"{cls.__name__} is not a registered message")
    fields: dict[str, Any] = {}
    arrays: list[dict[str, Any]] = []
    frames: list[bytes | memoryview] = []
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
            arrays.append({"field": f.name, "dtype": str(array.dtype), "shape": list(array.shape)})
            frames.append(memoryview(array).cast("B") if array.size else b"")  # a view with a 0 in its shape cannot be cast
        elif dataclasses.is_dataclass(value):
            fields[f.name] = _as_dict(value)
        else:
            fields[f.name] = value
    header = msgpack.packb({"type": cls.__name__, "fields": fields, "arrays": arrays}, use_bin_type=True)
    return [header, *frames]


def decode(frames: Sequence[bytes | memoryview]) -> Any:
    """Frames -> message, validated; arrays are zero-copy views of their frames."""
    if not frames:
        raise MessageError("no frames")
    header_bytes = frames[0]
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise MessageError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(header_bytes, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MessageError(f"header is not msgpack: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"type", "fields", "arrays"}:
        raise MessageError("header must be a map of type, fields, arrays")
    cls = _REGISTRY.get(header["type"]) if isinstance(header["type"], str) else None
    if cls is None:
        raise MessageError(f"unknown message type {header['type']!r}")
    fields, arrays = header["fields"], header["arrays"]
    if not isinstance(fields, dict) or not isinstance(arrays, list) or len(arrays) > MAX_ARRAYS:
        raise MessageError("fields must be a map and arrays a short list")
    if len(frames) != 1 + len(arrays):
        raise MessageError(f"{len(arrays)} arrays declared but {len(frames) - 1} frames sent")
    values = dict(fields)
    for spec, frame in zip(arrays, frames[1:]):
        name, array = _decode_array(spec, frame)
        values[name] = array
    return _build(cls, values)


def _decode_array(spec: Any, frame: bytes | memoryview) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict) or set(spec) != {"field", "dtype", "shape"}:
        raise MessageError("array spec must name field, dtype and shape")
    dtype, shape = spec["dtype"], spec["shape"]
    if dtype not in ALLOWED_DTYPES:
        raise MessageError(f"array dtype {dtype!r} is not allowed")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d for d in shape) or len(shape) > 8:
        raise MessageError(f"bad array shape {shape!r}")
    if not isinstance(spec["field"], str):
        raise MessageError(f"array field name {spec['field']!r} is not a string")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no overflow on hostile shapes
    if nbytes > MAX_ARRAY_BYTES or len(frame) != nbytes:
        raise MessageError(f"array {spec['field']!r}: frame has {len(frame)} bytes, shape needs {nbytes}")
    try:
        return spec["field"], np.frombuffer(frame, dtype=dtype).reshape(shape)
    except ValueError as exc:  # an empty array with absurd dimensions
        raise MessageError(f"array {spec['field']!r}: bad shape {shape!r} ({exc})") from None


def _build(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if not all(isinstance(name, str) for name in values):
        raise MessageError(f"{cls.__name__}: field names must be strings")
    unknown = set(values) - names
    if unknown:
        raise MessageError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        spec = cls._specs[name]
        if spec.array:
            if not isinstance(value, np.ndarray) and value is not None:
                raise MessageError(f"{cls.__name__}.{name} must travel as an array frame")
        else:
            spec.check(f"{cls.__name__}.{name}", value)
            if spec.nested is not None and isinstance(value, dict):
                value = _build(spec.nested, value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise MessageError(f"{cls.__name__}: {exc}") from None


MESSAGE_TYPES = tuple(_REGISTRY)

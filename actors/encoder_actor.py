"""The vision and audio encoder actors: media items in, soft tokens in LM space out.

Preprocess sends each media item of a request as an `EncodeJob` to one encoder replica (chosen
by the item's content hash, so repeats meet the replica that cached them) and names the engine
replica that will prefill the request. The encoder drains every job that has arrived (waiting
a little for the rest of a request's jobs to this replica, which it counts, so that a request's
images share one forward), answers
repeats from a byte-bounded LRU cache of outputs keyed by content hash (the same image twice is
encoded once, also within one batch), encodes the rest in one batched forward, and sends one
`EncodeResult` per job to the engine replica named in it. A job that cannot be encoded gets an
`EncodeResult` carrying the error, so the waiting prefill ends that request instead of waiting.
Each item leaves an `encode` span (its kind, tokens, whether the cache answered, the batch).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import Counter, OrderedDict
from typing import Callable, Sequence

import numpy as np

from .media_inputs import pixel_lookup
from .messages import CancelRequest, EncodeJob, EncodeResult
from .tracing import Tracer
from .transport import Channel

KINDS = {"vision_encoder": ("image", "video"), "audio_encoder": ("audio",)}
Embeddings = tuple[np.ndarray, str]  # (array [tokens, hidden], dtype name: bfloat16 travels as uint16)
BatchEncoder = Callable[[Sequence[EncodeJob]], list[Embeddings]]
log = logging.getLogger(__name__)


class EncoderCache:
    """Encoder outputs by content key, least recently used dropped first past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Embeddings] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Embeddings | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, entry: Embeddings) -> None:
        size = entry[0].nbytes
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = entry
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (old, _) = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes


class EncoderActor:
    """Owns one media encoder; fed by its inbox, answers the engine replicas."""

    def __init__(self, kind: str, encode_batch: BatchEncoder, inbox: Channel, replies: Sequence[Channel],
                 tracer: Tracer | None = None, cache_bytes: int = 256 << 20, max_batch: int = 16,
                 sibling_wait_s: float = 0.05):
        if kind not in KINDS:
            raise ValueError(f"encoder kind must be one of {sorted(KINDS)}, got {kind!r}")
        self.kind = kind
        self.encode_batch = encode_batch
        self.inbox = inbox
        self.replies = list(replies)
        self.tracer = tracer or Tracer(kind, None)
        self.cache = EncoderCache(cache_bytes)
        self.max_batch = max_batch
        self.sibling_wait_s = sibling_wait_s

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batch = self.gather(self.inbox.recv(timeout_ms=50))
            if batch:
                self.process(batch)
            self.tracer.tick()

    def gather(self, msg: object) -> list[EncodeJob]:
        """`msg` and everything that has arrived after it, up to one batch; while a request in it
        still misses some of its jobs (`EncodeJob.siblings`: preprocess sends them back to back),
        up to `sibling_wait_s` more for them, so a request's items share one forward."""
        batch: list[EncodeJob] = []
        deadline = None
        while msg is not None:
            if isinstance(msg, CancelRequest):
                batch = [job for job in batch if job.request_id != msg.request_id]
            elif isinstance(msg, EncodeJob):
                batch.append(msg)
            else:
                raise TypeError(f"{self.kind} got an unexpected {type(msg).__name__}")
            if len(batch) >= self.max_batch:
                break
            msg = self.inbox.recv(timeout_ms=0)
            if msg is None and _missing_siblings(batch):
                deadline = deadline or time.monotonic() + self.sibling_wait_s
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms > 0:
                    msg = self.inbox.recv(timeout_ms=left_ms)
        return batch

    def process(self, jobs: Sequence[EncodeJob]) -> None:
        """Answer every job: from the cache, or by encoding each distinct new content once."""
        valid = []
        for job in jobs:
            problem = self._check(job)
            if problem is None:
                valid.append(job)
            else:
                self._reply(job, None, error=problem)
        found: dict[str, Embeddings] = {}
        todo: dict[str, EncodeJob] = {}
        for job in valid:
            key = job.content_key
            if key not in found and key not in todo:
                hit = self.cache.get(key)
                if hit is not None:
                    found[key] = hit
                else:
                    todo[key] = job
        start = time.time_ns()
        fresh, errors = self._encode(list(todo.values()))
        end = time.time_ns()
        for job in valid:
            cached = job.content_key in found
            entry = found.get(job.content_key) if cached else fresh.get(job.content_key)
            if entry is None:
                self._reply(job, None, error=errors.get(job.content_key, "not encoded"))
                continue
            self._reply(job, entry, cached=cached)
            self.tracer.record("encode", end if cached else start, end, job.request_id, kind=job.kind,
                               tokens=int(entry[0].shape[0]), cached=cached, batch=len(todo))

    def _check(self, job: EncodeJob) -> str | None:
        if job.kind not in KINDS[self.kind]:
            return f"a {self.kind} cannot encode {job.kind} input"
        if not 0 <= job.reply_to < len(self.replies):
            return f"reply_to {job.reply_to} names no engine replica"
        return None

    def _encode(self, jobs: list[EncodeJob]) -> tuple[dict[str, Embeddings], dict[str, str]]:
        """Outputs by content key, and errors by content key. A batch that fails is retried item
        by item, so one bad item fails only its own requests."""
        if not jobs:
            return {}, {}
        try:
            outputs = self.encode_batch(jobs)
        except (ValueError, RuntimeError) as exc:  # shapes the encoder refuses; out of memory
            if len(jobs) == 1:
                return {}, {jobs[0].content_key: f"{jobs[0].kind} could not be encoded: {exc}"}
            fresh, errors = {}, {}
            for job in jobs:
                one, problem = self._encode([job])
                fresh.update(one)
                errors.update(problem)
            return fresh, errors
        fresh = {}
        for job, entry in zip(jobs, outputs):
            self.cache.put(job.content_key, entry)
            fresh[job.content_key] = entry
        return fresh, {}

    def _reply(self, job: EncodeJob, entry: Embeddings | None, cached: bool = False, error: str | None = None) -> None:
        if not 0 <= job.reply_to < len(self.replies):
            return  # nobody to tell; preprocess never sends such a job
        embeddings, dtype = entry if entry is not None else (None, "float32")
        self.replies[job.reply_to].send(EncodeResult(job.request_id, job.media_index, embeddings, dtype, cached, error))


def _missing_siblings(batch: Sequence[EncodeJob]) -> bool:
    """Whether some request in the batch has fewer of its jobs here than it sent this replica."""
    present = Counter(job.request_id for job in batch)
    return any(present[job.request_id] < job.siblings for job in batch)


def _padded(arrays: Sequence[np.ndarray], fill: float) -> np.ndarray:
    """Stack [frames, n, ...] arrays along frames, padding axis 1 to the longest with `fill`."""
    longest = max(a.shape[1] for a in arrays)
    if len(arrays) == 1 and arrays[0].shape[1] == longest:
        return arrays[0]  # nothing to pad or stack: no copy (a 720p image's pixels are ~7 MB)
    out = np.full((sum(a.shape[0] for a in arrays), longest, *arrays[0].shape[2:]), fill, dtype=arrays[0].dtype)
    row = 0
    for a in arrays:  # one copy of each array into its place
        out[row:row + a.shape[0], :a.shape[1]] = a
        row += a.shape[0]
    return out


def _pixels(group: Sequence[EncodeJob], positions, tensor: Callable, dtype):
    """The jobs' pixel values on the device, padded with zeros: 8-bit values (the usual case: a
    quarter of the bytes to copy) looked up in their jobs' tables there, float32 ones as they are."""
    import torch

    for j in group:
        eight_bit = j.pixel_values.dtype == np.uint8
        if eight_bit != (j.pixel_table is not None):
            raise ValueError("uint8 pixel_values need a pixel_table, float ones none")
        if eight_bit and (j.pixel_table.shape != (3, 256) or j.pixel_values.shape[-1] % 3):
            raise ValueError(f"a pixel_table is [3, 256] (got {j.pixel_table.shape}) for HWC patches "
                             f"(got {j.pixel_values.shape[-1]} values a patch)")
    if all(j.pixel_table is not None for j in group):
        codes = tensor(_padded([j.pixel_values for j in group], 0))
        tables = tensor(np.stack([j.pixel_table for j in group]).astype(np.float32, copy=False))
        frames = torch.tensor([len(j.pixel_values) for j in group], device=codes.device)
        frame_job = torch.repeat_interleave(torch.arange(len(group), device=codes.device), frames)
        values = lookup_pixels(codes, tables, frame_job)
        return torch.where(positions[..., :1] >= 0, values, 0.0).to(dtype)
    floats = [j.pixel_values if j.pixel_table is None else pixel_lookup(j.pixel_values, j.pixel_table) for j in group]
    return tensor(_padded(floats, 0.0), dtype)


def lookup_pixels(codes, tables, frame_job):
    """uint8 [F, P, D] HWC patch values -> float32 through the frame's job's table ([J, 3, 256]; a
    value's channel is its column mod 3): `media_inputs.pixel_lookup` on a device, for a batch."""
    import torch

    channel = torch.arange(codes.shape[-1], device=codes.device) % 3
    index = (frame_job[:, None, None] * 3 + channel) * 256 + codes.long()
    return tables.reshape(-1)[index]


def warm_up_tower(encoder, device: str, dtype) -> float:
    """Encode one and three small blank images (a 12 x 12 patch grid; three replay as four) so the
    compiled layer is compiled for one image (a size-1 dimension, compiled apart) and for several
    (four: no size equal to another dimension's, which would tie the two) before any request: seconds."""
    import torch

    start = time.perf_counter()
    side = 4 * encoder.cfg.pooling_kernel_size
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).to(device)
    for images in (1, 3):
        pixels = torch.zeros((images, side * side, encoder.cfg.patch_dim), device=device, dtype=dtype)
        encoder.encode(pixels, positions.expand(images, -1, -1).contiguous())
    return time.perf_counter() - start


def make_batch_encoder(encoder, device: str, dtype, compile_tower: bool = False) -> BatchEncoder:
    """Jobs -> embeddings through one of `gemma4_model`'s media encoders, one forward per kind:
    images padded to the most patches (padding patches at position (-1, -1)), videos as their
    frames, audio clips padded to the longest (mask False). On a CUDA device an image encoder
    replays its tower from CUDA graphs."""
    import torch

    from .handoff import to_numpy

    if str(device).startswith("cuda") and hasattr(encoder, "enable_graphs"):
        encoder.enable_graphs(compile=compile_tower)  # the vision tower replays CUDA graphs (gemma4_model.vision_graphs)
        if compile_tower:
            log.info("vision tower compiled and captured in %.1f s", warm_up_tower(encoder, device, dtype))

    def tensor(a: np.ndarray, dt=None) -> torch.Tensor:
        a = np.ascontiguousarray(a)
        if a.flags.writeable:
            return torch.from_numpy(a).to(device=device, dtype=dt)
        with warnings.catch_warnings():  # a read-only message frame: only read here, by the copy below
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
        return t.to(device=device, dtype=dt, copy=True)

    @torch.inference_mode()
    def encode(jobs: Sequence[EncodeJob]) -> list[Embeddings]:
        results: dict[int, torch.Tensor] = {}
        for kind in ("image", "video", "audio"):
            idx = [i for i, job in enumerate(jobs) if job.kind == kind]
            if not idx:
                continue
            group = [jobs[i] for i in idx]
            if kind == "audio":
                if any(j.features is None or j.feature_mask is None for j in group):
                    raise ValueError("an audio job needs features and feature_mask")
                feats = tensor(_padded([j.features[None] for j in group], 0.0), dtype)
                mask = tensor(_padded([j.feature_mask[None] for j in group], False))
                outs = encoder.encode(feats, mask)
            else:
                if any(j.pixel_values is None or j.position_ids is None for j in group):
                    raise ValueError(f"an {kind} job needs pixel_values and position_ids")
                positions = tensor(_padded([j.position_ids for j in group], -1), torch.long)
                pixels = _pixels(group, positions, tensor, dtype)
                if kind == "image":
                    outs = encoder.encode(pixels, positions)
                else:
                    outs = encoder.encode_video(pixels, positions, [len(j.pixel_values) for j in group])
            results.update(zip(idx, outs))
        return [to_numpy(results[i]) for i in range(len(jobs))]

    return encode

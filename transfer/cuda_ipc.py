"""Transfer backend `cuda_ipc`: decode copies the pages straight out of prefill's KV pool.

Prefill shares its pool once: per pool tensor (K and V of each layer group) the CUDA IPC
handle of its storage (`torch.UntypedStorage._share_cuda_`: bytes and ints, msgpack-safe,
never pickle), carried in every handoff's `device_pages` (a few hundred bytes), so a restarted
decode replica, or a restarted prefill with a new pool, is mapped afresh. Decode maps each
pool once per (prefill replica, handle) with `_new_shared_cuda`.

One handoff: prefill makes sure the sequence's KV is written, takes a reference on its pages
(`device_pages.hold`: freeing the sequence leaves them allocated) and pushes the control
`KVHandoff` with the pages' places in its pool. Decode, on accepting it, copies on a side
stream: per group one gather out of the mapped pool (one `index_select` per pool tensor, into
one buffer on prefill's GPU) and, across GPUs, one contiguous device-to-device copy to its own;
no host round trip. When the copy is done it sends `KVRelease` to that prefill replica (its
`kv_release` channel) and hands the pages to the engine actor, which scatters them into its
cache. Prefill frees the pages on the release, or after `hold_timeout_s` if none comes (a
decode replica that died); a handoff decode drops (cancelled, unusable) is released at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from typing import Sequence

import numpy as np
import torch

from actors.messages import DevicePages, KVHandoff, KVRelease, MessageError
from actors.transport import Channel

from .backend import BAD_DATA, Arrival, KVReceiver, KVSender, SendReport, missing_device_pages
from .device_pages import DTYPES, HeldPages, held_pages, hold, pack_group, parse_shapes, release, shapes_of
from .device_pages import unpack_payload
from .kv_pages import PayloadError

_FIELD = {"full_attention": "full_pages", "sliding_attention": "sliding_pages"}
INTS_PER_TENSOR = 6  # device, storage bytes, storage offset, ref-counter offset, event sync, pool pages


# -- the pool's IPC handles -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PoolHandles:
    """A KV pool's CUDA IPC handles, as `DevicePages` carries them: per pool tensor (K then V of
    each group, in `HeldPages.groups` order) the handle, ref-counter name, event handle and ints."""

    handles: tuple[bytes, ...]
    ref_counters: tuple[bytes, ...]
    events: tuple[bytes, ...]
    ints: tuple[int, ...]

    def fields(self) -> dict:
        return {"pool_handles": list(self.handles), "pool_ref_counters": list(self.ref_counters),
                "pool_events": list(self.events), "pool_ints": list(self.ints)}


def share_pool(cache, groups: Sequence[str]) -> PoolHandles:
    """The IPC handles of `cache`'s K and V tensors of `groups` (each a whole storage)."""
    handles, refs, events, ints = [], [], [], []
    for name in groups:
        for t in (cache.groups[name].k, cache.groups[name].v):
            if not t.is_cuda or t.storage_offset() != 0 or not t.is_contiguous():
                raise ValueError(f"group {name}: cuda_ipc shares contiguous CUDA pool tensors only")
            device, handle, size, offset, ref, ref_offset, event, sync = t.untyped_storage()._share_cuda_()
            handles.append(bytes(handle)), refs.append(bytes(ref)), events.append(bytes(event))
            ints += [int(device), int(size), int(offset), int(ref_offset), int(bool(sync)), int(t.shape[1])]
    return PoolHandles(tuple(handles), tuple(refs), tuple(events), tuple(ints))


def open_pool(pages: DevicePages, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, tuple]:
    """Map a pool shared by `share_pool` into this process: per group (K, V) on prefill's device,
    shaped [layers, pool pages, page_size, kv_heads, head_dim] (raises `PayloadError`)."""
    count = 2 * len(shapes)
    if not (len(pages.pool_handles) == len(pages.pool_ref_counters) == len(pages.pool_events) == count
            and len(pages.pool_ints) == INTS_PER_TENSOR * count):
        raise PayloadError(f"the handoff shares {len(pages.pool_handles)} pool tensors, {count} expected")
    pool, i = {}, 0
    for name, shape in shapes.items():
        tensors = []
        for _ in ("k", "v"):
            device, size, offset, ref_offset, sync, pool_pages = pages.pool_ints[INTS_PER_TENSOR * i:
                                                                                 INTS_PER_TENSOR * (i + 1)]
            full = (shape[0], pool_pages, *shape[2:])
            needed = int(np.prod(full)) * torch.empty((), dtype=dtype).element_size()
            if not 0 <= device < torch.cuda.device_count() or needed > size or pool_pages < 1:
                raise PayloadError(f"group {name}: a pool of {full} {dtype} does not fit a {size}-byte storage "
                                   f"on cuda:{device}")
            storage = torch.UntypedStorage._new_shared_cuda(
                device, pages.pool_handles[i], size, offset, pages.pool_ref_counters[i], ref_offset,
                pages.pool_events[i], bool(sync))
            tensor = torch.empty(0, dtype=dtype, device=f"cuda:{device}")
            tensors.append(tensor.set_(storage, 0, full))
            i += 1
        pool[name] = tuple(tensors)
    return pool


# -- sender (prefill) -----------------------------------------------------------------------
@dataclasses.dataclass
class _Held:
    held: HeldPages
    request_id: str
    deadline: float


class CudaIpcSender(KVSender):
    backend = "cuda_ipc"

    def __init__(self, controls: Sequence[Channel], releases: Channel, source: int, hold_timeout_s: float = 60.0,
                 clock=time.monotonic):
        """`releases`: this prefill replica's bound `kv_release` PULL."""
        super().__init__(controls)
        self.releases, self.source, self.hold_timeout_s, self.clock = releases, source, hold_timeout_s, clock
        self._serials = [itertools.count(1) for _ in controls]
        self._held: dict[tuple[int, int], _Held] = {}  # (decode replica, serial) -> pages kept for it
        self._cache = None
        self._pool: PoolHandles | None = None
        self.expired = 0  # holds freed by the timeout, not by a release
        self.dropped_malformed = 0

    def export(self, cache, seq_id: int, reach_back: int = 0) -> HeldPages:
        if self._cache is None:
            self._cache = cache
            self._pool = share_pool(cache, [n for n in ("full_attention", "sliding_attention") if n in cache.groups])
        elif cache is not self._cache:
            raise ValueError("a cuda_ipc sender serves one cache")
        device = next(iter(cache.groups.values())).k.device
        if device.type == "cuda":  # decode reads the pages from another process: they must be written
            torch.cuda.current_stream(device).synchronize()
        held = held_pages(cache, seq_id, reach_back)
        hold(cache, held)
        return held

    def send(self, handoff: KVHandoff, held: HeldPages) -> SendReport:
        replica = next(self._turn)
        serial = next(self._serials[replica])
        cache = self._cache
        pages = {_FIELD[name]: np.asarray(held.logical[name], dtype=np.int32) for name in held.groups}
        kv_dtype = str(next(iter(cache.groups.values())).k.dtype).removeprefix("torch.")
        device_pages = DevicePages(self.source, serial, shapes_of(cache, held), held.flat_physical(),
                                   **self._pool.fields())
        control = dataclasses.replace(handoff, num_tokens=held.num_tokens, kv_dtype=kv_dtype, **pages,
                                      data_ref=f"cuda_ipc:{self.source}:{serial}", device_pages=device_pages)
        self._held[(replica, serial)] = _Held(held, handoff.request_id, self.clock() + self.hold_timeout_s)
        try:
            self.controls[replica].send(control)
        except Exception:
            release(cache, self._held.pop((replica, serial)).held)
            raise
        nbytes = sum(cache.bytes_per_page()[name] * len(held.logical[name]) for name in held.groups)
        return SendReport(replica, nbytes, held.num_pages)

    def poll(self) -> None:
        for _ in range(1024):  # bounded, so a flood cannot starve the prefill loop
            try:
                msg = self.releases.recv(timeout_ms=0)
            except MessageError:
                self.dropped_malformed += 1
                continue
            if msg is None:
                break
            entry = self._held.pop((msg.replica, msg.serial), None) if isinstance(msg, KVRelease) else None
            if entry is not None:
                release(self._cache, entry.held)
        now = self.clock()
        for key in [k for k, e in self._held.items() if e.deadline < now]:
            release(self._cache, self._held.pop(key).held)
            self.expired += 1

    def pending(self) -> int:
        return len(self._held)

    def close(self) -> None:
        for entry in self._held.values():
            release(self._cache, entry.held)
        self._held.clear()
        super().close()
        self.releases.close()


# -- receiver (decode) ----------------------------------------------------------------------
@dataclasses.dataclass
class _Copy:
    handoff: KVHandoff
    logical: dict[str, list[int]]
    buffers: dict[str, torch.Tensor]
    done: torch.cuda.Event
    since: int


class CudaIpcReceiver(KVReceiver):
    backend = "cuda_ipc"

    def __init__(self, releases: Sequence[Channel], replica: int, device: torch.device | str, **kwargs):
        """`releases`: a PUSH to each prefill replica's `kv_release` channel, in replica order."""
        super().__init__(**kwargs)
        self.releases, self.replica, self.device = list(releases), replica, torch.device(device)
        self._pools: dict[int, tuple[bytes, dict]] = {}  # prefill replica -> (its first handle, mapped pool)
        self._copies: deque[_Copy] = deque()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def accept(self, handoff: KVHandoff) -> None:
        now = time.time_ns()
        pages = handoff.device_pages
        if pages is None:
            self._ready.append(missing_device_pages(handoff, "cuda_ipc", now))
            return
        if handoff.request_id in self._cancelled:
            self._release(pages, handoff.request_id)
            return
        try:
            self._copies.append(self._start_copy(handoff, pages, now))
        except (PayloadError, RuntimeError, TypeError, ValueError) as exc:  # RuntimeError: a handle CUDA cannot open
            self._release(pages, handoff.request_id)
            self._ready.append(Arrival(handoff.request_id, handoff, None, f"bad cuda_ipc handoff: {exc}", BAD_DATA,
                                       since_ns=now))

    def _start_copy(self, handoff: KVHandoff, pages: DevicePages, now: int) -> _Copy:
        if not 0 <= pages.source < len(self.releases):
            raise PayloadError(f"source replica {pages.source} is not one of {len(self.releases)} prefill replicas")
        if handoff.kv_dtype not in DTYPES:
            raise PayloadError(f"kv_dtype {handoff.kv_dtype!r} is not one of {sorted(DTYPES)}")
        logical = {name: [int(p) for p in getattr(handoff, field)] for name, field in _FIELD.items()
                   if getattr(handoff, field) is not None}
        shapes = parse_shapes(pages.shapes, logical)
        pool = self._pool(pages, shapes, DTYPES[handoff.kv_dtype])
        physical, start = {}, 0
        for name in shapes:
            physical[name] = pages.physical[start:start + len(logical[name])]
            start += len(logical[name])
            pool_pages = pool[name][0].shape[1]
            if len(physical[name]) != len(logical[name]) or not all(0 <= p < pool_pages for p in physical[name]):
                raise PayloadError(f"group {name}: physical pages do not match the page list or the pool")
        if start != len(pages.physical):
            raise PayloadError(f"{len(pages.physical)} physical pages for {start} logical ones")
        source = next(iter(pool.values()))[0].device
        src_stream, dst_stream = self._stream(source), self._stream(self.device)
        src_stream.wait_stream(torch.cuda.current_stream(source))
        dst_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(src_stream), torch.cuda.stream(dst_stream):
            buffers = {name: pack_group(k, v, physical[name]).to(self.device, non_blocking=True)
                       for name, (k, v) in pool.items() if name in shapes}
            done = torch.cuda.Event()
            done.record(dst_stream)
        return _Copy(handoff, logical, buffers, done, now)

    def _pool(self, pages: DevicePages, shapes: dict, dtype: torch.dtype) -> dict:
        key = pages.pool_handles[0] if pages.pool_handles else b""
        known = self._pools.get(pages.source)
        if known is None or known[0] != key:  # first handoff of this prefill replica, or a new pool
            self._pools[pages.source] = (key, open_pool(pages, shapes, dtype))
        return self._pools[pages.source][1]

    def poll(self) -> list[Arrival]:
        while self._copies and self._copies[0].done.query():
            copy = self._copies.popleft()
            pages = copy.handoff.device_pages
            self._release(pages, copy.handoff.request_id)  # copied out: prefill may free them
            if copy.handoff.request_id in self._cancelled:
                continue
            current = torch.cuda.current_stream(self.device)
            for buffer in copy.buffers.values():
                buffer.record_stream(current)  # the cache scatter reads it on the engine's stream
            self._ready.append(self._arrival(copy.handoff, lambda: unpack_payload(copy.handoff.num_tokens,
                                                                                  copy.logical, copy.buffers),
                                             copy.since))
        return super().poll()

    def _release(self, pages: DevicePages, request_id: str) -> None:
        if 0 <= pages.source < len(self.releases):
            self.releases[pages.source].send(KVRelease(self.replica, pages.serial, request_id))

    def pending(self) -> int:
        return len(self._copies)

    def close(self) -> None:
        for channel in self.releases:
            channel.close()

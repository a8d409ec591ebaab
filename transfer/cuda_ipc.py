"""Transfer backend `cuda_ipc`: decode copies the pages straight out of prefill's KV pool.

Prefill shares its pool once: per pool tensor (K and V of each layer group) the CUDA IPC
handle of its storage (`torch.UntypedStorage._share_cuda_`: bytes and ints, msgpack-safe,
never pickle), carried in every handoff's `device_pages` (a few hundred bytes), so a restarted
decode replica, or a restarted prefill with a new pool, is mapped afresh. Decode maps each
pool once per (prefill replica, handle) with `_new_shared_cuda`.

One handoff: prefill makes sure the sequence's KV is written, takes a reference on its pages
(`device_pages.hold`: freeing the sequence leaves them allocated) and pushes the control
`KVHandoff` with the pages' places in its pool. Decode maps the pool (on prefill's device, in
its own process), and the handoff becomes at once an `Arrival` whose payload views the mapped
pool with the pages' places (`GroupPages.physical`): no staging buffer. The engine actor's
import (`kv_pages.import_pages`, `copy_pages`) then moves them straight from prefill's pool into
its own cache pages: runs of consecutive pages as device copies that prefill's GPU's copy engine
pushes over the link (no kernel on prefill's SMs), scattered pages as a gather there, one copy
and a scatter; within one GPU one kernel; no host round trip. The engine actor tells
the receiver (`imported`), which records an event after the copy and, once it has passed,
sends `KVRelease` to that prefill replica (its `kv_release` channel). Prefill frees the pages
on the release, or after `hold_timeout_s` if none comes (a decode replica that died); a
handoff decode drops (cancelled, unusable) is released at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Sequence

import numpy as np
import torch

from actors.messages import DevicePages, KVHandoff, KVRelease, MessageError
from actors.transport import Channel

from .backend import BAD_DATA, SPIN_S, Arrival, KVReceiver, KVSender, SendReport, missing_device_pages
from .device_pages import (DTYPES, HeldPages, handoff_logical, held_pages, hold, page_fields, parse_shapes,
                           release, shapes_of)
from .kv_pages import GroupPages, KVPayload, PayloadError

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
    torch.cuda.init()  # opening a handle before CUDA is initialised in this process crashes it
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
        pages = page_fields(held)
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
class _Reading:
    """A handoff whose pages decode reads out of prefill's pool: released once `done` is passed."""

    pages: DevicePages
    request_id: str
    done: torch.cuda.Event | None = None  # recorded after the engine's import; None until then


class CudaIpcReceiver(KVReceiver):
    on_device = True
    backend = "cuda_ipc"

    def __init__(self, releases: Sequence[Channel], replica: int, device: torch.device | str, **kwargs):
        """`releases`: a PUSH to each prefill replica's `kv_release` channel, in replica order."""
        super().__init__(**kwargs)
        self.releases, self.replica, self.device = list(releases), replica, torch.device(device)
        self._pools: dict[int, tuple[bytes, dict]] = {}  # prefill replica -> (its first handle, mapped pool)
        self._reading: dict[str, _Reading] = {}  # request id -> pages until the import has read them
        self.mapped_on: dict[int, str] = {}  # prefill replica -> the device its pool is mapped on

    def accept(self, handoff: KVHandoff) -> None:
        now = time.time_ns()
        pages = handoff.device_pages
        if pages is None:
            self._ready.append(missing_device_pages(handoff, "cuda_ipc", now))
            return
        if handoff.request_id in self._cancelled or handoff.request_id in self._reading:
            self._release(pages, handoff.request_id)
            if handoff.request_id not in self._cancelled:
                self._ready.append(Arrival(handoff.request_id, handoff, None, "a second handoff for a request whose "
                                           "pages are still being read", BAD_DATA, since_ns=now))
            return
        try:
            payload = self._payload(handoff, pages)
        except (PayloadError, RuntimeError, TypeError, ValueError) as exc:  # RuntimeError: a handle CUDA cannot open
            self._release(pages, handoff.request_id)
            self._ready.append(Arrival(handoff.request_id, handoff, None, f"bad cuda_ipc handoff: {exc}", BAD_DATA,
                                       since_ns=now))
            return
        self._reading[handoff.request_id] = _Reading(pages, handoff.request_id)
        self._ready.append(Arrival(handoff.request_id, handoff, payload, nbytes=payload.nbytes, since_ns=now))

    def _payload(self, handoff: KVHandoff, pages: DevicePages) -> KVPayload:
        """The handoff's pages as a view of prefill's mapped pool (no copy: the engine's import
        reads them in place)."""
        if not 0 <= pages.source < len(self.releases):
            raise PayloadError(f"source replica {pages.source} is not one of {len(self.releases)} prefill replicas")
        if handoff.kv_dtype not in DTYPES:
            raise PayloadError(f"kv_dtype {handoff.kv_dtype!r} is not one of {sorted(DTYPES)}")
        logical = handoff_logical(handoff)
        shapes = parse_shapes(pages.shapes, logical)
        pool = self._pool(pages, shapes, DTYPES[handoff.kv_dtype])
        physical = np.asarray(pages.physical, dtype=np.int64)
        if physical.shape != (sum(len(p) for p in logical.values()),):
            raise PayloadError(f"{len(pages.physical)} physical pages for {sum(len(p) for p in logical.values())} "
                               "logical ones")
        groups, start = {}, 0
        for name in shapes:
            k, v = pool[name]
            places = physical[start:start + len(logical[name])]
            start += len(logical[name])
            if places.size and not (0 <= places.min() and places.max() < k.shape[1]):
                raise PayloadError(f"group {name}: physical pages outside the pool's {k.shape[1]}")
            groups[name] = GroupPages(tuple(logical[name]), k, v, torch.from_numpy(places))
        return KVPayload(handoff.num_tokens, groups)

    def _pool(self, pages: DevicePages, shapes: dict, dtype: torch.dtype) -> dict:
        key = pages.pool_handles[0] if pages.pool_handles else b""
        known = self._pools.get(pages.source)
        if known is None or known[0] != key:  # first handoff of this prefill replica, or a new pool
            pool = open_pool(pages, shapes, dtype)
            self._pools[pages.source] = (key, pool)
            self.mapped_on[pages.source] = str(next(iter(pool.values()))[0].device)
        return self._pools[pages.source][1]

    def imported(self, request_id: str) -> None:
        reading = self._reading.get(request_id)
        if reading is not None and reading.done is None:
            reading.done = torch.cuda.Event()
            reading.done.record(torch.cuda.current_stream(self.device))

    def poll(self) -> list[Arrival]:
        for request_id in [r for r, reading in self._reading.items() if reading.done is not None
                           and reading.done.query()]:
            reading = self._reading.pop(request_id)
            self._release(reading.pages, request_id)  # read: prefill may free them
        return super().poll()

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not any(r.done is None or r.done.query() for r in self._reading.values()):
            time.sleep(SPIN_S)

    def discard(self, request_id: str) -> None:
        dropped = [a for a in self._ready if a.request_id == request_id]
        super().discard(request_id)
        if dropped:
            self.imported(request_id)  # never imported: released once the stream is past now

    def _release(self, pages: DevicePages, request_id: str) -> None:
        if 0 <= pages.source < len(self.releases):
            self.releases[pages.source].send(KVRelease(self.replica, pages.serial, request_id))

    def pending(self) -> int:
        return len(self._reading)

    def close(self) -> None:
        for channel in self.releases:
            channel.close()

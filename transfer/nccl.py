"""Transfer backend `nccl`: KV pages as point-to-point sends between GPUs, on any node.

Every (prefill replica, decode replica) pair has its own 2-rank process group (prefill rank 0,
decode rank 1), built from `torch.distributed`'s backend classes directly: no global default
group, no `init_process_group`. Rendezvous: each decode replica hosts a `TCPStore` at its
`kv_store` endpoint (`Wiring.kv_store`, a TCP port even on one node); the pair's keys live
under the prefix `pair-{prefill replica}/`. Both sides build their groups in background
threads at start-up and exchange a one-element handshake on them, so the NCCL communicator
exists before the first handoff and neither actor waits for the other to start.

One handoff: the sender gathers each layer group's pages into one contiguous buffer
(`device_pages.pack_group`) when the sequence is handed over, pushes the control `KVHandoff`
(page lists, `kv_dtype`, and `device_pages` with the source replica, a serial number and each
group's shape; no page data) to the decode replica, then posts one async send per group,
tagged by serial and group; buffers stay referenced until their sends complete. The receiver
posts the matching receives as soon as it accepts the control message, into buffers of the
announced sizes (not its own cache's: a mismatch must not desynchronise the pair), and when
they complete views them as a `KVPayload`, which the engine actor checks and scatters into its
cache like any other. Controls of one pair travel on one ZeroMQ socket, in order, so receives
are posted in the order of the sends (NCCL matches point-to-point operations by order). A
handoff whose request was cancelled is still received in full, then dropped.

The process-group backend is a parameter: "nccl" between GPUs; "gloo" runs the same protocol
between CPU processes, which is how CI tests it.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections import deque
from datetime import timedelta
from typing import Callable, Sequence

import torch

from actors.messages import DevicePages, KVHandoff
from actors.transport import Channel

from .backend import BAD_DATA, DATA_LOST, SPIN_S, Arrival, KVReceiver, KVSender, SendReport, missing_device_pages
from .device_pages import (DTYPES, GROUP_ORDER, HeldPages, as_bytes, empty_buffers, handoff_logical, held_pages,
                           pack_payload, page_fields, parse_shapes, shapes_of, unpack_payload)
from .kv_pages import PayloadError

PROCESS_GROUPS = ("nccl", "gloo")


def tag(serial: int, group: int) -> int:
    """The point-to-point tag of one group of one handoff (gloo matches by it; NCCL by order)."""
    return (serial % (1 << 29)) * 2 + group + 2  # 0 and 1: the handshake


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """"tcp://host:port" -> (host, port)."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"a process-group store needs a tcp:// endpoint, got {endpoint!r}")
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    return host, int(port)


def new_pair_group(store, rank: int, process_group: str, device: torch.device, timeout_s: float):
    """A 2-rank process-group backend on `store`, built directly (no default group)."""
    from torch._C._distributed_c10d import ProcessGroupGloo

    timeout = timedelta(seconds=timeout_s)
    if process_group == "gloo":
        return ProcessGroupGloo(store, rank, 2, timeout)
    from torch._C._distributed_c10d import ProcessGroupNCCL

    torch.cuda.set_device(device)  # this thread's device: NCCL builds its communicator there
    options = ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return ProcessGroupNCCL(store, rank, 2, options)


class PairGroup:
    """One pair's process group, connected in a background thread; `get` waits for it."""

    def __init__(self, connect: Callable[[], object], name: str):
        self.name = name
        self._group = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._run, args=(connect,), name=name, daemon=True).start()

    def _run(self, connect) -> None:
        try:
            self._group = connect()
        except BaseException as exc:  # reported to whoever needs the group
            self._error = exc
        finally:
            self._ready.set()

    def abort(self) -> None:
        """At stop: drop the communicator without waiting on a peer that may be gone."""
        if self._ready.is_set() and self._group is not None:
            try:
                self._group.abort()
            except (RuntimeError, AttributeError):  # a backend without abort, or already down
                pass

    def get(self, timeout_s: float):
        if not self._ready.wait(timeout_s):
            raise ConnectionError(f"{self.name}: process group not connected after {timeout_s:g} s")
        if self._error is not None:
            raise ConnectionError(f"{self.name}: process group failed to connect: {self._error}")
        return self._group


def connect_pair(store_endpoint: str, prefill: int, rank: int, process_group: str, device: torch.device,
                 timeout_s: float, server=None):
    """Rendezvous of prefill replica `prefill` with one decode replica; `server`: decode's own
    store (rank 1), else a client of it is made (rank 0). Ends with a handshake message."""
    from torch._C._distributed_c10d import PrefixStore, TCPStore

    if server is None:
        host, port = parse_endpoint(store_endpoint)
        server = TCPStore(host, port, None, False, timedelta(seconds=timeout_s))
    group = new_pair_group(PrefixStore(f"pair-{prefill}/", server), rank, process_group, device, timeout_s)
    probe = torch.zeros(1, device=device)
    work = group.send([probe], 1, 0) if rank == 0 else group.recv([probe], 0, 0)
    work.wait()
    return group


class Completions:
    """Which posted point-to-point works have completed. NCCL works answer `is_completed` (a
    CUDA event query); gloo's complete only inside `wait`, so a thread waits on them in posting
    order. `done()` gives (key, error or None) of the finished ones, in posting order."""

    def __init__(self, process_group: str, name: str):
        self.threaded = process_group != "nccl"
        self._posted: deque = deque()  # (key, works); nccl
        self._count = 0
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        if self.threaded:
            self._todo: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._wait_all, name=name, daemon=True).start()

    def __len__(self) -> int:
        return self._count

    def add(self, key, works: list) -> None:
        self._count += 1
        (self._todo.put if self.threaded else self._posted.append)((key, works))

    def _wait_all(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            key, works = item
            self._finished.put((key, _wait(works)))

    def any_done(self) -> bool:
        """Whether `done()` would give something now."""
        if self.threaded:
            return not self._finished.empty()
        return bool(self._posted) and all(w.is_completed() for w in self._posted[0][1])

    def done(self) -> list:
        out = []
        if not self.threaded:
            while self._posted and all(w.is_completed() for w in self._posted[0][1]):
                key, works = self._posted.popleft()
                out.append((key, _wait(works)))  # surfaces an error; orders this stream after the transfer
        while True:
            try:
                out.append(self._finished.get_nowait())
            except queue.Empty:
                break
        self._count -= len(out)
        return out

    def close(self) -> None:
        if self.threaded:
            self._todo.put(None)


def _wait(works: list) -> str | None:
    try:
        for work in works:
            work.wait()
    except Exception as exc:  # the peer died or the transfer timed out
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclasses.dataclass(frozen=True)
class PackedPages:
    """What `NcclSender.export` takes out of the cache: the pages' places and their send buffers."""

    held: HeldPages
    shapes: list[int]
    kv_dtype: str
    buffers: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class NcclSender(KVSender):
    backend = "nccl"

    def __init__(self, controls: Sequence[Channel], groups: Sequence[PairGroup], source: int,
                 process_group: str = "nccl", connect_timeout_s: float = 300.0):
        super().__init__(controls)
        if len(groups) != len(controls):
            raise ValueError(f"{len(controls)} decode replicas but {len(groups)} process groups")
        self.groups, self.source, self.connect_timeout_s = list(groups), source, connect_timeout_s
        self._serials = [itertools.count(1) for _ in groups]
        self._sends = Completions(process_group, f"nccl-send-{source}")
        self.failed: list[str] = []  # sends that completed with an error (the decode replica is gone)

    def export(self, cache, seq_id: int, reach_back: int = 0) -> PackedPages:
        held = held_pages(cache, seq_id, reach_back)
        kv_dtype = str(next(iter(cache.groups.values())).k.dtype).removeprefix("torch.")
        return PackedPages(held, shapes_of(cache, held), kv_dtype, pack_payload(cache, held))

    def send(self, handoff: KVHandoff, payload: PackedPages) -> SendReport:
        replica = next(self._turn)
        group = self.groups[replica].get(self.connect_timeout_s)  # ConnectionError: this request fails
        serial = next(self._serials[replica])
        held = payload.held
        pages = page_fields(held)
        control = dataclasses.replace(handoff, num_tokens=held.num_tokens, kv_dtype=payload.kv_dtype, **pages,
                                      data_ref=f"nccl:{self.source}:{serial}",
                                      device_pages=DevicePages(self.source, serial, payload.shapes))
        self.controls[replica].send(control)  # first: the receiver posts its receives when it reads it
        try:
            works = [group.send([as_bytes(payload.buffers[name])], 1, tag(serial, i))
                     for i, name in enumerate(GROUP_ORDER) if name in payload.buffers]
        except RuntimeError as exc:
            raise ConnectionError(f"nccl send to decode replica {replica} failed: {exc}") from exc
        self._sends.add((handoff.request_id, payload.buffers), works)  # buffers live until the sends complete
        return SendReport(replica, payload.nbytes, held.num_pages)

    def poll(self) -> None:
        for (request_id, _), error in self._sends.done():
            if error is not None:
                self.failed.append(f"{request_id}: {error}")

    def pending(self) -> int:
        return len(self._sends)

    def close(self) -> None:
        super().close()
        self._sends.close()
        for group in self.groups:
            group.abort()


class NcclReceiver(KVReceiver):
    on_device = True
    backend = "nccl"

    def __init__(self, groups: Sequence[PairGroup], device: torch.device | str, process_group: str = "nccl",
                 connect_timeout_s: float = 300.0, store=None, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.device, self.connect_timeout_s = list(groups), torch.device(device), connect_timeout_s
        self.store = store  # this replica's rendezvous server: alive as long as the receiver
        self._next = [1] * len(groups)
        self._recvs = Completions(process_group, "nccl-recv")
        self.received = self.dropped = 0  # handoffs whose pages arrived; of those, cancelled ones dropped

    def accept(self, handoff: KVHandoff) -> None:
        now = time.time_ns()
        pages = handoff.device_pages
        if pages is None:
            self._ready.append(missing_device_pages(handoff, "nccl", now))
            return
        try:
            buffers, logical, group = self._prepare(handoff, pages)
        except (PayloadError, ConnectionError) as exc:
            # nothing can be received for it; a later handoff of this pair may still be
            self._ready.append(Arrival(handoff.request_id, handoff, None, f"bad nccl handoff: {exc}", BAD_DATA,
                                       since_ns=now))
            return
        works = [group.recv([as_bytes(buffers[name])], 0, tag(pages.serial, i))
                 for i, name in enumerate(GROUP_ORDER) if name in buffers]
        self._recvs.add((handoff, logical, buffers, now), works)  # a cancelled one is still received, then dropped

    def _prepare(self, handoff: KVHandoff, pages: DevicePages):
        if not 0 <= pages.source < len(self.groups):
            raise PayloadError(f"source replica {pages.source} is not one of {len(self.groups)} prefill replicas")
        if pages.serial != self._next[pages.source]:
            raise PayloadError(f"handoff {pages.serial} of prefill {pages.source} arrived, "
                               f"{self._next[pages.source]} was due: the pair's transfers are out of order")
        if handoff.kv_dtype not in DTYPES:
            raise PayloadError(f"kv_dtype {handoff.kv_dtype!r} is not one of {sorted(DTYPES)}")
        logical = handoff_logical(handoff)
        shapes = parse_shapes(pages.shapes, logical)
        group = self.groups[pages.source].get(self.connect_timeout_s)
        self._next[pages.source] += 1
        return empty_buffers(shapes, DTYPES[handoff.kv_dtype], self.device), logical, group

    def poll(self) -> list[Arrival]:
        for (handoff, logical, buffers, since), error in self._recvs.done():
            self.received += error is None
            if handoff.request_id in self._cancelled:
                self.dropped += 1
                continue  # received in full (the pair stays in step), then dropped
            if error is not None:
                self._ready.append(Arrival(handoff.request_id, handoff, None, f"the KV pages of this handoff did "
                                           f"not arrive: {error}", DATA_LOST, since_ns=since))
            else:
                self._ready.append(self._arrival(handoff, lambda: unpack_payload(handoff.num_tokens, logical,
                                                                                 buffers), since))
        return super().poll()

    def pending(self) -> int:
        return len(self._recvs)

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._recvs.any_done():
            time.sleep(SPIN_S)

    def close(self) -> None:
        self._recvs.close()
        for group in self.groups:
            group.abort()


def make_nccl_sender(controls: Sequence[Channel], store_endpoints: Sequence[str], source: int,
                     device: torch.device | str, process_group: str = "nccl",
                     timeout_s: float = 300.0) -> NcclSender:
    """Prefill replica `source`: one pair group per decode replica (stores in replica order)."""
    if len(store_endpoints) != len(controls):
        raise ValueError(f"nccl needs one kv_store endpoint per decode replica, got {len(store_endpoints)} "
                         f"for {len(controls)}")
    device = torch.device(device)
    groups = [PairGroup(lambda e=endpoint: connect_pair(e, source, 0, process_group, device, timeout_s),
                        f"nccl-pair-p{source}-d{d}") for d, endpoint in enumerate(store_endpoints)]
    return NcclSender(controls, groups, source, process_group, timeout_s)


def make_nccl_receiver(store_endpoint: str, prefill_replicas: int, device: torch.device | str,
                       process_group: str = "nccl", timeout_s: float = 300.0) -> NcclReceiver:
    """A decode replica: hosts its rendezvous store, one pair group per prefill replica."""
    from torch._C._distributed_c10d import TCPStore

    host, port = parse_endpoint(store_endpoint)
    store = TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)
    device = torch.device(device)
    groups = [PairGroup(lambda p=p: connect_pair(store_endpoint, p, 1, process_group, device, timeout_s, store),
                        f"nccl-pair-p{p}") for p in range(prefill_replicas)]
    return NcclReceiver(groups, device, process_group, timeout_s, store)

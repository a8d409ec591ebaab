"""The KV handoff's data plane: one interface, one backend per topology `[transfer] backend`.

A prefill actor hands a request over with `KVSender.send(handoff, payload)`: it picks the decode
replica itself (round-robin, so the pages and the control message go to the same one), moves
the pages its way and pushes the control `KVHandoff` to that replica's inbox. The decode actor
passes every `KVHandoff` from its inbox to `KVReceiver.accept` and collects, each loop, the
handoffs whose pages are here with `KVReceiver.poll()`: a list of `Arrival`s, each either
(handoff, payload) or an error for one request (which then ends with a `RequestError`).

Backends:
- `inline`: the pages ride in the `KVHandoff` itself (numpy frames on the control socket).
- `shm` (one host): the pages go into a POSIX shared-memory segment (`transfer/shm.py`); the
  handoff carries only its name (`data_ref`); the receiver copies it out and unlinks it.
- `tcp` (across hosts): the pages go as a `KVData` message on a dedicated ZeroMQ channel to the
  chosen replica's `kv_data` endpoint; the receiver matches data and control by `data_ref` in
  either arrival order, holding at most `max_pending` unmatched parts (`max_pending_bytes` of
  data) for at most `timeout_s`; what overflows or times out fails its request.
- `nccl` (GPUs, across nodes; `transfer/nccl.py`): the pages go, one contiguous buffer per layer
  group, as point-to-point sends on a 2-rank process group per (prefill, decode) replica pair;
  the handoff carries their sizes (`device_pages`), the receiver posts the matching receives.
- `cuda_ipc` (GPUs of one host; `transfer/cuda_ipc.py`): decode maps prefill's KV pool through
  CUDA IPC handles and copies the pages out itself; prefill keeps them until decode's
  `KVRelease` (or a timeout).

A sender also says how pages leave the cache (`KVSender.export`: a copy for the CPU backends,
a gather into send buffers for `nccl`, a hold on the pages in place for `cuda_ipc`), and has a
`poll` the prefill actor calls every loop (sends completing, pages released).

A cancelled request's parts are dropped wherever they are, and ones still to come are dropped
on arrival (a segment unlinked unread): `KVReceiver.discard`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import zmq

from actors.handoff import page_arrays, payload_from_arrays, payload_of
from actors.messages import KVData, KVHandoff, MessageError
from actors.transport import Channel, pull, push

from . import shm
from .kv_pages import KVPayload, PayloadError, export_pages

BACKENDS = ("inline", "shm", "tcp", "cuda_ipc", "nccl")
GPU_BACKENDS = ("cuda_ipc", "nccl")
BAD_DATA = 502  # the pages that arrived are unusable
DATA_LOST = 504  # one half of a handoff never came
RECEIVER_FULL = 503


class TransferBackendError(ValueError):
    """A transfer backend this build cannot run."""


def check_backend(backend: str, process_group: str = "nccl") -> None:
    """Refuse a backend this machine cannot run: unknown, or a GPU one without CUDA (`nccl` runs
    its protocol over gloo, on CPU, when `process_group` is "gloo")."""
    if backend not in BACKENDS:
        raise TransferBackendError(f"unknown transfer backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "cuda_ipc" and not torch.cuda.is_available():
        raise TransferBackendError("transfer backend 'cuda_ipc' maps one process's GPU memory into another: "
                                   "this machine has no CUDA device (torch.cuda.is_available() is False); "
                                   "CPU actors use 'shm' (one host) or 'tcp'")
    if backend == "nccl":
        if process_group not in ("nccl", "gloo"):
            raise TransferBackendError(f"the nccl transfer backend runs on a 'nccl' or 'gloo' process group, "
                                       f"not {process_group!r}")
        nccl = dist.is_available() and dist.is_nccl_available()
        if process_group == "nccl" and not (torch.cuda.is_available() and nccl):
            raise TransferBackendError("transfer backend 'nccl' needs CUDA devices and a torch built with NCCL "
                                       f"(cuda available: {torch.cuda.is_available()}, nccl: {nccl}); "
                                       "CPU actors use 'shm' (one host) or 'tcp'")


def num_pages(payload: KVPayload) -> int:
    return sum(len(g.logical) for g in payload.groups.values())


@dataclass(frozen=True)
class SendReport:
    """What one handoff cost: the replica it went to, K/V bytes and pages moved."""

    replica: int
    nbytes: int
    pages: int


@dataclass(frozen=True)
class Arrival:
    """A handoff ready to adopt (`payload` set) or failed (`error` set, `code` HTTP-like)."""

    request_id: str
    handoff: KVHandoff | None  # None when only its data came and the control never did
    payload: KVPayload | None
    error: str | None = None
    code: int = 0
    nbytes: int = 0
    since_ns: int = 0  # wall clock (time.time_ns) when its first part reached the receiver

    @property
    def pages(self) -> int:
        return num_pages(self.payload) if self.payload is not None else 0


# -- senders ------------------------------------------------------------------------------
def missing_device_pages(handoff: KVHandoff, backend: str, now_ns: int) -> Arrival:
    """The failure of a GPU-backend handoff that came without `device_pages` (a misconfigured pair)."""
    return Arrival(handoff.request_id, handoff, None, f"the {backend} receiver got a handoff without device_pages: "
                   "prefill and decode disagree on the backend", BAD_DATA, since_ns=now_ns)


class KVSender:
    """Sends handoffs to decode replicas round-robin; this base class carries the pages inline."""

    backend = "inline"

    def __init__(self, controls: Sequence[Channel]):
        if not controls:
            raise ValueError("a KV sender needs at least one decode replica")
        self.controls = list(controls)
        self._turn = itertools.cycle(range(len(self.controls)))
        self._refs = itertools.count()

    def export(self, cache, seq_id: int, reach_back: int = 0) -> KVPayload:
        """Take a handed-over sequence's pages out of `cache` (with `reach_back` sliding positions
        more, as `export_pages`), before the sequence is freed there; what it returns goes to
        `send`. The CPU backends copy the pages out."""
        return export_pages(cache, seq_id, reach_back)

    def poll(self) -> None:
        """Called every loop of the prefill actor: the GPU backends finish sends and free pages here."""

    def pending(self) -> int:
        """Handoffs whose pages this sender still holds."""
        return 0

    def send(self, handoff: KVHandoff, payload: KVPayload) -> SendReport:
        """Move `payload` and push `handoff` (built without pages) to the next replica."""
        replica = next(self._turn)
        arrays, kv_dtype = page_arrays(payload)
        data_ref = self._ship(replica, handoff.request_id, payload.num_tokens, kv_dtype, arrays)
        control = dataclasses.replace(handoff, num_tokens=payload.num_tokens, kv_dtype=kv_dtype, data_ref=data_ref)
        if control.data_ref is None:
            control = dataclasses.replace(control, **arrays)
        self.controls[replica].send(control)
        return SendReport(replica, payload.nbytes, num_pages(payload))

    def _ship(self, replica: int, request_id: str, num_tokens: int, kv_dtype: str, arrays: dict) -> str | None:
        """Move the arrays apart from the control message; returns their `data_ref` (None: inline)."""
        return None

    def _new_ref(self) -> str:
        return f"{os.getpid()}-{next(self._refs)}"

    def close(self) -> None:
        for channel in self.controls:
            channel.close()


class ShmSender(KVSender):
    backend = "shm"

    def __init__(self, controls: Sequence[Channel], run_id: str, directory: Path = shm.SHM_DIR):
        super().__init__(controls)
        self.run_id, self.directory = run_id, directory
        shm.segment_prefix(run_id)  # refuse a bad run id now, not at the first handoff

    def _ship(self, replica, request_id, num_tokens, kv_dtype, arrays) -> str:
        name = shm.segment_prefix(self.run_id) + self._new_ref()
        shm.write_segment(name, self.run_id, num_tokens, kv_dtype, arrays, self.directory)
        return name


class TcpSender(KVSender):
    backend = "tcp"

    def __init__(self, controls: Sequence[Channel], data: Sequence[Channel]):
        super().__init__(controls)
        if len(data) != len(controls):
            raise ValueError(f"{len(controls)} decode replicas but {len(data)} kv_data endpoints")
        self.data = list(data)

    def _ship(self, replica, request_id, num_tokens, kv_dtype, arrays) -> str:
        ref = self._new_ref()
        self.data[replica].send(KVData(ref, request_id, num_tokens, kv_dtype, **arrays))
        return ref

    def close(self) -> None:
        super().close()
        for channel in self.data:
            channel.close()


# -- receivers ----------------------------------------------------------------------------
SPIN_S = 50e-6  # how often a receiver waiting on the device looks again


class KVReceiver:
    """Turns arriving handoffs into `Arrival`s; this base class reads pages carried inline."""

    backend = "inline"
    on_device = False  # pending parts complete on the GPU (`wait` looks at them), not on a socket

    def __init__(self, remember_cancelled: int = 4096):
        self._ready: list[Arrival] = []
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_cancelled

    def accept(self, handoff: KVHandoff) -> None:
        """A `KVHandoff` came in on the control plane."""
        if handoff.request_id in self._cancelled:
            self._drop(handoff)
        elif handoff.data_ref is None:
            self._ready.append(self._arrival(handoff, lambda: payload_of(handoff), time.time_ns()))
        else:
            self._accept_ref(handoff, time.time_ns())

    def poll(self) -> list[Arrival]:
        """Handoffs whose pages are here, and failed ones, since the last poll."""
        ready, self._ready = self._ready, []
        return ready

    def discard(self, request_id: str) -> None:
        """The request was cancelled: drop its parts here and any that arrive later."""
        self._ready = [a for a in self._ready if a.request_id != request_id]
        self._cancelled[request_id] = None
        while len(self._cancelled) > self._remember:
            self._cancelled.popitem(last=False)

    def pending(self) -> int:
        """Parts held while waiting for their other half."""
        return 0

    def imported(self, request_id: str) -> None:
        """The engine has imported this arrival's pages (or dropped it): the GPU backends free
        what they hold for it once the device is past the import."""

    def wait(self, timeout_s: float) -> None:
        """Block up to `timeout_s` until something pending may be ready (an idle engine waiting
        for a device transfer calls this rather than sleeping a fixed poll interval)."""
        time.sleep(timeout_s)  # the GPU backends look at their events

    def close(self) -> None:
        pass

    def _accept_ref(self, handoff: KVHandoff, now: int) -> None:
        self._ready.append(Arrival(handoff.request_id, handoff, None, f"a {self.backend} receiver cannot "
                                   f"resolve data_ref {handoff.data_ref!r}: prefill and decode disagree on the backend",
                                   BAD_DATA, since_ns=now))

    def _drop(self, handoff: KVHandoff) -> None:
        pass

    @staticmethod
    def _arrival(handoff: KVHandoff, load, since_ns: int) -> Arrival:
        try:
            payload = load()
        except (PayloadError, shm.SegmentError) as exc:
            return Arrival(handoff.request_id, handoff, None, f"bad KV handoff: {exc}", BAD_DATA, since_ns=since_ns)
        return Arrival(handoff.request_id, handoff, payload, nbytes=payload.nbytes, since_ns=since_ns)


class ShmReceiver(KVReceiver):
    backend = "shm"

    def __init__(self, run_id: str, directory: Path = shm.SHM_DIR, **kwargs):
        super().__init__(**kwargs)
        self.run_id, self.directory = run_id, directory

    def _accept_ref(self, handoff: KVHandoff, now: int) -> None:
        def load() -> KVPayload:
            num_tokens, kv_dtype, arrays, _ = shm.read_segment(handoff.data_ref, self.run_id, self.directory)
            return payload_from_arrays(num_tokens, kv_dtype, arrays)

        self._ready.append(self._arrival(handoff, load, now))

    def _drop(self, handoff: KVHandoff) -> None:
        if handoff.data_ref is not None:
            shm.unlink_segment(handoff.data_ref, self.run_id, self.directory)


class TcpReceiver(KVReceiver):
    backend = "tcp"

    def __init__(self, data: Channel, timeout_s: float = 10.0, max_pending: int = 256,
                 max_pending_bytes: int = 4 << 30, **kwargs):
        super().__init__(**kwargs)
        self.data = data
        self.timeout_ns = int(timeout_s * 1e9)
        self.max_pending, self.max_pending_bytes = max_pending, max_pending_bytes
        self._controls: dict[str, tuple[KVHandoff, int]] = {}  # data_ref -> (handoff, since)
        self._data: dict[str, tuple[KVData, int, int]] = {}  # data_ref -> (data, since, bytes)
        self.dropped_malformed = 0

    def poll(self) -> list[Arrival]:
        for _ in range(1024):  # bounded, so a flood cannot starve the decode loop
            try:
                msg = self.data.recv(timeout_ms=0)
            except MessageError:
                self.dropped_malformed += 1
                continue
            if msg is None:
                break
            if isinstance(msg, KVData):
                self._on_data(msg, time.time_ns())
            else:
                self.dropped_malformed += 1
        self._expire(time.time_ns())
        return super().poll()

    def pending(self) -> int:
        return len(self._controls) + len(self._data)

    def discard(self, request_id: str) -> None:
        super().discard(request_id)
        for ref in [r for r, (h, _) in self._controls.items() if h.request_id == request_id]:
            del self._controls[ref]
        for ref in [r for r, (d, _, _) in self._data.items() if d.request_id == request_id]:
            del self._data[ref]

    def close(self) -> None:
        self.data.close()

    def _accept_ref(self, handoff: KVHandoff, now: int) -> None:
        if handoff.data_ref in self._data:
            data, since, _ = self._data.pop(handoff.data_ref)
            self._ready.append(self._pair(handoff, data, since))
        else:
            self._controls[handoff.data_ref] = (handoff, now)
            self._bound()

    def _on_data(self, data: KVData, now: int) -> None:
        if data.request_id in self._cancelled:
            return
        if data.ref in self._controls:
            handoff, since = self._controls.pop(data.ref)
            self._ready.append(self._pair(handoff, data, since))
        else:
            nbytes = sum(getattr(data, f).nbytes for f in ("full_k", "full_v", "sliding_k", "sliding_v")
                         if getattr(data, f) is not None)
            self._data[data.ref] = (data, now, nbytes)
            self._bound()

    def _pair(self, handoff: KVHandoff, data: KVData, since: int) -> Arrival:
        if data.request_id != handoff.request_id:
            return Arrival(handoff.request_id, handoff, None, f"KV data {data.ref} belongs to request "
                           f"{data.request_id!r}, not {handoff.request_id!r}", BAD_DATA, since_ns=since)
        return self._arrival(handoff, lambda: payload_of(data), since)

    def _bound(self) -> None:
        """Fail the oldest unmatched parts while too many are held."""
        while self.pending() > self.max_pending or sum(b for _, _, b in self._data.values()) > self.max_pending_bytes:
            oldest = min([*((s, r, "c") for r, (_, s) in self._controls.items()),
                          *((s, r, "d") for r, (_, s, _) in self._data.items())])
            self._fail(oldest[1], oldest[2], RECEIVER_FULL, "decode's KV receive buffer is full "
                       f"({self.max_pending} parts / {self.max_pending_bytes} bytes waiting for their other half)")

    def _expire(self, now: int) -> None:
        for ref, (_, since) in list(self._controls.items()):
            if now - since > self.timeout_ns:
                self._fail(ref, "c", DATA_LOST, f"the KV data of this handoff did not arrive within "
                           f"{self.timeout_ns / 1e9:g} s")
        for ref, (_, since, _) in list(self._data.items()):
            if now - since > self.timeout_ns:
                self._fail(ref, "d", DATA_LOST, f"KV data arrived but its handoff did not within "
                           f"{self.timeout_ns / 1e9:g} s")

    def _fail(self, ref: str, kind: str, code: int, why: str) -> None:
        if kind == "c":
            handoff, since = self._controls.pop(ref)
            self._ready.append(Arrival(handoff.request_id, handoff, None, why, code, since_ns=since))
        else:
            data, since, _ = self._data.pop(ref)
            self._ready.append(Arrival(data.request_id, None, None, why, code, since_ns=since))


# -- construction from a topology ---------------------------------------------------------
def make_sender(backend: str, *, zctx: zmq.Context, decode_inboxes: Sequence[str],
                kv_data_endpoints: Sequence[str] = (), run_id: str | None = None,
                shm_dir: Path = shm.SHM_DIR, replica: int = 0, kv_store_endpoints: Sequence[str] = (),
                kv_release_endpoint: str | None = None, device: str = "cpu", process_group: str = "nccl",
                timeout_s: float = 300.0) -> KVSender:
    """A prefill actor's sender: one control PUSH per decode replica (inboxes in replica order),
    plus, for `tcp`, one data PUSH per replica (`kv_data_endpoints`, same order); for `nccl` a
    process group per decode replica (rendezvous at `kv_store_endpoints`, same order); for
    `cuda_ipc` this replica's bound `kv_release_endpoint`. `replica`: this prefill replica."""
    check_backend(backend, process_group)
    if backend == "nccl":
        from .nccl import make_nccl_sender

        return make_nccl_sender([push(zctx, e) for e in decode_inboxes], kv_store_endpoints, replica, device,
                                process_group, timeout_s)
    if backend == "cuda_ipc":
        from .cuda_ipc import CudaIpcSender

        if kv_release_endpoint is None:
            raise ValueError("the cuda_ipc backend needs this prefill replica's kv_release endpoint")
        return CudaIpcSender([push(zctx, e) for e in decode_inboxes], pull(zctx, kv_release_endpoint), replica)
    if backend == "shm" and run_id is None:
        raise ValueError("the shm backend needs the run id (its segments are named after it)")
    if backend == "tcp" and len(kv_data_endpoints) != len(decode_inboxes):
        raise ValueError(f"tcp needs one kv_data endpoint per decode replica, got {len(kv_data_endpoints)} "
                         f"for {len(decode_inboxes)}")
    controls = [push(zctx, endpoint) for endpoint in decode_inboxes]
    if backend == "shm":
        return ShmSender(controls, run_id, shm_dir)
    if backend == "tcp":
        return TcpSender(controls, [push(zctx, endpoint) for endpoint in kv_data_endpoints])
    return KVSender(controls)


def make_receiver(backend: str, *, zctx: zmq.Context | None = None, kv_data_endpoint: str | None = None,
                  run_id: str | None = None, shm_dir: Path = shm.SHM_DIR, timeout_s: float = 10.0,
                  max_pending: int = 256, replica: int = 0, kv_store_endpoint: str | None = None,
                  prefill_replicas: int = 1, kv_release_endpoints: Sequence[str] = (), device: str = "cpu",
                  process_group: str = "nccl", connect_timeout_s: float = 300.0) -> KVReceiver:
    """A decode replica's receiver; `tcp` binds this replica's `kv_data_endpoint`; `nccl` hosts
    the rendezvous of its process groups at `kv_store_endpoint`, one per prefill replica;
    `cuda_ipc` pushes releases to the prefill replicas' `kv_release_endpoints` (replica order)."""
    check_backend(backend, process_group)
    if backend == "nccl":
        from .nccl import make_nccl_receiver

        if kv_store_endpoint is None:
            raise ValueError("the nccl backend needs this decode replica's kv_store endpoint")
        return make_nccl_receiver(kv_store_endpoint, prefill_replicas, device, process_group, connect_timeout_s)
    if backend == "cuda_ipc":
        from .cuda_ipc import CudaIpcReceiver

        if zctx is None or len(kv_release_endpoints) < 1:
            raise ValueError("the cuda_ipc backend needs a ZeroMQ context and the prefill replicas' kv_release "
                             "endpoints")
        return CudaIpcReceiver([push(zctx, e) for e in kv_release_endpoints], replica, device)
    if backend == "shm":
        if run_id is None:
            raise ValueError("the shm backend needs the run id (its segments are named after it)")
        return ShmReceiver(run_id, shm_dir)
    if backend == "tcp":
        if zctx is None or kv_data_endpoint is None:
            raise ValueError("the tcp backend needs a ZeroMQ context and this replica's kv_data endpoint")
        return TcpReceiver(pull(zctx, kv_data_endpoint), timeout_s=timeout_s, max_pending=max_pending)
    return KVReceiver()

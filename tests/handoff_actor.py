"""One prefill or decode engine actor in a process of its own, for the GPU data-plane tests.

`python -m tests.handoff_actor --role prefill|decode|pool-owner --replica N --backend nccl|cuda_ipc
--process-group gloo|nccl --checkpoint DIR --run-dir DIR --device cpu|cuda:N --dtype float32`

Endpoints are ipc sockets in `--run-dir` (prefill-N.in, decode-N.in, api.results,
prefill-N.release); the nccl stores are `--stores` (one tcp:// per decode replica). The sender
or receiver comes from `make_sender` / `make_receiver` with the arguments `run_engine` gives
them. Runs until SIGTERM; then exits 0 if its cache has no page in use and its sender holds
nothing, else 3 (so a test sees leaked or never-released pages).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import torch
import zmq

from actors.engine_actor import EngineActor
from actors.transport import pull, push
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from transfer.backend import make_receiver, make_sender


def pool_values(shape, salt: int) -> torch.Tensor:
    """The known content a `pool-owner` fills a pool tensor with (float32, on CPU)."""
    n = 1
    for d in shape:
        n *= d
    return ((torch.arange(n, dtype=torch.float64) * 7 + salt) % 1009).float().reshape(shape)


def own_pool(args) -> int:
    """`--role pool-owner`: a cache of known content on `--device` with one sequence, handed over
    with the cuda_ipc sender to decode-0's inbox; waits for the `KVRelease`, exit 0 once it came
    and the pages are free, 3 if not within 60 s."""
    import time

    from actors.handoff import handoff_message
    from actors.messages import SamplingSpec
    from gemma4_model.config import load_config

    dtype = getattr(torch, args.dtype)
    config = load_config(args.checkpoint)
    cache = PagedKVCache(config.text, page_size=args.page_size, num_pages=args.pages, device=args.device, dtype=dtype)
    for salt, group in enumerate(cache.groups.values()):
        group.k.copy_(pool_values(group.k.shape, 2 * salt))
        group.v.copy_(pool_values(group.v.shape, 2 * salt + 1))
    cache.adopt_sequence(0, 3, {name: [0] for name in cache.groups})  # occupy a page: the handed-over ones follow
    cache.adopt_sequence(1, 45, {name: list(range(12)) for name in cache.groups})
    zctx = zmq.Context()
    sender = make_sender("cuda_ipc", zctx=zctx, decode_inboxes=[f"ipc://{args.run_dir}/decode-0.in"],
                         kv_release_endpoint=f"ipc://{args.run_dir}/prefill-0.release")
    held = sender.export(cache, 1)
    cache.free_sequence(1)
    sender.send(handoff_message("owned", list(range(3, 48)), 5, SamplingSpec(), None), held)
    deadline = time.monotonic() + 60
    while sender.pending() and time.monotonic() < deadline:
        sender.poll()
        time.sleep(0.01)
    cache.free_sequence(0)
    in_use = cache.pages_in_use()
    print(f"pool-owner: pending {sender.pending()}, pages in use {in_use}", flush=True)
    sender.close()
    zctx.destroy(linger=0)
    return 0 if not any(in_use.values()) else 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    for flag in ("--role", "--backend", "--checkpoint", "--run-dir"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--replica", type=int, default=0)
    ap.add_argument("--prefills", type=int, default=1)
    ap.add_argument("--decodes", type=int, default=1)
    ap.add_argument("--stores", default="", help="comma-separated tcp:// stores, one per decode replica (nccl)")
    ap.add_argument("--process-group", default="nccl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--page-size", type=int, default=4)
    ap.add_argument("--pages", type=int, default=80)
    ap.add_argument("--chunk", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.role == "pool-owner":
        return own_pool(args)
    dtype = getattr(torch, args.dtype)
    config, model = load_text_decoder(args.checkpoint, device=args.device, dtype=dtype)
    cache = PagedKVCache(config.text, page_size=args.page_size, num_pages=args.pages, device=args.device, dtype=dtype)
    engine = Engine(model, cache, SchedulerLimits(chunk_size=args.chunk))
    run = args.run_dir
    stores = [s for s in args.stores.split(",") if s]
    releases = [f"ipc://{run}/prefill-{r}.release" for r in range(args.prefills)]
    zctx = zmq.Context()
    inbox = pull(zctx, f"ipc://{run}/{args.role}-{args.replica}.in")
    outbox = push(zctx, f"ipc://{run}/api.results")
    sender = receiver = None
    if args.role == "prefill":
        sender = make_sender(args.backend, zctx=zctx, replica=args.replica, device=args.device,
                             decode_inboxes=[f"ipc://{run}/decode-{r}.in" for r in range(args.decodes)],
                             kv_store_endpoints=stores, kv_release_endpoint=releases[args.replica],
                             process_group=args.process_group)
    else:
        receiver = make_receiver(args.backend, zctx=zctx, replica=args.replica, device=args.device,
                                 kv_store_endpoint=stores[args.replica] if stores else None,
                                 prefill_replicas=args.prefills, kv_release_endpoints=releases,
                                 process_group=args.process_group)
    actor = EngineActor(engine, inbox, outbox, role=args.role, sender=sender, receiver=receiver,
                        replica=args.replica, stats_interval_s=3600)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"{args.role}-{args.replica} running", flush=True)
    actor.run(stop)
    if sender is not None:
        sender.poll()
        print(f"failed sends: {getattr(sender, 'failed', [])}", flush=True)
    held = sender.pending() if sender is not None else 0
    if receiver is not None:
        receiver.poll()
        print(f"received {getattr(receiver, 'received', '?')} dropped {getattr(receiver, 'dropped', '?')} "
              f"pending {receiver.pending()}", flush=True)
    in_use = cache.pages_in_use()
    print(f"{args.role}-{args.replica} pages in use {in_use}, handoffs held {held}", flush=True)
    busy = receiver.pending() if receiver is not None else 0
    for part in (sender, receiver):  # as run_engine does at stop
        if part is not None:
            part.close()
    return 0 if not any(in_use.values()) and held == 0 and busy == 0 else 3


if __name__ == "__main__":
    sys.exit(main())

"""KV handoff on the GPU data plane: peer-copy ceiling, handoff bandwidth, KV bytes per
handoff, and TTFT disaggregated against colocated (issue 8, acceptance 2, 3 and 4). One JSON file.

GPU (a machine with 2 GPUs, e.g. 2x H200; about 4-6 minutes; the JSON is rewritten after every
record, so a run cut short keeps what it measured):

    PYTHONPATH=. python bench/handoff.py --commit <sha> --out bench/results/handoff_h200x2.json

or in two commands (each well under 10 minutes):

    PYTHONPATH=. python bench/handoff.py --commit <sha> --parts ceiling,bandwidth,bytes --out A.json
    PYTHONPATH=. python bench/handoff.py --commit <sha> --parts ttft --out B.json

Setups (`--setups` picks some): bandwidth `cuda_ipc_two_gpus`, `nccl_two_gpus`,
`cuda_ipc_split_one_gpu`; ttft `colocated` (the base of the ratios) and the same three. On a
machine with one GPU only the cuda:0 setups run.

CPU smoke (tiny config, float32, the nccl protocol over gloo between CPU processes; about a
minute, or seconds with `--in-process`, which runs the workers as threads):
`PYTHONPATH=. python bench/handoff.py --smoke --out /tmp/handoff.json`

Parts:
  ceiling    The device's copy ceiling: GB/s (bytes copied / time; CUDA events, median) of a
             1 GiB device-to-device copy cuda:0 -> cuda:1, and within cuda:0.
  bandwidth  Handoffs between two processes, a prefill on cuda:0 and a decode on cuda:1 (cuda_ipc
             and nccl) or both on cuda:0 (cuda_ipc, the split case), through the real senders and
             receivers (`transfer.backend.make_sender` / `make_receiver`, with the arguments
             `actors.main.run_engine` passes; ZeroMQ on ipc:// sockets, nccl stores on
             tcp://127.0.0.1). Each process holds an E4B-shaped `PagedKVCache` (bf16, page 16,
             random content); prefill puts one sequence of 1k, 8k or 32k tokens in its cache and
             hands it over (`export`, free, `send`); decode accepts the control message, polls
             the receiver and scatters the `Arrival`'s pages into its own cache
             (`kv_pages.import_pages`), then synchronizes its device. Time: from just before
             prefill's `export` (its device synchronized) to decode's pages imported and
             synchronized, both read on the host's wall clock (one host: one clock); the start
             time travels in the request id. Bytes: the payload's (K and V of the pages moved);
             GB/s against the ceiling of the same path (peer copy across GPUs, the copy within
             cuda:0 for the split case). Median of `--reps` after one warm-up per size.
  bytes      KV bytes of an 8k-token E4B-shaped handoff (the pages `held_pages` picks: KV-owning
             layers only, the sliding group only the pages its window still needs) against a
             naive handoff of every decoder layer, K and V, every token; and their ratio. The
             measured payload bytes of the bandwidth part's 8k handoffs are set beside it.
  ttft       A random-weight E4B target (`random_text_decoder`, the same seed in every process,
             bf16) in `EngineActor`s: colocated = one actor in role engine on cuda:0;
             disaggregated = prefill on cuda:0 and decode on cuda:1 over cuda_ipc and nccl (and
             cuda_ipc with both on cuda:0, split). The driver (this process) sends a PrefillJob of
             8192 random token ids (max_tokens 2, ignore_eos) and reads the api's results: TTFT =
             send to the first TokenBatch; second = send to the finishing batch (includes the
             handoff). A warm-up request first, then the median over `--requests`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gemma4_model.config import FULL, SLIDING, TextConfig, parse_config  # noqa: E402
from gemma4_model.kv_cache import PagedKVCache  # noqa: E402

CONFIGS = ROOT / "tests" / "fixtures" / "hf_configs"
E4B = "gemma-4-E4B-it"
PARTS = ("ceiling", "bandwidth", "bytes", "ttft")
# (label, backend, prefill device, decode device); smoke replaces the devices by cpu, backends by nccl/gloo
BANDWIDTH_PAIRS = (("cuda_ipc_two_gpus", "cuda_ipc", "cuda:0", "cuda:1"),
                   ("nccl_two_gpus", "nccl", "cuda:0", "cuda:1"),
                   ("cuda_ipc_split_one_gpu", "cuda_ipc", "cuda:0", "cuda:0"))
TTFT_SETUPS = (("colocated", None, "cuda:0", None),
               ("cuda_ipc_two_gpus", "cuda_ipc", "cuda:0", "cuda:1"),
               ("nccl_two_gpus", "nccl", "cuda:0", "cuda:1"),
               ("cuda_ipc_split_one_gpu", "cuda_ipc", "cuda:0", "cuda:0"))
GB = 1e9


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def text_config(smoke: bool) -> tuple[TextConfig, str]:
    if smoke:
        from gemma4_model.random_checkpoint import tiny_config

        return parse_config(tiny_config("e4b").to_dict()).text, "random_checkpoint.tiny_config('e4b')"
    return parse_config(json.loads((CONFIGS / f"{E4B}.json").read_text())).text, f"tests/fixtures/hf_configs/{E4B}.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


class Report:
    """The JSON file: a header and records, rewritten after every record (a run cut short keeps
    what it measured)."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.records = path, header, []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, record: dict) -> dict:
        self.records.append(record)
        self.write()
        return record

    def write(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"benchmark": "handoff", "header": self.header, "records": self.records},
                                  indent=1) + "\n")
        tmp.replace(self.path)

    def find(self, part: str, **match) -> list[dict]:
        return [r for r in self.records if r["part"] == part and all(r.get(k) == v for k, v in match.items())]


# ---- part 1: the copy ceiling --------------------------------------------------------------------
def copy_gbps(src_device: str, dst_device: str, nbytes: int, reps: int) -> tuple[float, list[float]]:
    """Median GB/s (bytes copied / time) of `dst.copy_(src)`; CUDA events on the source device's
    stream (a cross-device copy runs there), perf_counter on CPU."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=src_device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device)
    cuda = src.is_cuda
    times = []
    for i in range(reps + 2):
        if cuda:
            for d in {src.device, dst.device}:
                torch.cuda.synchronize(d)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.device(src.device):
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
            for d in {src.device, dst.device}:
                torch.cuda.synchronize(d)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= 2:  # two warm-ups
            times.append(ms)
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    ms = statistics.median(times)
    return nbytes / (ms * 1e-3) / GB, times


def ceiling_part(args, report: Report) -> None:
    nbytes = (1 << 24) if args.smoke else (1 << 30)
    paths = [("peer", "cpu", "cpu")] if args.smoke else [("within_cuda0", "cuda:0", "cuda:0")]
    if not args.smoke and torch.cuda.device_count() >= 2:
        paths.insert(0, ("peer", "cuda:0", "cuda:1"))
    for name, src, dst in paths:
        gbps, times = copy_gbps(src, dst, nbytes, args.reps if args.smoke else 10)
        extra = {}
        if src != dst:
            extra["peer_access"] = torch.cuda.can_device_access_peer(0, 1)
        report.add({"part": "ceiling", "path": name, "src": src, "dst": dst, "bytes": nbytes, "gbps": gbps,
                    "times_ms": times, "timing": "CUDA events, median" if src != "cpu" else "perf_counter, median",
                    "counts": "bytes copied once (a copy within one device reads and writes each: twice the traffic)",
                    **extra})
        say(f"ceiling {name} {src} -> {dst}: {gbps:.1f} GB/s")


def ceiling_for(report: Report, prefill: str, decode: str) -> float | None:
    """The ceiling a handoff's bandwidth is set against: the peer copy across devices, the copy
    within the device when both sides share one."""
    path = "peer" if prefill != decode or prefill == "cpu" else "within_cuda0"
    found = report.find("ceiling", path=path)
    return found[0]["gbps"] if found else None


# ---- part 2: handoff bandwidth between two processes ---------------------------------------------
def kv_cache(cfg: TextConfig, tokens: int, page_size: int, device: str, dtype: torch.dtype) -> PagedKVCache:
    """A cache that holds one sequence of `tokens` (all full pages, the sliding window's pages)."""
    full = -(-tokens // page_size) + 4
    sliding = -(-(cfg.sliding_window or tokens) // page_size) + 4
    return PagedKVCache(cfg, page_size=page_size, num_pages={FULL: full, SLIDING: sliding}, device=device,
                        dtype=dtype)


def sequence_pages(cache: PagedKVCache, tokens: int) -> dict[str, list[int]]:
    """The logical pages a prefilled sequence of `tokens` holds: every full page; sliding pages
    from the first one a query at position `tokens` can still see (what `cache.slide` keeps)."""
    width = -(-tokens // cache.page_size)
    out = {}
    for name, group in cache.groups.items():
        first = 0 if group.window is None else max(0, tokens - group.window + 1) // cache.page_size
        out[name] = list(range(first, width))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_copy(device: torch.device, copy) -> float:
    """Milliseconds `copy` takes, from its first device work to its last (CUDA events on this
    device's stream, the host idle between them; wall time on the CPU)."""
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        copy()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    copy()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def kv_prefill_worker(args, stop: threading.Event | None = None) -> int:
    """Hands over `--reps` + 1 sequences of each size in `--sizes`, one at a time."""
    import zmq

    from actors.handoff import handoff_message
    from actors.messages import SamplingSpec
    from transfer.backend import make_sender

    cfg, _ = text_config(args.smoke)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = [int(x) for x in args.sizes.split(",")]
    cache = kv_cache(cfg, max(sizes), args.page_size, args.device, dtype)
    generator = torch.Generator(device=device).manual_seed(1)
    for group in cache.groups.values():  # random KV content
        group.k.normal_(generator=generator), group.v.normal_(generator=generator)
    run, zctx = Path(args.run_dir), zmq.Context()
    sender = make_sender(args.backend, zctx=zctx, decode_inboxes=[f"ipc://{run}/decode-0.in"],
                         kv_data_endpoints=[], run_id="handoffbench", replica=0, device=args.device,
                         kv_store_endpoints=[args.store] if args.store else [],
                         kv_release_endpoint=f"ipc://{run}/prefill-0.release", process_group=args.process_group)
    say(f"kv-prefill {args.backend} on {args.device} running")
    seq_id = 0
    for tokens in sizes:
        prompt = np.random.default_rng(tokens).integers(3, cfg.vocab_size, tokens).astype(np.int32)
        for rep in range(args.reps + 1):
            seq_id += 1
            cache.adopt_sequence(seq_id, tokens, sequence_pages(cache, tokens))
            sync(device)
            t0 = time.time_ns()
            payload = sender.export(cache, seq_id, 0)
            cache.free_sequence(seq_id)
            sender.send(handoff_message(f"bw:{tokens}:{rep}:{t0}", prompt, 5, SamplingSpec(max_tokens=2), None),
                        payload)
            deadline = time.monotonic() + 120
            while sender.pending() and time.monotonic() < deadline:
                sender.poll()
                time.sleep(0.0005)
            del payload
            time.sleep(args.pace_s)  # decode imports; the next handoff does not overlap it
    done, exited = run / "decode.done", run / "decode.exited"
    deadline = time.monotonic() + 120
    while not exited.exists() and time.monotonic() < deadline:  # decode may map this pool until it exits
        sender.poll()
        time.sleep(0.05)
    in_use = cache.pages_in_use()
    say(f"kv-prefill done: pending {sender.pending()}, pages in use {in_use}, "
        f"failed {getattr(sender, 'failed', [])}")
    sender.close()
    zctx.destroy(linger=0)
    return 0 if not any(in_use.values()) and done.exists() else 3


def kv_decode_worker(args, stop: threading.Event | None = None) -> int:
    """Receives `len(sizes) * (reps + 1)` handoffs, imports each into its own cache, and writes
    the timings to `decode-result.json`."""
    import zmq

    from actors.transport import pull
    from transfer.backend import make_receiver
    from transfer.kv_pages import write_pages

    cfg, _ = text_config(args.smoke)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = [int(x) for x in args.sizes.split(",")]
    cache = kv_cache(cfg, max(sizes), args.page_size, args.device, dtype)
    run, zctx = Path(args.run_dir), zmq.Context()
    inbox = pull(zctx, f"ipc://{run}/decode-0.in")
    receiver = make_receiver(args.backend, zctx=zctx, kv_data_endpoint=None, run_id="handoffbench", replica=0,
                             device=args.device, kv_store_endpoint=args.store or None, prefill_replicas=1,
                             kv_release_endpoints=[f"ipc://{run}/prefill-0.release"],
                             process_group=args.process_group)
    say(f"kv-decode {args.backend} on {args.device} running")
    expected, results, in_flight, seq_id = len(sizes) * (args.reps + 1), [], 0, 0
    deadline = time.monotonic() + args.timeout_s
    while len(results) < expected and time.monotonic() < deadline:
        msg = inbox.recv(timeout_ms=0 if in_flight else 5)
        if msg is not None:
            receiver.accept(msg)
            in_flight += 1
            say(f"kv-decode accepted {msg.request_id.rsplit(':', 1)[0]}")
        for arrival in receiver.poll():
            in_flight -= 1
            _, tokens, rep, t0 = arrival.request_id.split(":")
            if arrival.error is not None:
                results.append({"tokens": int(tokens), "rep": int(rep), "error": arrival.error})
                continue
            seq_id += 1
            t_import = time.time_ns()
            payload = arrival.payload
            physical = cache.adopt_sequence(seq_id, payload.num_tokens,
                                            {n: list(g.logical) for n, g in payload.groups.items()})
            copy_ms = timed_copy(device, lambda: write_pages(cache, physical, payload))  # as import_pages
            t1 = time.time_ns()
            receiver.imported(arrival.request_id)
            say(f"kv-decode imported {tokens}:{rep}, pending {receiver.pending()}")
            while receiver.pending():  # cuda_ipc: the release goes back once the import has read the pages
                receiver.poll()
            results.append({"tokens": int(tokens), "rep": int(rep), "ms": (t1 - int(t0)) / 1e6,
                            "decode_side_ms": (t1 - arrival.since_ns) / 1e6, "import_ms": (t1 - t_import) / 1e6,
                            "copy_ms": copy_ms,
                            "bytes": arrival.nbytes,
                            "pages": arrival.pages, "tokens_in_payload": arrival.payload.num_tokens,
                            "pool_mapped_on": getattr(receiver, "mapped_on", {}).get(0)})
            cache.free_sequence(seq_id)
            del arrival, payload
    (run / "decode-result.json").write_text(json.dumps(results))
    (run / "decode.done").touch()
    say(f"kv-decode done: {len(results)} of {expected} handoffs")
    time.sleep(0.5)
    receiver.close()
    zctx.destroy(linger=0)
    return 0 if len(results) == expected and not any("error" in r for r in results) else 3


class ThreadWorker:
    """A worker run in a thread of this process (`--in-process`, CPU smoke only: no interpreter
    start-up per worker), answering what the driver asks of a `subprocess.Popen`."""

    def __init__(self, argv: list[str]):
        self.stop = threading.Event()
        self.returncode: int | None = None
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()

    def _run(self, argv: list[str]) -> None:
        code = 1
        try:
            code = main(argv, stop=self.stop)
        finally:
            self.returncode = code

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise subprocess.TimeoutExpired("worker thread", timeout)
        return self.returncode

    def send_signal(self, _sig) -> None:
        self.stop.set()

    kill = send_signal


def spawn(args, role: str, run: Path, extra: list[str], log: Path):
    worker_args = ["--worker", role, "--run-dir", str(run), "--dtype", args.dtype_name, "--page-size",
                   str(args.page_size), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                   "--chunked-prefill-size", str(args.chunked_prefill_size), *extra]
    if args.smoke:
        worker_args.append("--smoke")
    if args.in_process:
        return ThreadWorker(worker_args)
    command = [sys.executable, str(Path(__file__).resolve()), *worker_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, subprocess.Popen], timeout_s: float) -> dict[str, int | str]:
    deadline, codes = time.monotonic() + timeout_s, {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = "killed (timeout)"
    return codes


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def chosen(args, setups: list[tuple]) -> list[tuple]:
    """The setups `--setups` names (all by default)."""
    wanted = args.setups.split(",") if args.setups else None
    return [s for s in setups if wanted is None or s[0] in wanted]


def bandwidth_pairs(args) -> list[tuple[str, str, str, str]]:
    if args.smoke:
        return chosen(args, [("nccl_over_gloo_cpu", "nccl", "cpu", "cpu")])
    two = torch.cuda.device_count() >= 2
    return chosen(args, [p for p in BANDWIDTH_PAIRS if two or p[3] == "cuda:0"])


def bandwidth_part(args, report: Report) -> None:
    sizes = args.sizes
    for label, backend, prefill_device, decode_device in bandwidth_pairs(args):
        with tempfile.TemporaryDirectory(prefix="handoffbench-") as tmp:
            run = Path(tmp)
            store = f"tcp://127.0.0.1:{free_port()}" if backend == "nccl" else ""
            common = ["--backend", backend, "--process-group", args.process_group, "--sizes", sizes,
                      "--reps", str(args.reps), "--store", store, "--pace-s", str(args.pace_s)]
            logs = {role: run / f"{role}.log" for role in ("kv-decode", "kv-prefill")}
            t0 = time.perf_counter()
            procs = {"kv-decode": spawn(args, "kv-decode", run, [*common, "--device", decode_device], logs["kv-decode"])}
            procs["kv-prefill"] = spawn(args, "kv-prefill", run, [*common, "--device", prefill_device],
                                        logs["kv-prefill"])
            codes = wait_all({"kv-decode": procs["kv-decode"]}, args.pair_timeout_s)
            (run / "decode.exited").touch()  # prefill may free its pool now
            codes.update(wait_all({"kv-prefill": procs["kv-prefill"]}, 150))
            result = run / "decode-result.json"
            rows = json.loads(result.read_text()) if result.exists() else []
            if any(codes.values()) or not rows:
                report.add({"part": "bandwidth", "setup": label, "error": f"exit codes {codes}",
                            "log_tail": {r: tail(p) for r, p in logs.items()}})
                say(f"bandwidth {label}: FAILED {codes}\n" + "\n".join(tail(p) for p in logs.values()))
                continue
        ceiling = ceiling_for(report, prefill_device, decode_device)
        for tokens in (int(x) for x in sizes.split(",")):
            timed = [r for r in rows if r["tokens"] == tokens and r["rep"] > 0 and "ms" in r]  # rep 0: warm-up
            ms = median([r["ms"] for r in timed])
            nbytes = timed[0]["bytes"] if timed else None
            gbps = nbytes / (ms * 1e-3) / GB if ms else None
            record = report.add({
                "part": "bandwidth", "setup": label, "backend": backend, "process_group": args.process_group,
                "prefill_device": prefill_device, "decode_device": decode_device, "prompt_tokens": tokens,
                "payload_bytes": nbytes, "pages": timed[0]["pages"] if timed else None, "reps": len(timed),
                "median_ms": ms, "times_ms": [r["ms"] for r in timed],
                "decode_side_median_ms": median([r["decode_side_ms"] for r in timed]), "gbps": gbps,
                "import_median_ms": median([r["import_ms"] for r in timed]),
                "copy_median_ms": median([r["copy_ms"] for r in timed]),
                "copy_gbps": nbytes / (median([r["copy_ms"] for r in timed]) * 1e-3) / GB if timed else None,
                "pool_mapped_on": timed[0].get("pool_mapped_on") if timed else None,
                "ceiling_gbps": ceiling, "fraction_of_ceiling": gbps / ceiling if gbps and ceiling else None,
                "errors": [r["error"] for r in rows if r["tokens"] == tokens and "error" in r],
                "pair_wall_s": time.perf_counter() - t0})
            say(f"bandwidth {label} {tokens} tokens: {nbytes} B in {ms:.3f} ms = {gbps:.1f} GB/s"
                + (f" ({record['fraction_of_ceiling']:.0%} of {ceiling:.0f})" if ceiling else ""))


# ---- part 3: KV bytes per handoff ---------------------------------------------------------------
def bytes_part(args, report: Report) -> None:
    from transfer.device_pages import held_pages

    cfg, source = text_config(args.smoke)
    tokens, dtype = args.bytes_tokens, getattr(torch, args.dtype_name)
    element = torch.empty((), dtype=dtype).element_size()
    width = -(-tokens // args.page_size)  # every page of the prompt, in each group, before the window slides
    cache = PagedKVCache(cfg, page_size=args.page_size, num_pages=width, device="meta", dtype=dtype)  # no storage
    cache.adopt_sequence(0, tokens, {name: list(range(width)) for name in cache.groups})
    held = held_pages(cache, 0, 0)  # what a sender exports (reach_back 0: no MTP assistant downstream)
    per_page = cache.bytes_per_page()
    groups = {name: {"pages": len(held.logical[name]), "layers": len(cache.groups[name].layers),
                     "bytes": per_page[name] * len(held.logical[name])} for name in held.groups}
    handoff = sum(g["bytes"] for g in groups.values())
    naive = sum(2 * layer.num_kv_heads * layer.head_dim * element for layer in cfg.layers) * tokens
    measured = [r["payload_bytes"] for r in report.find("bandwidth", prompt_tokens=tokens) if r.get("payload_bytes")]
    report.add({"part": "bytes", "config": source, "prompt_tokens": tokens, "page_size": args.page_size,
                "dtype": args.dtype_name, "decoder_layers": cfg.num_layers, "kv_owning_layers": len(cfg.kv_layers),
                "sliding_window": cfg.sliding_window, "groups": groups, "handoff_bytes": handoff,
                "naive_bytes_every_layer_every_token": naive, "naive_over_handoff": naive / handoff,
                "measured_payload_bytes": measured,
                "measured_equals_computed": all(m == handoff for m in measured) if measured else None})
    say(f"bytes at {tokens} tokens: handoff {handoff / 2**20:.1f} MiB, naive {naive / 2**20:.1f} MiB, "
        f"ratio {naive / handoff:.2f}")


# ---- part 4: TTFT, disaggregated against colocated -----------------------------------------------
def engine_worker(args, stop: threading.Event | None = None) -> int:
    """One EngineActor (role `--worker`) with a random-weight target, until SIGTERM."""
    import zmq

    from actors.engine_actor import EngineActor
    from actors.transport import pull, push
    from gemma4_model.engine import Engine, SchedulerLimits
    from gemma4_model.random_weights import random_text_decoder
    from transfer.backend import make_receiver, make_sender

    role = args.worker
    cfg, _ = text_config(args.smoke)
    dtype = getattr(torch, args.dtype)
    model = random_text_decoder(cfg, args.device, dtype, seed=0)
    cache = PagedKVCache(cfg, page_size=args.page_size, num_pages=args.kv_pages, device=args.device, dtype=dtype)
    limits = SchedulerLimits(max_batch_tokens=args.max_num_batched_tokens, chunk_size=args.chunked_prefill_size)
    engine = Engine(model, cache, limits)  # as run_engine with a GPU topology's [model] limits
    run, zctx = Path(args.run_dir), zmq.Context()
    inbox = pull(zctx, f"ipc://{run}/{role}-0.in", drop_malformed=True)
    outbox = push(zctx, f"ipc://{run}/api.results")
    sender = receiver = None
    if role == "prefill":
        sender = make_sender(args.backend, zctx=zctx, decode_inboxes=[f"ipc://{run}/decode-0.in"],
                             kv_data_endpoints=[], run_id="handoffbench", replica=0, device=args.device,
                             kv_store_endpoints=[args.store] if args.store else [],
                             kv_release_endpoint=f"ipc://{run}/prefill-0.release", process_group=args.process_group)
    elif role == "decode":
        receiver = make_receiver(args.backend, zctx=zctx, kv_data_endpoint=None, run_id="handoffbench", replica=0,
                                 device=args.device, kv_store_endpoint=args.store or None, prefill_replicas=1,
                                 kv_release_endpoints=[f"ipc://{run}/prefill-0.release"],
                                 process_group=args.process_group)
    actor = EngineActor(engine, inbox, outbox, role=role, sender=sender, receiver=receiver, stats_interval_s=3600)
    if stop is None:  # a process of its own: until SIGTERM
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    say(f"{role} on {args.device} running")
    try:
        actor.run(stop)
    finally:
        for part in (sender, receiver):
            if part is not None:
                part.close()
    return 0


def one_request(api, inbox, request_id: str, token_ids: np.ndarray, timeout_s: float,
                procs: dict[str, subprocess.Popen]) -> dict:
    """Send one PrefillJob; the times (ms from the send) of its first and finishing TokenBatch."""
    from actors.messages import PrefillJob, RequestError, SamplingSpec, TokenBatch, per_request

    t0 = time.perf_counter()
    inbox.send(PrefillJob(request_id, token_ids, SamplingSpec(max_tokens=2, ignore_eos=True)))
    first = done = None
    tokens: list[int] = []
    deadline = t0 + timeout_s
    while done is None:
        dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
        if dead or time.perf_counter() > deadline:
            raise RuntimeError(f"request {request_id}: no answer (exited {dead})")
        received = api.recv(timeout_ms=200)
        now = time.perf_counter()
        for msg in per_request(received):  # a decode step's tokens travel as one StepTokens
            if getattr(msg, "request_id", None) != request_id:
                continue
            if isinstance(msg, RequestError):
                raise RuntimeError(f"request {request_id} failed: {msg.code} {msg.message}")
            if isinstance(msg, TokenBatch):
                tokens += list(msg.token_ids)
                if first is None:
                    first = now
                if msg.finish_reason is not None:
                    done = now
    return {"ttft_ms": (first - t0) * 1e3, "second_token_ms": (done - t0) * 1e3, "tokens": tokens}


def ttft_setups(args) -> list[tuple[str, str | None, str, str | None]]:
    if args.smoke:
        return chosen(args, [("colocated", None, "cpu", None), ("nccl_over_gloo_cpu", "nccl", "cpu", "cpu")])
    two = torch.cuda.device_count() >= 2
    return chosen(args, [s for s in TTFT_SETUPS if two or s[3] in (None, "cuda:0")])


def ttft_part(args, report: Report) -> None:
    import zmq

    from actors.transport import pull, push

    cfg, _ = text_config(args.smoke)
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, cfg.vocab_size, args.ttft_tokens).astype(np.int32) for _ in range(args.requests + 1)]
    for label, backend, first_device, decode_device in ttft_setups(args):
        with tempfile.TemporaryDirectory(prefix="handoffbench-") as tmp:
            run = Path(tmp)
            zctx = zmq.Context()
            api = pull(zctx, f"ipc://{run}/api.results")
            store = f"tcp://127.0.0.1:{free_port()}" if backend == "nccl" else ""
            common = ["--kv-pages", str(args.kv_pages), "--store", store, "--process-group", args.process_group,
                      "--backend", backend or "inline"]
            roles = [("engine", first_device)] if backend is None else [("decode", decode_device),
                                                                         ("prefill", first_device)]
            logs = {role: run / f"{role}.log" for role, _ in roles}
            t0 = time.perf_counter()
            procs = {role: spawn(args, role, run, [*common, "--device", device], logs[role]) for role, device in roles}
            inbox = push(zctx, f"ipc://{run}/{roles[-1][0]}-0.in")
            try:
                warm = one_request(api, inbox, "warm-up", prompts[0], args.start_timeout_s, procs)
                startup_s = time.perf_counter() - t0
                timed = [one_request(api, inbox, f"r{i}", prompts[i], 120, procs) for i in range(1, len(prompts))]
                error = None
            except RuntimeError as exc:
                error, timed, warm, startup_s = str(exc), [], None, None
            finally:
                for proc in procs.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                codes = wait_all(procs, 60)
                api.close(), inbox.close()
                zctx.destroy(linger=0)
            if error is not None:
                report.add({"part": "ttft", "setup": label, "error": error,
                            "log_tail": {r: tail(p) for r, p in logs.items()}})
                say(f"ttft {label}: FAILED {error}\n" + "\n".join(tail(p) for p in logs.values()))
                continue
        record = {"part": "ttft", "setup": label, "backend": backend, "prefill_device": first_device,
                  "decode_device": decode_device or first_device, "prompt_tokens": args.ttft_tokens,
                  "requests": len(timed), "ttft_ms": [r["ttft_ms"] for r in timed],
                  "second_token_ms": [r["second_token_ms"] for r in timed],
                  "median_ttft_ms": median([r["ttft_ms"] for r in timed]),
                  "median_second_token_ms": median([r["second_token_ms"] for r in timed]),
                  "warm_up": {k: warm[k] for k in ("ttft_ms", "second_token_ms")},
                  "tokens": [r["tokens"] for r in timed], "startup_and_warm_up_s": startup_s, "exit_codes": codes}
        colocated = report.find("ttft", setup="colocated")
        if backend is not None and colocated and "median_ttft_ms" in colocated[0]:
            base = colocated[0]
            record["ttft_over_colocated"] = record["median_ttft_ms"] / base["median_ttft_ms"]
            record["second_token_over_colocated"] = record["median_second_token_ms"] / base["median_second_token_ms"]
            record["same_tokens_as_colocated"] = record["tokens"] == base["tokens"]
        report.add(record)
        say(f"ttft {label}: {record['median_ttft_ms']:.1f} ms, second token {record['median_second_token_ms']:.1f} ms"
            + (f" (x{record['ttft_over_colocated']:.3f} / x{record['second_token_over_colocated']:.3f} colocated)"
               if "ttft_over_colocated" in record else ""))


# ---- the acceptance figures ----------------------------------------------------------------------
BANDWIDTH_FLOOR = 0.70  # of the ceiling, for the largest handoff
TTFT_CAP = 1.10  # disaggregated TTFT over colocated


def summary(report: Report) -> dict:
    """Issue 8's acceptance 2-4 read off the records: per bandwidth setup its largest handoff's
    fraction of the ceiling, the bytes ratio, per disaggregated setup its TTFT ratio."""
    out: dict = {"part": "summary", "bandwidth": {}, "ttft": {}}
    for setup in dict.fromkeys(r["setup"] for r in report.find("bandwidth") if "gbps" in r):
        largest = max((r for r in report.find("bandwidth", setup=setup) if r.get("gbps")),
                      key=lambda r: r["prompt_tokens"])
        fraction = largest["fraction_of_ceiling"]
        out["bandwidth"][setup] = {"prompt_tokens": largest["prompt_tokens"], "gbps": largest["gbps"],
                                   "fraction_of_ceiling": fraction,
                                   "meets_70_percent": None if fraction is None else fraction >= BANDWIDTH_FLOOR}
    for r in report.find("bytes"):
        out["bytes"] = {"prompt_tokens": r["prompt_tokens"], "handoff_bytes": r["handoff_bytes"],
                        "naive_bytes": r["naive_bytes_every_layer_every_token"], "naive_over_handoff": r["naive_over_handoff"]}
    for r in report.find("ttft"):
        if "ttft_over_colocated" in r:
            out["ttft"][r["setup"]] = {"ttft_over_colocated": r["ttft_over_colocated"],
                                       "second_token_over_colocated": r["second_token_over_colocated"],
                                       "meets_10_percent": r["ttft_over_colocated"] <= TTFT_CAP}
    return out


# ---- driver --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Defaults:
    sizes: str
    reps: int
    requests: int
    ttft_tokens: int
    bytes_tokens: int
    page_size: int
    kv_pages: int
    pace_s: float
    max_num_batched_tokens: int  # ttft: the engines' scheduler, as a GPU topology sets it
    chunked_prefill_size: int


GPU = Defaults("1024,8192,32768", 5, 3, 8192, 8192, 16, 2048, 0.2, 8192, 4096)
SMOKE = Defaults("64,256", 2, 2, 48, 256, 4, 64, 0.05, 64, 16)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--commit", default="unknown", help="git commit of the code (the device copy's git metadata is stale)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--smoke", action="store_true", help="CPU, float32, tiny config, nccl over gloo")
    ap.add_argument("--in-process", action="store_true",
                    help="smoke only: run the workers as threads of this process (fast; the GPU run uses processes)")
    ap.add_argument("--setups", help="bandwidth / ttft: only these setups (labels, comma-separated; "
                    "ttft ratios need colocated)")
    ap.add_argument("--sizes", help="bandwidth: prompt tokens per handoff, comma-separated")
    ap.add_argument("--reps", type=int, help="bandwidth: timed handoffs per size (after one warm-up)")
    ap.add_argument("--requests", type=int, help="ttft: timed requests per setup (after one warm-up)")
    ap.add_argument("--ttft-tokens", type=int)
    ap.add_argument("--bytes-tokens", type=int)
    ap.add_argument("--kv-pages", type=int)
    ap.add_argument("--pace-s", type=float, help="bandwidth: pause after each handoff")
    ap.add_argument("--max-num-batched-tokens", type=int, help="ttft: query tokens per engine step")
    ap.add_argument("--chunked-prefill-size", type=int, help="ttft: longest prefill chunk per step")
    ap.add_argument("--pair-timeout-s", type=float, default=300)
    ap.add_argument("--start-timeout-s", type=float, default=300, help="ttft: start-up and warm-up request")
    # worker processes (started by the driver)
    ap.add_argument("--worker", choices=("kv-prefill", "kv-decode", "engine", "prefill", "decode"))
    ap.add_argument("--run-dir")
    ap.add_argument("--backend")
    ap.add_argument("--process-group")
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--page-size", type=int)
    ap.add_argument("--store", default="")
    ap.add_argument("--timeout-s", type=float, default=240)
    args = ap.parse_args(argv)
    d = SMOKE if args.smoke else GPU
    for name in ("sizes", "reps", "requests", "ttft_tokens", "bytes_tokens", "page_size", "kv_pages", "pace_s",
                 "max_num_batched_tokens", "chunked_prefill_size"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(d, name))
    args.dtype_name = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.dtype = args.dtype_name
    args.process_group = args.process_group or ("gloo" if args.smoke else "nccl")
    if args.worker is None:
        if args.out is None:
            ap.error("--out is required")
        for part in args.parts.split(","):
            if part not in PARTS:
                ap.error(f"unknown part {part!r}; expected some of {PARTS}")
        if args.in_process and not args.smoke:
            ap.error("--in-process is for the CPU smoke run only (cuda_ipc maps another process's memory)")
        if not args.smoke and not torch.cuda.is_available():
            ap.error("the GPU benchmark needs CUDA devices; use --smoke on CPU")
    return args


WORKERS = {"kv-prefill": kv_prefill_worker, "kv-decode": kv_decode_worker, "engine": engine_worker,
           "prefill": engine_worker, "decode": engine_worker}


def main(argv: Sequence[str] | None = None, stop: threading.Event | None = None) -> dict | int:
    args = parse_args(argv)
    if args.worker is not None:
        if args.smoke and stop is None:  # a worker process of the smoke run: tiny ops
            torch.set_num_threads(1)
        return WORKERS[args.worker](args, stop)
    command = "python bench/handoff.py " + " ".join(sys.argv[1:] if argv is None else argv)
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if torch.cuda.is_available() and not args.smoke else ["cpu"])
    _, source = text_config(args.smoke)
    header = {"command": command, "commit": args.commit, "torch": torch.__version__, "devices": devices,
              "device": devices[0], "dtype": args.dtype_name, "smoke": args.smoke, "config": source,
              "page_size": args.page_size, "process_group": args.process_group,
              "max_num_batched_tokens": args.max_num_batched_tokens, "chunked_prefill_size": args.chunked_prefill_size,
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "acceptance": {"bandwidth": "large handoffs >= 70% of the peer-copy ceiling",
                             "ttft": "disaggregated TTFT at 8k tokens <= 1.10 x colocated"}}
    report = Report(args.out, header)
    say(f"handoff bench on {devices} ({args.dtype_name}), parts {args.parts}, out {args.out}")
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    for part, run in (("ceiling", ceiling_part), ("bandwidth", bandwidth_part), ("bytes", bytes_part),
                      ("ttft", ttft_part)):
        if part in parts:
            run(args, report)
    record = report.add(summary(report))
    say(f"summary: {json.dumps({k: v for k, v in record.items() if k != 'part'})}")
    say(f"done in {time.perf_counter() - t0:.1f} s: {len(report.records)} records in {args.out}")
    return {"header": header, "records": report.records}


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)

"""The host side of one KV handoff on the GPU data plane: the page bookkeeping both processes do
per handoff, whatever the copy costs, timed on the CPU (no GPU needed; the pools are CPU
tensors of E4B's shape, bf16, page 16).

Per prompt size (`--sizes`), the median over `--reps` of:
  sender    `device_pages.held_pages` + `hold` (prefill picks the pages and keeps them);
            the `KVHandoff` with its `DevicePages` (page numbers, places in the pool) encoded
  receiver  the message decoded (checked field by field), `kv_pages.check_payload`,
            `PagedKVCache.adopt_sequence` (the decode cache's pages), `page_runs` per group
            (what the copy across GPUs looks for)
Release and free (after the copy, off the handoff's path) are not timed.

    PYTHONPATH=. python bench/handoff_host.py --commit <sha> --out bench/results/handoff_host_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.handoff import handoff_message  # noqa: E402
from actors.messages import DevicePages, SamplingSpec, decode, encode  # noqa: E402
from bench.handoff import kv_cache, sequence_pages, text_config  # noqa: E402
from gemma4_model.kernels.page_copy import page_runs  # noqa: E402
from transfer.device_pages import held_pages, hold, release, shapes_of  # noqa: E402
from transfer.kv_pages import GroupPages, KVPayload, check_payload  # noqa: E402

# The script uses only what 6f81372 had too (not `device_pages.page_fields`), so the one script
# times the bookkeeping before and after its vectorisation (bench/results/handoff_host_cpu_6f81372.json).
FIELDS = {"full_attention": "full_pages", "sliding_attention": "sliding_pages"}


def median_ms(fn, reps: int, after=None) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if after is not None:
            after()
    return round(statistics.median(times), 4)


def one_size(tokens: int, reps: int) -> dict:
    cfg, _ = text_config(False)
    src = kv_cache(cfg, tokens, 16, "cpu", torch.bfloat16)
    dst = kv_cache(cfg, tokens, 16, "cpu", torch.bfloat16)
    src.adopt_sequence(1, tokens, sequence_pages(src, tokens))
    held = held_pages(src, 1)
    groups = [n for n in FIELDS if n in held.logical]
    prompt = np.arange(tokens, dtype=np.int32)

    def message():
        pages = {FIELDS[n]: np.asarray(held.logical[n], dtype=np.int32) for n in groups}
        device_pages = DevicePages(0, 1, shapes_of(src, held), [p for n in groups for p in held.physical[n]],
                                   pool_handles=[bytes(64)] * 4, pool_ref_counters=[bytes(40)] * 4,
                                   pool_events=[bytes(64)] * 4, pool_ints=[0] * 24)
        msg = handoff_message("r", prompt, 5, SamplingSpec(max_tokens=2), None)
        return encode(dataclasses.replace(msg, num_tokens=tokens, kv_dtype="bfloat16", data_ref="bench",
                                          device_pages=device_pages, **pages))

    frames = message()
    payload = KVPayload(tokens, {n: GroupPages(tuple(held.logical[n]), src.groups[n].k, src.groups[n].v,
                                               torch.tensor(held.physical[n])) for n in groups})
    logical = {n: list(held.logical[n]) for n in groups}
    places = {n: torch.tensor(held.physical[n], dtype=torch.int32) for n in groups}
    parts = {
        "held_pages_hold": median_ms(lambda: hold(src, held_pages(src, 1)), reps, after=lambda: release(src, held)),
        "message_encode": median_ms(message, reps),
        "message_decode": median_ms(lambda: decode(frames), reps),
        "check_payload": median_ms(lambda: check_payload(dst, payload, tokens), reps),
        "adopt_sequence": median_ms(lambda: dst.adopt_sequence(2, tokens, logical), reps,
                                    after=lambda: dst.free_sequence(2)),
        "page_runs": median_ms(lambda: [page_runs(places[n], places[n]) for n in groups], reps),
    }
    src.free_sequence(1)
    sender = parts["held_pages_hold"] + parts["message_encode"]
    receiver = sum(v for k, v in parts.items() if k not in ("held_pages_hold", "message_encode"))
    return {"prompt_tokens": tokens, "pages": held.num_pages, "ms": parts, "sender_ms": round(sender, 4),
            "receiver_ms": round(receiver, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--sizes", default="1024,8192,32768")
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args()
    records = []
    for tokens in map(int, args.sizes.split(",")):
        records.append(one_size(tokens, args.reps))
        r = records[-1]
        print(f"{tokens} tokens, {r['pages']} pages: sender {r['sender_ms']:.3f} ms, receiver {r['receiver_ms']:.3f} ms "
              f"{r['ms']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "handoff_host", "commit": args.commit, "command": " ".join(["python"] + sys.argv),
        "torch": torch.__version__, "python": platform.python_version(), "host": platform.processor() or platform.machine(),
        "timing": "wall clock per call, median of --reps", "records": records}, indent=1))


if __name__ == "__main__":
    main()

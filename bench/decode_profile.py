"""Where a decode step's time goes: kernels per step and GPU time per kernel name.

Prefills `--batch` random prompts of `--context` tokens on a random-weight model at a real shape,
then (1) profiles `--steps` eager steps with the Triton attention (torch.profiler; the kernels a
CUDA graph replays are these), and (2) times replays of the captured decode graph alone with CUDA
events, against the whole `Engine.step` (which adds batch building, input copies and sampling).

    PYTHONPATH=. python bench/decode_profile.py --commit <sha> --out bench/results/decode_profile_e4b_h200.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_step import prefilled_engine  # noqa: E402
from mtp_speed import model_configs  # noqa: E402

from gemma4_model.batch import ForwardBatch  # noqa: E402
from gemma4_model.engine import Engine  # noqa: E402
from gemma4_model.random_weights import random_text_decoder  # noqa: E402


def kernel_table(engine: Engine, steps: int) -> dict:
    """Profile `steps` eager steps: kernel launches per step and the top kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_name[evt.name].append(evt.device_time)  # microseconds
    total_us = sum(sum(v) for v in per_name.values())
    rows = sorted(((sum(v), len(v), k) for k, v in per_name.items()), reverse=True)
    return {
        "kernels_per_step": sum(len(v) for v in per_name.values()) / steps,
        "gpu_ms_per_step": total_us / steps / 1e3,
        "top": [{"name": k[:120], "ms_per_step": round(t / steps / 1e3, 4), "calls_per_step": n / steps,
                 "mean_us": round(t / n, 2)} for t, n, k in rows[:40]],
    }


def replay_times(engine: Engine, reps: int) -> dict:
    """CUDA-event time of the graph replay alone and wall time of whole steps."""
    graphs = engine.graphs
    for _ in range(3):
        engine.step()
    plan = engine.scheduler.schedule()
    chunks, _ = engine._add_drafts(plan)
    batch = ForwardBatch.build(chunks, engine.cache, engine.device)
    size = graphs.size_for(batch)
    graph = graphs._graphs[size].graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replay = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        replay.append(start.elapsed_time(end))
    step = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        step.append((time.perf_counter() - t0) * 1e3)
    return {"replay_ms": statistics.median(replay), "step_ms": statistics.median(step)}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--model", default="e4b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--page-size", type=int, default=16)
    args = ap.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    target, _, source = model_configs(args.model, False)
    cfg = target.text
    model = random_text_decoder(cfg, device, dtype, seed=0)
    model.set_kernels(True)
    result = {"benchmark": "decode_profile", "command": "python bench/decode_profile.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "commit": args.commit, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0), "model": args.model, "config": source, "context": args.context,
        "records": []}
    for batch in (int(b) for b in args.batches.split(",")):
        engine, _ = prefilled_engine(model, cfg, batch, args.context, 200, args.page_size, device, dtype)
        record = {"batch": batch, "eager_kernels": kernel_table(engine, args.steps)}
        engine.capture_decode_graphs(batch)
        record["graphs"] = replay_times(engine, 20)
        engine.graphs.close()
        result["records"].append(record)
        print(json.dumps(record, indent=1)[:4000], flush=True)
        args.out.write_text(json.dumps(result, indent=1))
        for seq in list(engine.scheduler.running):
            engine.cancel(seq)
        del engine
        torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    main()

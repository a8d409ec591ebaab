"""Where a decode step's time goes: kernels per step and GPU time per kernel name.

Prefills `--batch` random prompts of `--context` tokens on a random-weight model at a real shape,
then (1) profiles `--steps` eager steps with the Triton attention (torch.profiler; the kernels a
CUDA graph replays are these), and (2) times replays of the captured decode graph alone with CUDA
events, against the whole `Engine.step` (which adds batch building, input copies and sampling);
(3) with `--mixed N,...` profiles an eager step that runs the decode batch plus one new N-token
prompt (a server's step on each arrival).

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
from gemma4_model.sampling import SamplingParams  # noqa: E402


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
    return _tables(prof, steps)


def _tables(prof, steps: int) -> dict:
    """Per step: kernels, GPU ms, the top kernels by GPU time and the top operators by CPU time."""
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    timeline = []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_name[evt.name].append(evt.device_time)  # microseconds
            timeline.append((evt.time_range.start, evt.name, evt.device_time))
    timeline.sort()
    total_us = sum(sum(v) for v in per_name.values())
    rows = sorted(((sum(v), len(v), k) for k, v in per_name.items()), reverse=True)
    return {
        "kernels_per_step": sum(len(v) for v in per_name.values()) / steps,
        "gpu_ms_per_step": total_us / steps / 1e3,
        "top": [{"name": k[:120], "ms_per_step": round(t / steps / 1e3, 4), "calls_per_step": n / steps,
                 "mean_us": round(t / n, 2)} for t, n, k in rows[:40]],
        "top_cpu": [{"name": e.key[:120], "self_cpu_ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 4),
                     "calls_per_step": e.count / steps}
                    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]],
        # the last step's kernels in launch order (a step launches the same count each time): which
        # product or layer a kernel's time belongs to
        "last_step": [[k[:60], round(t, 2)] for _, k, t in timeline[len(timeline) - len(timeline) // steps:]],
    }


def mixed_step(engine: Engine, vocab: int, prompt_len: int, reps: int) -> dict:
    """A running decode batch plus one new `prompt_len`-token prompt in one eager step (what a
    server does on each arrival): its wall time (launch alone and to the device's end), and the
    profile of one such step."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(prompt_len)
    params = SamplingParams(max_tokens=2, ignore_eos=True)

    def arrive_and_step() -> tuple[float, float]:
        engine.add_request(torch.randint(3, vocab, (prompt_len,), generator=g).tolist(), params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3

    for _ in range(3):  # compile and pick kernels; each new sequence then decodes along
        arrive_and_step()
    walls = [arrive_and_step() for _ in range(reps)]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        arrive_and_step()
    return {"prompt_len": prompt_len, "host_ms": statistics.median(w[0] for w in walls),
            "wall_ms": statistics.median(w[1] for w in walls), "profile": _tables(prof, 1)}


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
    ap.add_argument("--mixed", default="", help="also profile a decode step plus one new prompt of each length")
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
        engine, _ = prefilled_engine(model, cfg, batch, args.context, 200, args.page_size, device, dtype,
                                     extra_pages=sum(4 * (int(n) // args.page_size + 2) for n in args.mixed.split(",") if n))
        record = {"batch": batch, "eager_kernels": kernel_table(engine, args.steps)}
        record["mixed"] = [mixed_step(engine, cfg.vocab_size, int(n), 5) for n in args.mixed.split(",") if n]
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

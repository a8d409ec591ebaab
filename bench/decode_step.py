"""Decode step time at a real Gemma 4 shape (random weights): eager PyTorch attention, eager with
the Triton kernels, and CUDA-graph replays; beside the memory-bandwidth floor.

One record per (model, batch, mode): `B` sequences with `--context`-token random prompts are
prefilled, then `--steps` engine steps are timed (wall clock between device synchronisations:
batch building, the forward and sampling, so the time a client sees per token at that
concurrency, the api hop aside). The floor is `mtp_speed.step_bytes` (every weight once, plus
each layer's visible KV) over the measured device copy bandwidth.

    PYTHONPATH=. python bench/decode_step.py --commit <sha> --out bench/results/decode_step_h100.json
    PYTHONPATH=. python bench/decode_step.py --smoke --out /tmp/decode_step.json   # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchors import MODEL_KEYS, SGLANG_H200, SOURCE  # noqa: E402
from mtp_speed import Clock, copy_bandwidth, model_configs, step_bytes  # noqa: E402

from gemma4_model.engine import Engine, SchedulerLimits  # noqa: E402
from gemma4_model.kernels.fused import PDL_ON  # noqa: E402
from gemma4_model.kernels.gemv import EARLY_CHUNKS, PREFETCH_K, SMALL_M_ON, SPLITS_IN_NORM_ROWS, TMA_ON  # noqa: E402
from gemma4_model.kernels.paged_attention import DECODE_TILES, MAX_SPLITS  # noqa: E402
from gemma4_model.kernels.l2_prefetch import WeightPrefetch  # noqa: E402
from gemma4_model.kv_cache import PagedKVCache  # noqa: E402
from gemma4_model.random_weights import random_text_decoder  # noqa: E402
from gemma4_model.sampling import SamplingParams  # noqa: E402
from topology.config import KV_CACHE_DTYPES  # noqa: E402

MODES = ("eager", "kernels", "graphs", "overlap", "prefetch", "prefetch_mlp")
# prefetch: graphs with weights read into L2 ahead of their products (kernels/l2_prefetch.py);
# prefetch_mlp: also the head of each gate|up weight (--prefetch-mlp-fraction of each row)


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def time_steps(engine: Engine, steps: int, device: torch.device) -> list[float]:
    """Wall time of each step; with overlap scheduling no synchronisation between steps (each
    call waits for the previous step's tokens, so in steady state it lasts one device step)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    between = sync if not engine.overlap else (lambda: None)
    times = []
    sync()
    for _ in range(steps):
        between()
        t0 = time.perf_counter()
        engine.step()
        between()
        times.append((time.perf_counter() - t0) * 1e3)
    sync()
    return times


def prefilled_engine(model, cfg, batch: int, context: int, max_new: int, page_size: int, device: torch.device,
                     dtype: torch.dtype, overlap: bool = False, graphs: bool = False,
                     extra_pages: int = 0) -> tuple[Engine, float | None]:
    """An engine over a fresh cache holding `batch` random `context`-token prompts, prefilled (each
    has its first token and may take `max_new` in all); with `graphs`, decode graphs captured
    first; `extra_pages` free for later arrivals. Returns it and the capture's seconds (None without graphs)."""
    pages_per_seq = -(-(context + max_new + 8) // page_size)
    cache = PagedKVCache(cfg, page_size=page_size, num_pages=batch * pages_per_seq + 8 + extra_pages, device=device,
                         dtype=dtype)
    engine = Engine(model, cache, SchedulerLimits(max_batch_tokens=max(8192, batch), max_running=batch,
                                                  chunk_size=4096), overlap=overlap)
    capture_s = None
    if graphs:
        t0 = time.perf_counter()
        engine.capture_decode_graphs(batch)
        capture_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=max_new, ignore_eos=True)
    media = set(cfg.media_token_ids.values())
    for _ in range(batch):  # random text: no media placeholder ids
        prompt = torch.randint(3, cfg.vocab_size, (context,), generator=g).tolist()
        engine.add_request([3 if t in media else t for t in prompt], params)
    while any(not s.output for s in engine.scheduler.running + engine.scheduler.waiting):
        engine.step()  # prefill
    return engine, capture_s


def measure(model, cfg, batch: int, mode: str, args, device: torch.device, dtype: torch.dtype,
            kv_dtype: torch.dtype | None = None) -> dict:
    model.set_kernels(mode != "eager")
    prefetch = mode.startswith("prefetch")
    model.weight_prefetch = WeightPrefetch(device, max_rows=max(batch, 1), mlp_fraction=args.prefetch_mlp_fraction
                                           if mode == "prefetch_mlp" else 0.0) if prefetch else None
    engine, capture_s = prefilled_engine(model, cfg, batch, args.context, args.steps + args.warmup + 4, args.page_size,
                                         device, kv_dtype or dtype, overlap=mode == "overlap",
                                         graphs=mode in ("graphs", "overlap") or prefetch)
    time_steps(engine, args.warmup, device)
    times = time_steps(engine, args.steps, device)
    replays = engine.graphs.replays if engine.graphs is not None else 0
    if engine.graphs is not None:
        engine.graphs.close()
    model.weight_prefetch = None
    for seq in list(engine.scheduler.running):
        engine.cancel(seq)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"median_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))],
            "times_ms": [round(t, 3) for t in times], "graph_replays": replays, "capture_s": capture_s}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--models", default="e4b")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--kv-dtypes", default="auto", help="KV cache storage, comma-separated: auto (the model's "
                    "dtype), fp8_e4m3")
    ap.add_argument("--prefetch-mlp-fraction", type=float, default=0.15, help="prefetch_mlp mode: share of each "
                    "gate|up row read into L2 with the o projection")
    ap.add_argument("--smoke", action="store_true", help="CPU, float32, a tiny config, eager only")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    modes = [m for m in args.modes.split(",") if not args.smoke or m == "eager"]  # kernels and graphs: CUDA
    clock = Clock(device)
    bandwidth = copy_bandwidth(device, clock, args.smoke)
    header = {"benchmark": "decode_step", "command": "python bench/decode_step.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "commit": args.commit, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": str(dtype),
        "context": args.context, "copy_bandwidth_gbps": round(bandwidth, 1), "dependent_launch": PDL_ON,
        "tma_stages": DECODE_TILES.tma_stages, "programs_per_sm": DECODE_TILES.programs_per_sm,
        "split_keys": DECODE_TILES.split_keys, "max_splits": MAX_SPLITS,
        "attention_early_metadata": DECODE_TILES.early_metadata,
        "small_m_products": SMALL_M_ON, "gemv_prefetch_k": PREFETCH_K, "gemv_early_chunks": EARLY_CHUNKS,
        "gemv_tma": TMA_ON,
        "splits_in_norm_rows": SPLITS_IN_NORM_ROWS,
        "timing": "wall clock of Engine.step between device synchronisations (batch build, forward, sampling); "
                  "overlap: no synchronisation between steps (overlap scheduling: the host's work of a step "
                  "runs while the device runs the next)",
        "floor": "mtp_speed.step_bytes / copy bandwidth", "anchor": SOURCE + ": TPOT at concurrency 1, set "
        "beside batch-1 steps (the engine alone: the api hop is not in these figures)"}
    records = []
    for name in args.models.split(","):
        target, _, source = model_configs(name, args.smoke)
        cfg = target.text
        model = random_text_decoder(cfg, device, dtype, seed=0)
        for batch in (int(b) for b in args.batches.split(",")):
            for kv_name, mode in ((k, m) for k in args.kv_dtypes.split(",") for m in modes):
                kv_dtype = KV_CACHE_DTYPES[kv_name] and getattr(torch, KV_CACHE_DTYPES[kv_name])
                floor_ms = step_bytes(model, cfg, batch, 1, args.context, dtype.itemsize,
                                      (kv_dtype or dtype).itemsize) / (bandwidth * 1e9) * 1e3
                try:
                    result = measure(model, cfg, batch, mode, args, device, dtype, kv_dtype)
                except Exception as exc:  # a record of what failed, the rest still measured
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                record = {"model": name, "config": source, "batch": batch, "mode": mode, "kv_dtype": kv_name,
                          "floor_ms": round(floor_ms, 3), **result}
                if "median_ms" in result:
                    record["over_floor"] = round(result["median_ms"] / floor_ms, 2)
                    record["output_tok_per_s"] = round(batch * 1e3 / result["median_ms"], 1)
                    if batch == 1 and name in MODEL_KEYS:  # a step at batch 1 is the TPOT at concurrency 1
                        record["sglang_tpot_ms"] = SGLANG_H200[MODEL_KEYS[name]][0]
                        record["tpot_speedup_vs_sglang"] = round(record["sglang_tpot_ms"] / result["median_ms"], 3)
                records.append(record)
                say(f"{name} batch {batch} {mode} kv {kv_name}: " + (f"{result['median_ms']:.2f} ms/step (floor {floor_ms:.2f})"
                                                         if "median_ms" in result else result["error"]))
                args.out.write_text(json.dumps({"header": header, "records": records}, indent=1))
        del model
    return {"header": header, "records": records}


if __name__ == "__main__":
    main()

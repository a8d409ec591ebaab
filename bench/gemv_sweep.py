"""Small-M matrix products of a decode step: cuBLAS `F.linear` against the `kernels.gemv` Triton
kernels over a sweep of their tiles, on the device (CUDA only).

For each weight of the E4B decode step and of the 26B-A4B dense parts (shapes from
tests/fixtures/hf_configs through `config.parse_config`: the packed qkv of each layer kind, o_proj,
the MLP's packed gate|up and down, E4B's per-layer-input gate and projection and its per-layer
model projection, 26B-A4B's router, the lm_head) and each row count M (1, 2, 4, 8, 16):

- cuBLAS `F.linear`; for the packed gate|up also `F.linear` then `fused.gelu_mul` (the decoder's
  path today);
- `small_m_linear` over the swept `GemvTiles`, and for the packed gate|up `small_m_gate_up_gelu`
  over its own sweep; each also with `tiles=None` (the current defaults).

Every configuration's output is checked against the twin (cuBLAS in bf16; relative error of the
norms, threshold 1e-2, its output buffer poisoned with NaN first) before it is timed; failing or
uncompilable ones are listed and left out. Timing: at least `--calls` calls in one CUDA graph,
each on its own copy of the weight when a copy is small (the copies total several times the
L2 cache, so every call streams its weight from HBM as a decode step's layers do), the graph's
replays timed with CUDA events; per call = median replay / calls, so launch gaps are those of a
replayed decode step. TB/s counts weight, x and output bytes once.

The kernels are compiled ahead in `--jobs` worker processes (Triton's on-disk cache then serves
this process), so the full sweep should compile and run in about three minutes on an H200.

The --out JSON holds the command line, per (shape, kernel, M) the cuBLAS time, the best
configuration with its time, TB/s and errors, the defaults' time and every configuration's time;
per model and M the summed decode-step time of these products (cuBLAS against the best kernels);
and a suggested `DEFAULT_TILES` table: per kernel and (rows, K) bucket the configuration of least
summed time over the bucket's shapes and all M, weighted by calls per decode step.

    PYTHONPATH=. python bench/gemv_sweep.py --commit <sha> --out bench/results/gemv_sweep_h200.json
    PYTHONPATH=. python bench/gemv_sweep.py --quick --out /tmp/gemv_quick.json   # a dozen configs a shape
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gemma4_model.config import SLIDING, parse_config  # noqa: E402
from gemma4_model.kernels.gemv import (  # noqa: E402
    MAX_ROWS, GemvTiles, default_tiles, small_m_gate_up_gelu, small_m_gate_up_gelu_torch, small_m_linear,
    tiles_bucket,
)

CONFIGS = ROOT / "tests" / "fixtures" / "hf_configs"
MODELS = {"e4b": "gemma-4-E4B-it", "26b_a4b": "gemma-4-26B-A4B-it"}
SMS = 132  # H200; read off the device in main()
ROTATE_BYTES = 256 << 20  # weight copies per shape: about five times the H200's 50 MB of L2
MAX_COPIES = 128
SMEM_LIMIT = 160 << 10  # of the H200's 227 KB a program may take, leaving room for Triton's own

FULL_GRID = dict(block_n=(8, 16, 32, 64), block_k=(128, 256, 512), split_k=(1, 2, 4), num_warps=(4, 8),
                 num_stages=(2, 3, 4))
QUICK_GRID = dict(block_n=(16, 32, 64), block_k=(256,), split_k=(1, 2, 4), num_warps=(4,), num_stages=(3, 4))
KERNELS: dict[str, Callable] = {"linear": small_m_linear, "gate_up": small_m_gate_up_gelu}


@dataclass(frozen=True)
class Shape:
    """One weight of a decode step: [rows, k] (rows = 2I for a packed gate|up), called `per_step`
    times per step."""

    model: str
    name: str
    rows: int
    k: int
    per_step: int
    gate_up: bool = False

    @property
    def kernels(self) -> tuple[str, ...]:
        return ("linear", "gate_up") if self.gate_up else ("linear",)


def model_shapes(models: Sequence[str]) -> list[Shape]:
    """The distinct weight shapes of each model's decode step, with their calls per step."""
    shapes = []
    for model in models:
        cfg = parse_config(json.loads((CONFIGS / f"{MODELS[model]}.json").read_text())).text
        h = cfg.hidden_size
        counts: collections.Counter = collections.Counter()
        for spec in cfg.layers:
            kind = "sliding" if spec.layer_type == SLIDING else "full"
            q = cfg.num_heads * spec.head_dim
            kv = spec.num_kv_heads * spec.head_dim * (1 if spec.k_eq_v else 2) if spec.owns_kv else 0
            counts[(f"qkv_{kind}" if spec.owns_kv else f"q_{kind}_kv_shared", q + kv, h, False)] += 1
            counts[(f"o_proj_{kind}", h, q, False)] += 1
            counts[("mlp_gate_up", 2 * spec.intermediate_size, h, True)] += 1
            counts[("mlp_down", h, spec.intermediate_size, False)] += 1
            if cfg.ple_dim:
                counts[("ple_gate", cfg.ple_dim, h, False)] += 1
                counts[("ple_projection", h, cfg.ple_dim, False)] += 1
            if cfg.moe is not None:
                counts[("router", cfg.moe.num_experts, h, False)] += 1
        if cfg.ple_dim:
            counts[("ple_model_projection", cfg.num_layers * cfg.ple_dim, h, False)] += 1
        counts[("lm_head", cfg.vocab_size, h, False)] += 1
        shapes += [Shape(model, name, rows, k, n, gate_up) for (name, rows, k, gate_up), n in counts.items()]
    return shapes


def effective_splits(k: int, tiles: GemvTiles) -> int:
    """The splits `gemv._launch` makes of K (none past K's end)."""
    chunks = -(-k // tiles.block_k)
    per_split = -(-chunks // min(tiles.split_k, chunks))
    return -(-chunks // per_split)


def candidate_tiles(kind: str, rows: int, k: int, quick: bool = False, sms: int = SMS) -> list[GemvTiles]:
    """The swept tiles for one kernel and weight [rows, k] (bf16), less the obviously bad: a
    weight chunk per stage outside 4-64 KB, under 8 KB of weight in flight (stages - 1 chunks),
    8 warps on chunks under 32 KB, shared memory over `SMEM_LIMIT`, a chunk twice K or more, a
    split count that `gemv` would lower (a duplicate), splits of under two chunks each or past
    need (a split is tried only while half as many splits give under two programs per
    multiprocessor), pipelines deeper than the loop (but the shallowest such), and grids under
    half the chip when another tiling fills it."""
    grid = QUICK_GRID if quick else FULL_GRID
    cols = rows // 2 if kind == "gate_up" else rows
    slabs = 2 if kind == "gate_up" else 1
    most_programs = -(-cols // min(grid["block_n"])) * max(grid["split_k"])
    out, seen = [], set()
    for bn, bk, split, warps, stages in itertools.product(*grid.values()):
        weight_rows = slabs * bn
        elements = weight_rows * bk
        if not 2048 <= elements <= 32768 or (warps == 8 and elements < 16384) or (stages - 1) * elements < 4096:
            continue
        if stages * (weight_rows + MAX_ROWS) * bk * 2 > SMEM_LIMIT or bk >= 2 * k:
            continue
        tiles = GemvTiles(bn, bk, split, warps, stages)
        splits = effective_splits(k, tiles)
        if splits != split:
            continue
        column_blocks = -(-cols // bn)
        chunks_per_split = -(-k // (bk * split))
        if split > 1 and (chunks_per_split < 2 or column_blocks * split // 2 >= 2 * sms):
            continue
        if column_blocks * split < min(sms, most_programs) // 2:
            continue
        depth = (bn, bk, split, warps, min(stages, chunks_per_split + 1))  # a deeper pipeline changes nothing
        if depth not in seen:
            seen.add(depth)
            out.append(tiles)
    return out


def with_tma(tiles: list[GemvTiles], which: str) -> list[GemvTiles]:
    """The tiles as they are ("0"), their tensor-descriptor twins where a TMA box allows ("1"), or both."""
    tma = [replace(t, tma=True) for t in tiles if t.block_k <= 256 and t.block_n <= 256]
    return {"0": tiles, "1": tma, "both": tiles + tma}[which]


# ---- compiling ahead, in worker processes ----------------------------------------------------------


def _compile_key(kind: str, rows: int, k: int, tiles: GemvTiles) -> tuple:
    """What a compiled variant depends on here (every model shape is a multiple of 16)."""
    return (kind, tiles.block_n, tiles.block_k, tiles.num_warps, tiles.num_stages, effective_splits(k, tiles),
            k % tiles.block_k == 0, rows % 32 == 0, k % 16 == 0, tiles.tma)


def _compile_worker(jobs: list[tuple[str, int, int, GemvTiles]]) -> list[dict]:
    """Run each job once on a zero x (compiling it into Triton's on-disk cache); the failures."""
    failed = []
    for kind, rows, k, tiles in jobs:
        try:
            w = torch.empty((rows, k), dtype=torch.bfloat16, device="cuda")
            KERNELS[kind](torch.zeros((1, k), dtype=torch.bfloat16, device="cuda"), w, tiles)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported, and the config left out
            failed.append({"kernel": kind, "rows": rows, "k": k, "tiles": asdict(tiles), "error": repr(exc)[:300],
                           "key": list(_compile_key(kind, rows, k, tiles))})
    return failed


def precompile(plan: list[tuple[Shape, str, list[GemvTiles]]], workers: int) -> list[dict]:
    """Compile every distinct variant of the plan in `workers` processes (none: 0)."""
    jobs: dict[tuple, tuple] = {}
    for shape, kind, tiles_list in plan:
        for tiles in tiles_list + [default_tiles(kind, shape.rows, shape.k)]:
            key = _compile_key(kind, shape.rows, shape.k, tiles)
            if key not in jobs or shape.rows * shape.k < jobs[key][1] * jobs[key][2]:
                jobs[key] = (kind, shape.rows, shape.k, tiles)
    if workers <= 0 or not jobs:
        return []
    todo = sorted(jobs.values(), key=lambda j: (j[3].block_k, j[3].block_n, j[3].num_stages), reverse=True)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(_compile_worker, [todo[i::workers] for i in range(workers)])
        return [f for part in parts for f in part]


# ---- timing --------------------------------------------------------------------------------------


def graph_us(calls: list[Callable[[], object]], reps: int, stream: torch.cuda.Stream) -> float:
    """Microseconds per call: the calls captured in one CUDA graph, the median of `reps` replays."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    del graph
    return statistics.median(times) / len(calls)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def tiles_name(tiles: GemvTiles | None) -> str:
    if tiles is None:
        return "default"
    return (f"n{tiles.block_n}_k{tiles.block_k}_s{tiles.split_k}_w{tiles.num_warps}_st{tiles.num_stages}"
            + ("_tma" if tiles.tma else ""))


def parse_tiles_name(name: str) -> GemvTiles:
    """The tiles of a `tiles_name`."""
    found = re.fullmatch(r"n(\d+)_k(\d+)_s(\d+)_w(\d+)_st(\d+)(_tma)?", name)
    if found is None:
        raise ValueError(f"not a tiles name: {name!r}")
    return GemvTiles(*(int(v) for v in found.groups()[:5]), tma=found.group(6) is not None)


def measure(shape: Shape, kind: str, m: int, x: torch.Tensor, copies: list[torch.Tensor], tiles_list: list[GemvTiles],
            skip: set, calls: int, reps: int, stream: torch.cuda.Stream) -> dict:
    """One (shape, kernel, M) record: cuBLAS, the defaults and every swept tiling (less those whose
    compiled variant, by `_compile_key`, is in `skip`: it failed ahead)."""
    from gemma4_model.kernels.fused import gelu_mul

    cols = shape.rows // 2 if kind == "gate_up" else shape.rows
    n_calls = max(calls, len(copies))
    weights = [copies[i % len(copies)] for i in range(n_calls)]
    moved = (shape.rows * shape.k + m * shape.k + m * cols) * x.element_size()
    inter = shape.rows // 2
    if kind == "gate_up":
        want = small_m_gate_up_gelu_torch(x, copies[0])
        cublas = [lambda w=w: gelu_mul(*F.linear(x, w).split(inter, dim=1)) for w in weights]
    else:
        want = F.linear(x, copies[0])
        cublas = [lambda w=w: F.linear(x, w) for w in weights]
    want32 = (small_m_gate_up_gelu_torch if kind == "gate_up" else F.linear)(x.float(), copies[0].float())
    cublas_us = graph_us(cublas, reps, stream)
    record = {"model": shape.model, "shape": shape.name, "rows": shape.rows, "k": shape.k, "per_step": shape.per_step,
              "kernel": kind, "packed_gate_up": shape.gate_up, "m": m,
              "bucket": list(tiles_bucket(shape.rows, shape.k)),
              "weight_mb": round(shape.rows * shape.k * 2 / 2**20, 2), "calls_per_graph": n_calls,
              "cublas_us": round(cublas_us, 3), "cublas_tbs": round(moved / cublas_us / 1e6, 3),
              "cublas_rel_err_fp32": rel_err(want, want32), "times_us": {}, "failed": []}
    if kind == "gate_up":
        linear_only = [lambda w=w: F.linear(x, w) for w in weights]
        record["cublas_linear_only_us"] = round(graph_us(linear_only, reps, stream), 3)
    fn = KERNELS[kind]
    for tiles in [None] + tiles_list:
        name = tiles_name(tiles)
        if tiles is not None and _compile_key(kind, shape.rows, shape.k, tiles) in skip:
            continue
        try:
            torch.full((m, cols), float("nan"), dtype=x.dtype, device=x.device)  # freed: the output's block
            got = fn(x, copies[0], tiles)
            err = rel_err(got, want)
            if not err < 1e-2:
                record["failed"].append({"tiles": name, "rel_err": err})
                continue
            us = graph_us([lambda w=w: fn(x, w, tiles) for w in weights], reps, stream)
        except Exception as exc:  # noqa: BLE001 - reported, and the config left out
            record["failed"].append({"tiles": name, "error": repr(exc)[:300]})
            continue
        record["times_us"][name] = round(us, 3)
        if tiles is None:
            record["default"] = {"tiles": asdict(default_tiles(kind, shape.rows, shape.k)), "us": round(us, 3),
                                 "tbs": round(moved / us / 1e6, 3), "rel_err": err}
        elif "best" not in record or us < record["best"]["us"]:
            record["best"] = {"tiles": asdict(tiles), "name": name, "us": round(us, 3),
                              "tbs": round(moved / us / 1e6, 3), "rel_err_vs_cublas": err,
                              "rel_err_vs_fp32": rel_err(got, want32)}
    if "best" in record:
        record["speedup_vs_cublas"] = round(cublas_us / record["best"]["us"], 3)
        ranked = sorted((us, n) for n, us in record["times_us"].items() if n != "default")
        record["top"] = [{"tiles": n, "us": us} for us, n in ranked[:5]]
    return record


# ---- summaries --------------------------------------------------------------------------------------


def step_totals(records: list[dict]) -> dict:
    """Per model and M: the decode step's summed time of these products (times calls per step):
    cuBLAS (F.linear, then gelu_mul for the packed gate|up) against the best kernel per shape (the
    fused gate|up kernel for the packed gate|up), and against the faster of the two per shape."""
    totals: dict = {}
    for r in records:
        if "best" not in r or r["kernel"] != ("gate_up" if r["packed_gate_up"] else "linear"):
            continue
        t = totals.setdefault(r["model"], {}).setdefault(str(r["m"]), {"cublas_us": 0.0, "kernels_us": 0.0,
                                                                        "faster_of_both_us": 0.0})
        t["cublas_us"] = round(t["cublas_us"] + r["per_step"] * r["cublas_us"], 2)
        t["kernels_us"] = round(t["kernels_us"] + r["per_step"] * r["best"]["us"], 2)
        t["faster_of_both_us"] = round(t["faster_of_both_us"] + r["per_step"] * min(r["cublas_us"], r["best"]["us"]), 2)
    return totals


def suggested_table(records: list[dict]) -> list[dict]:
    """Per (kernel, bucket): the tiles of least time summed over the bucket's shapes and every M
    (weighted by calls per step), among the tiles timed for all of them."""
    groups: dict = collections.defaultdict(list)
    for r in records:
        if r["times_us"]:
            groups[(r["kernel"], *r["bucket"])].append(r)
    table = []
    for (kind, rows_b, k_b), recs in sorted(groups.items()):
        names = set.intersection(*(set(n for n in r["times_us"] if n != "default") for r in recs))
        if not names:
            continue
        total = {n: sum(r["per_step"] * r["times_us"][n] for r in recs) for n in names}
        best = min(total, key=total.get)
        default_total = sum(r["per_step"] * r["times_us"].get("default", math.nan) for r in recs)
        table.append({"kernel": kind, "bucket": [rows_b, k_b], "tiles": asdict(parse_tiles_name(best)), "name": best,
                      "shapes": sorted({f"{r['model']}:{r['shape']}" for r in recs}),
                      "total_us": round(total[best], 2), "default_total_us": round(default_total, 2),
                      "cublas_total_us": round(sum(r["per_step"] * r["cublas_us"] for r in recs), 2)})
    return table


def table_literal(table: list[dict]) -> str:
    """The suggested table as `gemv.DEFAULT_TILES` source lines."""
    return "\n".join(f"    ({row['kernel']!r}, {row['bucket'][0]}, {row['bucket'][1]}): GemvTiles("
                     f"{_tiles_arguments(row['tiles'])}),  # {', '.join(row['shapes'])}" for row in table)


def _tiles_arguments(tiles: dict) -> str:
    """GemvTiles' five leading fields by position, the rest by name where not their default."""
    defaults = GemvTiles(16, 16)
    leading = ("block_n", "block_k", "split_k", "num_warps", "num_stages")
    return ", ".join([str(tiles[k]) for k in leading] + [f"{k}={v!r}" for k, v in tiles.items()
                                                          if k not in leading and v != getattr(defaults, k)])


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--models", default="e4b,26b_a4b")
    ap.add_argument("--ms", default="1,2,4,8,16", help="row counts (at most 16)")
    ap.add_argument("--quick", action="store_true", help="sweep about a dozen tiles a shape instead of about 60")
    ap.add_argument("--only", default="", help="only shapes whose name contains this")
    ap.add_argument("--tma", choices=("0", "1", "both"), default="0", help="the tiles with tensor-descriptor loads "
                    "(GemvTiles.tma; chunks of at most 256 columns), without them (0), or both")
    ap.add_argument("--calls", type=int, default=20, help="calls per captured graph (more for small weights)")
    ap.add_argument("--reps", type=int, default=5, help="timed graph replays (the median is kept)")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile processes (0: none)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemv_sweep needs a CUDA device")
    ms = [int(m) for m in args.ms.split(",")]
    if max(ms) > MAX_ROWS:
        raise SystemExit(f"--ms: at most {MAX_ROWS} rows")
    import triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [s for s in model_shapes(args.models.split(",")) if args.only in s.name]
    plan = [(s, kind, with_tma(candidate_tiles(kind, s.rows, s.k, args.quick, sms), args.tma))
            for s in shapes for kind in s.kernels]
    t0 = time.perf_counter()
    failed = precompile(plan, args.jobs)
    compile_s = time.perf_counter() - t0
    skip = {tuple(f["key"]) for f in failed}
    print(f"{len(plan)} (shape, kernel) pairs, {sum(len(t) for _, _, t in plan)} configs; compiled ahead in "
          f"{compile_s:.1f} s, {len(failed)} failed", flush=True)
    result = {"benchmark": "gemv_sweep", "command": "python bench/gemv_sweep.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "commit": args.commit, "torch": torch.__version__,
        "triton": triton.__version__, "device": torch.cuda.get_device_name(0), "sms": sms, "quick": args.quick,
        "ms": ms, "configs": {k: list(v) for k, v in (QUICK_GRID if args.quick else FULL_GRID).items()},
        "compile_ahead_s": round(compile_s, 1), "compile_failures": failed, "sweep_s": 0.0, "records": []}
    stream = torch.cuda.Stream()
    g = torch.Generator(device="cuda").manual_seed(0)
    t1 = time.perf_counter()
    for shape in shapes:
        nbytes = shape.rows * shape.k * 2
        n_copies = max(1, min(MAX_COPIES, -(-ROTATE_BYTES // nbytes)))
        copies = [(torch.randn((shape.rows, shape.k), generator=g, device="cuda") * shape.k**-0.5).to(torch.bfloat16)
                  for _ in range(n_copies)]
        for m in ms:
            x = torch.randn((m, shape.k), generator=g, device="cuda").to(torch.bfloat16)
            for kind, tiles_list in ((kind, t) for s, kind, t in plan if s == shape):
                r = measure(shape, kind, m, x, copies, tiles_list, skip, args.calls, args.reps, stream)
                result["records"].append(r)
                best = r.get("best", {})
                print(f"{shape.model:8s} {shape.name:22s} {shape.rows:6d}x{shape.k:<5d} {kind:7s} M={m:2d}  cublas "
                      f"{r['cublas_us']:8.2f} us {r['cublas_tbs']:5.2f} TB/s  best {best.get('us', math.nan):8.2f} us "
                      f"{best.get('tbs', math.nan):5.2f} TB/s {best.get('name', '-'):24s} default "
                      f"{r.get('default', {}).get('us', math.nan):8.2f} us  failed {len(r['failed'])}", flush=True)
        del copies
        torch.cuda.empty_cache()
        result["sweep_s"] = round(time.perf_counter() - t1, 1)
        args.out.write_text(json.dumps(result, indent=1))
    result["step_totals_us"] = step_totals(result["records"])
    result["suggested_table"] = suggested_table(result["records"])
    result["suggested_table_literal"] = table_literal(result["suggested_table"])
    args.out.write_text(json.dumps(result, indent=1))
    print("\ndecode-step totals of these products (us):", json.dumps(result["step_totals_us"]))
    print("suggested DEFAULT_TILES:\n" + result["suggested_table_literal"])
    print(f"compile {compile_s:.0f} s, sweep {result['sweep_s']:.0f} s; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

"""Tile sizes of the MoE grouped products (`gemma4_model.kernels.moe`) measured on the device.

For each token count, random routing over the 26B-A4B experts (128 experts, top 8, 2816 x 704),
times `moe_expert_rows` (alignment, gate|up product, down product) replayed in a CUDA graph for
every candidate `MoeTiles`, the gate|up tiles first (down fixed), then the down tiles with the
best gate|up; reports the best, the current `moe_tiles` choice, the expert bytes read and their
rate, and the routing (`moe_route`) and combination (`moe_combine`) launches' time. Candidates are
compiled first by `--jobs` worker processes (Triton's on-disk cache), so the sweep is mostly timing.

    PYTHONPATH=. python bench/moe_sweep.py --out bench/results/moe_sweep_h200.json --commit <sha>
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from gemma4_model.kernels.fused import residual_norm
from gemma4_model.kernels.moe import KernelTiles, MoeTiles, moe_combine, moe_combine_tail, moe_expert_rows, moe_tiles

HIDDEN, INTER, EXPERTS, TOP_K = 2816, 704, 128, 8


def kernel_candidates(quick: bool) -> list[KernelTiles]:
    ns, ks = (32, 64, 128), (64, 128, 256)
    warps, stages = ((4, 8), (3, 4)) if not quick else ((4,), (3,))
    return [KernelTiles(n, k, w, s) for n, k, w, s in itertools.product(ns, ks, warps, stages)]


def fits(t: MoeTiles, smem_bytes: int = 200 << 10) -> bool:
    """Whether both kernels' pipelined tiles fit in shared memory (gate|up loads two weight tiles)."""
    def need(k: KernelTiles, weight_tiles: int) -> int:
        return k.num_stages * (t.block_m * k.block_k + weight_tiles * k.block_k * k.block_n) * 2
    return need(t.gate_up, 2) <= smem_bytes and need(t.down, 1) <= smem_bytes


def block_ms(pairs: int) -> tuple[int, ...]:
    if pairs <= 256:
        return (16,)
    if pairs <= 2048:
        return (16, 32, 64)
    return (32, 64, 128)


def tensors(tokens: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn((tokens, HIDDEN), generator=g, device="cuda").to(torch.bfloat16)
    gate_up = (torch.randn((EXPERTS, 2 * INTER, HIDDEN), generator=g, device="cuda") * HIDDEN**-0.5).to(torch.bfloat16)
    down = (torch.randn((EXPERTS, HIDDEN, INTER), generator=g, device="cuda") * INTER**-0.5).to(torch.bfloat16)
    weights, experts = torch.rand((tokens, EXPERTS), generator=g, device="cuda").topk(TOP_K, dim=-1)
    return x, (weights / weights.sum(-1, keepdim=True)).float(), experts.to(torch.int32), gate_up, down


def _compile(tiles: list[MoeTiles]) -> int:
    args = tensors(1)
    built = 0
    for t in tiles:
        try:
            moe_expert_rows(*args, tiles=t)
            built += 1
        except Exception:  # noqa: BLE001 - a candidate that does not build is left out when timed
            pass
    torch.cuda.synchronize()
    return built


def precompile(all_tiles: list[MoeTiles], jobs: int) -> float:
    """Compile every candidate in `jobs` processes (the kernels land in Triton's cache)."""
    t0 = time.perf_counter()
    chunks = [all_tiles[i::jobs] for i in range(jobs)]
    with mp.get_context("spawn").Pool(jobs) as pool:
        pool.map(_compile, [c for c in chunks if c])
    return time.perf_counter() - t0


def graph_time_us(fn, reps: int = 20, rounds: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    del graph
    return best


def sweep_tokens(tokens: int, cands: list[KernelTiles]) -> dict:
    x, weights, experts, gate_up, down = tensors(tokens, seed=tokens)
    used = torch.unique(experts).numel()
    expert_bytes = used * 3 * HIDDEN * INTER * 2
    want = moe_expert_rows(x, weights, experts, gate_up, down, tiles=moe_tiles(tokens * TOP_K)).float()

    reps = 20 if tokens <= 256 else 3

    def timed(t: MoeTiles) -> float:
        if not fits(t):
            return float("inf")
        try:
            return graph_time_us(lambda: moe_expert_rows(x, weights, experts, gate_up, down, tiles=t), reps=reps,
                                 rounds=3)
        except Exception:  # noqa: BLE001 - out of resources: not a candidate
            torch.cuda.synchronize()
            return float("inf")

    default = moe_tiles(tokens * TOP_K)
    results = {"default": (default, timed(default))}
    best = results["default"]
    for bm in block_ms(tokens * TOP_K):
        fixed = KernelTiles(64, 64)
        for c in cands:
            t = MoeTiles(bm, c, fixed)
            us = timed(t)
            if us < best[1]:
                best = (t, us)
    for c in cands:
        t = MoeTiles(best[0].block_m, best[0].gate_up, c)
        us = timed(t)
        if us < best[1]:
            best = (t, us)
    got = moe_expert_rows(x, weights, experts, gate_up, down, tiles=best[0]).float()
    rel = ((got - want).norm() / want.norm()).item()
    return {"tokens": tokens, "pairs": tokens * TOP_K, "experts_used": used, "expert_mb": round(expert_bytes / 1e6, 1),
            "default": {"tiles": _tiles_dict(default), "us": round(results["default"][1], 2),
                        "tb_per_s": round(expert_bytes / results["default"][1] / 1e6, 3)},
            "best": {"tiles": _tiles_dict(best[0]), "us": round(best[1], 2),
                     "tb_per_s": round(expert_bytes / best[1] / 1e6, 3)},
            "best_vs_default_rel_err": rel}


def _tiles_dict(t: MoeTiles) -> dict:
    return {"block_m": t.block_m, "gate_up": vars(t.gate_up), "down": vars(t.down)}


def route_and_combine_us(tokens: int) -> dict:
    """The routing and combination launches (with the router's product) at this token count; the
    routing also with the router's product as its own cuBLAS call (`route_separate_us`), which
    `moe_route` makes only past `FUSED_ROUTER_MAX_ROWS` rows; the combination with the layer's
    residual norm in one launch (`moe_combine_tail`) and as two."""
    from gemma4_model.config import MoESpec
    from gemma4_model.kernels import moe
    from gemma4_model.kernels.moe import moe_route
    from gemma4_model.layers import RMSNorm, Router

    spec = MoESpec(num_experts=EXPERTS, top_k=TOP_K, intermediate_size=INTER)
    router = Router(HIDDEN, spec, 1e-6).cuda().to(torch.bfloat16)
    norm = RMSNorm(HIDDEN, 1e-6).cuda().to(torch.bfloat16)
    h = torch.randn((tokens, HIDDEN), device="cuda").to(torch.bfloat16)
    rows = torch.randn((tokens, TOP_K, HIDDEN), device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        route = graph_time_us(lambda: moe_route(h, router, norm))
        combine = graph_time_us(lambda: moe_combine(h, rows, norm.weight, norm.weight, 1e-6))
        scalar = torch.ones(1, device="cuda", dtype=torch.bfloat16)
        tail = graph_time_us(lambda: moe_combine_tail(h, rows, norm.weight, norm.weight, 1e-6, h, norm.weight, scalar,
                                                      norm.weight))
        two = graph_time_us(lambda: residual_norm(moe_combine(h, rows, norm.weight, norm.weight, 1e-6), h, norm.weight,
                                                  1e-6, scalar, norm.weight))
        fused_rows, moe.FUSED_ROUTER_MAX_ROWS = moe.FUSED_ROUTER_MAX_ROWS, 0
        try:
            separate = graph_time_us(lambda: moe_route(h, router, norm))
        finally:
            moe.FUSED_ROUTER_MAX_ROWS = fused_rows
    return {"route_us": round(route, 2), "route_separate_us": round(separate, 2), "combine_us": round(combine, 2),
            "combine_tail_us": round(tail, 2), "combine_then_residual_norm_us": round(two, 2)}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--tokens", default="1,4,16,64,100,128,256,512,2048,8192")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="fewer warps / stages candidates")
    args = ap.parse_args(argv)
    token_counts = [int(t) for t in args.tokens.split(",")]
    cands = kernel_candidates(args.quick)
    every = sorted({MoeTiles(bm, c, KernelTiles(64, 64)) for t in token_counts for bm in block_ms(t * TOP_K)
                    for c in cands} | {MoeTiles(bm, KernelTiles(64, 64), c) for t in token_counts
                                      for bm in block_ms(t * TOP_K) for c in cands}, key=repr)
    every = [t for t in every if fits(t)]
    compile_s = precompile(every, args.jobs) if args.jobs > 1 else 0.0
    records = []
    with torch.no_grad():
        for tokens in token_counts:
            rec = sweep_tokens(tokens, cands)
            rec.update(route_and_combine_us(tokens))
            records.append(rec)
            print(json.dumps(rec), flush=True)
    result = {"benchmark": "moe_sweep", "command": "python bench/moe_sweep.py " + " ".join(sys.argv[1:] if argv is None
                                                                                          else argv),
              "commit": args.commit, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
              "shape": {"hidden": HIDDEN, "inter": INTER, "experts": EXPERTS, "top_k": TOP_K, "dtype": "bfloat16"},
              "candidates_per_kernel": len(cands), "precompile_s": round(compile_s, 1), "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()

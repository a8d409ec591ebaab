"""Decode attention at serving batch sizes: `paged_attention_triton` launches (warps, pipeline
stages, V loaded with K or after the scores, keys per block, head-dim columns per score chunk,
fewest keys per split, programs over the splits, split counts) timed against the bytes a step
must read, on the device (CUDA only).

One decode row per sequence, every sequence at `--context` tokens (positions context-1), K/V
pages scattered over a pool as the cache leaves them, `--page-sizes` tokens a page (16: the
topology's default). Shapes from
tests/fixtures/hf_configs: 26B-A4B and E4B sliding (head 256) and full (head 512) layers. Floor
bytes: each sequence's visible keys (its window, or all) times K and V of every KV head, bf16.
Each launch is checked against the default launch first (equal up to bf16 rounding: the same
keys, partitioned otherwise by other split counts and sizes), each forced onto its kernel (gathering or TMA)
whatever the batch; the default launch, whose kernel and split count follow the batch, is timed
too. Time: `--calls` calls captured in one CUDA graph (no host launch overhead), the median of
`--reps` replays, per call.

    PYTHONPATH=. python bench/attention_sweep.py --commit <sha> --out bench/results/attention_sweep_h200.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gemv_sweep import graph_us  # noqa: E402
from gemma4_model.batch import ForwardBatch, GroupView  # noqa: E402
from gemma4_model.config import parse_config  # noqa: E402
from gemma4_model.kernels.paged_attention import (  # noqa: E402
    DECODE_TILES, MAX_SPLITS, NO_WINDOW, DecodeTiles, default_num_splits, paged_attention_triton)
from gemma4_model.kv_cache import KVGroup  # noqa: E402
from gemma4_model.page_pool import PagePool  # noqa: E402
from topology.config import KV_CACHE_DTYPES  # noqa: E402

CONFIGS = {"26b_a4b": "gemma-4-26B-A4B-it.json", "e4b": "gemma-4-E4B-it.json"}


def decode_case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, window: int | None,
                kv_dtype: torch.dtype = torch.bfloat16, page: int = 16):
    """q [batch, heads, head_dim] at position context-1 of each sequence, and its KV group (K and V
    stored as `kv_dtype`, `page` tokens a page) and batch."""
    g = torch.Generator(device="cuda").manual_seed(0)
    per_seq = -(-context // page)
    pages = batch * per_seq + 1
    k = torch.randn((1, pages, page, kv_heads, head_dim), generator=g, device="cuda").to(kv_dtype)
    v = torch.randn((1, pages, page, kv_heads, head_dim), generator=g, device="cuda").to(kv_dtype)
    group = KVGroup("bench", (0,), window, PagePool(pages), k, v)
    order = torch.randperm(pages - 1, generator=torch.Generator().manual_seed(0))
    tables = order.reshape(batch, per_seq).to("cuda")
    positions = torch.full((batch,), context - 1, dtype=torch.long, device="cuda")
    fb = ForwardBatch(token_ids=torch.zeros(batch, dtype=torch.long, device="cuda"), positions=positions,
                      query_starts=tuple(range(batch + 1)), kv_lens=(context,) * batch,
                      chunk_starts=(context - 1,) * batch, chunk_spans=(None,) * batch,
                      groups={"bench": GroupView(tables, torch.zeros(batch, dtype=torch.long, device="cuda"))},
                      logits_rows=torch.arange(batch, device="cuda"), page_size=page)
    q = torch.randn((batch, heads, head_dim), generator=g, device="cuda").to(torch.bfloat16) * head_dim**-0.5
    return q, group, fb


def layer_shapes(model: str) -> dict[str, tuple[int, int, int, int | None]]:
    """layer type -> (heads, kv_heads, head_dim, window)."""
    text = parse_config(json.loads((ROOT / "tests/fixtures/hf_configs" / CONFIGS[model]).read_text())).text
    raw = json.loads((ROOT / "tests/fixtures/hf_configs" / CONFIGS[model]).read_text())["text_config"]
    heads = raw["num_attention_heads"]
    full_kv = raw.get("num_global_key_value_heads") or raw["num_key_value_heads"]
    return {"sliding": (heads, raw["num_key_value_heads"], raw["head_dim"], text.sliding_window),
            "full": (heads, full_kv, raw.get("global_head_dim") or raw["head_dim"], None)}


def write(args, records: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "attention_sweep", "commit": args.commit, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "command": " ".join(["python"] + sys.argv),
        "page_sizes": args.page_sizes, "peak_gbps": args.peak_gbps, "records": records}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--models", default="26b_a4b,e4b")
    ap.add_argument("--batches", default="1,32,64,96")
    ap.add_argument("--contexts", default="512,1024,2048")
    ap.add_argument("--page-sizes", default="16", help="tokens per KV page (a topology's model.page_size)")
    ap.add_argument("--block-ns", default="0,32", help="keys per block to try (0: the default by head dim)")
    ap.add_argument("--block-dks", default="0", help="head-dim columns of K per score chunk to try (0: up to 256)")
    ap.add_argument("--prefetch-v", default="0,1", help="V loaded with K (1), after the scores (0), or both")
    ap.add_argument("--split-keys", default="64,256", help="fewest keys per flash-decoding split to try")
    ap.add_argument("--num-splits", default=f"2,4,8,{MAX_SPLITS}", help="flash-decoding splits (programs per sequence "
                    "and KV head) to try")
    ap.add_argument("--split-programs", default="0", help="programs over a sequence's splits to try (0: one a split)")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--kv-dtype", default="auto", choices=sorted(KV_CACHE_DTYPES), help="K/V storage (auto: bf16)")
    ap.add_argument("--tma-stages", default="0,2", help="pure decode pages read by TMA, this many in flight (0: off)")
    ap.add_argument("--block-dvs", default="0", help="head-dim columns of V per program to try (0: the whole head dim)")
    ap.add_argument("--fp16-products", default="1", help="over an fp8 cache, products in float16 (1), in bf16 (0), or both")
    ap.add_argument("--stages", default="1,2,3")
    ap.add_argument("--reps", type=int, default=20, help="graph replays timed (the median is kept)")
    ap.add_argument("--calls", type=int, default=10, help="calls captured in one graph (launch overhead left out)")
    ap.add_argument("--peak-gbps", type=float, default=4800.0, help="HBM bandwidth for the floor (H200: 4800)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_sweep needs a CUDA device")
    stream = torch.cuda.Stream()
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    prefetch_v = [bool(x) for x in ints(args.prefetch_v)]
    kv_dtype = getattr(torch, KV_CACHE_DTYPES[args.kv_dtype] or "bfloat16")
    fp16 = [bool(x) for x in ints(args.fp16_products)] if kv_dtype.itemsize == 1 else [DECODE_TILES.fp8_products_in_fp16]
    variants = [(DecodeTiles(w, s, p, n, k, g, block_dk=dk, block_dv=dv, fp8_products_in_fp16=f, tma_stages=t,
                             tma_min_sequences=1), splits)  # each variant on its own kernel at any batch
                for w, s, p, n, dk, k, g, splits, f, dv, t in
                itertools.product(ints(args.warps), ints(args.stages), prefetch_v, ints(args.block_ns),
                                  ints(args.block_dks), ints(args.split_keys), ints(args.split_programs),
                                  ints(args.num_splits), fp16, ints(args.block_dvs), ints(args.tma_stages))]
    records = []
    for model in args.models.split(","):
        for layer, (heads, kv_heads, head_dim, window) in layer_shapes(model).items():
            for batch, context, page in itertools.product(ints(args.batches), ints(args.contexts),
                                                          ints(args.page_sizes)):
                q, group, fb = decode_case(batch, context, heads, kv_heads, head_dim, window, kv_dtype, page)
                visible = min(context, window or context)
                floor_bytes = batch * visible * kv_heads * head_dim * 2 * kv_dtype.itemsize
                want = paged_attention_triton(q, group, 0, fb, "bench")
                timings = []
                for tiles, splits in variants:
                    try:
                        got = paged_attention_triton(q, group, 0, fb, "bench", num_splits=splits, tiles=tiles)
                    except OutOfResources as e:  # e.g. large pages' TMA stages past shared memory
                        timings.append({**tiles.__dict__, "num_splits": splits, "skipped": str(e)})
                        continue
                    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                    if err > 2e-2:
                        raise SystemExit(f"{model} {layer} b{batch} c{context} {tiles}: rel err {err:.3g}")
                    call = functools.partial(paged_attention_triton, q, group, 0, fb, "bench", num_splits=splits,
                                             tiles=tiles)
                    us = graph_us([call] * args.calls, args.reps, stream)
                    timings.append({**tiles.__dict__, "num_splits": splits, "us": round(us, 2),
                                    "gbps": round(floor_bytes / us / 1e3, 1)})
                best = min((t for t in timings if "us" in t), key=lambda t: t["us"])
                # the default launch at this batch (its split count and kernel chosen by batch size)
                default_call = functools.partial(paged_attention_triton, q, group, 0, fb, "bench")
                default_us = graph_us([default_call] * args.calls, args.reps, stream)
                splits = default_num_splits(fb, kv_heads, 16, q.device, DECODE_TILES, window or NO_WINDOW)
                default = {**DECODE_TILES.__dict__, "tma": DECODE_TILES.use_tma(batch, head_dim, splits),
                           "num_splits": splits,
                           "us": round(default_us, 2), "gbps": round(floor_bytes / default_us / 1e3, 1)}
                rec = {"model": model, "layer": layer, "batch": batch, "context": context, "page_size": page,
                       "kv_dtype": args.kv_dtype, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                       "window": window, "floor_bytes": floor_bytes,
                       "floor_us": round(floor_bytes / args.peak_gbps / 1e3, 2), "default": default, "best": best,
                       "variants": timings}
                records.append(rec)
                print(f"{model:8s} {layer:7s} b{batch:<3d} c{context:<5d} p{page:<3d} floor {rec['floor_us']:7.1f} us  "
                      f"default {default['us']:7.1f} (x{default['num_splits']})  best {best['us']:7.1f} "
                      f"(w{best['num_warps']} s{best['num_stages']} pv{int(best['prefetch_v'])} "
                      f"n{best['block_n']} dk{best['block_dk']} k{best['split_keys']} x{best['num_splits']} g{best['split_programs']}"
                      f" dv{best['block_dv']} f16 {int(best['fp8_products_in_fp16'])} tma{best['tma_stages']})",
                      flush=True)
                del q, group, fb
                write(args, records)  # after every case: a run stopped at its time limit keeps what it measured


if __name__ == "__main__":
    main()

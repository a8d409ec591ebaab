"""KV-cache bytes per token of each published Gemma 4 variant, from its config.json.

Usage: python bench/kv_bytes.py [--dtype-bytes 2] [--context 8192] [--kv-budget-gib 60]
                                [--out bench/results/kv_bytes_per_token.json]

Counts only KV-owning layers (KV-shared layers hold nothing), K and V both stored. Sliding
layers hold at most `sliding_window` tokens per request, so the per-request figure at a given
context is reported beside the naive one (every layer, every token). Capacity: the tokens of
`--context`-token requests a KV budget of `--kv-budget-gib` holds, with a bf16 cache and with
an FP8 (e4m3) one (`kv_cache_dtype = "fp8_e4m3"`: one byte per value).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemma4_model.config import FULL, SLIDING, parse_config  # noqa: E402

CONFIGS = ROOT / "tests" / "fixtures" / "hf_configs"


CACHE_DTYPES = {"bfloat16": 2, "float8_e4m3fn": 1}


def capacity(text, context: int, budget_gib: float) -> dict:
    """Per cache dtype: requests of `context` tokens, and their tokens, that fit the budget."""
    out = {}
    for name, size in CACHE_DTYPES.items():
        per_type = text.kv_bytes_per_token(size)
        per_request = per_type[SLIDING] * min(context, text.sliding_window) + per_type[FULL] * context
        requests = int(budget_gib * 2**30 // per_request)
        out[name] = {"bytes_per_request": per_request, "requests": requests, "tokens": requests * context}
    return out


def report(raw: dict, dtype_bytes: int, context: int, budget_gib: float = 60.0) -> dict:
    cfg = parse_config(raw)
    text = cfg.text
    per_type = text.kv_bytes_per_token(dtype_bytes)
    naive = sum(2 * l.num_kv_heads * l.head_dim * dtype_bytes for l in text.layers)
    held = per_type[SLIDING] * min(context, text.sliding_window) + per_type[FULL] * context
    return {
        "model_type": cfg.model_type,
        "layers": text.num_layers,
        "kv_owning_layers": {t: sum(1 for l in text.kv_layers if l.layer_type == t) for t in (SLIDING, FULL)},
        "bytes_per_token": per_type,
        "bytes_per_token_total": sum(per_type.values()),
        "naive_bytes_per_token_every_layer": naive,
        f"bytes_per_request_at_{context}_tokens": held,
        f"naive_bytes_per_request_at_{context}_tokens": naive * context,
        f"capacity_in_{budget_gib:g}_gib_at_{context}_tokens": capacity(text, context, budget_gib),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--kv-budget-gib", type=float, default=60.0, help="KV memory for the capacity figures")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_bytes_per_token.json")
    args = ap.parse_args()
    results = {}
    for path in sorted(CONFIGS.glob("*.json")):
        raw = json.loads(path.read_text())
        if raw.get("model_type", "").endswith("assistant"):
            continue  # assistants read the target's KV and hold none
        results[path.stem] = report(raw, args.dtype_bytes, args.context, args.kv_budget_gib)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    doc = {
        "command": "python bench/kv_bytes.py " + " ".join(sys.argv[1:]),
        "commit": commit,
        "dtype_bytes": args.dtype_bytes,
        "context": args.context,
        "kv_budget_gib": args.kv_budget_gib,
        "models": results,
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'model':28s} {'KV B/token':>11s} {'naive B/token':>14s} {'req@ctx MiB':>12s} {'naive MiB':>10s} "
          f"{'bf16 tokens':>12s} {'fp8 tokens':>12s}")
    for name, r in results.items():
        cap = r[f"capacity_in_{args.kv_budget_gib:g}_gib_at_{args.context}_tokens"]
        print(f"{name:28s} {r['bytes_per_token_total']:11d} {r['naive_bytes_per_token_every_layer']:14d} "
              f"{r[f'bytes_per_request_at_{args.context}_tokens'] / 2**20:12.1f} "
              f"{r[f'naive_bytes_per_request_at_{args.context}_tokens'] / 2**20:10.1f} "
              f"{cap['bfloat16']['tokens']:12d} {cap['float8_e4m3fn']['tokens']:12d}")


if __name__ == "__main__":
    main()

"""SGLang's published Gemma 4 figures on one H200 (../shared/design/PERFORMANCE.md), and the ratio
of a result to them.

    python bench/anchors.py RESULT.json [RESULT.json ...]   # adds an "anchor" block to serve_bench JSONs

A serve_bench JSON names its model shape in `meta.model_shape` (`serve_random_weights.sh` does);
its concurrency-1 point is set against SGLang's TPOT and TTFT, its concurrency-100 point against
SGLang's output throughput (for an image workload, SGLang's image-run TTFT and throughput). Ratios read "how many times better than SGLang": anchor / ours for
latencies, ours / anchor for throughput.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SOURCE = "SGLang on one H200, sglang.bench_serving random dataset (../shared/design/PERFORMANCE.md)"
# model shape -> TPOT c=1 (ms), TTFT c=1 (ms), output tok/s at c=100; image runs (two 720p images,
# 128 text tokens, 1024 out): TTFT c=1 (ms), output tok/s at c=100
SGLANG_H200 = {
    "gemma-4-E2B-it": (3.99, 50.2, 9876, 109.6, 5736),
    "gemma-4-E4B-it": (5.64, 52.8, 7003, 110.2, 4687),
    "gemma-4-12B-it": (9.02, 33.1, 3916, 95.0, 3462),
    "gemma-4-26B-A4B-it": (5.60, 103.7, 3676, 129.2, 2741),
    "gemma-4-31B-it": (12.32, 72.8, 2807, 143.4, 2160),
}
MODEL_KEYS = {"e2b": "gemma-4-E2B-it", "e4b": "gemma-4-E4B-it", "12b": "gemma-4-12B-it",
              "26b_a4b": "gemma-4-26B-A4B-it", "31b": "gemma-4-31B-it"}


def serve_anchor(result: dict) -> dict:
    """The anchor block of a serve_bench result: SGLang's figures and ours beside them."""
    shape = result["meta"]["model_shape"]
    tpot, ttft, tokps, image_ttft, image_tokps = SGLANG_H200[shape]
    image = result["workload"]["dataset"] == "image"
    if image:  # SGLang's image runs report TTFT and throughput; the TPOT figure is the text run's
        ttft, tokps = image_ttft, image_tokps
    block = {"source": SOURCE, "model": shape, "workload": "image" if image else "random", "points": []}
    for point in result["points"]:
        if point["max_concurrency"] == 1:
            block["points"].append({
                "max_concurrency": 1, "sglang_tpot_ms": tpot, "tpot_ms": point["tpot_ms"]["mean"],
                "tpot_speedup": round(tpot / point["tpot_ms"]["mean"], 3), "sglang_ttft_ms": ttft,
                "ttft_ms": point["ttft_ms"]["mean"], "ttft_speedup": round(ttft / point["ttft_ms"]["mean"], 3)})
        elif point["max_concurrency"] == 100:
            block["points"].append({
                "max_concurrency": 100, "sglang_output_tok_per_s": tokps, "output_tok_per_s": point["output_throughput"],
                "throughput_ratio": round(point["output_throughput"] / tokps, 3)})
    return block


def main(paths: list[str]) -> None:
    for path in map(Path, paths):
        result = json.loads(path.read_text())
        result["anchor"] = serve_anchor(result)
        path.write_text(json.dumps(result, indent=1))
        print(path, json.dumps(result["anchor"]["points"]))


if __name__ == "__main__":
    main(sys.argv[1:])

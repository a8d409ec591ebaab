"""What leaving the per-stage traces on costs: `tandem serve` with and without `--trace-dir`
under the same load, alternated (A B A B ...) so drift on the machine hits both alike.

Each run starts a fresh server, drives `bench/serve_bench.py` (random token-id prompts, fixed
output length, a concurrency cap) and keeps its output throughput and TPOT; the JSON holds every
run, the medians per mode and the overhead (traced over untraced, minus one).

    PYTHONPATH=. python bench/trace_overhead.py --commit <sha> --out bench/results/trace_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import Served  # noqa: E402


def one_run(args, traced: bool, work: Path, index: int) -> dict:
    trace_dir = work / f"trace-{index}"
    argv = ["serve", "--topology", args.topology] + (["--trace-dir", str(trace_dir)] if traced else [])
    out = work / f"run-{index}.json"
    with Served(argv, log=work / f"serve-{index}.log") as server:
        bench = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--base-url", server.url,
             "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
             "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
             "--random-range-ratio", "1.0", "--warmup-requests", "2", "--disable-tqdm", "--output-file", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=args.run_timeout_s)
        server.stop()
    if bench.returncode != 0:
        raise RuntimeError(f"serve_bench failed: {bench.stdout[-2000:]}{bench.stderr[-2000:]}")
    result = json.loads(out.read_text())
    summary = result["points"][0]
    spans = sum(1 for f in trace_dir.glob("*.jsonl") for _ in f.open()) if traced else 0
    return {"traced": traced, "output_throughput": summary["output_throughput"],
            "mean_tpot_ms": summary["tpot_ms"]["mean"], "mean_ttft_ms": summary["ttft_ms"]["mean"],
            "completed": summary["completed"], "spans": spans}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--topology", default="cpu_colocated")
    ap.add_argument("--pairs", type=int, default=2, help="untraced + traced runs, alternated")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--run-timeout-s", type=float, default=600)
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="traceoverhead-") as tmp:
        for i in range(2 * args.pairs):
            runs.append(one_run(args, traced=bool(i % 2), work=Path(tmp), index=i))
            print(time.strftime("%H:%M:%S"), json.dumps(runs[-1]), flush=True)
    medians = {mode: {key: statistics.median(r[key] for r in runs if r["traced"] == (mode == "traced"))
                      for key in ("output_throughput", "mean_tpot_ms", "mean_ttft_ms")}
               for mode in ("untraced", "traced")}
    doc = {"benchmark": "trace_overhead",
           "command": "python bench/trace_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "commit": args.commit, "settings": vars(args) | {"out": str(args.out)}, "runs": runs, "medians": medians,
           "throughput_overhead": 1 - medians["traced"]["output_throughput"] / medians["untraced"]["output_throughput"],
           "tpot_overhead": medians["traced"]["mean_tpot_ms"] / medians["untraced"]["mean_tpot_ms"] - 1}
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("medians", "throughput_overhead", "tpot_overhead")}, indent=1))
    return doc


if __name__ == "__main__":
    main()

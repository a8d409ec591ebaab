"""The per-layer-embedding tail of a decode step, fused (`kernels.ple_tail.PleTail`, two launches)
against the chain it replaces (residual_norm, cuBLAS gate product, gelu_mul, cuBLAS projection,
residual_norm: five launches), on the device (CUDA only).

For E2B and E4B (hidden and ple_dim from tests/fixtures/hf_configs) and each row count M: one call
per layer of the model, each on its own copy of the two weights (as a step's layers: the copies
stream from HBM), captured in one CUDA graph; per call = median replay / calls. Each output is
checked against the twin `ple_tail_torch` first (relative error of the norms).

    PYTHONPATH=. python bench/ple_tail.py --commit <sha> --out bench/results/ple_tail_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gemv_sweep import graph_us, rel_err  # noqa: E402
from gemma4_model.config import parse_config  # noqa: E402
from gemma4_model.kernels.fused import gelu_mul, residual_norm  # noqa: E402
from gemma4_model.kernels.ple_tail import MAX_ROWS, PleTail, ple_tail_torch  # noqa: E402

CONFIGS = {"e2b": "gemma-4-E2B-it.json", "e4b": "gemma-4-E4B-it.json"}
EPS = 1e-6


def unfused(m, h, ff_norm, gate_w, ple_input, proj_w, ple_norm, eps, scalar, next_weight):
    """The decoder's chain for rows past `MAX_ROWS`, five launches."""
    x, _ = residual_norm(m, h, ff_norm, eps)
    gated = gelu_mul(F.linear(x, gate_w), ple_input)
    return residual_norm(F.linear(gated, proj_w), x, ple_norm, eps, scalar, next_weight)


def measure(model: str, ms: list[int], reps: int, stream: torch.cuda.Stream) -> list[dict]:
    text = parse_config(json.loads((ROOT / "tests/fixtures/hf_configs" / CONFIGS[model]).read_text())).text
    hidden, ple_dim, layers = text.hidden_size, text.ple_dim, text.num_layers
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    weights = [(rand(ple_dim, hidden, scale=hidden**-0.5), rand(hidden, ple_dim, scale=ple_dim**-0.5))
               for _ in range(layers)]
    norms = [rand(hidden) for _ in range(3)]
    scalar = torch.tensor([0.9], dtype=torch.bfloat16, device="cuda")
    tail = PleTail()
    records = []
    for m in ms:
        m_in, h_in = rand(m, hidden), rand(m, hidden)
        ple_all = rand(m, layers, ple_dim)

        def args(i):
            return (m_in, h_in, norms[0], weights[i][0], ple_all[:, i], weights[i][1], norms[1], EPS, scalar, norms[2])

        want = ple_tail_torch(*args(0))
        errors = {name: max(rel_err(got, ref) for got, ref in zip(fn(*args(0)), want))
                  for name, fn in (("fused", tail), ("unfused", unfused))}
        times = {name: graph_us([lambda i=i: fn(*args(i)) for i in range(layers)], reps, stream)
                 for name, fn in (("fused", tail), ("unfused", unfused))}
        record = {"model": model, "hidden": hidden, "ple_dim": ple_dim, "calls_per_graph": layers, "m": m,
                  "fused_us": round(times["fused"], 3), "unfused_us": round(times["unfused"], 3),
                  "speedup": round(times["unfused"] / times["fused"], 3),
                  "saved_per_step_us": round((times["unfused"] - times["fused"]) * layers, 1),
                  "rel_err_vs_twin": {k: round(v, 6) for k, v in errors.items()}}
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--models", default="e4b,e2b")
    ap.add_argument("--ms", default=",".join(str(m) for m in (1, 2, 4, 8, 16) if m <= MAX_ROWS), help=f"row counts (at most {MAX_ROWS})")
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays (the median is kept)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ple_tail needs a CUDA device")
    ms = [int(m) for m in args.ms.split(",")]
    if not all(1 <= m <= MAX_ROWS for m in ms):
        raise SystemExit(f"--ms: 1 to {MAX_ROWS} rows")
    stream = torch.cuda.Stream()
    result = {"benchmark": "ple_tail", "command": "python bench/ple_tail.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "commit": args.commit, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0), "dtype": "bfloat16",
        "timing": "one call per layer, each on its own weight copies, in one CUDA graph; median of the replays "
                  "/ calls", "records": []}
    for model in args.models.split(","):
        result["records"] += measure(model, ms, args.reps, stream)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

"""The weight products of a whole decode step at one to a few rows, as a chain: cuBLAS against the
`kernels.gemv` Triton kernels launched plainly, with tensor-descriptor (TMA) loads, programmatically
dependent, and dependent with an L2 prefetch of each program's weights ahead of its wait (CUDA only).

A decode step at batch 1 streams every weight once, and each of its ~170 products (E4B) pays a
ramp and a tail of a few microseconds in which the memory system idles: a 10 MB o_proj takes
about 6.4 us on an H200 where its bytes alone take 2.3 (bench/results/gemv_sweep_h200.json). A
dependent launch lets the next product's programs start while the one before drains, and
without reading anything the one before writes they can already ask L2 for their weights; the
chain measures what that gains when every product reads the one before's output, as a layer's
do (qkv -> o_proj on the attention heads' columns -> gate|up with the activation -> down ->
the next layer's qkv; no attention, norms or per-layer embeddings between them).

Per model and row count, each variant's chain (every decoder layer's four products at the
config's shapes, distinct weights, optionally the lm_head) is captured in one CUDA graph; the
median of the replays, timed with CUDA events, over the weight bytes gives its effective TB/s.
Outputs are checked over the first layer's four products (one more run outside the graph): every
Triton variant's equals the plain launches' exactly (the same kernels and tiles) or not, and each is
compared with cuBLAS's by relative error. Not over the whole chain: with random weights and no
norms between layers each gate|up's gelu_tanh(gate) * up shrinks the values, and after a dozen
layers they are zeros, where any two variants agree.

    PYTHONPATH=. python bench/gemv_chain.py --commit <sha> --out bench/results/gemv_chain_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gemma4_model.config import parse_config  # noqa: E402
from gemma4_model.kernels.fused import gelu_mul  # noqa: E402
from gemma4_model.kernels.gemv import default_tiles, small_m_gate_up_gelu, small_m_linear  # noqa: E402
from gemv_sweep import graph_us  # noqa: E402

CONFIGS = ROOT / "tests" / "fixtures" / "hf_configs"
MODELS = {"e4b": "gemma-4-E4B-it", "26b_a4b": "gemma-4-26B-A4B-it"}
PREFETCHES = (0, 512, 2048, 16384)  # K columns a program asks L2 for ahead of its wait (16384: its whole split)
CHECKED = 4  # products whose output is checked: the first layer's (deeper, random chains decay to zeros)


def chain_weights(model: str, device: torch.device, lm_head: bool, layers: int | None) -> list[tuple[str, torch.Tensor]]:
    """(kind, weight) in step order: per decoder layer qkv, o_proj, packed gate|up, down; the
    dense MLP for an MoE model (its experts are not here); then the lm_head if asked."""
    cfg = parse_config(json.loads((CONFIGS / f"{MODELS[model]}.json").read_text())).text
    h = cfg.hidden_size
    gen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(0)  # meta: shapes only

    def weight(rows, k):
        return (torch.randn((rows, k), generator=gen, device=device) * k**-0.5).to(torch.bfloat16)

    out = []
    for spec in cfg.layers[:layers]:
        q = cfg.num_heads * spec.head_dim
        kv = spec.num_kv_heads * spec.head_dim * (1 if spec.k_eq_v else 2) if spec.owns_kv else 0
        out += [("linear", weight(q + kv, h)), ("linear", weight(h, q)),
                ("gate_up", weight(2 * spec.intermediate_size, h)), ("linear", weight(h, spec.intermediate_size))]
    if lm_head:
        out.append(("linear", weight(cfg.vocab_size, h)))
    return out


def run_chain(x: torch.Tensor, weights: list[tuple[str, torch.Tensor]], variant: str, prefetch_k: int) -> torch.Tensor:
    """The chain's last output; each product reads the first K columns of the one before's."""
    h = x
    for kind, w in weights:
        inp = h[:, : w.shape[1]]
        if variant == "cublas":
            if kind == "gate_up":
                both = F.linear(inp, w)
                h = gelu_mul(both[:, : w.shape[0] // 2], both[:, w.shape[0] // 2:])
            else:
                h = F.linear(inp, w)
            continue
        tiles = replace(default_tiles(kind, w.shape[0], w.shape[1]), prefetch_k=prefetch_k)
        if variant == "triton_tma":  # tensor-descriptor loads, chunks of at most 256 columns
            tiles = replace(tiles, block_k=min(tiles.block_k, 256), tma=True)
        dependent = variant == "triton_pdl"
        h = (small_m_gate_up_gelu if kind == "gate_up" else small_m_linear)(inp, w, tiles, dependent=dependent)
    return h


def measure(model: str, rows: int, lm_head: bool, layers: int | None, reps: int, device: torch.device,
            only: Sequence[str] = ()) -> dict:
    weights = chain_weights(model, device, lm_head, layers)
    nbytes = sum(w.numel() * w.element_size() for _, w in weights)
    x = torch.randn((rows, weights[0][1].shape[1]), generator=torch.Generator(device=device).manual_seed(1),
                    device=device).to(torch.bfloat16)
    variants = [("cublas", 0), ("triton", 0), ("triton_tma", 0)] + [("triton_pdl", p) for p in PREFETCHES]
    variants = [v for v in variants if not only or v[0] in only or v[0] == "triton"]  # plain triton: the reference
    results, outputs, stream = [], {}, torch.cuda.Stream()
    for variant, prefetch_k in variants:
        ms = graph_us([lambda: run_chain(x, weights, variant, prefetch_k)], reps, stream) / 1e3
        outputs[(variant, prefetch_k)] = run_chain(x, weights[:CHECKED], variant, prefetch_k)
        results.append(dict(variant=variant, prefetch_k=prefetch_k, ms=round(ms, 4),
                            tbs=round(nbytes / ms / 1e9, 3)))
    plain = outputs[("triton", 0)]
    cublas = outputs[("cublas", 0)].float()
    for r in results:
        out = outputs[(r["variant"], r["prefetch_k"])]
        r["equals_plain_triton"] = bool(torch.equal(out, plain))
        r["rel_err_vs_cublas"] = round(((out.float() - cublas).norm() / cublas.norm()).item(), 5)
    return dict(model=model, rows=rows, lm_head=lm_head, products=len(weights), weight_gb=round(nbytes / 1e9, 3),
                checked_products=CHECKED, variants=results)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--models", default="e4b,26b_a4b")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--layers", type=int, default=None, help="the first N decoder layers only")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default="", help="comma-separated: cublas, triton_tma, triton_pdl (plain triton "
                    "always runs); empty: all")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemv_chain.py measures CUDA launches: no CUDA device here")
    device = torch.device("cuda")
    records = []
    for model in args.models.split(","):
        for rows in (int(r) for r in args.rows.split(",")):
            for lm_head in (False, True):
                record = measure(model, rows, lm_head, args.layers, args.reps, device,
                                 [v for v in args.variants.split(",") if v])
                records.append(record)
                best = min(record["variants"], key=lambda r: r["ms"])
                print(model, rows, "lm_head" if lm_head else "layers", record["weight_gb"], "GB:",
                      ", ".join(f"{r['variant']}/{r['prefetch_k']} {r['ms']:.3f} ms {r['tbs']} TB/s"
                                f"{'' if r['equals_plain_triton'] or r['variant'] == 'cublas' else ' MISMATCH'}"
                                for r in record["variants"]), "| best", best["variant"], best["prefetch_k"], flush=True)
                torch.cuda.empty_cache()
    result = dict(benchmark="gemv_chain", command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                  commit=args.commit, torch=torch.__version__, device=torch.cuda.get_device_name(),
                  python=platform.python_version(), prefetches=list(PREFETCHES), records=records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

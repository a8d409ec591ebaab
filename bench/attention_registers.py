"""Registers, spill stores and shared memory of the decode attention kernel's launches on sm_90,
from Triton's compiler and its own ptxas (`-v`): no GPU needed.

Compiled as a launch specialises them: aligned pointers, strides that are multiples of 16.
A launch whose tiles need more than 255 registers a thread spills to local memory, and at 255 one
8-warp program fills an SM's register file: both slow a kernel that should stream K and V at the
memory's rate. Variants: head dim (256 sliding, 512 full), keys per block, head-dim columns of K
per score chunk, warps, software-pipeline stages, V loaded with K.

    PYTHONPATH=. python bench/attention_registers.py --out bench/results/attention_registers_sm90.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INT32_ARGS = {"tables_ptr", "positions_ptr", "schedule_ptr", "query_starts_ptr", "kv_lens_ptr", "chunk_starts_ptr",
              "span_offsets_ptr", "span_lens_ptr", "spans_ptr"}


def constexprs(head_dim: int, block_n: int, block_dk: int, prefetch_v: bool) -> dict:
    """A decode-like launch's compile-time arguments (16-row tiles, GQA of 2, 16 splits, 16-token pages)."""
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    block_dk = min(d_pad, block_dk or 256)
    return dict(HEAD_DIM=head_dim, REP=2, REP_PAD=2, BLOCK_M=16, BLOCK_N=block_n, BLOCK_DK=block_dk,
                NUM_DK=d_pad // block_dk, BLOCK_DV=d_pad, NUM_DV=1, PAGE=16, SPAN_MODE=0, NUM_SPLITS=16,
                SPLIT_KEYS=64, SPLIT_PROGRAMS=16, IEEE=False, PREFETCH_V=prefetch_v, PDL=False, MMA_FP16=False,
                EARLY_META=False)


def launch_alignment(kernel, const: dict) -> dict:
    """What a real launch tells the compiler about the arguments: 16-byte-aligned cache, query and
    output pointers and strides that are multiples of 16 (a launch specialises on both; without
    them the K/V loads compile to 2-byte scalar loads and the register count is not the one a
    launch gets). The batch's int32 metadata and the page-table stride are left unspecialised,
    as the kernel's decorator says."""
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        if name in const or name in INT32_ARGS or name == "stride_table":
            continue
        if name.endswith("_ptr") or name.startswith("stride_") or name == "num_heads":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def report(variant: tuple) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gemma4_model.kernels.paged_attention import _paged_attention_kernel as kernel

    head_dim, block_n, block_dk, warps, stages, prefetch_v = variant
    const = constexprs(head_dim, block_n, block_dk, prefetch_v)
    types = {a: "constexpr" if a in const else "*i32" if a in INT32_ARGS else "*fp32" if a in ("part_ptr", "lse_ptr")
             else "*bf16" if a.endswith("_ptr") else "i32" for a in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=const, attrs=launch_alignment(kernel, const)),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    loads = re.findall(r"ld\.global[.a-z0-9]*", compiled.asm["ptx"])
    return {"head_dim": head_dim, "block_n": block_n, "block_dk": block_dk, "num_warps": warps, "num_stages": stages,
            "prefetch_v": prefetch_v, **ptxas_usage(compiled.asm["ptx"]), "shared_bytes": compiled.metadata.shared,
            "global_loads_16B": sum(1 for op in loads if ".v4." in op), "global_loads_2B": loads.count("ld.global.b16")}


def ptxas_usage(ptx: str) -> dict:
    """Registers a thread (None if ptxas reports none) and spill-store bytes of sm_90a PTX, from
    the ptxas that Triton ships (`-v`)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([getattr(ptxas, "path", None) or ptxas[0], "-v", "--gpu-name=sm_90a", f.name, "-o",
                              "/dev/null"], capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_store_bytes": int(spills.group(1)) if spills else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    import triton

    variants = [(d, n, dk, w, s, pv) for (d, n), dk, w, s, pv in itertools.product(
        ((256, 64), (256, 32), (512, 32), (512, 16)), (0, 128), (4, 8), (1, 2), (False, True))]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(report, variants))
    for r in rows:
        print(f"d{r['head_dim']} n{r['block_n']} dk{r['block_dk']} w{r['num_warps']} s{r['num_stages']} "
              f"pv{int(r['prefetch_v'])}: {r['registers']} registers, {r['spill_store_bytes']} B spilled, "
              f"{r['shared_bytes']} B shared, {r['global_loads_16B']} 16-byte and {r['global_loads_2B']} 2-byte loads",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "attention_registers", "triton": triton.__version__,
                                    "target": "sm_90a", "command": " ".join(["python"] + sys.argv), "rows": rows},
                                   indent=1))


if __name__ == "__main__":
    main()

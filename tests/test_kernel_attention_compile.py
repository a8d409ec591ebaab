"""Paged attention (decode tiles with one program per split and with fewer programs than splits,
a prefill tile, span modes, the FP8 cache, dependent launch), the weight-prefetch kernel and the
fused kernels with dependent launch (griddepcontrol) compile for Hopper
(sm_90) on a machine without a GPU, with Triton's own ptxas: type and lowering errors show in CI
before a device run (as tests/test_kernel_moe_compile.py; a subprocess, since the test session
runs Triton's interpreter)."""

from __future__ import annotations

import pytest

from test_kernel_moe_compile import _ptxas, compile_in_subprocess

SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gemma4_model.kernels import l2_prefetch, paged_attention as pa

INT32_PTRS = {"tables_ptr", "positions_ptr", "schedule_ptr", "query_starts_ptr", "kv_lens_ptr", "chunk_starts_ptr",
              "span_offsets_ptr", "span_lens_ptr", "spans_ptr"}

def signature(fn, constexprs, kv="*bf16"):
    types = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            types[arg] = "constexpr"
        elif arg in INT32_PTRS:
            types[arg] = "*i32"
        elif arg in ("part_ptr", "lse_ptr"):
            types[arg] = "*fp32"
        elif arg in ("k_ptr", "v_ptr"):
            types[arg] = kv
        elif arg.endswith("_ptr"):
            types[arg] = "*bf16"
        else:
            types[arg] = "i32"
    return types

def build(fn, constexprs, kv="*bf16", warps=4, stages=2):
    # [cubin bytes, tensor-core products (and the dependent-launch wait with PDL)]
    source = ASTSource(fn=fn, signature=signature(fn, constexprs, kv), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                                 "num_stages": stages})
    ptx = compiled.asm["ptx"]
    ok = "mma" in ptx and (not constexprs["PDL"] or "griddepcontrol.wait" in ptx)
    if constexprs["EARLY_META"]:  # the metadata's loads come before the wait, q's and the cache's after it
        wait = ptx.find("griddepcontrol.wait")
        ok = ok and 0 < ptx.find("ld.global") < wait and "mma" in ptx[wait:]
    return [len(compiled.asm["cubin"]), ok]

def attention(head_dim, block_m, block_n, splits, programs, span_mode=0, split_keys=64, pdl=False, prefetch_v=False,
              fp16=False, early=False):
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_dk = min(d_pad, 256)
    block_dv = d_pad if block_m <= 16 else min(d_pad, 256)
    return dict(HEAD_DIM=head_dim, REP=2, REP_PAD=2, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=block_dk,
                NUM_DK=d_pad // block_dk, BLOCK_DV=block_dv, NUM_DV=d_pad // block_dv, PAGE=16, SPAN_MODE=span_mode,
                NUM_SPLITS=splits, SPLIT_KEYS=split_keys, SPLIT_PROGRAMS=programs, IEEE=False, PREFETCH_V=prefetch_v,
                PDL=pdl, MMA_FP16=fp16, EARLY_META=early)

built = {
    "decode-256": build(pa._paged_attention_kernel, attention(256, 16, 64, 16, 16)),
    # the default decode launch (DecodeTiles()): 32-key blocks, V with K, one stage
    "decode-256-default": build(pa._paged_attention_kernel, attention(256, 16, 32, 16, 16, prefetch_v=True), stages=1),
    "decode-512-default": build(pa._paged_attention_kernel, attention(512, 16, 32, 16, 16, prefetch_v=True), stages=1),
    "decode-256-programs4": build(pa._paged_attention_kernel, attention(256, 16, 64, 16, 4, split_keys=256)),
    "decode-256-pdl": build(pa._paged_attention_kernel, attention(256, 16, 64, 16, 16, pdl=True)),
    "decode-256-pdl-early-metadata": build(pa._paged_attention_kernel,
                                           attention(256, 16, 32, 16, 16, pdl=True, prefetch_v=True, early=True),
                                           stages=1),
    "decode-512-programs4": build(pa._paged_attention_kernel, attention(512, 16, 32, 16, 4)),
    "decode-256-fp8": build(pa._paged_attention_kernel, attention(256, 16, 64, 16, 4), kv="*fp8e4nv"),
    "decode-256-fp8-fp16": build(pa._paged_attention_kernel, attention(256, 16, 32, 16, 16, prefetch_v=True, fp16=True),
                                 kv="*fp8e4nv", stages=1),
    "prefill-512-spans": build(pa._paged_attention_kernel, attention(512, 32, 32, 1, 1, span_mode=2), warps=8),
    "prefill-256-windowed": build(pa._paged_attention_kernel, attention(256, 64, 32, 1, 1, span_mode=1), warps=8),
}
touch = {"ptr": "*i32", "sink_ptr": "*i32", "rows": "i32", "cols": "i32", "stride": "i32",
         "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
source = ASTSource(fn=l2_prefetch._touch_kernel, signature=touch, constexprs={"BLOCK_R": 4, "BLOCK_C": 2048})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
built["touch"] = [len(compiled.asm["cubin"]), "ld.global.cg" in compiled.asm["ptx"]]
from gemma4_model.kernels import fused, ple_tail
for name, fn, constexprs in (
        ("residual_norm", fused._residual_norm_kernel, dict(HAS_RES=True, HAS_W=True, HAS_SCALAR=True, HAS_NEXT=True,
                                                            BLOCK=4096, SPLITS=0, SPLITS_PAD=1, PDL=True)),
        ("residual_norm_splits", fused._residual_norm_kernel, dict(HAS_RES=True, HAS_W=True, HAS_SCALAR=True,
                                                                   HAS_NEXT=True, BLOCK=4096, SPLITS=3, SPLITS_PAD=4,
                                                                   PDL=True)),
        ("ple_gate", ple_tail._ple_gate_kernel, dict(BLOCK_K=4096, BLOCK_G=2, SPLITS=0, SPLITS_PAD=1, PDL=True)),
        ("ple_gate_splits", ple_tail._ple_gate_kernel, dict(BLOCK_K=4096, BLOCK_G=2, SPLITS=2, SPLITS_PAD=2,
                                                            PDL=True)),
        ("ple_project", ple_tail._ple_project_kernel, dict(HAS_SCALAR=True, HAS_NEXT=True, BLOCK_K=256, BLOCK_N=32,
                                                           BLOCK_ROW=4096, PDL=True))):
    types = {arg: "constexpr" if arg in constexprs else "*i32" if arg == "count_ptr" else "*bf16"
             if arg.endswith("_ptr") else "fp32" if arg == "eps" else "i32" for arg in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=types, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "launch_pdl": True})
    ptx = compiled.asm["ptx"]
    built[name] = [len(compiled.asm["cubin"]), "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx]
print(json.dumps(built))
"""


@pytest.mark.skipif(not _ptxas(), reason="this Triton build ships no ptxas to compile for sm_90 with")
def test_attention_and_prefetch_kernels_compile_for_sm90():
    built = compile_in_subprocess(SCRIPT)
    assert len(built) == 17
    # tensor cores (attention); the prefetch's L2 loads; the dependent-launch instructions (PDL variants)
    assert all(size > 1000 and ok for size, ok in built.values()), built


REGISTERS = r"""
import json
from bench.attention_registers import report
from gemma4_model.kernels.paged_attention import DECODE_TILES as t
print(json.dumps({d: report((d, 32 if d > 256 else t.block_n, t.block_dk, t.num_warps, t.num_stages, t.prefetch_v))
                  for d in (256, 512)}))
"""


@pytest.mark.skipif(not _ptxas(), reason="this Triton build ships no ptxas to compile for sm_90 with")
def test_default_decode_launch_streams_16_byte_loads_without_spilling():
    """ptxas -v through bench/attention_registers.py, compiled as a launch specialises it: the
    default decode launch reads K and V in 16-byte loads (none of 2 bytes) and, at head dim 256,
    keeps its registers below 255 with nothing spilled."""
    got = compile_in_subprocess(REGISTERS)
    sliding, full = got["256"], got["512"]
    for r in (sliding, full):
        assert r["global_loads_16B"] >= 8 and r["global_loads_2B"] == 0, got
    assert sliding["registers"] < 255 and sliding["spill_store_bytes"] == 0, got


TMA = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench.attention_registers import ptxas_usage
from gemma4_model.kernels.paged_attention import _paged_decode_tma_kernel as kernel

INT32 = {"tables_ptr", "positions_ptr", "schedule_ptr", "query_starts_ptr", "kv_lens_ptr"}
ALIGNED = {"q_ptr", "out_ptr", "part_ptr", "lse_ptr", "stride_qt", "stride_qh", "stride_ot", "stride_oh", "num_heads"}

def build(kv, fp16, head_dim=256, early=False):
    const = dict(HEAD_DIM=head_dim, BOX_D=min(head_dim, 256), REP=2, REP_PAD=2, BLOCK_M=16, PAGE=16, NUM_SPLITS=16,
                 SPLIT_KEYS=64, IEEE=False, PDL=early, MMA_FP16=fp16, EARLY_META=early)
    types = {a: "constexpr" if a in const else "*i32" if a in INT32 else "*fp32" if a in ("part_ptr", "lse_ptr")
             else f"tensordesc<{kv}[16,256]>" if a.endswith("_desc") else "*bf16" if a.endswith("_ptr") else "i32"
             for a in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names) if a in ALIGNED}
    compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    ptx = compiled.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    return {"tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), "mma": "mma" in ptx,
            "metadata_before_wait": 0 < ptx.find("ld.global") < wait, "copies_after_wait": "cp.async.bulk" in ptx[wait:],
            **ptxas_usage(ptx)}

print(json.dumps({"bf16": build("bf16", False), "fp8": build("fp8e4nv", False), "fp8-fp16": build("fp8e4nv", True),
                  "bf16-512": build("bf16", False, 512), "bf16-512-early-metadata": build("bf16", False, 512, True)}))
"""


@pytest.mark.skipif(not _ptxas(), reason="this Triton build ships no ptxas to compile for sm_90 with")
def test_tma_decode_kernel_compiles_to_pipelined_tensor_loads():
    """The TMA decode kernel (DecodeTiles.tma_stages) for sm_90 at head dim 256 over bf16 and fp8
    pages: its K/V reads are bulk tensor copies, pipelined (more than the two a page of K and V
    take), on the tensor cores, in fewer registers than the gathering kernel's 162, nothing spilled;
    at head dim 512 two boxes a page (more copies), still within the register file."""
    got = compile_in_subprocess(TMA)
    for name, variant in got.items():
        assert variant["tma_loads"] > 2 and variant["mma"], got
        assert variant["spill_store_bytes"] == 0 and (variant["registers"] < 162 or name.startswith("bf16-512")), got
    assert got["bf16-512"]["tma_loads"] > got["bf16"]["tma_loads"] and got["bf16-512"]["registers"] < 255, got
    # with DecodeTiles.early_metadata the rows' metadata is read before the dependent wait, the pages after it
    early = got["bf16-512-early-metadata"]
    assert early["metadata_before_wait"] and early["copies_after_wait"], got

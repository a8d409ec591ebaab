"""The MoE kernels (grouped products, alignment, routing, combination) compile for Hopper (sm_90) on a machine without a GPU: Triton's own ptxas
builds the binaries, so type and lowering errors show in CI before a device run. (A subprocess:
the test session runs Triton's interpreter, whose kernels cannot be compiled.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton

SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gemma4_model.kernels import moe

common = {"slot_pairs_ptr": "*i32", "block_experts_ptr": "*i32", "hidden": "i32", "inter": "i32", "stride_we": "i32",
          "stride_wn": "i32", "stride_o": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
          "BLOCK_K": "constexpr", "IEEE": "constexpr"}
kernels = {
    "gate_up": (moe._gate_up_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "top_k": "i32",
                                      "stride_x": "i32", **common}),
    "down": (moe._down_kernel, {"act_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "weights_ptr": "*fp32",
                                "stride_a": "i32", **common}),
}
built = {}
for name, (fn, types) in kernels.items():
    for block_m in (16, 64):  # decode batches, prompt chunks
        source = ASTSource(fn=fn, signature={arg: types[arg] for arg in fn.arg_names},
                           constexprs={"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "IEEE": False})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        built[f"{name}-{block_m}"] = [len(compiled.asm["cubin"]), "mma" in compiled.asm["ptx"]]
combine_types = {**{p: "*bf16" for p in ("mlp_ptr", "rows_ptr", "w1_ptr", "w2_ptr", "out_ptr", "res_ptr", "w_ptr",
                                          "scalar_ptr", "next_w_ptr", "y_ptr")},
                 **{i: "i32" for i in ("n_cols", "stride_m", "stride_o", "stride_r", "stride_y")}, "eps": "fp32"}
small = {  # one row / one program each: no tensor cores
    "align": (moe._align_kernel, {"experts_ptr": "*i32", "slot_pairs_ptr": "*i32", "block_experts_ptr": "*i32",
                                  "num_pairs": "i32", "num_experts": "i32", "num_slots": "i32"},
              {"BLOCK_M": 16, "E_BLOCK": 128, "BLOCK": 128}),
    "norms": (moe._moe_norms_kernel, {"h_ptr": "*bf16", "scale_ptr": "*bf16", "w_ptr": "*bf16",
                                      "router_in_ptr": "*bf16", "expert_in_ptr": "*bf16", "n_cols": "i32",
                                      "eps": "fp32", "root": "fp32", "stride_h": "i32", "stride_r": "i32",
                                      "stride_e": "i32"}, {"BLOCK": 4096}),
    "norms_router": (moe._norms_router_kernel, {"h_ptr": "*bf16", "scale_ptr": "*bf16", "w_ptr": "*bf16",
                                                "proj_ptr": "*bf16", "logits_ptr": "*bf16", "expert_in_ptr": "*bf16",
                                                "n_cols": "i32", "num_experts": "i32", "eps": "fp32", "root": "fp32",
                                                "stride_h": "i32", "stride_p": "i32", "stride_l": "i32",
                                                "stride_e": "i32"}, {"BLOCK": 4096, "E_CHUNK": 8}),
    "route": (moe._route_kernel, {"logits_ptr": "*bf16", "expert_scale_ptr": "*bf16", "weights_ptr": "*fp32",
                                  "experts_ptr": "*i32", "num_experts": "i32", "stride_l": "i32"},
              {"TOP_K": 8, "E_BLOCK": 128, "K_BLOCK": 8}),
    "combine": (moe._combine_kernel, combine_types, {"TOP_K": 8, "BLOCK": 4096, "TAIL": False}),
    "combine_tail": (moe._combine_kernel, combine_types, {"TOP_K": 8, "BLOCK": 4096, "TAIL": True}),
}
for name, (fn, types, constexprs) in small.items():
    types = {**types, **{k: "constexpr" for k in constexprs}}
    source = ASTSource(fn=fn, signature={arg: types[arg] for arg in fn.arg_names}, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    built[name] = [len(compiled.asm["cubin"]), True]
print(json.dumps(built))
"""


def _ptxas() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def compile_in_subprocess(script: str) -> dict:
    """Run a compile script outside the interpreter session; its last stdout line, as JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _ptxas(), reason="this Triton build ships no ptxas to compile for sm_90 with")
def test_moe_kernels_compile_for_sm90():
    built = compile_in_subprocess(SCRIPT)
    assert set(built) == {"gate_up-16", "gate_up-64", "down-16", "down-64", "align", "norms", "norms_router", "route",
                          "combine", "combine_tail"}
    assert all(size > 1000 and mma for size, mma in built.values()), built  # tensor-core binaries

"""The per-layer-embedding tail of a decoder layer at decode batch sizes: two launches, not five.

After its feed-forward block, a Gemma 4 layer with per-layer embeddings (E2B, E4B) computes

    x   = h + RMSNorm(m) * w_ff                     the post-feed-forward norm and residual add
    g   = gelu_tanh(x @ W_gate.T) * ple              the per-layer-input gate (hidden -> ple_dim)
    p   = g @ W_proj.T                               the per-layer projection (ple_dim -> hidden)
    out = (x + RMSNorm(p) * w_ple) * scalar          the post-PLE norm, residual add, layer scalar
    y   = RMSNorm(out) * w_next                      the next layer's input norm

Through `residual_norm`, two cuBLAS products and `gelu_mul` that is five launches per layer whose
weights are 1.3 MB apiece at E4B's shapes: at one to a few rows each launch is mostly its fixed
cost, about a fifth of an E4B decode step over the 42 layers. Here:

- `ple_gate`: program (row, block of gate outputs) recomputes its row's post-feed-forward norm
  (the row is a few KB, read from L2 by every program; m may come as `fused.SplitSums`, the down
  product's K splits, which each program adds), takes its block's dot products with the whole row
  and writes gelu_tanh(gate) * ple; the row's first program also writes x.
- `ple_project`: program (row, block of projection outputs) writes its rounded p values to a
  workspace row and counts itself done on the row's counter (an acquire-release atomic after a
  barrier: the block's stores are visible to whoever counts last). The row's last program reads
  the whole p row back past L1 and runs the residual-norm epilogue; it then sets the counter back
  to zero, so the next launch (and a captured CUDA graph's next replay) starts from zero
  (`kernels.counters`). The counters are the caller's (`PleTail`), one set per call site.

Every product is element-wise multiplies and a float32 `tl.sum` over the whole K in one tile
(K = hidden for the gate, ple_dim for the projection; each program's tile is at most 8192
values), so nothing is padded to a tensor-core tile and no K loop waits on memory in turn.

Rounding follows the twin `ple_tail_torch`, the layer's own chain: each product rounded to the
activation dtype once (float32 accumulation, as `F.linear`), the norms, the activation and the
adds rounded where `residual_norm_torch` and `gelu_mul_torch` round; the kernels agree with it
but for float32 summation order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .counters import LaunchCounters
from .fused import (SplitSums, _load_row, _pdl_release, _pdl_wait, _read_as, _round, _use_kernel, gelu_mul_torch,
                    pdl, residual_norm_torch)
from .gemv import _gelu_times

MAX_ROWS = 8  # the most rows `ple_tail` takes (one counter each); more go through the unfused chain. At
# 16 rows the E4B tail was slower than the chain (bench/results/ple_tail_h100.json: 20.1 vs 16.0 us)
TILE = 8192  # values of weight per program and product


@triton.jit
def _ple_gate_kernel(m_ptr, h_ptr, w_ff_ptr, wg_ptr, ple_ptr, x_ptr, g_ptr, K, G, eps,
                     stride_m, stride_h, stride_wg, stride_ple, stride_x, stride_g, stride_split,
                     BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                     PDL: tl.constexpr):
    _pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_g = block * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = offs_g < G
    w = tl.load(wg_ptr + offs_g.to(tl.int64)[:, None] * stride_wg + offs_k[None, :],
                mask=g_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # weights: before the wait
    _pdl_wait(PDL)
    m = _load_row(m_ptr + row * stride_m, offs_k, k_ok, stride_split, SPLITS, SPLITS_PAD, dt)
    n = m * tl.rsqrt(tl.sum(m * m, axis=0) / K + eps) * tl.load(w_ff_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    x = _round(tl.load(h_ptr + row * stride_h + offs_k, mask=k_ok, other=0.0).to(tl.float32) + _round(n, dt), dt)
    if block == 0:
        tl.store(x_ptr + row * stride_x + offs_k, x.to(dt), mask=k_ok)
    gate = tl.sum(w * x[None, :], axis=1)
    ple = tl.load(ple_ptr + row * stride_ple + offs_g, mask=g_ok, other=0.0).to(tl.float32)
    tl.store(g_ptr + row * stride_g + offs_g, _gelu_times(gate, ple, dt).to(dt), mask=g_ok)


@triton.jit
def _ple_project_kernel(g_ptr, wp_ptr, x_ptr, w_ple_ptr, scalar_ptr, next_w_ptr, p_ptr, out_ptr, y_ptr, count_ptr,
                        N, K, eps, stride_g, stride_wp, stride_x, stride_out, stride_y,
                        HAS_SCALAR: tl.constexpr, HAS_NEXT: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROW: tl.constexpr, PDL: tl.constexpr):
    _pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    dt = out_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w = tl.load(wp_ptr + offs_n.to(tl.int64)[:, None] * stride_wp + offs_k[None, :],
                mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # weights: before the wait
    _pdl_wait(PDL)
    g = tl.load(g_ptr + row * stride_g + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(p_ptr + row * N + offs_n, tl.sum(w * g[None, :], axis=1).to(dt), mask=n_ok)
    tl.debug_barrier()  # every thread's stores issued before the count releases them
    done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(1) - 1:  # the row's last program: the whole p row is written
        tl.debug_barrier()
        offs = tl.arange(0, BLOCK_ROW)
        ok = offs < N
        p = tl.load(p_ptr + row * N + offs, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        n = p * tl.rsqrt(tl.sum(p * p, axis=0) / N + eps) * tl.load(w_ple_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        h = _round(tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32) + _round(n, dt), dt)
        if HAS_SCALAR:
            h = _round(h * tl.load(scalar_ptr).to(tl.float32), dt)
        tl.store(out_ptr + row * stride_out + offs, h.to(dt), mask=ok)
        if HAS_NEXT:
            y = h * tl.rsqrt(tl.sum(h * h, axis=0) / N + eps) * tl.load(next_w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + row * stride_y + offs, y.to(dt), mask=ok)
        tl.atomic_xchg(count_ptr + row, 0)  # ready for the next launch


# ---- the twin and the public functions ---------------------------------------------------------------


def ple_tail_torch(m: torch.Tensor, h: torch.Tensor, ff_norm: torch.Tensor, gate_w: torch.Tensor,
                   ple_input: torch.Tensor, proj_w: torch.Tensor, ple_norm: torch.Tensor, eps: float,
                   scalar: torch.Tensor | None = None,
                   next_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The twin, the layer's own chain: (out, y) as defined in the module docstring."""
    x, _ = residual_norm_torch(m, h, ff_norm, eps)
    gated = gelu_mul_torch(F.linear(x, gate_w), ple_input)
    return residual_norm_torch(F.linear(gated, proj_w), x, ple_norm, eps, scalar, next_weight)


@dataclass
class PleTail:
    """One call site's row counters (`LaunchCounters` of `MAX_ROWS`; every launch leaves them
    zero). A decoder layer owns one."""

    rows: LaunchCounters = field(default_factory=lambda: LaunchCounters(MAX_ROWS))

    def counter(self, device: torch.device) -> torch.Tensor:
        return self.rows.counter(device)

    @staticmethod
    def fits(m: "torch.Tensor | SplitSums") -> bool:
        """Whether `__call__` takes these rows through the kernels (CUDA or the interpreter, at
        most MAX_ROWS rows); the caller runs the unfused chain otherwise."""
        rows = _read_as(m)[0]
        return _use_kernel(rows) and 0 < rows.shape[0] <= MAX_ROWS

    def __call__(self, m: "torch.Tensor | SplitSums", h: torch.Tensor, ff_norm: torch.Tensor, gate_w: torch.Tensor,
                 ple_input: torch.Tensor, proj_w: torch.Tensor, ple_norm: torch.Tensor, eps: float,
                 scalar: torch.Tensor | None = None,
                 next_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out, y) as `ple_tail_torch`, in two launches: m, h [M, hidden] (M <= MAX_ROWS; m may be
        `SplitSums`, added by the first launch), ple_input [M, ple_dim] (rows may be strided),
        gate_w [ple_dim, hidden], proj_w [hidden, ple_dim], the norms [hidden]."""
        if not self.fits(m):
            rows = _read_as(m)[0]
            raise ValueError(f"PleTail takes 1 to {MAX_ROWS} rows on CUDA (or in Triton's interpreter), "
                             f"got {rows.shape[0]} on {rows.device}")
        m, dtype, stride_split, splits = _read_as(m)
        M, hidden = m.shape
        ple_dim = gate_w.shape[0]
        if (h.shape != m.shape or gate_w.shape != (ple_dim, hidden) or proj_w.shape != (hidden, ple_dim)
                or ple_input.shape != (M, ple_dim)):
            raise ValueError(f"PleTail shapes disagree: m {tuple(m.shape)}, h {tuple(h.shape)}, gate "
                             f"{tuple(gate_w.shape)}, projection {tuple(proj_w.shape)}, ple {tuple(ple_input.shape)}")
        tensors = (h, gate_w, ple_input, proj_w)
        if m.stride(-1) != 1 or any(t.stride(-1) != 1 for t in tensors) or any(t.dtype != dtype for t in tensors):
            raise ValueError("PleTail takes tensors of one dtype with unit column stride")
        x = torch.empty_like(h)
        gated = torch.empty((M, ple_dim), dtype=dtype, device=m.device)
        p = torch.empty_like(h)
        out = torch.empty_like(h)
        y = torch.empty_like(h) if next_weight is not None else out
        block_k = triton.next_power_of_2(hidden)
        block_g = min(max(2, TILE // block_k), triton.next_power_of_2(ple_dim))
        block_pk = triton.next_power_of_2(ple_dim)
        block_n = min(max(2, TILE // block_pk), triton.next_power_of_2(hidden))
        warps = 8 if block_k >= 2048 else 4  # rows of the hidden width in registers: a few values a thread
        with torch.cuda.device(m.device) if m.is_cuda else contextlib.nullcontext():
            _ple_gate_kernel[(M, triton.cdiv(ple_dim, block_g))](
                m, h, ff_norm, gate_w, ple_input, x, gated, hidden, ple_dim, eps,
                m.stride(0), h.stride(0), gate_w.stride(0), ple_input.stride(0), x.stride(0), gated.stride(0),
                stride_split, BLOCK_K=block_k, BLOCK_G=block_g, **splits, PDL=pdl(m), launch_pdl=pdl(m),
                num_warps=warps)
            _ple_project_kernel[(M, triton.cdiv(hidden, block_n))](
                gated, proj_w, x, ple_norm, scalar if scalar is not None else x,
                next_weight if next_weight is not None else x, p, out, y, self.counter(m.device),
                hidden, ple_dim, eps, gated.stride(0), proj_w.stride(0), x.stride(0), out.stride(0), y.stride(0),
                HAS_SCALAR=scalar is not None, HAS_NEXT=next_weight is not None,
                BLOCK_K=block_pk, BLOCK_N=block_n, BLOCK_ROW=block_k, PDL=pdl(m), launch_pdl=pdl(m),
                num_warps=warps)
        return out, (y if next_weight is not None else None)

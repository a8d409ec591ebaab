"""The matrix products of a decode step at small batch (1 to 16 rows), streamed for bandwidth.

At M <= 16 rows a product x @ w.T reads each weight byte once and does a few flops with it, so
its floor is the weight's bytes over memory bandwidth; cuBLAS reaches 2 to 3.4 TB/s of an
H200's ~4.8 there. `small_m_linear` gives each program BLOCK_N output columns (weight rows) and
streams its [BLOCK_N, K] weight slab in BLOCK_K chunks with the x rows; with SPLIT_K > 1 the K
range is cut into that many block-aligned pieces, each program writes float32 partial sums to a
workspace [splits, M, N] and a second small kernel adds them in a fixed order and rounds
(deterministic: no atomics). `small_m_gate_up_gelu` does the MLP's packed gate|up product the
same way, each program taking matching gate and up column blocks, with gelu_tanh(gate) * up in
its epilogue (the [M, 2I] product never goes to memory).

Each chunk is multiplied with `tl.dot`, the x rows padded to 16 (the padding rows re-read row
M-1, from L1, and are never stored; ragged column blocks likewise re-read the last weight row,
so the loads need no masks but at a ragged end of K). Why not element-wise products and
`tl.sum`: M is a run-time argument (one compiled kernel serves every batch of 1..16 rows, as a
server's decode batches change size at every step), so an element-wise kernel would have to work
on 16 padded rows too, and at the lm_head (262144 x 2560) that is 21 GFLOP on the CUDA cores,
about 0.3 ms at their float32 rate, more than the ~0.28 ms that streaming its 1.3 GB weight
takes; on the tensor cores the padding costs nothing. `tl.dot` also has Triton stage the weight
chunks through shared memory with 16-byte asynchronous copies `num_stages` deep, which keeps
enough bytes in flight. Float32 inputs (the interpreter's tests) multiply in IEEE float32.

Rounding follows `torch.nn.functional.linear`: float32 accumulation and one rounding to the
activation dtype at the end (split partial sums are float32 too). The gate|up epilogue follows
its twin `gelu_mul_torch(F.linear(x, w)[:, :I], F.linear(x, w)[:, I:])`: both products rounded to
the dtype, the activation rounded, the product rounded.

Batch-dependent integers (the row count) are not specialised, so no batch size compiles a new
variant (the main kernel takes the split count at run time too; only the small reduction is
compiled per split count), and nothing is read back to the host: a captured CUDA graph replays
the launches.
Tiles (`GemvTiles`) come from `DEFAULT_TILES`, keyed by kernel and the weight's (rows, K) rounded
up to powers of two, and `heuristic_tiles` for shapes outside it; bench/gemv_sweep.py measures
them on the device.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fused import (KVWrite, SplitSums, _gelu_tanh, _pdl_release, _pdl_wait, _round, _use_kernel, gelu_mul,
                    gelu_mul_torch, head_norm_rope, pdl, residual_norm, tma_capable)
from .paged_attention import _dot

MAX_ROWS = 16  # the most rows these kernels take (one tensor-core tile of rows)
# The decoder's products of up to MAX_ROWS rows on CUDA go through these kernels instead of cuBLAS
# (TANDEM_SMALL_M=0: cuBLAS), loading through tensor descriptors where the device has TMA
# (TANDEM_GEMV_TMA=0: the gathering kernel); with dependent launches each program asks L2 for
# TANDEM_GEMV_PREFETCH_K columns of its weight rows ahead of its wait (0: none). All read once, at import. On by default
# since 220850e: E4B decode steps 4-9% shorter at 1-16 sequences on an H100 and 2-8% on an H200,
# 26B-A4B 4.6% at batch 1 and the same at 96 (bench/results/h100_220850e/, e4b_h200_c945b3a/).
SMALL_M_ON = os.environ.get("TANDEM_SMALL_M", "1") != "0"
PREFETCH_K = int(os.environ.get("TANDEM_GEMV_PREFETCH_K", "0"))
# In a dependent launch each program loads its first TANDEM_GEMV_EARLY_CHUNKS weight chunks (1 by default,
# at most 2; 0: none) before its wait (`GemvTiles.early_chunks`). On an H100 at 362c987 an E4B step took
# 4.63 / 4.63 ms at batch 1 with one against 4.69 / 4.70 without, 5.00 / 5.01 against 5.03 / 5.05 at batch
# 8, 5.45 against 5.47 at 16, and the server's mean TPOT 4.64 against 4.70 ms (bench/results/h100_362c987/)
EARLY_CHUNKS = int(os.environ.get("TANDEM_GEMV_EARLY_CHUNKS", "1"))
if EARLY_CHUNKS not in (0, 1, 2):
    raise ValueError(f"TANDEM_GEMV_EARLY_CHUNKS takes 0, 1 or 2, got {EARLY_CHUNKS}")
TMA_ON = os.environ.get("TANDEM_GEMV_TMA", "1") != "0"
# Up to TANDEM_SPLITS_IN_NORM_ROWS rows (1 by default; 0: never) the norms after the q|k|v, o and
# down products (the PLE tail's first launch too) add those products' K splits in their own launch
# (`fused.SplitSums`) instead of a reduction launch before them. On an H100 at 243a8e4 an E4B step
# took 4.63 ms at batch 1 against 4.69-4.70 with the reduction launches, but 5.02 against
# 4.92-4.96 at batch 8 (bench/results/h100_243a8e4/).
SPLITS_IN_NORM_ROWS = int(os.environ.get("TANDEM_SPLITS_IN_NORM_ROWS", "1"))
_ROWS = tl.constexpr(MAX_ROWS)
TARGET_SMS = 132  # the H200's multiprocessors, which `heuristic_tiles` aims to fill


@dataclass(frozen=True)
class GemvTiles:
    """One launch configuration: output columns per program, K per loop step, programs per column
    block along K (1: no split), warps per program, the depth of the load pipeline, and in a
    programmatically dependent launch the K columns of its weight rows each program asks L2 for
    before it waits for the launch before it (0: none; at most its split's columns), and the
    [block_n, block_k] weight chunks each program loads before that wait, 0 to 2 (the weight is no
    launch's output: those bytes move while the launch before drains).
    With `tma` the weight's [block_n, block_k] chunks and x's [16, block_k] ones are
    tensor-descriptor loads (bulk copies by the tensor memory accelerator, `_gemv_tma_kernel`)
    where the strides allow it (16-byte aligned rows)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch_k: int = 0
    tma: bool = False
    early_chunks: int = 0

    def __post_init__(self):
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvTiles.{name} must be a power of two, got {value}")
        if self.block_n < 8 or self.block_k < 16:
            raise ValueError(f"GemvTiles needs block_n >= 8 and block_k >= 16, got {self}")
        if self.prefetch_k < 0 or self.prefetch_k & (self.prefetch_k - 1):
            raise ValueError(f"GemvTiles.prefetch_k must be 0 or a power of two, got {self.prefetch_k}")
        if self.early_chunks not in (0, 1, 2):
            raise ValueError(f"GemvTiles.early_chunks is 0, 1 or 2, got {self.early_chunks}")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError(f"GemvTiles needs split_k >= 1 and num_stages >= 1, got {self}")
        if self.tma and (self.block_k > 256 or self.block_n > 256):
            raise ValueError(f"GemvTiles with tma takes blocks of at most 256 (a TMA box's side), got {self}")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def tiles_bucket(rows: int, k: int) -> tuple[int, int]:
    """The `DEFAULT_TILES` key of a weight [rows, K] (rows: the packed 2I rows for gate|up)."""
    return _pow2(rows), _pow2(k)


# Keyed by (kernel, *tiles_bucket(weight rows, K)) for bf16 weights: "linear" for `small_m_linear`,
# "gate_up" for `small_m_gate_up_gelu` (rows = 2I). Per bucket the tiles of least summed time over
# its shapes and 1-16 rows, weighted by calls per decode step, in bench/gemv_sweep.py's sweep on an
# H200 (bench/results/gemv_sweep_h200.json, "suggested_table"; the shapes it saw in the comments).
DEFAULT_TILES: dict[tuple[str, int, int], GemvTiles] = {
    ("gate_up", 8192, 4096): GemvTiles(32, 256, 1, 4, 4),  # 26b_a4b:mlp_gate_up
    ("gate_up", 32768, 4096): GemvTiles(64, 128, 1, 4, 3),  # e4b:mlp_gate_up
    ("linear", 128, 4096): GemvTiles(8, 256, 4, 4, 4),  # 26b_a4b:router
    ("linear", 256, 4096): GemvTiles(16, 128, 4, 4, 4),  # e4b:ple_gate
    ("linear", 2048, 4096): GemvTiles(64, 128, 4, 4, 4),  # e4b:q_sliding_kv_shared
    ("linear", 4096, 256): GemvTiles(32, 128, 1, 4, 3),  # e4b:ple_projection
    ("linear", 4096, 2048): GemvTiles(64, 256, 2, 4, 4),  # e4b:o_proj_sliding
    ("linear", 4096, 4096): GemvTiles(64, 256, 2, 4, 4),  # 26b_a4b:mlp_down, o_proj_sliding; e4b:o_proj_full, q_full_kv_shared, qkv_sliding
    ("linear", 4096, 8192): GemvTiles(64, 256, 2, 4, 4),  # 26b_a4b:o_proj_full
    ("linear", 4096, 16384): GemvTiles(64, 256, 2, 4, 4),  # e4b:mlp_down
    ("linear", 8192, 4096): GemvTiles(64, 256, 1, 4, 4),  # 26b_a4b:mlp_gate_up, 26b_a4b:qkv_sliding, e4b:qkv_full
    ("linear", 16384, 4096): GemvTiles(64, 256, 1, 4, 3),  # 26b_a4b:qkv_full, e4b:ple_model_projection
    ("linear", 32768, 4096): GemvTiles(64, 256, 1, 4, 4),  # e4b:mlp_gate_up
    ("linear", 262144, 4096): GemvTiles(64, 256, 1, 4, 3),  # 26b_a4b:lm_head, e4b:lm_head
}


def heuristic_tiles(kind: str, rows: int, k: int, element_size: int = 2) -> GemvTiles:
    """Tiles for a shape outside `DEFAULT_TILES`: the widest column block that still gives two
    programs per multiprocessor, then K splits until it does (each split at least two chunks)."""
    block_k = 512 // element_size  # 512-byte rows per chunk
    out_cols = rows // 2 if kind == "gate_up" else rows
    block_n = 16
    for candidate in (64, 32):
        if triton.cdiv(out_cols, candidate) >= 2 * TARGET_SMS:
            block_n = candidate
            break
    programs, split = triton.cdiv(out_cols, block_n), 1
    while programs * split < 2 * TARGET_SMS and split < 8 and k >= 4 * block_k * split:
        split *= 2
    return GemvTiles(block_n, block_k, split, num_warps=4, num_stages=3)


def default_tiles(kind: str, rows: int, k: int, dtype: torch.dtype = torch.bfloat16) -> GemvTiles:
    """The tiles `tiles=None` picks for a weight [rows, K] of `dtype`."""
    if kind not in ("linear", "gate_up"):
        raise ValueError(f"unknown kernel {kind!r}: 'linear' or 'gate_up'")
    element_size = torch.empty((), dtype=dtype).element_size()
    if element_size == 2:
        hit = DEFAULT_TILES.get((kind, *tiles_bucket(rows, k)))
        if hit is not None:
            return hit
    return heuristic_tiles(kind, rows, k, element_size)


# ---- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _gelu_times(gate, up, dt: tl.constexpr):
    """gelu_tanh(gate) * up as the twin rounds it: products, activation and result in `dt`."""
    gate, up = _round(gate, dt), _round(up, dt)
    act = _round(_gelu_tanh(gate), dt)
    return act * up  # sqrt(2 / pi) above; the caller rounds at the store


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the lines at ptrs (no registers filled, nothing waited for)."""
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _prefetch_weight_rows(w_ptr, w_rows, stride_w, up_offset, k_lo, k_hi, GATE_UP: tl.constexpr,
                          PREFETCH_K: tl.constexpr, LINE: tl.constexpr):
    """Ask L2 for the first PREFETCH_K columns from k_lo of weight rows `w_rows` (and of their up
    rows with GATE_UP), one request per LINE elements (128 bytes); nothing if PREFETCH_K is 0."""
    if PREFETCH_K > 0:
        lines = k_lo + tl.arange(0, PREFETCH_K // LINE) * LINE
        lines = tl.minimum(lines, k_hi - 1)  # a short range asks for its last line again
        _prefetch_l2(w_ptr + w_rows[:, None] * stride_w + lines[None, :])
        if GATE_UP:
            _prefetch_l2(w_ptr + up_offset + w_rows[:, None] * stride_w + lines[None, :])


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, M, N, K, k_per_split, up_offset, stride_x, stride_w, stride_o,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATE_UP: tl.constexpr, PARTIAL: tl.constexpr,
                 EVEN_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, PREFETCH_K: tl.constexpr,
                 LINE: tl.constexpr, EARLY: tl.constexpr):
    """Program (column block, split): out[:M, block] (or its float32 partial sums over the split's
    K range) = x[:M, range] @ w[block, range].T. N: output columns; with GATE_UP the up rows start
    at weight row N (`up_offset` elements on) and the output is gelu_tanh(gate) * up. With PDL the
    program may start while the launch before it drains: it first asks L2 for the first
    PREFETCH_K columns of its weight rows (one request per LINE elements, 128 bytes), which no
    launch writes, and loads its first EARLY weight chunks (0 to 2; a second past its split reads as
    zeros); it waits for the launch before it only then, before it reads x."""
    _pdl_release(PDL)
    split = tl.program_id(1)
    rows = tl.arange(0, _ROWS)
    row_ok = rows < M
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    # padding rows and columns re-read the last real one (cached, never stored): no load masks
    x_rows = tl.minimum(rows, M - 1).to(tl.int64)
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_ptrs = x_ptr + x_rows[:, None] * stride_x + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + w_rows[:, None] * stride_w + (k_lo + offs_k)[None, :]
    _prefetch_weight_rows(w_ptr, w_rows, stride_w, up_offset, k_lo, k_hi, GATE_UP, PREFETCH_K, LINE)
    if EARLY >= 1:
        w_first = _load_chunk(w_ptrs, k_lo, offs_k, K, EVEN_K)
        w_first_up = _load_chunk(w_ptrs + up_offset, k_lo, offs_k, K, EVEN_K) if GATE_UP else w_first
    if EARLY >= 2:  # masked at the split's end (a split may hold one chunk)
        w_second = _load_chunk(w_ptrs + BLOCK_K, k_lo + BLOCK_K, offs_k, k_hi, False)
        w_second_up = _load_chunk(w_ptrs + BLOCK_K + up_offset, k_lo + BLOCK_K, offs_k, k_hi, False) if GATE_UP \
            else w_second
    _pdl_wait(PDL)
    acc = tl.zeros([_ROWS, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([_ROWS, BLOCK_N], dtype=tl.float32)
    k_start = k_lo
    if EARLY >= 1:  # the early chunks' products, then the loop from the next
        x = _load_chunk(x_ptrs, k_lo, offs_k, K, EVEN_K)
        acc, acc_up = _add_products(acc, acc_up, x, w_first, w_first_up, GATE_UP, IEEE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        k_start += BLOCK_K
    if EARLY >= 2:
        x = _load_chunk(x_ptrs, k_start, offs_k, k_hi, False)
        acc, acc_up = _add_products(acc, acc_up, x, w_second, w_second_up, GATE_UP, IEEE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        k_start += BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        x = _load_chunk(x_ptrs, k0, offs_k, K, EVEN_K)
        w = _load_chunk(w_ptrs, k0, offs_k, K, EVEN_K)
        w_up = _load_chunk(w_ptrs + up_offset, k0, offs_k, K, EVEN_K) if GATE_UP else w
        acc, acc_up = _add_products(acc, acc_up, x, w, w_up, GATE_UP, IEEE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _store_products(acc, acc_up, out_ptr, part_ptr, rows, offs_n, row_ok[:, None] & n_ok[None, :], split, M, N,
                    stride_o, GATE_UP, PARTIAL)


@triton.jit
def _add_products(acc, acc_up, x, w, w_up, GATE_UP: tl.constexpr, IEEE: tl.constexpr):
    """acc + x @ w.T, and with GATE_UP acc_up + x @ w_up.T (one K chunk's products)."""
    acc += _dot(x, tl.trans(w), IEEE)
    if GATE_UP:
        acc_up += _dot(x, tl.trans(w_up), IEEE)
    return acc, acc_up


@triton.jit
def _load_chunk(ptrs, k0, offs_k, K, EVEN_K: tl.constexpr):
    """The chunk at `ptrs` (columns k0 + offs_k): unmasked with EVEN_K, else zeros from column K on
    (splits start on whole chunks: in the loop only K's end is ragged)."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)


@triton.jit
def _store_products(acc, acc_up, out_ptr, part_ptr, rows, offs_n, out_ok, split, M, N, stride_o,
                    GATE_UP: tl.constexpr, PARTIAL: tl.constexpr):
    """A program's products: float32 partial sums [splits, M, N (2N with GATE_UP)] for
    _split_reduce_kernel (or the kernel that reads `SplitSums`), or the rounded result
    (gelu_tanh(gate) * up with GATE_UP)."""
    if PARTIAL:
        width = 2 * N if GATE_UP else N
        cells = part_ptr + (split * M + rows).to(tl.int64)[:, None] * width + offs_n[None, :]
        tl.store(cells, acc, mask=out_ok)
        if GATE_UP:
            tl.store(cells + N, acc_up, mask=out_ok)
    else:
        dt = out_ptr.dtype.element_ty
        if GATE_UP:
            acc = _gelu_times(acc, acc_up, dt)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + offs_n[None, :], acc.to(dt), mask=out_ok)


@triton.jit(do_not_specialize=["M"])
def _gemv_tma_kernel(x_desc, w_desc, w_ptr, out_ptr, part_ptr, M, N, K, k_per_split, stride_w, stride_o,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATE_UP: tl.constexpr, PARTIAL: tl.constexpr,
                     IEEE: tl.constexpr, PDL: tl.constexpr, PREFETCH_K: tl.constexpr, LINE: tl.constexpr,
                     EARLY: tl.constexpr):
    """`_gemv_kernel` with its chunks loaded through tensor descriptors: x [M, K] in [16, BLOCK_K]
    boxes and the weight [N rows (2N with GATE_UP), K] in [BLOCK_N, BLOCK_K] boxes, the up rows'
    box N rows below the gate rows'. Whatever lies outside a descriptor reads as zeros (x's padding
    rows, K past its end), so no load takes a mask; a gate box past row N reads up rows, whose
    columns are never stored. With PDL and PREFETCH_K the program first asks L2 for the first
    PREFETCH_K columns of its weight rows through `w_ptr` (as `_gemv_kernel`), and loads its
    first EARLY weight chunks (boxes; a second past its split is zeroed through x), then waits."""
    _pdl_release(PDL)
    split = tl.program_id(1)
    rows = tl.arange(0, _ROWS)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    _prefetch_weight_rows(w_ptr, tl.minimum(offs_n, N - 1).to(tl.int64), stride_w, N * stride_w, k_lo, k_hi, GATE_UP,
                          PREFETCH_K, LINE)
    if EARLY >= 1:
        w_first = w_desc.load([n0, k_lo])
        w_first_up = w_desc.load([N + n0, k_lo]) if GATE_UP else w_first
    if EARLY >= 2:
        w_second = w_desc.load([n0, k_lo + BLOCK_K])
        w_second_up = w_desc.load([N + n0, k_lo + BLOCK_K]) if GATE_UP else w_second
    _pdl_wait(PDL)
    acc = tl.zeros([_ROWS, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([_ROWS, BLOCK_N], dtype=tl.float32)
    k_start = k_lo
    if EARLY >= 1:  # the early chunks' products, then the loop from the next
        x = x_desc.load([0, k_lo])
        acc, acc_up = _add_products(acc, acc_up, x, w_first, w_first_up, GATE_UP, IEEE)
        k_start += BLOCK_K
    if EARLY >= 2:  # x's columns past the split (the next split's) zeroed
        x = tl.where((k_start + tl.arange(0, BLOCK_K))[None, :] < k_hi, x_desc.load([0, k_start]), 0.0)
        acc, acc_up = _add_products(acc, acc_up, x, w_second, w_second_up, GATE_UP, IEEE)
        k_start += BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        x = x_desc.load([0, k0])
        acc += _dot(x, tl.trans(w_desc.load([n0, k0])), IEEE)
        if GATE_UP:
            acc_up += _dot(x, tl.trans(w_desc.load([N + n0, k0])), IEEE)
    _store_products(acc, acc_up, out_ptr, part_ptr, rows, offs_n, (rows < M)[:, None] & (offs_n < N)[None, :], split,
                    M, N, stride_o, GATE_UP, PARTIAL)


@triton.jit(do_not_specialize=["M"])
def _split_reduce_kernel(part_ptr, out_ptr, M, N, stride_o, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         GATE_UP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Program (row, column block): the splits' partial sums added in split order, rounded once
    (and with GATE_UP, gelu_tanh(gate) * up)."""
    _pdl_release(PDL)
    _pdl_wait(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    splits = tl.arange(0, SPLITS_PAD)
    width = 2 * N if GATE_UP else N
    cells = part_ptr + (splits * M + row).to(tl.int64)[:, None] * width + offs[None, :]
    mask = (splits < SPLITS)[:, None] & ok[None, :]
    acc = tl.sum(tl.load(cells, mask=mask, other=0.0), axis=0)
    dt = out_ptr.dtype.element_ty
    if GATE_UP:
        acc = _gelu_times(acc, tl.sum(tl.load(cells + N, mask=mask, other=0.0), axis=0), dt)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + offs, acc.to(dt), mask=ok)


# ---- the twins and the public functions --------------------------------------------------------------


def small_m_linear_torch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The twin: x @ w.T (`F.linear`)."""
    return F.linear(x, w)


def small_m_gate_up_gelu_torch(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    """The twin: gelu_tanh(x @ gate.T) * (x @ up.T), gate and up the halves of w_packed's rows."""
    gate_up = F.linear(x, w_packed)
    inter = w_packed.shape[0] // 2
    return gelu_mul_torch(gate_up[:, :inter], gate_up[:, inter:])


def _check(name: str, x: torch.Tensor, w: torch.Tensor) -> None:
    if not _use_kernel(x):
        raise ValueError(f"{name} needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name} takes x [M, K] and a weight [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"{name} takes at most {MAX_ROWS} rows, got {x.shape[0]}: use F.linear")
    if x.dtype != w.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name} takes x and weight of one dtype (bf16, fp16 or float32), got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"{name} takes x and weight on one device, got {x.device} and {w.device}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"{name} takes x and weight with unit column stride")


def _descriptor_ready(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x and w can be tensor descriptors: 16-byte aligned bases and row strides (the
    element size divides 16 in every dtype taken)."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x, w))


def _launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, n_out: int, tiles: GemvTiles, gate_up: bool,
            dependent: bool | None, keep_splits: bool = False) -> SplitSums | None:
    """The product into `out`, its K splits added by a second launch (`_split_reduce_kernel`); with
    `keep_splits` (a plain product), K split: no reduction launch, the partial sums returned as
    `SplitSums` for the caller's kernel to add (`out` left unwritten)."""
    M, K = x.shape
    block_k = tiles.block_k
    chunks = triton.cdiv(K, block_k)
    k_per_split = triton.cdiv(chunks, min(tiles.split_k, chunks)) * block_k
    splits = triton.cdiv(K, k_per_split)  # no split without K
    width = 2 * n_out if gate_up else n_out
    part = torch.empty((splits, M, width), dtype=torch.float32, device=x.device) if splits > 1 else out
    on = pdl(x) if dependent is None else dependent and x.is_cuda
    line = max(1, 128 // w.element_size())
    prefetch_k = min(tiles.prefetch_k, _pow2(k_per_split)) if on else 0
    prefetch_k = prefetch_k if prefetch_k >= line else 0  # at least one 128-byte line
    early = tiles.early_chunks  # without a wait, the same loop with its first chunks peeled
    grid = (triton.cdiv(n_out, tiles.block_n), splits)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if tiles.tma and _descriptor_ready(x, w):
            from triton.tools.tensor_descriptor import TensorDescriptor

            x_desc = TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [MAX_ROWS, block_k])
            w_desc = TensorDescriptor(w, list(w.shape), [w.stride(0), 1], [tiles.block_n, block_k])
            _gemv_tma_kernel[grid](
                x_desc, w_desc, w, out, part, M, n_out, K, k_per_split, w.stride(0), out.stride(0),
                BLOCK_N=tiles.block_n, BLOCK_K=block_k, GATE_UP=gate_up, PARTIAL=splits > 1,
                IEEE=x.dtype == torch.float32, PDL=on, PREFETCH_K=prefetch_k, LINE=line, EARLY=early,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=on)
        else:
            _gemv_kernel[grid](
                x, w, out, part, M, n_out, K, k_per_split, n_out * w.stride(0), x.stride(0), w.stride(0), out.stride(0),
                BLOCK_N=tiles.block_n, BLOCK_K=block_k, GATE_UP=gate_up, PARTIAL=splits > 1, EVEN_K=K % block_k == 0,
                IEEE=x.dtype == torch.float32, PDL=on, PREFETCH_K=prefetch_k, LINE=line, EARLY=early,
                num_warps=tiles.num_warps, num_stages=tiles.num_stages, launch_pdl=on)
        if splits > 1:
            if keep_splits:
                return SplitSums(part, out.dtype)
            block = min(1024, _pow2(n_out))
            _split_reduce_kernel[(M, triton.cdiv(n_out, block))](
                part, out, M, n_out, out.stride(0), SPLITS=splits, SPLITS_PAD=_pow2(splits), GATE_UP=gate_up,
                BLOCK=block, PDL=on, num_warps=4, launch_pdl=on)
    return None


def small_m_linear(x: torch.Tensor, w: torch.Tensor, tiles: GemvTiles | None = None, *,
                   dependent: bool | None = None, keep_splits: bool = False) -> torch.Tensor | SplitSums:
    """x [M, K] @ w.T for a weight w [N, K] (an nn.Linear's), M <= 16: [M, N] in x's dtype, as
    `small_m_linear_torch`. `tiles` defaults to `default_tiles("linear", N, K, dtype)`; `dependent`
    launches programmatically dependent (with `tiles.prefetch_k`), None as the `TANDEM_PDL` switch.
    With `keep_splits` the K splits are returned unadded, as `SplitSums`, for the kernel that reads
    the product."""
    _check("small_m_linear", x, w)
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    kept = _launch(x, w, out, N, tiles or default_tiles("linear", N, K, x.dtype), False, dependent,
                   keep_splits=keep_splits)
    return kept or out


def small_m_gate_up_gelu(x: torch.Tensor, w_packed: torch.Tensor, tiles: GemvTiles | None = None, *,
                         dependent: bool | None = None) -> torch.Tensor:
    """gelu_tanh(x @ gate.T) * (x @ up.T) [M, I] in x's dtype for w_packed [2I, K] (gate rows, then
    up rows), M <= 16, as `small_m_gate_up_gelu_torch`; gate and up in one pass over the weight.
    `tiles` defaults to `default_tiles("gate_up", 2I, K, dtype)`; `dependent` as `small_m_linear`'s."""
    _check("small_m_gate_up_gelu", x, w_packed)
    if w_packed.shape[0] % 2:
        raise ValueError(f"small_m_gate_up_gelu takes gate and up rows packed [2I, K], got {w_packed.shape[0]} rows")
    M, K = x.shape
    inter = w_packed.shape[0] // 2
    out = torch.empty((M, inter), dtype=x.dtype, device=x.device)
    if M == 0 or inter == 0:
        return out
    if K == 0:
        return out.zero_()  # gelu(0) * 0
    _launch(x, w_packed, out, inter, tiles or default_tiles("gate_up", 2 * inter, K, x.dtype), True, dependent)
    return out


def _decode_kernels(x: torch.Tensor) -> bool:
    return SMALL_M_ON and x.is_cuda and 0 < x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)


def _decode_tiles(kind: str, w: torch.Tensor) -> GemvTiles:
    tiles = default_tiles(kind, w.shape[0], w.shape[1], w.dtype)
    if TMA_ON and tma_capable(w):
        tiles = replace(tiles, block_k=min(tiles.block_k, 256), tma=True)
    return replace(tiles, prefetch_k=PREFETCH_K, early_chunks=EARLY_CHUNKS)


def decode_linear(x: torch.Tensor, w: torch.Tensor, norm_next: bool = False) -> torch.Tensor | SplitSums:
    """x @ w.T: `small_m_linear` where the TANDEM_SMALL_M switch takes x's rows, `F.linear` else.
    With `norm_next` (the caller's next kernel reads `SplitSums`), up to TANDEM_SPLITS_IN_NORM_ROWS
    rows, the K splits are left for that kernel to add."""
    if _decode_kernels(x) and x.stride(-1) == 1 and w.stride(-1) == 1:
        return small_m_linear(x, w, _decode_tiles("linear", w),
                              keep_splits=norm_next and x.shape[0] <= SPLITS_IN_NORM_ROWS)
    return F.linear(x, w)


def decode_qkv_norm_rope(x: torch.Tensor, w: torch.Tensor, heads: int, head_dim: int, q_weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, eps: float, kv: KVWrite | None = None) -> torch.Tensor:
    """`head_norm_rope(decode_linear(x, w), ...)`: up to TANDEM_SPLITS_IN_NORM_ROWS rows
    the product's K splits added in the norms' launch."""
    return head_norm_rope(decode_linear(x, w, norm_next=True), heads, head_dim, q_weight, cos, sin, eps, kv)


def decode_linear_norm(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       scalar: torch.Tensor | None = None,
                       next_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`residual_norm(decode_linear(x, w), residual, weight, eps, scalar, next_weight)`: up to
    TANDEM_SPLITS_IN_NORM_ROWS rows the product's K splits added in the norm's launch."""
    return residual_norm(decode_linear(x, w, norm_next=True), residual, weight, eps, scalar, next_weight)


def decode_gate_up_gelu(x: torch.Tensor, w_packed: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up of the packed gate|up weight: `small_m_gate_up_gelu` where the
    TANDEM_SMALL_M switch takes x's rows, else `F.linear` then the fused `gelu_mul`."""
    if _decode_kernels(x) and x.stride(-1) == 1 and w_packed.stride(-1) == 1:
        return small_m_gate_up_gelu(x, w_packed, _decode_tiles("gate_up", w_packed))
    both = F.linear(x, w_packed)
    inter = w_packed.shape[0] // 2
    return gelu_mul(both[:, :inter], both[:, inter:])

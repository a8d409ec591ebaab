"""Fused element-wise kernels of the decoder layer, each beside its PyTorch twin.

A Gemma 4 layer in plain PyTorch launches about a hundred small kernels (every RMSNorm alone is
eight: upcast, square, mean, add, rsqrt, two products, downcast), which at decode batch sizes
cost more than its matrix products. These kernels do each chain in one pass:

- `residual_norm`: h = residual + RMSNorm(x) * w, times the layer scalar, and the next norm of h
  (the post-attention norm, the residual add and the pre-feed-forward norm in one launch; the
  post-feed-forward or post-PLE norm, the add, the layer scalar and the next layer's input norm
  in another);
- `head_norm_rope`: the per-head q/k/v RMSNorms and RoPE on a fused QKV projection, K and V
  written straight into the paged cache (in its dtype; FP8 saturates as `attention.to_cache`);
- `gelu_mul`: gelu_tanh(a) * b (the MLP's gate times up, the PLE gate times its input);
- `ple_combine`: the per-layer-embedding table gather and its combination with the normed
  projection of the embeddings.

`residual_norm` and `head_norm_rope` also read a product as `SplitSums`, its float32 partial sums
over K splits (`kernels.gemv`), which they add as the split reduction would: one launch fewer.

Each kernel rounds to the activation dtype where its twin's PyTorch ops do (every op of a bf16
twin returns bf16), so the two agree to the last bit but for float32 summation order. The
`*_torch` functions are the twins, the CPU path and the tests' oracles; the public functions run
the kernel on CUDA tensors (or in Triton's interpreter) and the twin elsewhere.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..attention import to_cache
from ..layers import apply_rope, gelu_tanh, rms_norm



def _use_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


# Programmatic dependent launch (Hopper and later): a kernel launched with it may have its programs
# resident while the launch before it drains; they wait (`_pdl_wait`) before reading anything that
# launch, or one before it, may still write, and let the next launch in at once (`_pdl_release`).
# On unless TANDEM_PDL=0 (read once, at import): with the small-M products it took an E4B batch-1
# step from 4.97 to 4.87 ms on an H100 (bench/results/e4b_b1_h100_8c15c3a/).
PDL_ON = os.environ.get("TANDEM_PDL", "1") != "0"


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> bool:
    """Whether a launch on t's device is programmatically dependent (see PDL_ON)."""
    return PDL_ON and t.is_cuda and _hopper(_index(t))


def tma_capable(t: torch.Tensor) -> bool:
    """Whether kernels over t may load through tensor descriptors (TMA): on a Hopper or later GPU,
    or off CUDA (Triton's interpreter, which emulates them)."""
    return not t.is_cuda or _hopper(_index(t))


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


@triton.jit
def _pdl_release(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    if PDL:
        gdc_wait()


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to the activation dtype, kept in float32 (what a twin's op returns)."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _load_row(ptr, offs, ok, stride_split, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, dt: tl.constexpr):
    """Float32 values at ptr + offs; with SPLITS > 0, ptr points into a product's float32 partial
    sums over K splits `stride_split` apart (`SplitSums`), which are added and rounded to dt once,
    as `gemv._split_reduce_kernel` adds and stores them."""
    if SPLITS > 0:
        splits = tl.arange(0, SPLITS_PAD)
        cells = ptr + splits.to(tl.int64)[:, None] * stride_split + offs[None, :]
        mask = (splits < SPLITS)[:, None] & ok[None, :]
        x = _round(tl.sum(tl.load(cells, mask=mask, other=0.0), axis=0), dt)
    else:
        x = tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return x


@dataclass(frozen=True)
class SplitSums:
    """A product [M, N] left as its float32 partial sums over K splits, `parts` [splits, M, N]
    (unit column stride), for the kernel that reads it to add and round to `dtype`."""

    parts: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]

    def total(self) -> torch.Tensor:
        """The product itself (what the split reduction stores)."""
        return self.parts.sum(0).to(self.dtype)


def _plain(x: "torch.Tensor | SplitSums") -> torch.Tensor:
    """x as one tensor (the twins' input)."""
    return x.total() if isinstance(x, SplitSums) else x


def _read_as(x: "torch.Tensor | SplitSums") -> tuple[torch.Tensor, torch.dtype, int, dict]:
    """(the rows a kernel reads: x or its first split's, the product's dtype, the splits' stride,
    the kernel's SPLITS and SPLITS_PAD)."""
    if isinstance(x, SplitSums):
        splits = x.parts.shape[0]
        return x.parts[0], x.dtype, x.parts.stride(0), dict(SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits))
    return x, x.dtype, 0, dict(SPLITS=0, SPLITS_PAD=1)


@triton.jit
def _tanh(x):
    e = tl.exp(2.0 * x)
    return 1.0 - 2.0 / (e + 1.0)  # saturates to +-1 without overflow trouble


@triton.jit
def _gelu_tanh(x):
    """gelu with the tanh approximation (float32 in, float32 out; the caller rounds)."""
    return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))  # sqrt(2 / pi)


# ---- residual + RMSNorm (+ layer scalar) (+ the next RMSNorm) --------------------------------


@triton.jit
def _residual_norm_kernel(x_ptr, res_ptr, w_ptr, scalar_ptr, next_w_ptr, h_ptr, y_ptr, n_cols, eps,
                          stride_x, stride_r, stride_h, stride_y, stride_split,
                          HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_SCALAR: tl.constexpr,
                          HAS_NEXT: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
                          SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    _pdl_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cols
    _pdl_wait(PDL)
    x = _load_row(x_ptr + row * stride_x, offs, ok, stride_split, SPLITS, SPLITS_PAD, h_ptr.dtype.element_ty)
    _residual_norm_row(x, row, offs, ok, res_ptr, w_ptr, scalar_ptr, next_w_ptr, h_ptr, y_ptr, n_cols, eps, stride_r,
                       stride_h, stride_y, HAS_RES, HAS_W, HAS_SCALAR, HAS_NEXT)


@triton.jit
def _residual_norm_row(x, row, offs, ok, res_ptr, w_ptr, scalar_ptr, next_w_ptr, h_ptr, y_ptr, n_cols, eps, stride_r,
                       stride_h, stride_y, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_SCALAR: tl.constexpr,
                       HAS_NEXT: tl.constexpr):
    """One row of `residual_norm` from its input x (float32 values): stores h and, with HAS_NEXT, y."""
    dt = h_ptr.dtype.element_ty
    n = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    if HAS_W:
        n = n * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    h = _round(n, dt)
    if HAS_RES:
        h = _round(tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32) + h, dt)
    if HAS_SCALAR:
        h = _round(h * tl.load(scalar_ptr).to(tl.float32), dt)
    tl.store(h_ptr + row * stride_h + offs, h.to(dt), mask=ok)
    if HAS_NEXT:
        y = h * tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        y = y * tl.load(next_w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, y.to(dt), mask=ok)


def residual_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                        scalar: torch.Tensor | None = None,
                        next_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The twin: h = (residual + rms_norm(x, weight)) * scalar; y = rms_norm(h, next_weight)."""
    h = rms_norm(x, weight, eps)
    if residual is not None:
        h = residual + h
    if scalar is not None:
        h = h * scalar
    return h, None if next_weight is None else rms_norm(h, next_weight, eps)


def residual_norm(x: "torch.Tensor | SplitSums", residual: torch.Tensor | None, weight: torch.Tensor | None,
                  eps: float, scalar: torch.Tensor | None = None,
                  next_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h, y) as `residual_norm_torch`, in one launch per call on the GPU. x, residual: [T, N]
    (x may be `SplitSums`, added in the launch)."""
    if not _use_kernel(_read_as(x)[0]):
        return residual_norm_torch(_plain(x), residual, weight, eps, scalar, next_weight)
    x, dtype, stride_split, splits = _read_as(x)
    T, n_cols = x.shape
    if x.stride(1) != 1 or (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1)):
        raise ValueError("residual_norm takes row-major [T, N] tensors of one shape")
    h = torch.empty(x.shape, dtype=dtype, device=x.device)
    y = torch.empty_like(h) if next_weight is not None else h
    if T:
        block = triton.next_power_of_2(n_cols)
        _residual_norm_kernel[(T,)](
            x, residual if residual is not None else x, weight if weight is not None else x,
            scalar if scalar is not None else x, next_weight if next_weight is not None else x, h, y, n_cols, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, h.stride(0), y.stride(0), stride_split,
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_SCALAR=scalar is not None,
            HAS_NEXT=next_weight is not None, BLOCK=block, **splits, PDL=pdl(x), launch_pdl=pdl(x),
            num_warps=8 if block >= 2048 else 4)
    return h, (y if next_weight is not None else None)


# ---- per-head norms and RoPE on a fused QKV projection, K and V into the cache ------------------


@triton.jit
def _norm_rope(base, w_ptr, offs, partner, sign, ok, cos, sin, eps, stride_split, D: tl.constexpr, dt: tl.constexpr,
               SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    x = _load_row(base, offs, ok, stride_split, SPLITS, SPLITS_PAD, dt)
    xp = _load_row(base, partner, ok, stride_split, SPLITS, SPLITS_PAD, dt)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    n = _round(x * r * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32), dt)
    n_partner = _round(xp * r * tl.load(w_ptr + partner, mask=ok, other=0.0).to(tl.float32), dt)
    return _round(_round(n * cos, dt) + _round(sign * n_partner * sin, dt), dt)


@triton.jit
def _head_norm_rope_kernel(src_ptr, q_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                           stride_src, stride_qt, stride_qh, stride_cos, stride_cs, stride_ch, k_off, v_off, eps,
                           stride_split, HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                           FP8: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr):
    _pdl_release(PDL)
    _pdl_wait(PDL)
    _head_norm_rope_at(tl.program_id(0).to(tl.int64), tl.program_id(1), src_ptr, q_ptr, wq_ptr, wk_ptr, cos_ptr,
                       sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_src, stride_qt, stride_qh, stride_cos,
                       stride_cs, stride_ch, k_off, v_off, eps, HEADS, D, BLOCK_D, FP8, stride_split, SPLITS,
                       SPLITS_PAD)


@triton.jit
def _head_norm_rope_at(t, head, src_ptr, q_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                       stride_src, stride_qt, stride_qh, stride_cos, stride_cs, stride_ch, k_off, v_off, eps,
                       HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
                       stride_split, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Token t's head `head` of `head_norm_rope` (a q head below HEADS, else the KV head past
    them, K and V into the cache); with SPLITS the projections are `SplitSums` (`_load_row`)."""
    half: tl.constexpr = D // 2
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    partner = tl.where(offs < half, offs + half, offs - half)
    sign = tl.where(offs < half, -1.0, 1.0)
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + t * stride_cos + offs, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_cos + offs, mask=ok, other=0.0).to(tl.float32)
    row = src_ptr + t * stride_src
    if head < HEADS:
        q = _norm_rope(row + head * D, wq_ptr, offs, partner, sign, ok, cos, sin, eps, stride_split, D, dt, SPLITS,
                       SPLITS_PAD)
        tl.store(q_ptr + t * stride_qt + head * stride_qh + offs, q.to(dt), mask=ok)
    else:
        j = head - HEADS
        k = _norm_rope(row + k_off + j * D, wk_ptr, offs, partner, sign, ok, cos, sin, eps, stride_split, D, dt, SPLITS,
                       SPLITS_PAD)
        v = _load_row(row + v_off + j * D, offs, ok, stride_split, SPLITS, SPLITS_PAD, dt)
        v = _round(v * tl.rsqrt(tl.sum(v * v, axis=0) / D + eps), dt)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        cache_dt = k_cache_ptr.dtype.element_ty
        if FP8:
            k = tl.minimum(tl.maximum(k, -448.0), 448.0)  # attention.FP8_MAX
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        cell = slot * stride_cs + j * stride_ch + offs
        tl.store(k_cache_ptr + cell, k.to(cache_dt), mask=ok)
        tl.store(v_cache_ptr + cell, v.to(cache_dt), mask=ok)


def head_norm_rope_torch(src: torch.Tensor, heads: int, head_dim: int, q_weight: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, eps: float, kv: "KVWrite | None" = None) -> torch.Tensor:
    """The twin. src [T, heads*D (+ kv_heads*D (+ kv_heads*D))]: q (then k, then v unless k_eq_v)
    columns; returns q normed and rotated [T, heads, D]; with `kv`, K (normed, rotated) and V
    (normed, no weight) are stored at its slots."""
    T = src.shape[0]
    q = apply_rope(rms_norm(src[:, :heads * head_dim].reshape(T, heads, head_dim), q_weight, eps), cos, sin)
    if kv is not None:
        width = kv.kv_heads * head_dim
        raw_k = src[:, heads * head_dim:heads * head_dim + width].reshape(T, kv.kv_heads, head_dim)
        raw_v = raw_k if kv.k_eq_v else src[:, heads * head_dim + width:heads * head_dim + 2 * width].reshape(
            T, kv.kv_heads, head_dim)
        kv.k_cache[kv.slots] = to_cache(apply_rope(rms_norm(raw_k, kv.k_weight, eps), cos, sin), kv.k_cache.dtype)
        kv.v_cache[kv.slots] = to_cache(rms_norm(raw_v, None, eps), kv.v_cache.dtype)
    return q


class KVWrite:
    """Where `head_norm_rope` stores a layer's new K and V: flat caches [slots, kv_heads, D]."""

    __slots__ = ("k_weight", "kv_heads", "k_eq_v", "k_cache", "v_cache", "slots")

    def __init__(self, k_weight: torch.Tensor, kv_heads: int, k_eq_v: bool, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slots: torch.Tensor):
        self.k_weight, self.kv_heads, self.k_eq_v = k_weight, kv_heads, k_eq_v
        self.k_cache, self.v_cache, self.slots = k_cache, v_cache, slots


def head_norm_rope(src: "torch.Tensor | SplitSums", heads: int, head_dim: int, q_weight: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, eps: float, kv: KVWrite | None = None) -> torch.Tensor:
    """As `head_norm_rope_torch`, in one launch on the GPU (q heads and kv heads side by side);
    src may be `SplitSums`, added in the launch."""
    if not _use_kernel(_read_as(src)[0]):
        return head_norm_rope_torch(_plain(src), heads, head_dim, q_weight, cos, sin, eps, kv)
    src, dtype, stride_split, splits = _read_as(src)
    T = src.shape[0]
    if src.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(0) != cos.stride(0) or head_dim % 2:
        raise ValueError("head_norm_rope takes row-major projections and cos/sin tables and an even head dim")
    q = torch.empty((T, heads, head_dim), dtype=dtype, device=src.device)
    if not T:
        return q
    kv_heads = 0 if kv is None else kv.kv_heads
    if kv is not None:
        assert kv.k_cache.stride() == kv.v_cache.stride() and kv.k_cache.stride(2) == 1
    k_off = heads * head_dim
    v_off = k_off if kv is None or kv.k_eq_v else k_off + kv_heads * head_dim
    k_cache = q if kv is None else kv.k_cache
    _head_norm_rope_kernel[(T, heads + kv_heads)](
        src, q, q_weight, q_weight if kv is None else kv.k_weight, cos, sin, k_cache,
        q if kv is None else kv.v_cache, cos if kv is None else kv.slots,
        src.stride(0), q.stride(0), q.stride(1), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_off, v_off, eps,
        stride_split, HEADS=heads, D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        FP8=kv is not None and kv.k_cache.dtype == torch.float8_e4m3fn, **splits, PDL=pdl(src), launch_pdl=pdl(src),
        num_warps=4)
    return q


# ---- gelu_tanh(a) * b ---------------------------------------------------------------------------


@triton.jit
def _gelu_mul_kernel(a_ptr, b_ptr, out_ptr, n_cols, stride_a, stride_b, stride_o, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    _pdl_release(PDL)
    _pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_cols
    dt = out_ptr.dtype.element_ty
    a = tl.load(a_ptr + row * stride_a + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * stride_b + offs, mask=ok, other=0.0).to(tl.float32)
    g = _round(_gelu_tanh(a), dt)
    tl.store(out_ptr + row * stride_o + offs, (g * b).to(dt), mask=ok)


def gelu_mul_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The twin: gelu_tanh(a) * b."""
    return gelu_tanh(a) * b


def gelu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(a) * b for [T, N] tensors whose rows may be strided (halves of one projection)."""
    if not _use_kernel(a):
        return gelu_mul_torch(a, b)
    if a.shape != b.shape or a.dim() != 2 or a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("gelu_mul takes two [T, N] tensors of one shape with unit column stride")
    T, n = a.shape
    out = torch.empty((T, n), dtype=a.dtype, device=a.device)
    block = min(1024, triton.next_power_of_2(n))
    if T:
        _gelu_mul_kernel[(T, triton.cdiv(n, block))](a, b, out, n, a.stride(0), b.stride(0), out.stride(0),
                                                     BLOCK=block, PDL=pdl(a), launch_pdl=pdl(a), num_warps=4)
    return out


# ---- the per-layer-embedding input ---------------------------------------------------------------


@triton.jit
def _ple_combine_kernel(proj_ptr, ids_ptr, table_ptr, w_ptr, out_ptr, proj_scale, table_scale, eps,
                        stride_p, stride_table, stride_o, P: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    ok = offs < P
    dt = out_ptr.dtype.element_ty
    col = layer * P + offs
    p = _round(tl.load(proj_ptr + t * stride_p + col, mask=ok, other=0.0).to(tl.float32) * proj_scale, dt)
    p = _round(p * tl.rsqrt(tl.sum(p * p, axis=0) / P + eps) * tl.load(w_ptr + offs, mask=ok, other=0.0).to(
        tl.float32), dt)
    token = tl.load(ids_ptr + t).to(tl.int64)
    e = _round(tl.load(table_ptr + token * stride_table + col, mask=ok, other=0.0).to(tl.float32) * table_scale, dt)
    tl.store(out_ptr + t * stride_o + col, _round(p + e, dt) * 0.7071067811865476, mask=ok)


def ple_combine_torch(proj: torch.Tensor, token_ids: torch.Tensor, table: torch.Tensor, norm_weight: torch.Tensor,
                      num_layers: int, hidden: int, eps: float) -> torch.Tensor:
    """The twin: (rms_norm(proj * hidden^-0.5 per layer) + table[ids] * sqrt(P)) / sqrt 2, [T, L, P].

    `proj` is the embeddings' projection [T, L*P]; the table scale is rounded to the table's
    dtype first, as the reference multiplies by a tensor of that dtype."""
    P = norm_weight.shape[0]
    p = rms_norm((proj * hidden**-0.5).view(-1, num_layers, P), norm_weight, eps)
    e = torch.nn.functional.embedding(token_ids, table) * torch.tensor(P**0.5, dtype=table.dtype)
    return (p + e.view(-1, num_layers, P)) * 2.0**-0.5


def ple_combine(proj: torch.Tensor, token_ids: torch.Tensor, table: torch.Tensor, norm_weight: torch.Tensor,
                num_layers: int, hidden: int, eps: float) -> torch.Tensor:
    """As `ple_combine_torch`, one launch on the GPU: the table rows are gathered in the kernel."""
    if not _use_kernel(proj):
        return ple_combine_torch(proj, token_ids, table, norm_weight, num_layers, hidden, eps)
    T, P = proj.shape[0], norm_weight.shape[0]
    if proj.stride(1) != 1 or table.stride(1) != 1 or proj.shape[1] != num_layers * P:
        raise ValueError("ple_combine takes a row-major [T, layers * ple_dim] projection and table")
    out = torch.empty((T, num_layers, P), dtype=proj.dtype, device=proj.device)
    if T:
        table_scale = float(torch.tensor(P**0.5, dtype=table.dtype))
        # the last multiply by 2^-0.5 rounds at the store (the output's dtype)
        _ple_combine_kernel[(T, num_layers)](
            proj, token_ids, table, norm_weight, out, hidden**-0.5, table_scale, eps,
            proj.stride(0), table.stride(0), out.stride(0), P=P, BLOCK=triton.next_power_of_2(P), num_warps=2)
    return out

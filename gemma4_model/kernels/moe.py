"""The routed experts of a mixture-of-experts layer as two grouped matrix products; the twin is
`layers.Experts.forward` (expert by expert, its rows picked on the host).

Each (token, choice) pair of the router's top-k goes to its expert. `align_pairs` sorts the
pairs by expert on the device and pads each expert's run to whole blocks of `block_m` rows:
at most pairs + experts * (block_m - 1) slots, so for a given token count the grids are fixed
and nothing is read back to the host (a captured graph replays them whatever the routing;
blocks past the used ones exit at once). `_gate_up_kernel` multiplies a block's token rows by
its expert's gate and up rows and writes gelu_tanh(gate) * up per slot; `_down_kernel`
multiplies that by the expert's down projection, scales by the pair's routing weight and
writes the pair's row; a token's k rows are then summed (no atomics: deterministic).

Rounding follows the twin: the products, the activation and the weighted rows round to the
activation dtype where its PyTorch ops return it; the k rows are summed in float32 once (the
twin adds them one expert at a time in the activation dtype, so bf16 results differ by a few
units in the last place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused import _round, _tanh, _use_kernel
from .paged_attention import _dot


def align_pairs(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_pairs [slots] int32: the pair (token * k + choice) in each slot, -1 for padding;
    block_experts [slots / block_m] int32: each block's expert, -1 past the used blocks), every
    expert's pairs in token order in whole blocks. Device ops only, no host read."""
    flat = experts.reshape(-1)
    pairs, device = flat.numel(), flat.device
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    slots = padded_end[sorted_experts] - padded[sorted_experts] + torch.arange(pairs, device=device) - start[sorted_experts]
    num_slots = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
    slot_pairs = torch.full((num_slots,), -1, dtype=torch.int32, device=device)
    slot_pairs[slots] = order.to(torch.int32)
    block_starts = torch.arange(0, num_slots, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return slot_pairs, block_experts


@triton.jit
def _block_rows(block_experts_ptr, slot_pairs_ptr, BLOCK_M: tl.constexpr):
    """This program's block: its expert (-1: unused), its slots, their pairs and which are used."""
    block = tl.program_id(0)
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(slot_pairs_ptr + slots)
    return tl.load(block_experts_ptr + block), slots, pairs, pairs >= 0


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, slot_pairs_ptr, block_experts_ptr, top_k, hidden, inter,
                    stride_x, stride_we, stride_wn, stride_o,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    expert, slots, pairs, used = _block_rows(block_experts_ptr, slot_pairs_ptr, BLOCK_M)
    if expert < 0:
        return
    dt = out_ptr.dtype.element_ty
    tokens = tl.where(used, pairs // top_k, 0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + offs_k) < hidden
        a = tl.load(x_ptr + tokens[:, None] * stride_x + (k0 + offs_k)[None, :], mask=used[:, None] & k_ok[None, :],
                    other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_base + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None], mask=w_mask, other=0.0)
        wu = tl.load(w_base + (inter + offs_n)[None, :] * stride_wn + (k0 + offs_k)[:, None], mask=w_mask, other=0.0)
        gate += _dot(a, wg, IEEE)
        up += _dot(a, wu, IEEE)
    gate, up = _round(gate, dt), _round(up, dt)
    act = _round(0.5 * gate * (1.0 + _tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate))), dt)
    tl.store(out_ptr + slots.to(tl.int64)[:, None] * stride_o + offs_n[None, :], (act * up).to(dt),
             mask=used[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, out_ptr, weights_ptr, slot_pairs_ptr, block_experts_ptr, hidden, inter,
                 stride_a, stride_we, stride_wn, stride_o,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    expert, slots, pairs, used = _block_rows(block_experts_ptr, slot_pairs_ptr, BLOCK_M)
    if expert < 0:
        return
    dt = out_ptr.dtype.element_ty
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = (k0 + offs_k) < inter
        a = tl.load(act_ptr + slots.to(tl.int64)[:, None] * stride_a + (k0 + offs_k)[None, :],
                    mask=used[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None], mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc += _dot(a, w, IEEE)
    weight = tl.load(weights_ptr + tl.where(used, pairs, 0), mask=used, other=0.0).to(tl.float32)
    rows = tl.where(used, pairs, 0).to(tl.int64)
    tl.store(out_ptr + rows[:, None] * stride_o + offs_n[None, :], (_round(acc, dt) * weight[:, None]).to(dt),
             mask=used[:, None] & n_ok[None, :])


def moe_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """x [T, H], routing weights [T, k] (float32) and experts [T, k] -> [T, H] in x's dtype:
    sum over choices of weight * down_e(gelu_tanh(gate_e x) * up_e x), with gate_up [E, 2I, H]
    (gate rows first) and down [E, H, I]."""
    if not _use_kernel(x):
        raise ValueError("moe_experts needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    T, hidden = x.shape
    num_experts, two_inter, _ = gate_up.shape
    inter, top_k = two_inter // 2, experts.shape[1]
    assert gate_up.shape[2] == hidden and down.shape == (num_experts, hidden, inter)
    assert x.stride(1) == 1 and gate_up.stride(2) == 1 and down.stride(2) == 1
    if T == 0:
        return torch.zeros_like(x)
    block_m = 16 if T * top_k <= 1024 else 64  # decode batches: few pairs per expert
    slot_pairs, block_experts = align_pairs(experts, num_experts, block_m)
    ieee = x.dtype == torch.float32
    block_k = 32 if ieee else 64
    block_n = 32 if ieee else 64
    act = torch.empty((slot_pairs.numel(), inter), dtype=x.dtype, device=x.device)
    grid = (block_experts.numel(), triton.cdiv(inter, block_n))
    _gate_up_kernel[grid](x, gate_up, act, slot_pairs, block_experts, top_k, hidden, inter,
                          x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=4)
    rows = torch.empty((T * top_k, hidden), dtype=x.dtype, device=x.device)
    grid = (block_experts.numel(), triton.cdiv(hidden, block_n))
    _down_kernel[grid](act, down, rows, weights.reshape(-1).contiguous(), slot_pairs, block_experts, hidden, inter,
                       act.stride(0), down.stride(0), down.stride(1), rows.stride(0),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=ieee, num_warps=4)
    return rows.view(T, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)

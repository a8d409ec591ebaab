"""The mixture-of-experts block of a decoder layer in a few launches; the twins are
`layers.Router.forward`, `layers.Experts.forward` (expert by expert, its rows picked on the host)
and the block's RMSNorms.

At decode batch sizes the block is launch-bound: in plain PyTorch the router, the norms, the
pair alignment and the sum of the k rows are about fifty small kernels a layer. Here it is:

- `moe_route`: one kernel for the router's scaled RMSNorm and the experts' input norm of the
  residual stream, the router's matrix product (cuBLAS; for decode batches of up to
  `FUSED_ROUTER_MAX_ROWS` rows inside the norms' kernel), one kernel for the float32 softmax,
  top-k and renormalised, per-expert-scaled routing weights;
- `align_pairs`: one kernel sorts each (token, choice) pair to its expert in token order and
  pads each expert's run to whole blocks of `block_m` rows: at most pairs + experts *
  (block_m - 1) slots, so for a given token count the grids are fixed and nothing is read back
  to the host (a captured graph replays them whatever the routing; blocks past the used ones
  exit at once); `align_pairs_torch` is its twin;
- `_gate_up_kernel` multiplies a block's token rows by its expert's gate and up rows and writes
  gelu_tanh(gate) * up per slot; `_down_kernel` multiplies that by the expert's down projection,
  scales by the pair's routing weight and writes the pair's row (no atomics: deterministic);
- `moe_combine`: one kernel sums a token's k rows and adds the two post-feed-forward norms
  (of the dense MLP's output and of the routed sum).

Tile sizes come from `moe_tiles` (by the number of pairs), measured on the device by
`bench/moe_sweep.py`.

Rounding follows the twins: the products, the activation and the weighted rows round to the
activation dtype where their PyTorch ops return it; the k rows are summed in float32 once (the
expert-by-expert twin adds them one expert at a time in the activation dtype, so bf16 results
differ by a few units in the last place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from ..layers import rms_norm
from .fused import _gelu_tanh, _residual_norm_row, _round, _use_kernel, residual_norm_torch
from .paged_attention import _dot


def _check_kernel_path(t: torch.Tensor, what: str) -> None:
    if not _use_kernel(t):
        raise ValueError(f"{what} needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")


# ---- routing: the two norms, the router's product, softmax / top-k -------------------------


@triton.jit
def _moe_norms_kernel(h_ptr, scale_ptr, w_ptr, router_in_ptr, expert_in_ptr, n_cols, eps, root,
                      stride_h, stride_r, stride_e, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cols
    dt = router_in_ptr.dtype.element_ty
    n, r = _router_norms(h_ptr, scale_ptr, row, offs, ok, n_cols, eps, stride_h, dt)
    tl.store(router_in_ptr + row * stride_r + offs, (r * root).to(dt), mask=ok)
    e = n * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(expert_in_ptr + row * stride_e + offs, e.to(dt), mask=ok)


@triton.jit
def _router_norms(h_ptr, scale_ptr, row, offs, ok, n_cols, eps, stride_h, dt: tl.constexpr):
    """A row's RMS-normed values (float32) and the router's scaled input before its root scale."""
    x = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
    n = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    return n, _round(_round(n, dt) * tl.load(scale_ptr + offs, mask=ok, other=0.0).to(tl.float32), dt)


@triton.jit
def _norms_router_kernel(h_ptr, scale_ptr, w_ptr, proj_ptr, logits_ptr, expert_in_ptr, n_cols, num_experts, eps, root,
                         stride_h, stride_p, stride_l, stride_e, BLOCK: tl.constexpr, E_CHUNK: tl.constexpr):
    """`_moe_norms_kernel` and the router's product for few rows: program (row, c) normalises its
    row and takes experts [c * E_CHUNK, (c + 1) * E_CHUNK) of the product (float32 sums rounded to
    the activation dtype, as the product's output is); program (row, 0) stores the experts' input."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cols
    dt = expert_in_ptr.dtype.element_ty
    n, r = _router_norms(h_ptr, scale_ptr, row, offs, ok, n_cols, eps, stride_h, dt)
    router_in = _round(r * root, dt)
    es = tl.arange(0, E_CHUNK)
    logits = tl.zeros([E_CHUNK], dtype=tl.float32)
    for i in tl.static_range(E_CHUNK):
        e = tl.minimum(chunk * E_CHUNK + i, num_experts - 1)  # past the experts: a real row, not stored
        w = tl.load(proj_ptr + e.to(tl.int64) * stride_p + offs, mask=ok, other=0.0)
        logits = tl.where(es == i, tl.sum(router_in * w.to(tl.float32), axis=0), logits)
    expert_ids = chunk * E_CHUNK + es
    tl.store(logits_ptr + row * stride_l + expert_ids, logits.to(logits_ptr.dtype.element_ty),
             mask=expert_ids < num_experts)
    if chunk == 0:
        e_in = n * tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(expert_in_ptr + row * stride_e + offs, e_in.to(dt), mask=ok)


@triton.jit
def _route_kernel(logits_ptr, expert_scale_ptr, weights_ptr, experts_ptr, num_experts, stride_l,
                  TOP_K: tl.constexpr, E_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E_BLOCK)
    ok = offs < num_experts
    logits = tl.load(logits_ptr + row * stride_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    e = tl.exp(logits - tl.max(logits, axis=0))
    probs = tl.where(ok, e / tl.sum(e, axis=0), -1.0)
    ks = tl.arange(0, K_BLOCK)
    top_p = tl.zeros([K_BLOCK], dtype=tl.float32)
    top_i = tl.zeros([K_BLOCK], dtype=tl.int32)
    for i in tl.static_range(TOP_K):  # the largest first, the lowest index among equals
        best = tl.max(probs, axis=0)
        idx = tl.min(tl.where(probs == best, offs, E_BLOCK), axis=0)
        top_p = tl.where(ks == i, best, top_p)
        top_i = tl.where(ks == i, idx, top_i)
        probs = tl.where(offs == idx, -1.0, probs)
    k_ok = ks < TOP_K
    weights = top_p / tl.sum(tl.where(k_ok, top_p, 0.0), axis=0)
    weights = weights * tl.load(expert_scale_ptr + top_i, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(weights_ptr + row * TOP_K + ks, weights, mask=k_ok)
    tl.store(experts_ptr + row * TOP_K + ks, top_i, mask=k_ok)


def moe_route_torch(h: torch.Tensor, router, expert_norm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin: (expert_norm(h), routing weights [T, k] float32, experts [T, k])."""
    weights, experts = router(h)
    return expert_norm(h), weights, experts


FUSED_ROUTER_MAX_ROWS = 32  # decode batches: the router's product inside the norms' launch
ROUTER_EXPERTS_PER_PROGRAM = 8


def moe_route(h: torch.Tensor, router, expert_norm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`moe_route_torch` in three launches (norms, router product, softmax / top-k), or two for up
    to `FUSED_ROUTER_MAX_ROWS` rows (the norms and the router's product in one: at decode batch
    sizes the product is a small, launch-bound call); experts int32. `router` is a
    `layers.Router`, `expert_norm` the block's `pre_feedforward_layernorm_2`."""
    if not _use_kernel(h):
        return moe_route_torch(h, router, expert_norm)
    T, n_cols = h.shape
    if h.stride(1) != 1 or router.norm.eps != expert_norm.eps:
        raise ValueError("moe_route takes a row-major [T, H] input and norms of one epsilon")
    expert_in = torch.empty_like(h)
    num_experts, top_k = router.proj.weight.shape[0], router.top_k
    weights = torch.empty((T, top_k), dtype=torch.float32, device=h.device)
    experts = torch.empty((T, top_k), dtype=torch.int32, device=h.device)
    if T == 0:
        return expert_in, weights, experts
    block = triton.next_power_of_2(n_cols)
    warps = 8 if block >= 2048 else 4
    proj = router.proj.weight
    if T <= FUSED_ROUTER_MAX_ROWS and proj.stride(1) == 1:
        logits = torch.empty((T, num_experts), dtype=h.dtype, device=h.device)
        chunks = triton.cdiv(num_experts, ROUTER_EXPERTS_PER_PROGRAM)
        _norms_router_kernel[(T, chunks)](h, router.scale, expert_norm.weight, proj, logits, expert_in, n_cols,
                                          num_experts, expert_norm.eps, router.root, h.stride(0), proj.stride(0),
                                          logits.stride(0), expert_in.stride(0), BLOCK=block,
                                          E_CHUNK=ROUTER_EXPERTS_PER_PROGRAM, num_warps=warps)
    else:
        router_in = torch.empty_like(h)
        _moe_norms_kernel[(T,)](h, router.scale, expert_norm.weight, router_in, expert_in, n_cols, expert_norm.eps,
                                router.root, h.stride(0), router_in.stride(0), expert_in.stride(0), BLOCK=block,
                                num_warps=warps)
        logits = F.linear(router_in, proj)
    _route_kernel[(T,)](logits, router.per_expert_scale, weights, experts, num_experts, logits.stride(0),
                        TOP_K=top_k, E_BLOCK=triton.next_power_of_2(num_experts),
                        K_BLOCK=triton.next_power_of_2(top_k), num_warps=4)
    return expert_in, weights, experts


# ---- pairs sorted by expert, in whole blocks ----------------------------------------------


def _num_slots(pairs: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m


def align_pairs_torch(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of `align_pairs`, in PyTorch ops (a dozen launches)."""
    flat = experts.reshape(-1).long()
    pairs, device = flat.numel(), flat.device
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    slots = padded_end[sorted_experts] - padded[sorted_experts] + torch.arange(pairs, device=device) - start[sorted_experts]
    num_slots = _num_slots(pairs, num_experts, block_m)
    slot_pairs = torch.full((num_slots,), -1, dtype=torch.int32, device=device)
    slot_pairs[slots] = order.to(torch.int32)
    block_starts = torch.arange(0, num_slots, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return slot_pairs, block_experts


@triton.jit(do_not_specialize=["num_pairs", "num_slots"])
def _align_kernel(experts_ptr, slot_pairs_ptr, block_experts_ptr, num_pairs, num_experts, num_slots,
                  BLOCK_M: tl.constexpr, E_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """Program e: every expert's count (each program counts all: no second launch), then expert
    e's pairs in token order at its run's start, its padding and its blocks' expert; the last
    program also marks the unused tail."""
    e = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    counts = tl.zeros([E_BLOCK], dtype=tl.int32)
    for s in range(0, num_pairs, BLOCK):
        ok = s + lanes < num_pairs
        counts += tl.histogram(tl.load(experts_ptr + s + lanes, mask=ok, other=0).to(tl.int32), E_BLOCK, mask=ok)
    offs_e = tl.arange(0, E_BLOCK)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(offs_e < e, padded, 0), axis=0)
    mine = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    mine_padded = tl.sum(tl.where(offs_e == e, padded, 0), axis=0)
    base = start
    for s in range(0, num_pairs, BLOCK):
        ok = s + lanes < num_pairs
        hit = ((tl.load(experts_ptr + s + lanes, mask=ok, other=-1).to(tl.int32) == e) & ok).to(tl.int32)
        rank = tl.cumsum(hit, axis=0) - hit
        tl.store(slot_pairs_ptr + base + rank, s + lanes, mask=hit > 0)
        base += tl.sum(hit, axis=0)
    for p in range(mine, mine_padded, BLOCK):  # this run's padding
        tl.store(slot_pairs_ptr + start + p + lanes, tl.full([BLOCK], -1, tl.int32), mask=p + lanes < mine_padded)
    for b in range(start // BLOCK_M, (start + mine_padded) // BLOCK_M, BLOCK):
        tl.store(block_experts_ptr + b + lanes, tl.full([BLOCK], 0, tl.int32) + e,
                 mask=b + lanes < (start + mine_padded) // BLOCK_M)
    if e == num_experts - 1:
        end = start + mine_padded
        for p in range(end, num_slots, BLOCK):
            tl.store(slot_pairs_ptr + p + lanes, tl.full([BLOCK], -1, tl.int32), mask=p + lanes < num_slots)
        for b in range(end // BLOCK_M, num_slots // BLOCK_M, BLOCK):
            tl.store(block_experts_ptr + b + lanes, tl.full([BLOCK], -1, tl.int32), mask=b + lanes < num_slots // BLOCK_M)


def align_pairs(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_pairs [slots] int32: the pair (token * k + choice) in each slot, -1 for padding;
    block_experts [slots / block_m] int32: each block's expert, -1 past the used blocks), every
    expert's pairs in token order in whole blocks. One launch, no host read."""
    _check_kernel_path(experts, "align_pairs")
    flat = experts.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_slots = _num_slots(flat.numel(), num_experts, block_m)
    slot_pairs = torch.empty((num_slots,), dtype=torch.int32, device=flat.device)
    block_experts = torch.empty((num_slots // block_m,), dtype=torch.int32, device=flat.device)
    _align_kernel[(num_experts,)](flat, slot_pairs, block_experts, flat.numel(), num_experts, num_slots,
                                 BLOCK_M=block_m, E_BLOCK=triton.next_power_of_2(num_experts), BLOCK=128,
                                 num_warps=4)
    return slot_pairs, block_experts


# ---- the grouped products ---------------------------------------------------------------


@dataclass(frozen=True)
class KernelTiles:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoeTiles:
    """Rows per block (shared by both products: the alignment's granularity) and each product's tiles."""
    block_m: int
    gate_up: KernelTiles
    down: KernelTiles


def moe_tiles(pairs: int, ieee: bool = False) -> MoeTiles:
    """The tiles for a step of `pairs` (token, choice) pairs: the fastest of bench/moe_sweep.py's
    candidates at the 26B-A4B shape on an H200 (bench/results/moe_sweep_h200.json). Decode
    batches stream few rows per expert: narrow gate|up tiles over long K steps keep more programs
    reading; prompt chunks take 128-row blocks."""
    if ieee:  # float32 (the interpreter's tests): small tiles
        return MoeTiles(16, KernelTiles(32, 32), KernelTiles(32, 32))
    if pairs <= 8:  # one token: 46.6 -> 35.4 us
        return MoeTiles(16, KernelTiles(32, 256, 4, 3), KernelTiles(128, 64, 4, 4))
    if pairs <= 1024:  # decode batches up to 128: 3.9 -> 4.1-4.25 TB/s
        return MoeTiles(16, KernelTiles(32, 128, 4, 4), KernelTiles(64, 128, 4, 4))
    if pairs <= 2048:
        return MoeTiles(32, KernelTiles(64, 128, 4, 3), KernelTiles(128, 64, 4, 4))
    if pairs <= 16384:  # 2048-token chunks: 839 -> 730 us
        return MoeTiles(128, KernelTiles(64, 64, 8, 3), KernelTiles(128, 64, 4, 3))
    return MoeTiles(128, KernelTiles(128, 64, 8, 4), KernelTiles(128, 64, 4, 3))  # 8192 tokens: 2.90 -> 2.30 ms


@triton.jit
def _block_rows(block, slot_pairs_ptr, BLOCK_M: tl.constexpr):
    """A used block's slots, their pairs and which are used."""
    slots = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(slot_pairs_ptr + slots)
    return slots, pairs, pairs >= 0


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, slot_pairs_ptr, block_experts_ptr, top_k, hidden, inter,
                    stride_x, stride_we, stride_wn, stride_o,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    # the grid's first axis walks a block's columns, its second the blocks: the used blocks (the
    # first ones) start before the unused ones (only a bound on the count is known when launching)
    block = tl.program_id(1)
    expert = tl.load(block_experts_ptr + block)
    if expert < 0:
        return
    slots, pairs, used = _block_rows(block, slot_pairs_ptr, BLOCK_M)
    dt = out_ptr.dtype.element_ty
    tokens = tl.where(used, pairs // top_k, 0).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
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
    act = _round(_gelu_tanh(gate), dt)
    tl.store(out_ptr + slots.to(tl.int64)[:, None] * stride_o + offs_n[None, :], (act * up).to(dt),
             mask=used[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, out_ptr, weights_ptr, slot_pairs_ptr, block_experts_ptr, hidden, inter,
                 stride_a, stride_we, stride_wn, stride_o,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    block = tl.program_id(1)  # as _gate_up_kernel's grid
    expert = tl.load(block_experts_ptr + block)
    if expert < 0:
        return
    slots, pairs, used = _block_rows(block, slot_pairs_ptr, BLOCK_M)
    dt = out_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
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


def moe_expert_rows(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, tiles: MoeTiles | None = None) -> torch.Tensor:
    """x [T, H], routing weights [T, k] (float32) and experts [T, k] -> each pair's weighted row
    [T, k, H] in x's dtype: weight * down_e(gelu_tanh(gate_e x) * up_e x), with gate_up [E, 2I, H]
    (gate rows first) and down [E, H, I]."""
    _check_kernel_path(x, "moe_experts")
    T, hidden = x.shape
    num_experts, two_inter, _ = gate_up.shape
    inter, top_k = two_inter // 2, experts.shape[1]
    assert gate_up.shape[2] == hidden and down.shape == (num_experts, hidden, inter)
    assert x.stride(1) == 1 and gate_up.stride(2) == 1 and down.stride(2) == 1
    rows = torch.empty((T, top_k, hidden), dtype=x.dtype, device=x.device)
    if T == 0:
        return rows
    ieee = x.dtype == torch.float32
    tiles = tiles or moe_tiles(T * top_k, ieee)
    slot_pairs, block_experts = align_pairs(experts, num_experts, tiles.block_m)
    act = torch.empty((slot_pairs.numel(), inter), dtype=x.dtype, device=x.device)
    t = tiles.gate_up
    _gate_up_kernel[(triton.cdiv(inter, t.block_n), block_experts.numel())](
        x, gate_up, act, slot_pairs, block_experts, top_k, hidden, inter,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, IEEE=ieee, num_warps=t.num_warps,
        num_stages=t.num_stages)
    flat = rows.view(T * top_k, hidden)
    t = tiles.down
    _down_kernel[(triton.cdiv(hidden, t.block_n), block_experts.numel())](
        act, down, flat, weights.reshape(-1).contiguous(), slot_pairs, block_experts, hidden, inter,
        act.stride(0), down.stride(0), down.stride(1), flat.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, IEEE=ieee, num_warps=t.num_warps,
        num_stages=t.num_stages)
    return rows


def moe_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, tiles: MoeTiles | None = None) -> torch.Tensor:
    """`moe_expert_rows` summed over a token's choices in float32 -> [T, H] in x's dtype (the
    twin of `layers.Experts.forward`)."""
    return moe_expert_rows(x, weights, experts, gate_up, down, tiles).sum(dim=1, dtype=torch.float32).to(x.dtype)


# ---- the block's output: sum of the k rows and the two post-feed-forward norms -----------------


@triton.jit
def _combine_kernel(mlp_ptr, rows_ptr, w1_ptr, w2_ptr, out_ptr, res_ptr, w_ptr, scalar_ptr, next_w_ptr, y_ptr, n_cols,
                    eps, stride_m, stride_o, stride_r, stride_y, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                    TAIL: tl.constexpr):
    """out = the block's output; with TAIL, out = h and y of `residual_norm` on it (the layer's
    post-feed-forward norm, residual, scalar and the next layer's input norm) instead."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cols
    dt = out_ptr.dtype.element_ty
    routed = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(TOP_K):
        routed += tl.load(rows_ptr + (row * TOP_K + i) * n_cols + offs, mask=ok, other=0.0).to(tl.float32)
    routed = _round(routed, dt)
    m = tl.load(mlp_ptr + row * stride_m + offs, mask=ok, other=0.0).to(tl.float32)
    m = m * tl.rsqrt(tl.sum(m * m, axis=0) / n_cols + eps) * tl.load(w1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    r = routed * tl.rsqrt(tl.sum(routed * routed, axis=0) / n_cols + eps)
    r = r * tl.load(w2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    out = _round(_round(m, dt) + _round(r, dt), dt)
    if TAIL:
        _residual_norm_row(out, row, offs, ok, res_ptr, w_ptr, scalar_ptr, next_w_ptr, out_ptr, y_ptr, n_cols, eps,
                           stride_r, stride_o, stride_y, True, True, True, True)
    else:
        tl.store(out_ptr + row * stride_o + offs, out.to(dt), mask=ok)


def moe_combine_torch(mlp: torch.Tensor, rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """The twin: rms_norm(mlp, w1) + rms_norm(sum over k of rows [T, k, H] in float32, w2)."""
    routed = rows.sum(dim=1, dtype=torch.float32).to(mlp.dtype)
    return rms_norm(mlp, w1, eps) + rms_norm(routed, w2, eps)


def moe_combine(mlp: torch.Tensor, rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, eps: float) -> torch.Tensor:
    """`moe_combine_torch` in one launch on the kernel path."""
    if not _use_kernel(mlp):
        return moe_combine_torch(mlp, rows, w1, w2, eps)
    return _combine(mlp, rows, w1, w2, eps)[0]


def moe_combine_tail_torch(mlp: torch.Tensor, rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, eps: float,
                           residual: torch.Tensor, weight: torch.Tensor, scalar: torch.Tensor,
                           next_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin: `residual_norm_torch` (residual, weight, scalar, next_weight) of `moe_combine_torch`."""
    return residual_norm_torch(moe_combine_torch(mlp, rows, w1, w2, eps), residual, weight, eps, scalar, next_weight)


def moe_combine_tail(mlp: torch.Tensor, rows: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, eps: float,
                     residual: torch.Tensor, weight: torch.Tensor, scalar: torch.Tensor,
                     next_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A MoE layer's end in one launch on the kernel path: the block's output, then the layer's
    post-feed-forward norm, residual and scalar (h), and the next layer's input norm of h (y)."""
    if not _use_kernel(mlp):
        return moe_combine_tail_torch(mlp, rows, w1, w2, eps, residual, weight, scalar, next_weight)
    if residual.shape != mlp.shape or residual.stride(1) != 1:
        raise ValueError("moe_combine_tail takes a row-major residual of mlp's shape")
    return _combine(mlp, rows, w1, w2, eps, (residual, weight, scalar, next_weight))


def _combine(mlp, rows, w1, w2, eps, tail=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    T, n_cols = mlp.shape
    if mlp.stride(1) != 1 or rows.shape[::2] != (T, n_cols) or not rows.is_contiguous():
        raise ValueError("moe_combine takes mlp [T, H] and contiguous rows [T, k, H]")
    out = torch.empty_like(mlp)
    y = torch.empty_like(mlp) if tail is not None else None
    residual, weight, scalar, next_weight = tail or (mlp,) * 4  # placeholders: not read without TAIL
    if T:
        block = triton.next_power_of_2(n_cols)
        _combine_kernel[(T,)](mlp, rows, w1, w2, out, residual, weight, scalar, next_weight,
                              out if y is None else y, n_cols, eps, mlp.stride(0), out.stride(0), residual.stride(0),
                              out.stride(0) if y is None else y.stride(0), TOP_K=rows.shape[1], BLOCK=block,
                              TAIL=tail is not None, num_warps=8 if block >= 2048 else 4)
    return out, y

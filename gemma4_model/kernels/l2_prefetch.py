"""Weights read into the GPU's L2 cache on a side stream, ahead of the product that needs them.

At decode batch sizes a layer's small products (q|k|v at 16 MB, o at 10 MB for E4B) take about
twice their weight bytes' time at memory bandwidth: each launch ramps up and drains. Between the
products the memory bus idles while attention, the norms and the per-layer-embedding tail run
(latency-bound kernels reading little). `WeightPrefetch` fills those stretches: at a fork point
of the decode forward it launches, on its own stream, a kernel that reads the next products'
weights through L2 (`.cg` loads: cached in L2, not L1) and keeps only a checksum, so when the
product runs its weight is in L2 (50 MB on an H100 or H200: room for the products between two
fork points, not for an MLP).

The fork records the main stream's position; the side stream waits for it, so a prefetch never
runs ahead of the step it belongs to, and `join` makes the main stream wait for the side stream
before the forward returns (a CUDA graph capture then holds both branches). A prefetch changes
no value (its twin is doing nothing); its kernel's checksum (the xor of the 32-bit words it
read, one per program, in `sink`) is what the tests check it read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .fused import _use_kernel

TILE = 8192  # 32-bit words a program reads per loop step (32 KB)
MAX_WIDTH = 2048  # words per row of a whole-tensor read


@triton.jit(do_not_specialize=["rows", "stride"])
def _touch_kernel(ptr, sink_ptr, rows, cols, stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_R
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < cols
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    for r0 in range(pid * BLOCK_R, rows, step):
        r = r0 + offs_r
        acc = acc ^ tl.load(ptr + r.to(tl.int64)[:, None] * stride + offs_c[None, :],
                            mask=(r < rows)[:, None] & c_ok[None, :], other=0, cache_modifier=".cg")
    tl.store(sink_ptr + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


def words(region: torch.Tensor) -> torch.Tensor:
    """A weight (or the leading columns of one) as 32-bit words [rows, cols]: the view
    `touch` reads. Whole contiguous tensors become rows of up to `MAX_WIDTH` words."""
    if region.dim() != 2 or region.stride(1) != 1 or (region.shape[1] * region.element_size()) % 4 \
            or (region.stride(0) * region.element_size()) % 4:
        raise ValueError(f"a prefetch reads 2-D regions of whole 32-bit words with unit column stride, "
                         f"got shape {tuple(region.shape)}, strides {region.stride()}, {region.dtype}")
    if region.is_contiguous():
        n = region.numel() * region.element_size() // 4
        width = MAX_WIDTH
        while n % width:
            width //= 2
        return region.view(-1).view(torch.int32).view(n // width, width)
    return region.view(torch.int32)


def touch(region: torch.Tensor, sink: torch.Tensor) -> None:
    """Read `region` (see `words`) through L2 with up to `sink.numel()` programs, each leaving
    the xor of the words it read in `sink` (the programs past the grid leave theirs as they were)."""
    w = words(region)
    rows, cols = w.shape
    block_c = triton.next_power_of_2(cols)
    block_r = max(1, TILE // block_c)
    programs = max(1, min(sink.numel(), triton.cdiv(rows, block_r)))
    _touch_kernel[(programs,)](w, sink, rows, cols, w.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
                               num_warps=8 if block_r * block_c >= 4096 else 4)


@dataclass
class WeightPrefetch:
    """The decode forward's prefetches on one device: a side stream and its programs' sink.

    `max_rows`: the largest batch (rows) whose forward prefetches (more rows make the products
    compute-heavier and attention reads more: nothing idles). `mlp_fraction`: the share of each
    gate|up weight row read with the o projection (0 leaves the MLP to stream alone)."""

    device: torch.device
    max_rows: int = 16
    mlp_fraction: float = 0.0
    programs: int = 0  # 0: one per multiprocessor
    stream: torch.cuda.Stream | None = field(default=None, repr=False)
    sink: torch.Tensor | None = field(default=None, repr=False)
    _forked: bool = field(default=False, repr=False)

    def __post_init__(self):
        if not 0.0 <= self.mlp_fraction <= 1.0:
            raise ValueError(f"mlp_fraction is a share of each row, 0 to 1, got {self.mlp_fraction}")
        if self.device.type != "cuda":
            raise ValueError(f"weight prefetch runs on CUDA devices, not {self.device}")
        programs = self.programs or torch.cuda.get_device_properties(self.device).multi_processor_count
        self.stream = torch.cuda.Stream(self.device)
        self.sink = torch.zeros(programs, dtype=torch.int32, device=self.device)

    def applies(self, x: torch.Tensor) -> bool:
        return _use_kernel(x) and x.device == self.device and 0 < x.shape[0] <= self.max_rows

    def __call__(self, *regions: torch.Tensor | None) -> None:
        """Read these regions into L2 on the side stream, after the work queued so far on the
        current stream."""
        regions = [r for r in regions if r is not None]
        if not regions:
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for region in regions:
                touch(region, self.sink)
        self._forked = True

    def mlp_head(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """The leading `mlp_fraction` of each gate|up row (whole 64-byte sectors), or None."""
        cols = int(gate_up.shape[1] * self.mlp_fraction) // 32 * 32
        return gate_up[:, :cols] if cols else None

    def join(self) -> None:
        """The current stream waits for every prefetch forked so far."""
        if self._forked:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._forked = False

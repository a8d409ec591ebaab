"""Copy KV pages between pools in one launch: `dst[:, dst_pages] = src[:, src_pages]`.

Pool tensors are [layers, pages, *page] with each page's elements contiguous (the KV cache's
K and V, a handoff's packed buffers). One program moves one block of one page of one layer,
so a handoff's gather, scatter or peer pull is a single kernel whatever its page count, and it
reads and writes each byte once (`index_select` then `index_put_` would pass twice, and
advanced-index assignment moves one element per thread).

`copy_pages_torch` is the twin (the CPU path and the oracle); `copy_pages` takes the kernel within
one GPU (one launch, whatever the runs), device copies across GPUs for long runs of consecutive
pages (the copy engine: the source pushes at the link's full rate, where a kernel on the
receiving GPU pulls at less than half of it), and the twin elsewhere.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from ..batch import on_device

BLOCK = 2048  # elements per program: 4 KiB of bf16


@triton.jit
def _copy_pages_kernel(src, dst, src_pages, dst_pages, src_layer_stride, src_page_stride,
                       dst_layer_stride, dst_page_stride, page_elems, BLOCK: tl.constexpr):
    page = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    block = tl.program_id(2)
    s = tl.load(src_pages + page).to(tl.int64)
    d = tl.load(dst_pages + page).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_elems
    x = tl.load(src + layer * src_layer_stride + s * src_page_stride + offs, mask=mask)
    tl.store(dst + layer * dst_layer_stride + d * dst_page_stride + offs, x, mask=mask)


def _check(src: torch.Tensor, src_pages: torch.Tensor, dst: torch.Tensor, dst_pages: torch.Tensor) -> None:
    if src.dim() < 3 or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:]:
        raise ValueError(f"pools of shapes {tuple(src.shape)} and {tuple(dst.shape)} do not hold the same pages")
    if src.dtype != dst.dtype:
        raise ValueError(f"pools of {src.dtype} and {dst.dtype}")
    if src_pages.shape != dst_pages.shape or src_pages.dim() != 1:
        raise ValueError(f"page lists of shapes {tuple(src_pages.shape)} and {tuple(dst_pages.shape)}")


def copy_pages_torch(src: torch.Tensor, src_pages: torch.Tensor, dst: torch.Tensor, dst_pages: torch.Tensor) -> None:
    """The twin: an index and an index assignment."""
    _check(src, src_pages, dst, dst_pages)
    dst[:, dst_pages.to(dst.device, torch.long)] = src[:, src_pages.to(src.device, torch.long)].to(dst.device)


def _pages_contiguous(t: torch.Tensor) -> bool:
    page_elems = math.prod(t.shape[2:])
    return t[0, 0].is_contiguous() and (t.shape[1] <= 1 or t.stride(1) == page_elems)


def copy_pages_triton(src: torch.Tensor, src_pages: torch.Tensor, dst: torch.Tensor, dst_pages: torch.Tensor) -> None:
    """The kernel, on `dst`'s device and current stream (CPU tensors run in Triton's
    interpreter). Page numbers must be in range: the kernel does not check them."""
    _check(src, src_pages, dst, dst_pages)
    if not (_pages_contiguous(src) and _pages_contiguous(dst)):
        raise ValueError("copy_pages_triton needs each page's elements contiguous")
    n = src_pages.numel()
    if n == 0 or src.shape[0] == 0:
        return
    page_elems = math.prod(src.shape[2:])
    # without waiting for the stream (a decode actor imports while its last step runs)
    src_pages = on_device(src_pages.to(torch.int32), dst.device)
    dst_pages = on_device(dst_pages.to(torch.int32), dst.device)
    grid = (n, src.shape[0], triton.cdiv(page_elems, BLOCK))
    launch = _copy_pages_kernel[grid]
    args = (src, dst, src_pages, dst_pages, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1), page_elems)
    if dst.is_cuda:
        with torch.cuda.device(dst.device):
            launch(*args, BLOCK=BLOCK)
    else:
        launch(*args, BLOCK=BLOCK)


MEMCPY_MIN_BYTES = 1 << 20  # a run of pages this large (per layer) goes to the copy engine
MEMCPY_MAX_CALLS = 64  # more copies than this cost more in launches than the kernel


def page_runs(src_pages: torch.Tensor, dst_pages: torch.Tensor) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the stretches where both page lists count up by one
    (vectorised: a long handoff's thousands of pages cost microseconds, not a Python loop)."""
    src = src_pages.numpy().astype(np.int64, copy=False)
    dst = dst_pages.numpy().astype(np.int64, copy=False)
    if src.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist()))


def copy_pages(src: torch.Tensor, src_pages: torch.Tensor, dst: torch.Tensor, dst_pages: torch.Tensor) -> None:
    """`dst[:, dst_pages] = src[:, src_pages]`. Within one GPU: the kernel, one launch. Across
    GPUs, pools with contiguous pages and page lists on the host: long runs of consecutive pages
    go as one device copy per run and layer (the copy engine: the source GPU pushes over the link
    at its full rate). The twin anywhere else (across GPUs: a gather, one copy, a scatter)."""
    _check(src, src_pages, dst, dst_pages)
    on_cuda = src.is_cuda and dst.is_cuda and _pages_contiguous(src) and _pages_contiguous(dst)
    across = on_cuda and src.device != dst.device
    if across and not (src_pages.is_cuda or dst_pages.is_cuda) and src_pages.numel():
        runs = page_runs(src_pages, dst_pages)
        page_bytes = src[0, :1].numel() * src.element_size()
        if (len(runs) * src.shape[0] <= MEMCPY_MAX_CALLS
                and src_pages.numel() * page_bytes >= MEMCPY_MIN_BYTES * len(runs)):
            for s, d, n in runs:
                for layer in range(src.shape[0]):
                    dst[layer, d:d + n].copy_(src[layer, s:s + n], non_blocking=True)
            return
    if on_cuda and src.device == dst.device:
        copy_pages_triton(src, src_pages, dst, dst_pages)
    else:
        copy_pages_torch(src, src_pages, dst, dst_pages)

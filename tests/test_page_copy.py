"""`copy_pages`: the Triton kernel against its PyTorch twin (in Triton's interpreter on CPU,
on the device in the `gpu` tests)."""

from __future__ import annotations

import pytest
import torch

from gemma4_model.kernels.page_copy import BLOCK, copy_pages, copy_pages_torch, copy_pages_triton, page_runs


def pools(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(shape, generator=g).to(dtype).to(device)
    dst = torch.randn((shape[0], shape[1] + 3, *shape[2:]), generator=g).to(dtype).to(device)
    return src, dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page", [(4, 2, 8), (16, 1, 160)], ids=["small", "past_one_block"])
def test_kernel_equals_twin(dtype, page):
    if page == (16, 1, 160):
        assert 16 * 160 > BLOCK  # a page spans two programs
    src, dst = pools((3, 10, *page), dtype)
    src_pages = torch.tensor([7, 0, 9, 3], dtype=torch.int32)
    dst_pages = torch.tensor([12, 1, 5, 2], dtype=torch.int32)
    want = dst.clone()
    copy_pages_torch(src, src_pages, want, dst_pages)
    got = dst.clone()
    copy_pages_triton(src, src_pages, got, dst_pages)
    assert torch.equal(got, want)
    assert torch.equal(got[:, 12], src[:, 7]) and torch.equal(got[:, 0], dst[:, 0])  # untouched pages stay


def test_views_of_a_packed_buffer_and_empty_lists():
    """K and V halves of a packed buffer [2, layers, pages, ...] are pools with their own strides."""
    src, _ = pools((2, 10, 4, 2, 8), torch.float32)
    buffer = torch.zeros(2, 2, 3, 4, 2, 8)
    index, to = torch.tensor([4, 8, 1]), torch.arange(3)
    for half in (0, 1):
        copy_pages_triton(src, index, buffer[half], to)
    assert torch.equal(buffer[1], src[:, [4, 8, 1]]) and torch.equal(buffer[0], buffer[1])
    before = buffer.clone()
    copy_pages_triton(src, index[:0], buffer[0], to[:0])
    assert torch.equal(buffer, before)


def test_page_runs():
    assert page_runs(torch.tensor([4, 5, 6, 9, 10, 2]), torch.tensor([0, 1, 2, 3, 4, 8])) == [(4, 0, 3), (9, 3, 2),
                                                                                          (2, 8, 1)]
    assert page_runs(torch.tensor([1, 2]), torch.tensor([5, 3])) == [(1, 5, 1), (2, 3, 1)]  # both must count up
    assert page_runs(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == []


def test_refuses_mismatched_pools():
    src, dst = pools((3, 10, 4, 2, 8), torch.float32)
    with pytest.raises(ValueError, match="same pages"):
        copy_pages(src, torch.tensor([0]), dst[:2], torch.tensor([0]))
    with pytest.raises(ValueError, match="float16"):
        copy_pages(src, torch.tensor([0]), dst.half(), torch.tensor([0]))
    with pytest.raises(ValueError, match="page lists"):
        copy_pages(src, torch.tensor([0, 1]), dst, torch.tensor([0]))
    with pytest.raises(ValueError, match="contiguous"):
        copy_pages_triton(src.transpose(3, 4), torch.tensor([0]), dst.transpose(3, 4), torch.tensor([0]))


@pytest.mark.gpu
def test_kernel_equals_twin_on_the_device_and_its_bandwidth():
    """E4B's full-layer pages (4 layers, page 16 x 2 heads x 512) in bf16, 2048 pages scattered."""
    src, dst = pools((4, 4096, 16, 2, 512), torch.bfloat16, "cuda")
    g = torch.Generator().manual_seed(1)
    src_pages = torch.randperm(4096, generator=g)[:2048].cuda()
    dst_pages = torch.randperm(4099, generator=g)[:2048].cuda()
    want, got = dst.clone(), dst.clone()
    copy_pages_torch(src, src_pages, want, dst_pages)
    copy_pages(src, src_pages, got, dst_pages)
    assert torch.equal(got, want)
    runs = (torch.arange(100, 1100), torch.cat([torch.arange(7, 507), torch.arange(3000, 3500)]))  # runs: one launch too
    copy_pages_torch(src, *runs[:1], want, runs[1])
    copy_pages(src, *runs[:1], got, runs[1])
    assert torch.equal(got, want)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for fn in (copy_pages, copy_pages_torch):
        fn(src, src_pages, got, dst_pages)
        start.record()
        for _ in range(10):
            fn(src, src_pages, got, dst_pages)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / 10
        moved = 2 * src[:, :2048].numel() * 2  # read and written
        print(f"{fn.__name__}: {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s of traffic")

"""Device memory an engine needs past its weights, KV pages and captured graphs.

A step's logits and sampling allocate outside the captured graphs: the lm_head's output for the
rows that want logits, their float32 copy, the penalised copy, the sampling probabilities and the
noise (`sampling.transform_logits`, `sampling_probs`), each [rows, vocab]. With KV pages sized past
what the device holds, the first large batch fails there, mid-serving, and takes its engine and
every request in flight with it. `check_headroom` makes that a start-up error naming the setting
to lower instead. `kv_pages_for_share` sizes the pool from a share of the device instead of a page
count (`model.mem_fraction_static`).
"""

from __future__ import annotations

LOGITS_COPIES = 5  # [rows, vocab] float32-sized tensors a step may hold at once (see the module doc)
MARGIN_BYTES = 256 << 20  # the allocator's rounding and the step's other eager tensors


class HeadroomError(RuntimeError):
    """Too little device memory is left for a step at the largest batch."""


def step_headroom_bytes(max_rows: int, vocab: int) -> int:
    """About the most a step of `max_rows` sequences allocates outside the captured graphs."""
    if max_rows < 1 or vocab < 1:
        raise ValueError(f"max_rows and vocab are positive, got {max_rows} and {vocab}")
    return max_rows * vocab * 4 * LOGITS_COPIES + MARGIN_BYTES


def check_headroom(available: int, max_rows: int, vocab: int, where: str) -> None:
    """Raise `HeadroomError` when `available` bytes cannot hold a step of `max_rows` sequences."""
    need = step_headroom_bytes(max_rows, vocab)
    if available < need:
        raise HeadroomError(
            f"{where}: {available / 2**30:.2f} GiB of device memory is left after the weights, KV pages and "
            f"CUDA graphs, and a step of {max_rows} sequences needs about {need / 2**30:.2f} GiB more for its "
            f"logits and sampling: lower the topology's model.kv_pages or mem_fraction_static (or "
            f"max_running_requests)")


def kv_pages_for_share(free: int, total: int, share: float, page_bytes: int) -> int:
    """KV pages for an engine that takes `share` of its GPU for its weights and KV (SGLang's
    mem_fraction_static): with its weights loaded, `free` bytes are left of `total`; the pool is
    what they hold past the (1 - share) of the device kept for everything else."""
    if not 0 < share < 1 or page_bytes < 1:
        raise ValueError(f"share is in (0, 1) and page_bytes positive, got {share} and {page_bytes}")
    pages = int(free - total * (1 - share)) // page_bytes
    if pages < 1:
        raise HeadroomError(
            f"mem_fraction_static {share}: {free / 2**30:.2f} GiB of {total / 2**30:.2f} GiB is free after the weights, "
            f"less than the {(1 - share) * total / 2**30:.2f} GiB kept for the rest: raise it, or set kv_pages")
    return pages


def available_bytes(device) -> int:
    """Free device memory plus what the caching allocator holds unused (CUDA)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

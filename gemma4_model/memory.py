"""Device memory an engine needs past its weights, KV pages and captured graphs.

A step's logits and sampling allocate outside the captured graphs: the lm_head's output for the
rows that want logits, their float32 copy, the penalised copy, the sampling probabilities and the
noise (`sampling.transform_logits`, `sampling_probs`), each [rows, vocab]. With KV pages sized past
what the device holds, the first large batch fails there, mid-serving, and takes its engine and
every request in flight with it. `check_headroom` makes that a start-up error naming the setting
to lower instead.
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
            f"logits and sampling: lower the topology's model.kv_pages (or max_running_requests)")


def available_bytes(device) -> int:
    """Free device memory plus what the caching allocator holds unused (CUDA)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

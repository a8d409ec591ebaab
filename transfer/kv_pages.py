"""What a KV handoff carries, and how pages leave one cache and enter another.

Only the pages decode needs cross: every held page of the full-attention group, the pages of
the last window of the sliding group (the cache has already released older ones), and nothing
for KV-shared layers (they own no pages). The payload is plain arrays per group, so any
backend (shared memory, TCP frames) can move it; the GPU backends take the same pages
(`device_pages.held_pages`) and hand the receiver the same `KVPayload`, on its device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gemma4_model.kernels.page_copy import copy_pages
from gemma4_model.kv_cache import PagedKVCache


class PayloadError(ValueError):
    """Received pages that cannot be this cache's KV of the announced sequence (wrong group,
    shape, dtype or page numbers). The request fails; the receiver goes on."""


@dataclass(frozen=True)
class GroupPages:
    """One layer group's pages of one sequence: logical page numbers and their K/V."""

    logical: tuple[int, ...]
    k: torch.Tensor  # [owning layers, len(logical), page_size, kv_heads, head_dim]
    v: torch.Tensor
    # When set, `k` / `v` are a whole pool [layers, pool pages, ...] and the pages sit at these
    # places in it (cuda_ipc: the sender's pool, mapped, read in place by `import_pages`).
    physical: torch.Tensor | None = None

    @property
    def num_pages(self) -> int:
        return len(self.logical)

    @property
    def nbytes(self) -> int:
        page = self.k[:, :1].numel() * self.k.element_size()
        return 2 * page * self.num_pages


@dataclass(frozen=True)
class KVPayload:
    num_tokens: int  # positions whose KV the pages hold
    groups: dict[str, GroupPages]

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups.values())


def export_pages(cache: PagedKVCache, seq_id: int, reach_back: int = 0) -> KVPayload:
    """Copy out the pages a decoder needs to continue this sequence.

    Sliding pages the next position can no longer see are released first: nobody needs them
    (but for `reach_back` positions more, which an MTP assistant downstream reads).
    """
    cache.slide(seq_id, max(0, cache.num_computed(seq_id) - reach_back))
    groups = {}
    for name, logical in cache.held_pages(seq_id).items():
        table = cache.page_table(seq_id, name)
        physical = torch.tensor([table[j] for j in logical], dtype=torch.long, device=cache.groups[name].k.device)
        group = cache.groups[name]
        groups[name] = GroupPages(tuple(logical), group.k[:, physical].clone(), group.v[:, physical].clone())
    return KVPayload(cache.num_computed(seq_id), groups)


def check_payload(cache: PagedKVCache, payload: KVPayload, num_tokens: int) -> None:
    """Raise `PayloadError` unless `payload` can be this cache's KV of a sequence whose first
    `num_tokens` positions are computed: every group the cache has, in its shape and dtype, the
    full group's every page and the sliding group's newest one, page numbers in range."""
    if payload.num_tokens != num_tokens:
        raise PayloadError(f"the pages hold {payload.num_tokens} positions but the handoff announces {num_tokens}")
    width = -(-num_tokens // cache.page_size)
    if set(payload.groups) != set(cache.groups):
        raise PayloadError(f"payload has groups {sorted(payload.groups)}, this cache {sorted(cache.groups)}")
    for name, pages in payload.groups.items():
        group = cache.groups[name]
        expected = (group.k.shape[0], len(pages.logical), *group.k.shape[2:])
        if pages.physical is not None:  # a whole pool: its page count is its own
            if pages.physical.shape != (len(pages.logical),) or pages.k.shape[1:2] != pages.v.shape[1:2]:
                raise PayloadError(f"group {name}: {tuple(pages.physical.shape)} places for {len(pages.logical)} pages")
            expected = expected[:1] + tuple(pages.k.shape[1:2]) + expected[2:]
        for part, t in (("k", pages.k), ("v", pages.v)):
            if tuple(t.shape) != expected:
                raise PayloadError(f"group {name}: {part} has shape {tuple(t.shape)}, this cache needs {expected} "
                                   "(layers, pages, page_size, kv_heads, head_dim): a different model or page size?")
            if t.dtype != group.k.dtype:
                raise PayloadError(f"group {name}: {part} is {t.dtype}, this cache holds {group.k.dtype}")
        logical = np.asarray(pages.logical, dtype=np.int64)
        if np.any(np.diff(logical) <= 0) or (logical.size and not 0 <= logical[0] <= logical[-1] < width):
            raise PayloadError(f"group {name}: page numbers {logical[:8].tolist()}... are not distinct, "
                               f"sorted and below {width}")
        # sorted, distinct and below width: every page is there when there are width of them
        complete = logical.size == width if group.window is None else bool(logical.size) and logical[-1] == width - 1
        if not complete:
            needed = range(width) if group.window is None else [width - 1]
            raise PayloadError(f"group {name}: pages {sorted(set(needed) - set(logical.tolist()))[:8]} are missing")


def import_pages(cache: PagedKVCache, seq_id: int, payload: KVPayload) -> None:
    """Register the sequence in `cache` and write the received pages into fresh ones."""
    physical = cache.adopt_sequence(seq_id, payload.num_tokens, {n: list(g.logical) for n, g in payload.groups.items()})
    write_pages(cache, physical, payload)


def write_pages(cache: PagedKVCache, physical: dict[str, list[int]], payload: KVPayload) -> None:
    """Copy the payload's pages into `physical` (per group, in the payload's page order): per
    pool tensor one `copy_pages`."""
    for name, pages in payload.groups.items():
        group = cache.groups[name]
        dst = torch.tensor(physical[name], dtype=torch.int32)  # on the host: copy_pages looks for runs
        src = pages.physical if pages.physical is not None else torch.arange(pages.num_pages, dtype=torch.int32)
        for part, pool in ((pages.k, group.k), (pages.v, group.v)):
            copy_pages(part if part.dtype == pool.dtype else part.to(pool.dtype), src, pool, dst)

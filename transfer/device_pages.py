"""The pure parts of the GPU data plane: which pages a handoff moves, and moving them in bulk.

`held_pages` lists, per layer group, the logical pages a sequence hands over and their places
in the sending pool (the same pages `kv_pages.export_pages` would copy). `pack_group` gathers
one group's pages into one contiguous buffer [2 (k, v), layers, pages, page_size, kv_heads,
head_dim]: one `copy_pages` launch per pool tensor straight into the buffer, never a copy per page.
`nccl` sends that buffer; `cuda_ipc` packs out of the mapped pool of the other process and
moves the buffer to its own device in one copy. `unpack_payload` views received buffers as a
`KVPayload`, which `kv_pages.import_pages` scatters into the receiving cache (one `index_put`
per pool tensor). `hold` / `release` keep a handed-over sequence's pages out of the sender's
free list until the receiver has read them (`cuda_ipc`).

Nothing here knows processes or devices: it runs on CPU tensors as on CUDA ones, and is
unit-tested on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from gemma4_model.config import FULL, SLIDING
from gemma4_model.kernels.page_copy import copy_pages
from gemma4_model.kv_cache import NO_PAGE, PagedKVCache

from .kv_pages import GroupPages, KVPayload, PayloadError

GROUP_ORDER = (FULL, SLIDING)  # the order groups travel in (the order of `DevicePages.shapes`)
SHAPE_RANK = 5  # layers, pages, page_size, kv_heads, head_dim
MAX_PAGES = 1 << 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float8_e4m3fn": torch.float8_e4m3fn}


@dataclass(frozen=True)
class HeldPages:
    """The pages one handoff moves: per group, logical page numbers and their physical pages."""

    num_tokens: int
    logical: Mapping[str, tuple[int, ...]]
    physical: Mapping[str, tuple[int, ...]]

    @property
    def groups(self) -> list[str]:
        return [name for name in GROUP_ORDER if name in self.logical]

    @property
    def num_pages(self) -> int:
        return sum(len(pages) for pages in self.logical.values())

    def flat_physical(self) -> list[int]:
        return [p for name in self.groups for p in self.physical[name]]


def held_pages(cache: PagedKVCache, seq_id: int, reach_back: int = 0) -> HeldPages:
    """The pages a decoder needs to continue this sequence, where they sit in `cache`: as
    `kv_pages.export_pages`, sliding pages it can no longer see (but for `reach_back` positions
    more, which an MTP assistant downstream reads) are released first."""
    cache.slide(seq_id, max(0, cache.num_computed(seq_id) - reach_back))
    logical, physical = {}, {}
    for name in cache.groups:
        table = np.asarray(cache.page_table(seq_id, name), dtype=np.int64)
        held = np.flatnonzero(table != NO_PAGE)
        logical[name], physical[name] = tuple(held.tolist()), tuple(table[held].tolist())
    return HeldPages(cache.num_computed(seq_id), logical, physical)


def hold(cache: PagedKVCache, held: HeldPages) -> None:
    """Take one more reference on every page of `held`: freeing the sequence leaves them allocated."""
    for name, pages in held.physical.items():
        cache.groups[name].pool.acquire_all(pages)


def release(cache: PagedKVCache, held: HeldPages) -> None:
    """Drop the references `hold` took."""
    for name, pages in held.physical.items():
        cache.groups[name].pool.release_all(pages)


PAGE_FIELD = {FULL: "full_pages", SLIDING: "sliding_pages"}  # the `KVHandoff` field of a group's logical pages


def page_fields(held: HeldPages) -> dict[str, np.ndarray]:
    """`KVHandoff` fields of the handoff's logical pages, per travelling group."""
    return {PAGE_FIELD[name]: np.asarray(held.logical[name], dtype=np.int32) for name in held.groups}


def handoff_logical(handoff) -> dict[str, list[int]]:
    """A received `KVHandoff`'s logical pages per group that travels (page fields that are set);
    `PayloadError` unless each is a flat list of integers."""
    logical = {}
    for name, field in PAGE_FIELD.items():
        pages = getattr(handoff, field)
        if pages is None:
            continue
        pages = np.asarray(pages)
        if pages.ndim != 1 or (pages.size and pages.dtype.kind not in "iu"):
            raise PayloadError(f"{field} must be a flat array of page numbers, got {pages.dtype} {pages.shape}")
        logical[name] = pages.astype(np.int64).tolist()
    return logical


def group_shape(cache: PagedKVCache, name: str, pages: int) -> list[int]:
    """[layers, pages, page_size, kv_heads, head_dim] of `pages` pages of one group."""
    k = cache.groups[name].k
    return [k.shape[0], pages, *k.shape[2:]]


def shapes_of(cache: PagedKVCache, held: HeldPages) -> list[int]:
    """`DevicePages.shapes`: the shape of every travelling group's K (and V), flat."""
    return [d for name in held.groups for d in group_shape(cache, name, len(held.logical[name]))]


def parse_shapes(shapes: Sequence[int], logical: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """`DevicePages.shapes` back into per-group shapes, checked against the handoff's page lists
    (raises `PayloadError`)."""
    names = [name for name in GROUP_ORDER if name in logical]
    if len(shapes) != SHAPE_RANK * len(names):
        raise PayloadError(f"{len(shapes)} shape numbers for groups {names}: expected {SHAPE_RANK} per group")
    out = {}
    for i, name in enumerate(names):
        shape = tuple(shapes[SHAPE_RANK * i:SHAPE_RANK * (i + 1)])
        if not all(isinstance(d, int) and 0 <= d <= MAX_PAGES for d in shape) or 0 in shape[:1] + shape[2:]:
            raise PayloadError(f"group {name}: bad shape {shape}")
        if shape[1] != len(logical[name]):
            raise PayloadError(f"group {name}: shape has {shape[1]} pages, the page list {len(logical[name])}")
        out[name] = shape
    return out


def buffer_numel(shape: Sequence[int]) -> int:
    """Elements of a group's packed buffer (K and V)."""
    n = 2
    for d in shape:
        n *= d
    return n


def pack_group(k: torch.Tensor, v: torch.Tensor, physical: Sequence[int]) -> torch.Tensor:
    """One group's pages in one contiguous buffer [2, layers, len(physical), page_size, kv_heads,
    head_dim], on the pool's device: one gather per pool tensor."""
    index = torch.tensor(list(physical), dtype=torch.int32)  # on the host: copy_pages looks for runs
    to = torch.arange(len(physical), dtype=torch.int32)
    buffer = k.new_empty((2, k.shape[0], len(physical), *k.shape[2:]))
    copy_pages(k, index, buffer[0], to)
    copy_pages(v, index, buffer[1], to)
    return buffer


def pack_payload(cache: PagedKVCache, held: HeldPages) -> dict[str, torch.Tensor]:
    """Every travelling group packed (`pack_group`), in `GROUP_ORDER`."""
    return {name: pack_group(cache.groups[name].k, cache.groups[name].v, held.physical[name]) for name in held.groups}


def unpack_payload(num_tokens: int, logical: Mapping[str, Sequence[int]],
                   buffers: Mapping[str, torch.Tensor]) -> KVPayload:
    """Packed buffers (as `pack_group` makes them) as a `KVPayload` of views, no copy."""
    groups = {}
    for name, buffer in buffers.items():
        if buffer.dim() != 6 or buffer.shape[0] != 2 or buffer.shape[2] != len(logical[name]):
            raise PayloadError(f"group {name}: packed buffer of shape {tuple(buffer.shape)} does not hold "
                               f"K and V of {len(logical[name])} pages")
        groups[name] = GroupPages(tuple(np.asarray(logical[name], dtype=np.int64).tolist()), buffer[0], buffer[1])
    return KVPayload(num_tokens, groups)


def empty_buffers(shapes: Mapping[str, Sequence[int]], dtype: torch.dtype,
                  device: torch.device | str) -> dict[str, torch.Tensor]:
    """Receive buffers for groups of these shapes."""
    return {name: torch.empty((2, *shape), dtype=dtype, device=device) for name, shape in shapes.items()}


def as_bytes(buffer: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer as flat uint8 (the wire moves bytes, whatever the KV dtype)."""
    return buffer.reshape(-1).view(torch.uint8)

"""The paged, sliding-window-aware KV cache of a Gemma 4 text decoder.

One group per layer type (sliding, full). A group stores K and V of its KV-owning layers in
pages of `page_size` positions: tensors [layers_in_group, num_pages, page_size, kv_heads,
head_dim]. KV-shared layers own nothing; they read their owner's group. Each sequence has one
page table per group (logical page -> physical page, -1 where no page is held). Sliding groups
release pages as the window moves past them, so a sequence never holds more than about a
window of sliding pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .config import SLIDING, TextConfig
from .page_pool import KVCacheFullError, PagePool, page_hashes

NO_PAGE = -1


class RequestTooLargeError(ValueError):
    """A request can never fit in the cache, however empty it is."""


@dataclass
class KVGroup:
    """Storage and page pool of the KV-owning layers of one layer type."""

    layer_type: str
    layers: tuple[int, ...]  # owning layer indices, in order
    window: int | None
    pool: PagePool
    k: torch.Tensor  # [len(layers), num_pages, page_size, kv_heads, head_dim]
    v: torch.Tensor

    def slot_of(self, layer: int) -> int:
        return self.layers.index(layer)


@dataclass
class SequenceKV:
    """The pages one sequence holds, and how far its KV is computed."""

    seq_id: int
    tables: dict[str, list[int]]
    num_computed: int = 0  # positions whose KV is in the cache
    num_published: int = 0  # full pages indexed for prefix reuse
    hashes: list[bytes] = field(default_factory=list)
    slid: dict[str, int] = field(default_factory=dict)  # per sliding group: pages below it are released


class PagedKVCache:
    """Page tables, allocation, prefix reuse and window release over per-group KV storage."""

    def __init__(
        self,
        config: TextConfig,
        *,
        page_size: int,
        num_pages: int | Mapping[str, int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.page_size = page_size
        self.groups: dict[str, KVGroup] = {}
        for layer_type in (SLIDING, "full_attention"):
            owners = [l for l in config.kv_layers if l.layer_type == layer_type]
            if not owners:
                continue
            shapes = {(l.num_kv_heads, l.head_dim) for l in owners}
            if len(shapes) != 1:
                raise ValueError(f"{layer_type} layers differ in KV shape: {sorted(shapes)}")
            kv_heads, head_dim = shapes.pop()
            pages = num_pages if isinstance(num_pages, int) else num_pages[layer_type]
            shape = (len(owners), pages, page_size, kv_heads, head_dim)
            self.groups[layer_type] = KVGroup(
                layer_type=layer_type,
                layers=tuple(l.index for l in owners),
                window=owners[0].sliding_window,
                pool=PagePool(pages),
                k=torch.zeros(shape, device=device, dtype=dtype),
                v=torch.zeros(shape, device=device, dtype=dtype),
            )
        self._seqs: dict[int, SequenceKV] = {}

    @staticmethod
    def page_bytes(config: TextConfig, page_size: int, dtype: torch.dtype) -> int:
        """Device bytes one page number takes over every group (K and V of each owning layer)."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(2 * page_size * l.num_kv_heads * l.head_dim * size for l in config.kv_layers
                   if l.layer_type in (SLIDING, "full_attention"))

    # --- capacity -------------------------------------------------------------------------
    def pages_for(self, layer_type: str, start: int, end: int) -> int:
        """Pages a sequence holds in a group while positions [start, end) are being computed."""
        group = self.groups[layer_type]
        first = 0 if group.window is None else max(0, start - group.window + 1)
        return _ceil_div(end, self.page_size) - first // self.page_size

    def check_fits(self, max_tokens: int, chunk: int) -> None:
        """Refuse a request whose worst case exceeds a whole empty pool."""
        for name, group in self.groups.items():
            need = self.pages_for(name, max(0, max_tokens - chunk), max_tokens)
            if need > group.pool.num_pages:
                raise RequestTooLargeError(
                    f"{max_tokens} tokens need {need} {name} pages; the pool has {group.pool.num_pages}"
                )

    def can_extend(self, needs: Sequence[tuple[int, int]]) -> bool:
        """Whether every (seq_id, new_end) in `needs` can get its missing pages now."""
        missing = {name: 0 for name in self.groups}
        for seq_id, end in needs:
            seq = self._seqs[seq_id]
            for name, table in seq.tables.items():
                missing[name] += max(0, _ceil_div(end, self.page_size) - len(table))
        return all(missing[n] <= g.pool.num_available for n, g in self.groups.items())

    # --- sequence lifecycle ---------------------------------------------------------------
    def add_sequence(self, seq_id: int, prompt: Sequence[int], extra_keys: Sequence[bytes] = (),
                     blocks: Sequence[tuple[int, int]] = ()) -> int:
        """Register a sequence and attach the longest usable cached prefix; returns its length.

        At least one prompt token is always left to compute, so the request gets logits. The
        prefix never ends strictly inside one of `blocks` ([start, end) bidirectional spans),
        since such a span must be computed in one forward.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already in the cache")
        seq = SequenceKV(seq_id, {name: [] for name in self.groups})
        seq.hashes = page_hashes(prompt, self.page_size, extra_keys)
        usable = min(len(seq.hashes), (len(prompt) - 1) // self.page_size)
        for count in range(usable, 0, -1):
            if any(lo < count * self.page_size < hi for lo, hi in blocks):
                continue
            pages = self._cached_prefix_pages(seq.hashes, count)
            if pages is not None:
                for name, table in pages.items():
                    for page in table:
                        if page != NO_PAGE:
                            self.groups[name].pool.acquire(page)
                    seq.tables[name] = table
                seq.num_computed = seq.num_published = count * self.page_size
                break
        self._seqs[seq_id] = seq
        return seq.num_computed

    def _cached_prefix_pages(self, hashes: list[bytes], count: int) -> dict[str, list[int]] | None:
        """Page tables for the first `count` pages if every needed page is cached, else None."""
        tables = {}
        end = count * self.page_size
        for name, group in self.groups.items():
            first_needed = 0 if group.window is None else max(0, end - group.window + 1) // self.page_size
            table = [NO_PAGE] * count
            for j in range(first_needed, count):
                page = group.pool.lookup(hashes[j])
                if page is None:
                    return None
                table[j] = page
            tables[name] = table
        return tables

    def adopt_sequence(self, seq_id: int, num_computed: int, held: dict[str, list[int]]) -> dict[str, list[int]]:
        """Register a sequence whose KV arrives from elsewhere (a KV handoff): allocate pages
        for the logical pages in `held` (per group) and return their physical pages, in order.
        All or nothing: if the pool cannot hold them, nothing stays allocated."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already in the cache")
        for name, logical in held.items():
            if len(set(logical)) != len(logical):  # a repeated page would be allocated twice and leak
                raise ValueError(f"{name} page numbers repeat")
        seq = SequenceKV(seq_id, {name: [] for name in self.groups}, num_computed=num_computed)
        self._seqs[seq_id] = seq
        width = _ceil_div(num_computed, self.page_size)
        try:
            physical = {}
            for name, logical in held.items():
                table = seq.tables[name] = [NO_PAGE] * width
                if logical and not 0 <= min(logical) <= max(logical) < width:
                    raise IndexError(f"{name} pages {min(logical)}..{max(logical)} outside 0..{width - 1}")
                pages = physical[name] = self.groups[name].pool.allocate_many(len(logical))
                for j, page in zip(logical, pages):
                    table[j] = page
        except (KVCacheFullError, IndexError):
            self.free_sequence(seq_id)
            raise
        return physical

    def held_pages(self, seq_id: int) -> dict[str, list[int]]:
        """Per group, the logical pages this sequence holds (what a handoff must carry)."""
        return {name: [j for j, p in enumerate(t) if p != NO_PAGE] for name, t in self._seqs[seq_id].tables.items()}

    def extend(self, seq_id: int, new_end: int) -> None:
        """Give a sequence pages for positions up to `new_end` (exclusive) in every group."""
        seq = self._seqs[seq_id]
        taken: list[tuple[str, int]] = []
        try:
            for name, table in seq.tables.items():
                while len(table) * self.page_size < new_end:
                    table.append(self.groups[name].pool.allocate())
                    taken.append((name, len(table) - 1))
        except KVCacheFullError:
            for name, j in reversed(taken):  # all or nothing
                self.groups[name].pool.release(seq.tables[name].pop(j))
            raise

    def slide(self, seq_id: int, next_position: int) -> None:
        """Release sliding pages no query at `next_position` or later can see."""
        seq = self._seqs[seq_id]
        for name, table in seq.tables.items():
            window = self.groups[name].window
            if window is None:
                continue
            first_visible = next_position - window + 1
            below = min(len(table), max(0, first_visible) // self.page_size)
            for j in range(seq.slid.get(name, 0), below):  # only pages the window left since the last slide
                if table[j] != NO_PAGE:
                    self.groups[name].pool.release(table[j])
                    table[j] = NO_PAGE
            seq.slid[name] = max(seq.slid.get(name, 0), below)

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int, extra_keys: Sequence[bytes] = ()) -> None:
        """Record that KV of positions < num_computed is written; publish newly full pages."""
        self._seqs[seq_id].num_computed = num_computed
        self.publish(seq_id, token_ids, num_computed, extra_keys)

    def mark_computed(self, seq_id: int, num_computed: int) -> None:
        """Record that KV of positions < num_computed is (being) written, publishing nothing yet:
        a step launched before its input token is known on the host (`publish` follows)."""
        self._seqs[seq_id].num_computed = num_computed

    def publish(self, seq_id: int, token_ids: Sequence[int], upto: int, extra_keys: Sequence[bytes] = ()) -> None:
        """Offer the full pages below position `upto` to the prefix cache, keyed by `token_ids`."""
        seq = self._seqs[seq_id]
        full = min(upto, len(token_ids)) // self.page_size
        if full > len(seq.hashes):
            seq.hashes = page_hashes(token_ids, self.page_size, extra_keys, known=seq.hashes, num_pages=full)
        for j in range(seq.num_published, full):
            for name, table in seq.tables.items():
                if table[j] != NO_PAGE:
                    self.groups[name].pool.publish(table[j], seq.hashes[j])
        seq.num_published = max(seq.num_published, full)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Forget KV at positions >= num_tokens (rejected speculative tokens), freeing whole pages."""
        seq = self._seqs[seq_id]
        keep = _ceil_div(num_tokens, self.page_size)
        for name, table in seq.tables.items():
            while len(table) > keep:
                page = table.pop()
                if page != NO_PAGE:
                    self.groups[name].pool.release(page)
            if name in seq.slid:
                seq.slid[name] = min(seq.slid[name], len(table))
        seq.num_computed = min(seq.num_computed, num_tokens)
        seq.num_published = min(seq.num_published, num_tokens // self.page_size)
        del seq.hashes[num_tokens // self.page_size:]  # pages past it may hold other tokens next

    def free_sequence(self, seq_id: int) -> None:
        """Release every page of a finished, cancelled or preempted sequence."""
        seq = self._seqs.pop(seq_id)
        for name, table in seq.tables.items():
            self.groups[name].pool.release_all(p for p in table if p != NO_PAGE)

    # --- views for the forward pass -------------------------------------------------------
    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def num_computed(self, seq_id: int) -> int:
        return self._seqs[seq_id].num_computed

    def page_table(self, seq_id: int, layer_type: str) -> list[int]:
        return self._seqs[seq_id].tables[layer_type]

    def pages_in_use(self) -> dict[str, int]:
        return {name: g.pool.num_in_use for name, g in self.groups.items()}

    def bytes_per_page(self) -> dict[str, int]:
        return {
            name: 2 * g.k[:, 0].numel() * g.k.element_size() for name, g in self.groups.items()
        }


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)

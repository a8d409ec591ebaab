"""Page bookkeeping for one KV group: free pages, reference counts and the prefix-cache index.

A page holds `page_size` consecutive token positions of every layer in its group. Full pages
whose content is known are published under a chain hash of the tokens up to their end; when the
last user releases such a page it stays cached (idle, least-recently-used first) until a new
allocation needs the space.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from typing import Iterable, Sequence


class KVCacheFullError(RuntimeError):
    """No free or evictable page is left in a pool."""


def page_hashes(token_ids: Sequence[int], page_size: int, extra_keys: Sequence[bytes] = (),
                known: Sequence[bytes] = (), num_pages: int | None = None) -> list[bytes]:
    """Chain hashes of the full pages of `token_ids` (the first `num_pages`, default all).

    Page j's hash covers all tokens up to its end, so equal hashes mean equal prefixes.
    `extra_keys[j]`, when given, is mixed into page j (e.g. the content hash of an image whose
    placeholder tokens fall in it, since equal token ids do not mean equal images). `known` are
    the first pages' hashes, computed before: only the pages after them are hashed (a growing
    sequence hashes each page once).
    """
    pages = len(token_ids) // page_size if num_pages is None else min(num_pages, len(token_ids) // page_size)
    hashes = list(known[:pages])
    prev = hashes[-1] if hashes else b""
    page_format = struct.Struct(f"<{page_size}i")  # each id as 4 little-endian bytes, signed
    for j in range(len(hashes), pages):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(page_format.pack(*token_ids[j * page_size:(j + 1) * page_size]))
        if j < len(extra_keys):
            h.update(extra_keys[j])
        prev = h.digest()
        hashes.append(prev)
    return hashes


class PagePool:
    """Reference-counted pages with an LRU-evicted prefix-cache index."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._refcount = [0] * num_pages
        self._hash_of: list[bytes | None] = [None] * num_pages
        self._page_of: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_pages))
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages nobody uses, LRU first

    @property
    def num_available(self) -> int:
        """Pages an allocation can take now (free plus evictable cached ones)."""
        return len(self._free) + len(self._idle)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - self.num_available

    @property
    def num_cached(self) -> int:
        return len(self._page_of)

    def allocate(self) -> int:
        """Take a page, evicting the least recently used cached one if nothing is free."""
        if self._free:
            page = self._free.popleft()
        elif self._idle:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._hash_of[page]]
            self._hash_of[page] = None
        else:
            raise KVCacheFullError(f"all {self.num_pages} pages are in use")
        self._refcount[page] = 1
        return page

    def allocate_many(self, n: int) -> list[int]:
        """Take `n` pages (all or none), free ones first, then the least recently used cached ones."""
        if n > self.num_available:
            raise KVCacheFullError(f"{n} pages wanted, {self.num_available} of {self.num_pages} available")
        take = min(n, len(self._free))
        pages = [self._free.popleft() for _ in range(take)]
        for page in pages:
            self._refcount[page] = 1
        pages += [self.allocate() for _ in range(n - take)]
        return pages

    def lookup(self, page_hash: bytes) -> int | None:
        """The cached page published under `page_hash`, without taking it."""
        return self._page_of.get(page_hash)

    def acquire(self, page: int) -> None:
        """Add a user to a page (a prefix-cache hit or a fork)."""
        self.acquire_all((page,))

    def acquire_all(self, pages: Iterable[int]) -> None:
        """Add a user to each of `pages` (one loop: a handoff holds thousands)."""
        refcount, idle = self._refcount, self._idle
        for page in pages:
            if refcount[page] == 0:
                idle.pop(page, None)
            refcount[page] += 1

    def release(self, page: int) -> None:
        """Drop a user; an unused page becomes idle-cached if published, else free."""
        self.release_all((page,))

    def release_all(self, pages: Iterable[int]) -> None:
        """Drop a user of each of `pages` (one loop: a long sequence frees thousands)."""
        refcount, hash_of = self._refcount, self._hash_of
        for page in pages:
            assert refcount[page] > 0, f"page {page} released more often than acquired"
            refcount[page] -= 1
            if refcount[page] == 0:
                if hash_of[page] is not None:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def publish(self, page: int, page_hash: bytes) -> None:
        """Index a full, computed page for prefix reuse (first publisher of a hash wins)."""
        if self._hash_of[page] is not None or page_hash in self._page_of:
            return
        self._hash_of[page] = page_hash
        self._page_of[page_hash] = page

    def refcount(self, page: int) -> int:
        return self._refcount[page]

"""CUDA graphs of the vision tower's transformer (patch embedding, RoPE tables, encoder layers).

Eagerly, one pass of the E4B-sized tower over a 720p image is about 2,000 small launches: ~45 ms
of host time for ~2 ms of GPU work. `TowerGraphs` captures the pass once per input shape and
replays it. Shapes are bucketed so a few graphs serve every request: the patch count rounds up to
a multiple of `k^2 * 16` patches (the processor already pads
every image of a soft-token budget to that budget's patch count) (padding patches at (-1, -1), which attention masks out and the
pooling ignores, as batching already pads) and the image count up to a power of two (copies of the
first image, whose outputs are dropped). All graphs share one memory pool: replays never overlap,
and a replay's output is read before the next.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

log = logging.getLogger(__name__)


class TowerGraphs:
    """`fn(pixel_values, position_ids) -> h` replayed from CUDA graphs, the `max_graphs` most
    recently used shapes kept (least recently used released first)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pooling_kernel_size: int,
                 max_graphs: int = 8, fallback: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        if max_graphs < 1:
            raise ValueError("max_graphs must be >= 1")
        self.fn = fn
        self.fallback = fallback  # fn's plain twin, taken for good if fn's warm-up pass fails (a compile error)
        self.patch_bucket = pooling_kernel_size**2 * 16
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = \
            OrderedDict()
        self._pool = None
        self.captures = 0

    def bucketed_shape(self, images: int, patches: int) -> tuple[int, int]:
        return 1 << (images - 1).bit_length(), -(-patches // self.patch_bucket) * self.patch_bucket

    def bucketed(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs padded to their bucket: extra patches at (-1, -1), extra images copies of the first."""
        n, length = pixel_values.shape[:2]
        n2, length2 = self.bucketed_shape(n, length)
        if (n2, length2) == (n, length):
            return pixel_values, position_ids
        pixels = pixel_values.new_zeros((n2, length2, pixel_values.shape[2]))
        positions = position_ids.new_full((n2, length2, 2), -1)
        pixels[:n, :length], positions[:n, :length] = pixel_values, position_ids
        pixels[n:, :length], positions[n:, :length] = pixel_values[:1], position_ids[:1]
        return pixels, positions

    def __call__(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """fn's output for these inputs, in the graph's static buffer (valid until the next call)."""
        key = (tuple(pixel_values.shape), pixel_values.dtype, tuple(position_ids.shape), position_ids.dtype,
               pixel_values.device)
        entry = self._graphs.pop(key, None) or self._capture(pixel_values, position_ids)
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        graph, pixels, positions, out = entry
        pixels.copy_(pixel_values)
        positions.copy_(position_ids)
        graph.replay()
        return out

    def _capture(self, pixel_values: torch.Tensor, position_ids: torch.Tensor):
        pixels, positions = pixel_values.clone(), position_ids.clone()
        side = torch.cuda.Stream(pixel_values.device)
        side.wait_stream(torch.cuda.current_stream(pixel_values.device))
        with torch.cuda.stream(side):  # a warm-up pass: library handles and workspaces exist before capture
            try:
                self.fn(pixels, positions)
            except Exception as exc:  # noqa: BLE001 - any compile failure: the plain pass still works
                if self.fallback is None or self.fn is self.fallback:
                    raise
                log.warning("vision tower: compiled pass failed (%s: %s); replaying the plain pass", type(exc).__name__, exc)
                self.fn = self.fallback
                self.fn(pixels, positions)
        torch.cuda.current_stream(pixel_values.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.fn(pixels, positions)
        if self._pool is None:
            self._pool = graph.pool()
        self.captures += 1
        return graph, pixels, positions, out

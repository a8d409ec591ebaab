"""Counters for kernels whose last program finishes a launch's work ("last one done merges").

Some launches split one result over several programs and merge their partial results inside the
same launch, not in a second one: each program stores its part, counts itself done on a counter
with an acquire-release atomic (after a barrier: the block's stores are visible to whoever counts
last), and the program that counts last reads the parts back past L1, writes the result and sets
the counter back to zero, so the next launch (and a captured CUDA graph's next replay) starts
from zero. `kernels.ple_tail` counts this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LaunchCounters:
    """One call site's counters: `size` int32 zeros on each device it has run on, which every
    launch leaves zero. Launches of one call site follow each other on the stream (a dependent
    launch counts only after it has waited for the launch before it), so a counter is never
    counted by two launches at once; a module owns one for the launches it makes."""

    size: int = 4096
    counters: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def counter(self, device: torch.device) -> torch.Tensor:
        found = self.counters.get(device)
        if found is None:
            found = self.counters[device] = torch.zeros(self.size, dtype=torch.int32, device=device)
        return found

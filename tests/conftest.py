"""Shared fixtures: tiny random Gemma 4 checkpoints, and skipping GPU tests on CPU-only machines."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gemma4_model.random_checkpoint import save_tiny_checkpoint

GPU_SKIP_REASON = "needs a CUDA device; run through the device tool"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pathlib.Path]:
    """`get(variant, seed=0, max_shard_size=None, **text_overrides) -> Path` of a saved checkpoint.

    Each distinct (variant, arguments) is built and saved once per test session.
    """
    saved: dict[tuple[str, str], pathlib.Path] = {}

    def get(variant: str, **kwargs: Any) -> pathlib.Path:
        key = (variant, repr(sorted(kwargs.items())))
        if key not in saved:
            path = tmp_path_factory.mktemp(f"tiny-{variant}")
            saved[key] = save_tiny_checkpoint(variant, path, **kwargs)
        return saved[key]

    return get


@pytest.fixture(autouse=True)
def no_leaked_pages(monkeypatch: pytest.MonkeyPatch):
    """After every test, every KV page pool a test created must have no page in use."""
    from gemma4_model.kv_cache import PagedKVCache

    created: list[PagedKVCache] = []
    original = PagedKVCache.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(PagedKVCache, "__init__", tracking_init)
    yield created
    leaks = [cache.pages_in_use() for cache in created if any(cache.pages_in_use().values())]
    assert not leaks, f"pages still in use after the test: {leaks}"

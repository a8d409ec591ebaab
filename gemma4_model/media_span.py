"""Media in a prompt: encoder outputs (soft tokens) that replace runs of placeholder tokens.

A prompt keeps the checkpoint's placeholder ids (image / video / audio token) where its media
go; a `MediaSpan` carries the encoder's output for one such run. Image and video spans attend
bidirectionally in the variants that say so (`TextConfig.span_attention`): adjacent image/video
spans form one block, as the reference's `get_block_sequence_ids_for_mask` joins consecutive
vision tokens. Audio is causal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .config import TextConfig

MEDIA_KINDS = ("image", "video", "audio")
BIDIRECTIONAL_KINDS = ("image", "video")


@dataclass(frozen=True)
class MediaSpan:
    """One run of soft tokens in a prompt."""

    start: int  # prompt position of the first soft token
    embeddings: torch.Tensor  # [length, text hidden]: the encoder's output in LM space
    kind: str  # "image", "video" or "audio"
    content_key: bytes  # hash of the content: pages covering it hash with it (prefix cache)

    @property
    def length(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class MediaTokens:
    """The placeholder token id of each media kind (the checkpoint's top-level config)."""

    image: int | None = None
    video: int | None = None
    audio: int | None = None

    @staticmethod
    def from_special_tokens(tokens: Mapping[str, int]) -> "MediaTokens":
        """From `ModelConfig.special_tokens`."""
        return MediaTokens(tokens.get("image_token_id"), tokens.get("video_token_id"), tokens.get("audio_token_id"))

    @staticmethod
    def from_text_config(cfg: TextConfig) -> "MediaTokens":
        """From `TextConfig.media_token_ids` (what the loaded decoder knows)."""
        return MediaTokens(**{kind: cfg.media_token_ids.get(kind) for kind in MEDIA_KINDS})

    def id_of(self, kind: str) -> int | None:
        return getattr(self, kind)

    def ids(self) -> set[int]:
        return {t for t in (self.image, self.video, self.audio) if t is not None}


def validate_media(prompt: Sequence[int], media: Sequence[MediaSpan], tokens: MediaTokens,
                   hidden_size: int, pad_token_id: int | None) -> tuple[MediaSpan, ...]:
    """Check spans against the prompt; return them sorted by start. Raises ValueError naming the
    first problem: unknown kind, bad shape, a span outside the prompt or over the wrong
    placeholders, overlapping spans, or placeholder tokens no span covers."""
    spans = tuple(sorted(media, key=lambda s: s.start))
    placeholder_ids = tokens.ids()
    if spans and pad_token_id is None:
        raise ValueError("the text config has no pad_token_id, which media rows need for their per-layer embeddings")
    covered = [False] * len(prompt)
    prev_end = 0
    for i, span in enumerate(spans):
        where = f"media span {i} ({span.kind} at {span.start})"
        if span.kind not in MEDIA_KINDS:
            raise ValueError(f"{where}: kind must be one of {MEDIA_KINDS}")
        if not isinstance(span.content_key, bytes) or not span.content_key:
            raise ValueError(f"{where}: content_key must be non-empty bytes")
        emb = span.embeddings
        if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] == 0:
            raise ValueError(f"{where}: embeddings must be a non-empty [length, hidden] tensor")
        if emb.shape[1] != hidden_size:
            raise ValueError(f"{where}: embeddings width {emb.shape[1]} != text hidden size {hidden_size}")
        if span.start < 0 or span.end > len(prompt):
            raise ValueError(f"{where}: positions {span.start}..{span.end - 1} lie outside the prompt of {len(prompt)} tokens")
        if span.start < prev_end:
            raise ValueError(f"{where}: overlaps the previous span (which ends at {prev_end})")
        want = tokens.id_of(span.kind)
        if want is None:
            raise ValueError(f"{where}: the model has no {span.kind} placeholder token")
        wrong = [p for p in range(span.start, span.end) if prompt[p] != want]
        if wrong:
            raise ValueError(f"{where}: prompt position {wrong[0]} holds token {prompt[wrong[0]]}, "
                             f"not the {span.kind} placeholder {want} ({len(wrong)} of {span.length} positions differ)")
        covered[span.start:span.end] = [True] * span.length
        prev_end = span.end
    stray = [p for p, t in enumerate(prompt) if t in placeholder_ids and not covered[p]]
    if stray:
        raise ValueError(f"prompt position {stray[0]} holds placeholder token {prompt[stray[0]]} but no media span "
                         f"covers it ({len(stray)} such positions)")
    return spans


def bidirectional_blocks(spans: Sequence[MediaSpan]) -> tuple[tuple[int, int], ...]:
    """[start, end) of each bidirectional block: image/video spans, adjacent ones joined."""
    blocks: list[list[int]] = []
    for span in spans:
        if span.kind not in BIDIRECTIONAL_KINDS:
            continue
        if blocks and blocks[-1][1] == span.start:
            blocks[-1][1] = span.end
        else:
            blocks.append([span.start, span.end])
    return tuple((a, b) for a, b in blocks)


def page_extra_keys(spans: Sequence[MediaSpan], num_tokens: int, page_size: int) -> tuple[bytes, ...]:
    """Per full page of the prompt, the content keys of the spans it overlaps (b"" for none)."""
    keys = []
    for j in range(num_tokens // page_size):
        lo, hi = j * page_size, (j + 1) * page_size
        parts = [s.kind.encode() + s.start.to_bytes(4, "little") + s.content_key
                 for s in spans if s.start < hi and s.end > lo]
        keys.append(b"".join(parts))
    return tuple(keys)


def chunk_media(spans: Sequence[MediaSpan], start: int, end: int) -> tuple[tuple[int, torch.Tensor], ...]:
    """The soft-token rows of positions [start, end): (offset in the chunk, rows) per span piece."""
    out = []
    for span in spans:
        lo, hi = max(start, span.start), min(end, span.end)
        if lo < hi:
            out.append((lo - start, span.embeddings[lo - span.start: hi - span.start]))
    return tuple(out)


def chunk_span_ids(blocks: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, ...] | None:
    """Block id (> 0) of each position in [start, end), 0 outside blocks; None if no block is there."""
    ids = [0] * (end - start)
    hit = False
    for b, (lo, hi) in enumerate(blocks, start=1):
        lo, hi = max(lo, start), min(hi, end)
        if lo < hi:
            ids[lo - start: hi - start] = [b] * (hi - lo)
            hit = True
    return tuple(ids) if hit else None

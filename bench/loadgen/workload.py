"""The requests of a benchmark run: random text (token ids or text) and random images.

Lengths are drawn as `sglang.bench_serving`'s random dataset draws them (a legacy NumPy
`RandomState(seed)`, input then output, in `[len * range_ratio, len]`), so the same seed gives the
same length sequence (seed 1, 10 prompts of 1024: mean input 610.1, SGLang's latency workload).
Prompt tokens are drawn from the served model's tokenizer, special and added tokens excluded: sent
as token ids to /v1/completions the input length is exact; as text (/v1/chat/completions) the
text re-tokenizes to exactly that many tokens (the chat template then adds its own, which the
server's usage counts). Each request's content comes from a generator keyed on (seed, index), so a
request is the same whichever order or thread builds it.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

# Named resolutions as sglang.bench_serving names them: (height, width).
RESOLUTIONS = {"4k": (2160, 3840), "1080p": (1080, 1920), "720p": (720, 1280), "360p": (360, 640)}


@dataclass(frozen=True)
class WorkloadConfig:
    """What each request asks for; `dataset` "random" (text), "image" (images + text, chat) or
    "mixed" (chat: each request carries the images with probability `image_fraction`, drawn per
    request from the seed, and the drawn text either way)."""

    dataset: str = "random"
    api: str = "completions"  # "completions" (token-id prompts) or "chat" (text)
    num_prompts: int = 1000
    input_len: int = 1024
    output_len: int = 1024
    range_ratio: float = 0.0
    seed: int = 1
    image_count: int = 2
    image_height: int = 720
    image_width: int = 1280
    image_format: str = "jpeg"  # "jpeg" or "png"
    image_content: str = "random"  # "random" pixels or "blank" (white)
    image_fraction: float = 0.5  # mixed: the share of requests with images
    ignore_eos: bool = True  # force the output length: ignore_eos + max_tokens + min_tokens
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every body

    def __post_init__(self) -> None:
        if self.dataset not in ("random", "image", "mixed"):
            raise ValueError(f"unknown dataset {self.dataset!r} (random, image or mixed)")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"unknown api {self.api!r} (completions or chat)")
        if self.dataset in ("image", "mixed") and self.api != "chat":
            raise ValueError(f"the {self.dataset} dataset needs --api chat")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ValueError("image_fraction must be in [0, 1]")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be at least 1")
        if not 0.0 <= self.range_ratio <= 1.0:
            raise ValueError("range_ratio must be in [0, 1]")
        if self.image_format not in ("jpeg", "png") or self.image_content not in ("random", "blank"):
            raise ValueError("image_format is jpeg or png; image_content is random or blank")
        if self.image_count < 0 or self.image_height < 1 or self.image_width < 1:
            raise ValueError("image_count must be >= 0 and the resolution positive")

    @property
    def route(self) -> str:
        return CHAT if self.api == "chat" else COMPLETIONS


def parse_resolution(text: str) -> tuple[int, int]:
    """'720p' etc., or 'HEIGHTxWIDTH' as sglang.bench_serving writes it -> (height, width)."""
    if text.lower() in RESOLUTIONS:
        return RESOLUTIONS[text.lower()]
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution {text!r}: one of {sorted(RESOLUTIONS)} or HEIGHTxWIDTH") from None
    return height, width


def sample_lengths(config: WorkloadConfig) -> tuple[list[int], list[int]]:
    """Input and output lengths per request, drawn as sglang.bench_serving's random dataset does.

    SGLang allows an output length of 0; a request must decode at least one token, so 0 becomes 1.
    """
    rng = np.random.RandomState(config.seed)
    inputs = rng.randint(max(int(config.input_len * config.range_ratio), 1), config.input_len + 1,
                         size=config.num_prompts)
    outputs = rng.randint(int(config.output_len * config.range_ratio), config.output_len + 1,
                          size=config.num_prompts)
    return [int(n) for n in inputs], [max(int(n), 1) for n in outputs]


class TokenSource:
    """Random prompts from a tokenizer's ordinary tokens (no special, added or placeholder ids).

    Text prompts are strings of the vocabulary's space-led words (a piece "Ġword" or "▁word"
    whose text " word" encodes back to that one token), which tokenizers that split at spaces keep
    one token each; where a tokenizer merges across them, words are dropped or added until the
    count is exact. If that cannot be reached the closest text is used and its true count kept.
    """

    WORD = re.compile(r"[\u2581\u0120][A-Za-z]+")

    def __init__(self, tokenizer) -> None:
        excluded = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(tokenizer.all_special_ids)
        self.tokenizer = tokenizer
        self.pool = np.array([i for i in range(len(tokenizer)) if i not in excluded], dtype=np.int64)
        if self.pool.size == 0:
            raise ValueError("the tokenizer has no ordinary tokens to build prompts from")

    @functools.cached_property
    def words(self) -> list[str]:
        """The vocabulary's space-led words (found once, on the first text prompt)."""
        pieces = self.tokenizer.convert_ids_to_tokens(self.pool.tolist())
        words = [" " + p[1:] for p in pieces if isinstance(p, str) and self.WORD.fullmatch(p)]
        return [w for w in words if self.count(w) == 1]

    def ids(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(i) for i in rng.choice(self.pool, size=n)]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def text(self, rng: np.random.Generator, n: int) -> tuple[str, int]:
        """A text of `n` tokens (without special tokens) and its token count: `n` unless the
        tokenizer made that impossible, then the closest count reached."""
        if self.words:
            def draw(k: int) -> list[str]:
                return [self.words[j] for j in rng.integers(0, len(self.words), size=k)]
            pieces, decode = draw(n), "".join
        else:  # no word tokens: decoded random ids, re-encoded
            def draw(k: int) -> list[int]:
                return self.ids(rng, k)
            pieces, decode = draw(n), lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        best = None
        for _ in range(n + 32):
            text = decode(pieces)
            have = self.count(text)
            if best is None or abs(have - n) < abs(best[1] - n):
                best = (text, have)
            if have == n:
                break
            pieces = pieces[:-1] if have > n else pieces + draw(n - have)
        return best


def image_data_url(rng: np.random.Generator, height: int, width: int, fmt: str, content: str) -> str:
    """One image as a data: URL: random pixels (every image distinct) or plain white."""
    from PIL import Image

    if content == "blank":
        pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    else:
        pixels = np.frombuffer(rng.bytes(height * width * 3), dtype=np.uint8).reshape(height, width, 3)
    buffer = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    mime = "image/png" if fmt == "png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class PreparedRequest:
    """One request ready to send: its route, JSON body (bytes) and the lengths it asks for."""

    index: int
    route: str
    body: bytes
    input_len: int  # prompt tokens as built (text part only for chat: the template adds more)
    output_len: int  # the output length asked for (max_tokens)
    images: int = 0


class Workload:
    """The run's requests: lengths and prompts fixed up front, bodies (with images) built on demand.

    `request(i, model)` is thread-safe (it touches no tokenizer), so image bodies can be built
    in worker threads while the benchmark runs.
    """

    def __init__(self, config: WorkloadConfig, tokenizer) -> None:
        self.config = config
        self.input_lens, self.output_lens = sample_lengths(config)
        source = TokenSource(tokenizer)
        rngs = [np.random.default_rng([config.seed, i, 0]) for i in range(config.num_prompts)]
        if config.api == "completions":
            self.prompts: list[Any] = [source.ids(rng, n) for rng, n in zip(rngs, self.input_lens)]
        else:
            texts = [source.text(rng, n) for rng, n in zip(rngs, self.input_lens)]
            self.prompts = [text for text, _ in texts]
            self.input_lens = [count for _, count in texts]

    def __len__(self) -> int:
        return self.config.num_prompts

    def has_images(self, index: int) -> bool:
        """Whether request `index` carries images: every one of the image dataset, a seeded
        `image_fraction` of the mixed one's."""
        config = self.config
        if config.dataset == "mixed":
            return bool(np.random.default_rng([config.seed, index, 2]).random() < config.image_fraction)
        return config.dataset == "image"

    def request(self, index: int, model: str, output_len: int | None = None) -> PreparedRequest:
        """Request `index`; `output_len` overrides the drawn length (warm-up requests use it)."""
        config = self.config
        out = output_len if output_len is not None else self.output_lens[index]
        body: dict[str, Any] = {"model": model, "max_tokens": out, "temperature": config.temperature,
                                "stream": True, "stream_options": {"include_usage": True}}
        if config.ignore_eos:
            body.update(ignore_eos=True, min_tokens=out)
        images = config.image_count if self.has_images(index) else 0
        if config.api == "completions":
            body["prompt"] = self.prompts[index]
        elif images:
            rng = np.random.default_rng([config.seed, index, 1])
            parts = [{"type": "image_url", "image_url": {"url": image_data_url(
                rng, config.image_height, config.image_width, config.image_format, config.image_content)}}
                for _ in range(images)]
            body["messages"] = [{"role": "user", "content": [*parts, {"type": "text", "text": self.prompts[index]}]}]
        else:
            body["messages"] = [{"role": "user", "content": self.prompts[index]}]
        body.update(config.extra_body)
        return PreparedRequest(index, config.route, json.dumps(body).encode(), self.input_lens[index], out, images)

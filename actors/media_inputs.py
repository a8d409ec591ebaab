"""Media preprocessing for the preprocess actor: request bytes -> model arrays + prompt text.

Each image, audio clip or video of a request becomes a `ProcessedMedia`: the arrays the
family's encoder takes, the exact text the Gemma 4 processor substitutes for the item in the
prompt, and a content hash (prefix-cache key). The numeric work (resize, rescale, patchify, mel
features) is `transformers`' own image processor and feature extractor, configured from the
checkpoint's `processor_config.json`; this module only decodes, bounds and lays out. For images
converted to RGB (every Gemma 4 config) the processor's steps are replayed without its copies
(`MediaProcessor._rgb_patches`): its size rule, the same PIL resize, its rescale / normalize as a
per-value table; the tests hold the result bit-identical to the processor's.

torchvision is not a dependency (its PyPI wheels pin one torch build and do not load with the
CPU one), so the two processors that need it are replaced by their PIL twin:
  * video frames go through the family's PIL image processor at the video budget
    (`Gemma4VideoProcessor` resizes with torchvision's antialiased bicubic: pixel values may
    differ slightly; sizes, counts and prompt layout are the same);
  * the unified family's image processor (torchvision) = the PIL processor's 16-px patches
    merged k x k into (k*16)-px patches, exactly its `patches_merge` layout.

Video frame policy (what `Gemma4VideoProcessor` + `processing_gemma4.py` do): n = min(
`num_frames` of the video processor config (32), frames in the stream) frames at indices
`i * total // n`, each stamped `mm:ss` of `index / fps`; the prompt text is
"mm:ss <boi><video>*k<eoi>" per frame joined by spaces (transformers refuses a video with fewer
frames than `num_frames`; here all its frames are taken).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

SUPPORTED_BUDGETS = (70, 140, 280, 560, 1120)
AUDIO_RATE = 16_000
# Pillow formats accepted (not EPS/PS, which Pillow renders through Ghostscript, nor exotic ones).
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF")
# The image processor's settings `_rgb_patches` follows (the processor's own, or a video's overrides).
_IMAGE_SETTINGS = ("do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize",
                   "image_mean", "image_std", "patch_size", "pooling_kernel_size")
_NOT_AN_IMAGE = "bytes are not an image (PNG, JPEG, GIF, WebP, BMP or TIFF)"
_GEMMA4_TOKENS = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                  "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
                  "video_token": "<|video|>"}


class MediaError(ValueError):
    """A media item the server refuses; `param` names the part of the request, the message says why."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class MediaLimits:
    """Per-prompt counts (as vLLM's `limit_mm_per_prompt`) and per-item size bounds."""

    max_images: int = 8
    max_audios: int = 4
    max_videos: int = 1
    max_item_bytes: int = 20 * 1024 * 1024  # encoded bytes of one item
    max_image_pixels: int = 40_000_000  # width * height, checked from the header before decoding
    max_audio_seconds: float = 30.0  # the Gemma 4 feature extractor truncates past 30 s (480000 samples)
    max_video_seconds: float = 120.0
    max_video_frames: int = 7_200  # frames in the stream (bounds decoding work)

    def check_counts(self, images: int = 0, audios: int = 0, videos: int = 0, param: str = "messages") -> None:
        """Refuse a prompt with more items of a kind than allowed."""
        for kind, count, cap in (("image", images, self.max_images), ("audio", audios, self.max_audios),
                                 ("video", videos, self.max_videos)):
            if count > cap:
                raise MediaError(param, f"{count} {kind} items in one prompt; at most {cap} allowed")


@dataclass(frozen=True, eq=False)
class ProcessedMedia:
    """One media item ready for its encoder.

    image: `pixel_values` [P, D], `position_ids` int32 [P, 2] (x, y), real patches only
    (transformers pads to budget * k^2 rows with position -1; the encoder pads if it batches).
    An RGB image's `pixel_values` are its 8-bit values (uint8, a quarter of the float bytes to
    hash and send) and `pixel_table` float32 [3, 256] the processor's value of each 8-bit value
    of each channel (patches are HWC: a value's channel is its column mod 3); `float_pixels()`
    gives the float32 values. Otherwise (the processor's own path) they are float32 values.
    video: the same per sampled frame, stacked: [F, P, D] and [F, P, 2]; `timestamps` in seconds.
    audio: `features` float32 [T, F] and `feature_mask` bool [T], as the feature extractor gives.
    `arrays` holds the same arrays by name (read-only), ready for a message's array frames.
    """

    kind: str
    content_hash: str
    num_soft_tokens: int
    placeholder_text: str
    budget: int | None = None
    pixel_values: np.ndarray | None = None
    position_ids: np.ndarray | None = None
    pixel_table: np.ndarray | None = None
    features: np.ndarray | None = None
    feature_mask: np.ndarray | None = None
    frame_indices: tuple[int, ...] = ()
    timestamps: tuple[float, ...] = ()
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)

    def float_pixels(self) -> np.ndarray | None:
        """The pixel values as float32, what the processor gives (looked up when they are 8-bit)."""
        if self.pixel_table is None or self.pixel_values is None:
            return self.pixel_values
        return pixel_lookup(self.pixel_values, self.pixel_table)


def pixel_lookup(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 [..., D] HWC patch values -> float32 through `table` [3, 256] (a value's channel: its column mod 3)."""
    channel = (np.arange(codes.shape[-1]) % 3) * 256
    return table.reshape(-1)[codes.astype(np.intp) + channel]


def _content_hash(kind: str, budget: int | None, text: str, arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(f"{kind}|{budget}|{text}".encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a)  # its buffer: the bytes `tobytes()` would copy out
    return h.hexdigest()


def _media(kind: str, budget: int | None, n: int, text: str, **kw: Any) -> ProcessedMedia:
    arrays = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    for a in arrays.values():
        a.setflags(write=False)
    return ProcessedMedia(kind=kind, content_hash=_content_hash(kind, budget, text, arrays), num_soft_tokens=n,
                          placeholder_text=text, budget=budget, arrays=arrays, **kw)


# ---------------------------------------------------------------- getting the bytes


def parse_data_uri(url: str, max_bytes: int, param: str = "url") -> tuple[str, bytes]:
    """`data:<mime>;base64,<payload>` -> (mime, bytes); strict base64, size checked before decoding."""
    if not url[:5].lower() == "data:":
        raise MediaError(param, "not a data URL (it must start with 'data:')")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError(param, "data URL has no ',' before its payload")
    parts = [p.strip() for p in header.split(";")]
    if parts[-1].lower() != "base64":
        raise MediaError(param, "data URL must be base64-encoded (';base64,')")
    mime = parts[0].lower() if len(parts) > 1 and parts[0] else "application/octet-stream"
    estimate = len(payload) // 4 * 3 - payload[-2:].count("=") if len(payload) % 4 == 0 else len(payload) * 3 // 4
    if estimate > max_bytes:
        raise MediaError(param, f"base64 payload of {estimate} bytes exceeds the limit of {max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(param, f"data URL payload is not valid base64 ({exc})") from None
    if not data:
        raise MediaError(param, "data URL payload is empty")
    return mime, data


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: the caller allow-listed this host, not wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed", headers, fp)


def fetch_url(url: str, max_bytes: int, timeout_s: float, param: str = "url") -> tuple[str, bytes]:
    """GET an http(s) URL -> (mime, bytes): streamed with a byte cap and an overall deadline."""
    if not url.lower().startswith(("http://", "https://")):
        raise MediaError(param, "only http and https URLs can be fetched")
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers={"User-Agent": "tandem-media/1"})
    deadline = time.monotonic() + timeout_s
    try:
        with opener.open(request, timeout=timeout_s) as resp:
            declared = resp.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise MediaError(param, f"URL content of {declared} bytes exceeds the limit of {max_bytes}")
            chunks, total = [], 0
            while chunk := resp.read(64 * 1024):
                total += len(chunk)
                if total > max_bytes:
                    raise MediaError(param, f"URL content exceeds the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise MediaError(param, f"fetching the URL took longer than {timeout_s:g} s")
                chunks.append(chunk)
            mime = (resp.headers.get_content_type() or "application/octet-stream").lower()
    except MediaError:
        raise
    except urllib.error.HTTPError as exc:
        raise MediaError(param, f"fetching the URL failed: HTTP {exc.code} {exc.reason}") from None
    except (TimeoutError, OSError) as exc:  # URLError and socket timeouts are OSErrors
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise MediaError(param, f"fetching the URL took longer than {timeout_s:g} s") from None
        raise MediaError(param, f"fetching the URL failed: {reason}") from None
    if not chunks:
        raise MediaError(param, "URL returned no content")
    return mime, b"".join(chunks)


# ---------------------------------------------------------------- images


def _probe_image(data: bytes, param: str) -> tuple[str, int, int]:
    """(format, width, height) from the header alone, through PIL's own format plugins.

    `Image.open` would also do this, but it raises a decompression-bomb error for huge sizes
    without telling the size; opening through the plugin registry reads only the header.
    """
    Image.init()
    prefix = data[:16]
    for fmt in IMAGE_FORMATS:
        if fmt not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[fmt]
        if accept and not accept(prefix):
            continue
        try:
            probe = factory(io.BytesIO(data), "")
        except (SyntaxError, OSError, ValueError, IndexError, TypeError, EOFError):
            continue
        return fmt, probe.size[0], probe.size[1]
    raise MediaError(param, _NOT_AN_IMAGE)


def decode_image(data: bytes, limits: MediaLimits, param: str = "image") -> Image.Image:
    """Bytes -> a loaded PIL image, size-checked from the header before any pixel is decoded."""
    if len(data) > limits.max_item_bytes:
        raise MediaError(param, f"image of {len(data)} bytes exceeds the limit of {limits.max_item_bytes}")
    _, width, height = _probe_image(data, param)
    if width * height > limits.max_image_pixels:
        raise MediaError(param, f"image is {width}x{height} pixels; at most {limits.max_image_pixels} pixels")
    if width < 1 or height < 1:
        raise MediaError(param, f"image is {width}x{height} pixels; it must not be empty")
    # PIL warns past MAX_IMAGE_PIXELS (and raises past twice that); refused here from the header, as
    # a warnings filter would be process-wide state, which images decoded side by side would race on.
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise MediaError(param, f"image is {width}x{height} pixels, past PIL's decompression-bomb limit")
    try:
        # only the formats this Pillow registers (Pillow 13 has no separate MPO plugin: naming it is a KeyError)
        image = Image.open(io.BytesIO(data), formats=[f for f in IMAGE_FORMATS if f in Image.OPEN])
        image.load()
    except Image.DecompressionBombError:
        raise MediaError(param, f"image is {width}x{height} pixels, past PIL's decompression-bomb limit") from None
    except Image.UnidentifiedImageError:
        raise MediaError(param, _NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            raise MediaError(param, "image data is truncated") from None
        raise MediaError(param, f"image could not be decoded: {exc}") from None
    return image


def merge_patches(patches: np.ndarray, positions: np.ndarray, patch_size: int, k: int,
                  grid_w: int, grid_h: int) -> tuple[np.ndarray, np.ndarray]:
    """k x k groups of p-px patches (row-major, HWC inside) -> (k*p)-px patches, as the unified
    family's `patches_merge`: merged patches row-major over the k-blocks, each the HWC block."""
    blocks = patches.reshape(grid_h // k, k, grid_w // k, k, patch_size, patch_size, 3)
    merged = blocks.transpose(0, 2, 1, 4, 3, 5, 6).reshape((grid_h // k) * (grid_w // k), -1)
    merged_pos = positions.reshape(grid_h // k, k, grid_w // k, k, 2)[:, 0, :, 0, :] // k
    return merged, merged_pos.reshape(-1, 2)


# ---------------------------------------------------------------- the processor


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


STRIP_MIN_PIXELS = 512 * 512  # images smaller than this resize in one call: strips would cost more than they save


def _bands(length: int, parts: int) -> list[tuple[int, int]]:
    edges = [length * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def resize_in_strips(pil: Image.Image, size: tuple[int, int], resample: int, pool: Executor | None,
                     strips: int) -> Image.Image:
    """`pil.resize(size, resample=resample)` bit for bit, its passes cut into `strips` bands run on `pool`.

    Pillow resizes in two separable passes, horizontal then vertical, through an 8-bit image
    between them; each output row of the first pass depends on its input row alone, each output
    column of the second on its input column alone, and the filter coefficients on the sizes
    alone. So the first pass over bands of rows and the second over bands of columns, each a
    resize of one dimension only, put side by side, are the same pixels; a resize releases the GIL.
    """
    width, height = size
    if pool is None or strips < 2 or pil.mode != "RGB" or pil.width * pil.height < STRIP_MIN_PIXELS:
        return pil.resize(size, resample=resample)

    def rows(band: tuple[int, int]) -> np.ndarray:  # the horizontal pass over input rows [a, b)
        return np.asarray(pil.crop((0, band[0], pil.width, band[1])).resize((width, band[1] - band[0]),
                                                                          resample=resample))

    mid = pil if width == pil.width else Image.fromarray(np.concatenate(list(pool.map(rows, _bands(pil.height, strips)))))
    if height == mid.height:
        return mid

    def columns(band: tuple[int, int]) -> np.ndarray:  # the vertical pass over columns [a, b)
        return np.asarray(mid.crop((band[0], 0, band[1], mid.height)).resize((band[1] - band[0], height),
                                                                           resample=resample))

    return Image.fromarray(np.concatenate(list(pool.map(columns, _bands(width, strips))), axis=1))


class MediaProcessor:
    """The family's image processor and feature extractor, loaded from a checkpoint directory.

    With `resize_threads` > 1 it owns a pool on which an image's resize runs in that many strips
    (`resize_in_strips`); `close` shuts it down."""

    def __init__(self, checkpoint_dir: str | Path, limits: MediaLimits, default_image_budget: int | None = None,
                 resize_threads: int = 0):
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        root = Path(checkpoint_dir)
        self.limits = limits
        self.resize_strips = resize_threads
        self.resize_pool = ThreadPoolExecutor(resize_threads, thread_name_prefix="resize") if resize_threads > 1 else None
        model_type = str(_load_json(root / "config.json").get("model_type", "gemma4"))
        self.unified = model_type.startswith("gemma4_unified")
        cfg = _load_json(root / "processor_config.json")
        image_cfg = {k: v for k, v in cfg.get("image_processor", {}).items() if not k.endswith("_type")}
        video_cfg = {k: v for k, v in cfg.get("video_processor", {}).items() if not k.endswith("_type")}
        fe_cfg = {k: v for k, v in cfg.get("feature_extractor", {}).items() if not k.endswith("_type")}
        self.images = Gemma4ImageProcessorPil(**image_cfg)
        if self.unified:
            from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
                Gemma4UnifiedAudioFeatureExtractor as FeatureExtractor)
        else:
            from transformers.models.gemma4.feature_extraction_gemma4 import (
                Gemma4AudioFeatureExtractor as FeatureExtractor)
        self.audio_features = FeatureExtractor(**fe_cfg)
        self.audio_seq_length = int(cfg.get("audio_seq_length", 750))
        # The video processor's own settings (class defaults of Gemma4VideoProcessor where absent).
        self.video_frames = int(video_cfg.get("num_frames", 32))
        self.video_budget = int(video_cfg.get("max_soft_tokens", 70))
        self.video_image_kwargs = {k: video_cfg[k] for k in ("patch_size", "pooling_kernel_size", "do_rescale",
                                                             "rescale_factor", "do_convert_rgb") if k in video_cfg}
        tok_cfg = _load_json(root / "tokenizer_config.json")
        self.tokens = {k: tok_cfg.get(k) or v for k, v in _GEMMA4_TOKENS.items()}
        self.default_image_budget = self.check_budget(
            default_image_budget if default_image_budget is not None else int(self.images.max_soft_tokens),
            "default_image_budget")

    def close(self) -> None:
        if self.resize_pool is not None:
            self.resize_pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def check_budget(budget: int, param: str = "budget") -> int:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget not in SUPPORTED_BUDGETS:
            raise MediaError(param, f"vision token budget {budget!r} is not one of {list(SUPPORTED_BUDGETS)}")
        return budget

    def _patches(self, pil: Image.Image, budget: int, param: str,
                 **kwargs: Any) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
        """Real (unpadded) patches, their (x, y) positions, the soft-token count of one image and
        the value table of 8-bit patches (None: the patches are float32 values)."""
        cfg = {name: kwargs.get(name, getattr(self.images, name)) for name in _IMAGE_SETTINGS}
        p, k = int(cfg["patch_size"]), int(cfg["pooling_kernel_size"])
        try:
            if cfg["do_convert_rgb"]:
                patches, pos = self._rgb_patches(pil, budget, cfg)
                table = self._value_table(cfg)
            else:
                (patches, pos), table = self._processor_patches(pil, budget, kwargs), None
        except ValueError as exc:  # e.g. an aspect ratio no patch grid of this budget can hold
            raise MediaError(param, f"image of {pil.width}x{pil.height} pixels cannot be patchified: {exc}") from None
        n = len(patches) // (k * k)
        if self.unified:
            grid_w, grid_h = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
            patches, pos = merge_patches(patches, pos, p, k, grid_w, grid_h)
        return np.ascontiguousarray(patches), np.ascontiguousarray(pos, dtype=np.int32), n, table

    def _rgb_patches(self, pil: Image.Image, budget: int, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """`Gemma4ImageProcessorPil`'s steps for an image it converts to RGB, without its copies,
        up to its 8-bit values: uint8 patches and their positions.

        The processor turns the decoded image into an array and back into a PIL image before
        resizing it, rescales through a float64 copy, and pads to the budget (padding dropped
        again here). This resizes the decoded image itself by the same PIL call at the same size
        (transformers' own size rule) and keeps its 8-bit values: since rescale and normalize map
        each 8-bit value of a channel on its own, `_value_table` (made by the processor's own
        `rescale` / `normalize`) gives the same float32 values bit for bit, looked up where
        they are needed (the encoder's device).
        """
        from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

        if "A" in pil.getbands() or pil.info.get("transparency") is not None:  # as transformers' convert_to_rgb
            white = Image.new("RGBA", pil.size, (255, 255, 255, 255))
            pil = Image.alpha_composite(white, pil.convert("RGBA")).convert("RGB")
        elif pil.mode != "RGB":
            pil = pil.convert("RGB")
        p = int(cfg["patch_size"])
        if cfg["do_resize"]:
            k = int(cfg["pooling_kernel_size"])
            height, width = get_aspect_ratio_preserving_size(pil.height, pil.width, p, budget * k * k, k)
            if (height, width) != (pil.height, pil.width):
                pil = resize_in_strips(pil, (width, height), cfg["resample"], self.resize_pool, self.resize_strips)
        grid_h, grid_w = pil.height // p, pil.width // p
        # (patch row, patch column, y, x, channel): patches row-major, each HWC, as `convert_image_to_patches`
        blocks = np.asarray(pil).reshape(grid_h, p, grid_w, p, 3).transpose(0, 2, 1, 3, 4)
        xs, ys = np.meshgrid(np.arange(grid_w, dtype=np.int32), np.arange(grid_h, dtype=np.int32))
        return blocks.reshape(grid_h * grid_w, -1), np.stack([xs, ys], axis=-1).reshape(-1, 2)

    def _value_table(self, cfg: Mapping[str, Any]) -> np.ndarray:
        """float32 [3, 256]: each 8-bit value of each channel after the processor's rescale and normalize."""
        values = np.tile(np.arange(256, dtype=np.uint8), (3, 1, 1))  # a 3 x 1 x 256 (CHW) image of every value
        if cfg["do_rescale"]:
            values = self.images.rescale(values, cfg["rescale_factor"])
        if cfg["do_normalize"]:
            values = self.images.normalize(values, cfg["image_mean"], cfg["image_std"])
        return np.asarray(values[:, 0], dtype=np.float32)

    def _processor_patches(self, pil: Image.Image, budget: int,
                           kwargs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Through transformers' processor itself: an image kept in its own mode (no RGB conversion)."""
        out = self.images([pil], max_soft_tokens=budget, return_tensors="np", **kwargs)
        pos = out["image_position_ids"][0]
        real = int((pos[:, 0] >= 0).sum())
        return out["pixel_values"][0][:real].astype(np.float32), pos[:real].astype(np.int32)

    def _image_text(self, n: int, token: str) -> str:
        return f"{self.tokens['boi_token']}{token * n}{self.tokens['eoi_token']}"

    def image(self, data: bytes, budget: int | None = None, param: str = "image") -> ProcessedMedia:
        """Encoded image bytes -> patches at `budget` soft tokens (None: the server default)."""
        budget = self.default_image_budget if budget is None else self.check_budget(budget, param)
        pil = decode_image(data, self.limits, param)
        pixel_values, position_ids, n, table = self._patches(pil, budget, param)
        return _media("image", budget, n, self._image_text(n, self.tokens["image_token"]),
                      pixel_values=pixel_values, position_ids=position_ids, pixel_table=table)

    def audio(self, data: bytes, param: str = "audio") -> ProcessedMedia:
        """Encoded audio (wav, flac, ogg, mp3: whatever libsndfile reads) -> 16 kHz mono features."""
        wave = decode_audio(data, self.limits, param)
        out = self.audio_features([wave], sampling_rate=AUDIO_RATE, return_tensors="np")
        features = np.ascontiguousarray(out["input_features"][0], dtype=np.float32)
        mask = np.ascontiguousarray(out["input_features_mask"][0], dtype=bool)
        n = int(mask.sum()) if self.unified else audio_soft_tokens(mask)
        if n == 0:  # a few samples give no feature frame: nothing for the encoder to encode
            raise MediaError(param, f"audio is too short ({wave.shape[0] / AUDIO_RATE * 1000:.1f} ms); "
                                    "it gives no audio tokens")
        text = f"{self.tokens['boa_token']}{self.tokens['audio_token'] * n}{self.tokens['eoa_token']}"
        return _media("audio", None, n, text, features=features, feature_mask=mask)

    def video(self, data: bytes, budget: int | None = None, param: str = "video") -> ProcessedMedia:
        """Encoded video -> sampled frames (module docstring's policy), each patchified at `budget`."""
        budget = self.video_budget if budget is None else self.check_budget(budget, param)
        frames, indices, fps = decode_video(data, self.limits, self.video_frames, param)
        done = [self._patches(frame, budget, param, **self.video_image_kwargs) for frame in frames]
        per_frame = done[0][2]
        timestamps = tuple(i / fps for i in indices)
        body = self._image_text(per_frame, self.tokens["video_token"])
        text = " ".join(f"{int(t // 60):02d}:{int(t % 60):02d} {body}" for t in timestamps)
        return _media("video", budget, per_frame * len(frames), text,
                      pixel_values=np.stack([d[0] for d in done]), position_ids=np.stack([d[1] for d in done]),
                      pixel_table=done[0][3], frame_indices=tuple(indices), timestamps=timestamps)


def audio_soft_tokens(mask: np.ndarray) -> int:
    """Gemma 4 audio soft tokens: the feature mask through two stride-2 convolutions (k 3, pad 1)."""
    for _ in range(2):
        t_out = (len(mask) + 2 - 3) // 2 + 1
        mask = mask[::2][:t_out]
    return int(mask.sum())


def decode_audio(data: bytes, limits: MediaLimits, param: str = "audio") -> np.ndarray:
    """Bytes -> float32 mono waveform at 16 kHz (channels averaged, polyphase resampling)."""
    import soundfile
    from scipy.signal import resample_poly

    if len(data) > limits.max_item_bytes:
        raise MediaError(param, f"audio of {len(data)} bytes exceeds the limit of {limits.max_item_bytes}")
    try:
        info = soundfile.info(io.BytesIO(data))
        if info.samplerate > 0 and info.frames > 0 and info.frames / info.samplerate > limits.max_audio_seconds:
            raise MediaError(param, f"audio is {info.frames / info.samplerate:.1f} s long; "
                                    f"at most {limits.max_audio_seconds:g} s")
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except MediaError:
        raise
    except Exception as exc:  # libsndfile reports every malformed input as its own error type
        reason = getattr(exc, "error_string", None) or str(exc)  # libsndfile's own words, no object repr
        raise MediaError(param, f"audio could not be decoded: {reason}") from None
    if wave.shape[0] == 0:
        raise MediaError(param, "audio has no samples")
    if wave.shape[0] / rate > limits.max_audio_seconds:
        raise MediaError(param, f"audio is {wave.shape[0] / rate:.1f} s long; at most {limits.max_audio_seconds:g} s")
    mono = wave.mean(axis=1)
    if rate != AUDIO_RATE:
        g = math.gcd(int(rate), AUDIO_RATE)
        mono = resample_poly(mono, AUDIO_RATE // g, int(rate) // g).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def sample_frame_indices(total: int, max_frames: int) -> list[int]:
    """Uniform sampling as transformers' `default_sample_indices_fn`, capped at the stream's frames."""
    n = min(max_frames, total)
    return [i * total // n for i in range(n)]


def decode_video(data: bytes, limits: MediaLimits, max_frames: int,
                 param: str = "video") -> tuple[list[Image.Image], list[int], float]:
    """Bytes -> (sampled RGB frames, their indices, fps): duration and frame count checked first."""
    import av

    if len(data) > limits.max_item_bytes:
        raise MediaError(param, f"video of {len(data)} bytes exceeds the limit of {limits.max_item_bytes}")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError(param, "video has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 24.0  # transformers' fallback when fps is unknown
            seconds = float(stream.duration * stream.time_base) if stream.duration else (
                container.duration / 1e6 if container.duration else 0.0)
            if seconds > limits.max_video_seconds:
                raise MediaError(param, f"video is {seconds:.1f} s long; at most {limits.max_video_seconds:g} s")
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if total > limits.max_video_frames:
            raise MediaError(param, f"video has {total} frames; at most {limits.max_video_frames}")
        if total == 0:
            raise MediaError(param, "video has no frames")
        indices = sample_frame_indices(total, max_frames)
        wanted, frames = set(indices), []
        with av.open(io.BytesIO(data), mode="r") as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames.append(frame.to_image())
                if i >= indices[-1]:
                    break
    except MediaError:
        raise
    except Exception as exc:  # PyAV raises FFmpeg's error classes for malformed input
        raise MediaError(param, f"video could not be decoded: {exc}") from None
    if len(frames) != len(indices):
        raise MediaError(param, f"video ended after fewer frames than its header declares ({total})")
    return frames, indices, fps

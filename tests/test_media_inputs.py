"""actors/media_inputs.py against transformers 5.23's Gemma 4 processors.

The reference is transformers' own `Gemma4Processor` / `Gemma4UnifiedProcessor` built from the
checkpoint's processor config. `AutoProcessor` cannot load here: it also builds the video
processor, which needs torchvision (not installable beside the CPU torch build), so the
reference is constructed with no video processor; every other line of it is transformers'.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import struct
import sys
import threading
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.media_inputs import (_IMAGE_SETTINGS, MediaError, MediaLimits, MediaProcessor, fetch_url, merge_patches,
                                 parse_data_uri, pixel_lookup, sample_frame_indices)

CHECKPOINT = Path(__file__).resolve().parents[1] / "default_model" / "checkpoint"
BUDGETS = (70, 140, 280, 560, 1120)


def _without_video(cls):
    """The processor class, minus its check that a torchvision video processor was given."""
    class NoVideo(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)
    return NoVideo


def _reference(checkpoint: Path, unified: bool):
    from transformers import AutoTokenizer
    from transformers.models.gemma4 import Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor)
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

    cfg = json.loads((checkpoint / "processor_config.json").read_text())
    strip = lambda d: {k: v for k, v in d.items() if not k.endswith("_type")}  # noqa: E731
    images = Gemma4ImageProcessorPil(**strip(cfg["image_processor"]))
    fe_cls = Gemma4UnifiedAudioFeatureExtractor if unified else Gemma4AudioFeatureExtractor
    features = fe_cls(**strip(cfg["feature_extractor"]))
    proc_cls = _without_video(Gemma4UnifiedProcessor if unified else Gemma4Processor)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    return proc_cls(feature_extractor=features, image_processor=images, tokenizer=tokenizer, video_processor=None,
                    audio_seq_length=cfg.get("audio_seq_length", 750))


@pytest.fixture(scope="module")
def gemma4():
    return MediaProcessor(CHECKPOINT, MediaLimits()), _reference(CHECKPOINT, unified=False)


@pytest.fixture(scope="module")
def unified(tmp_path_factory):
    """A tiny random unified checkpoint; it has no processor files, so the classes' defaults are written."""
    from gemma4_model.random_checkpoint import save_tiny_checkpoint
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor)

    path = save_tiny_checkpoint("12b_unified", tmp_path_factory.mktemp("unified"))
    assert not (path / "processor_config.json").exists()
    fe = Gemma4UnifiedAudioFeatureExtractor().to_dict()
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4UnifiedProcessor",
        "image_processor": {"image_processor_type": "Gemma4UnifiedImageProcessor", "patch_size": 16,
                            "max_soft_tokens": 280, "pooling_kernel_size": 3},
        "feature_extractor": fe}))
    return MediaProcessor(path, MediaLimits()), _reference(path, unified=True)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _photo(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    rgb = np.clip(rgb.astype(int) + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        image.putalpha(Image.fromarray((xx * 255 // w).astype(np.uint8)))
    image = image.convert(mode)
    if mode == "P":
        image.info["transparency"] = 0  # a palette entry drawn as transparent: composited on white
    return image


def _wav(wave: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    import soundfile
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt)
    return buf.getvalue()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- images against transformers


@pytest.mark.parametrize("fmt,mode,size", [("PNG", "RGB", (100, 150)), ("JPEG", "RGB", (333, 217)),
                                           ("PNG", "RGBA", (64, 300)), ("PNG", "L", (480, 640)),
                                           ("JPEG", "RGB", (720, 1280)), ("GIF", "P", (90, 140)),
                                           ("PNG", "LA", (50, 70)), ("JPEG", "CMYK", (120, 90)),
                                           ("PNG", "RGB", (384, 384)), ("PNG", "RGB", (20, 2000))])
def test_image_matches_gemma4_processor(gemma4, fmt, mode, size):
    ours, ref = gemma4
    data = _encode(_photo(*size, mode=mode), fmt)
    for budget in BUDGETS:
        got = ours.image(data, budget)
        want = ref(text="look: <|image|>", images=[Image.open(io.BytesIO(data))], max_soft_tokens=budget,
                   return_tensors="np")
        pv, pos = want["pixel_values"][0], want["image_position_ids"][0]
        real = got.pixel_values.shape[0]
        # RGB (RGBA / grayscale converted): the 8-bit values and their table, a quarter of the bytes
        assert got.pixel_values.dtype == np.uint8 and got.pixel_table.shape == (3, 256)
        assert got.float_pixels().dtype == np.float32 and got.position_ids.dtype == np.int32
        assert got.pixel_values.shape[1] == 16 * 16 * 3
        np.testing.assert_array_equal(got.float_pixels(), pv[:real])
        np.testing.assert_array_equal(got.position_ids, pos[:real])
        assert (pos[real:] == -1).all() and (pv[real:] == 0).all()  # only the padding was left out
        assert got.num_soft_tokens == real // 9 <= budget
        # The prompt: transformers' expansion of the placeholder is exactly ours.
        assert want["input_ids"][0].tolist() == _ids(ref.tokenizer, "look: " + got.placeholder_text)
        ids = _ids(ref.tokenizer, got.placeholder_text)
        assert ids == [ref.tokenizer.convert_tokens_to_ids("<|image>")] + [ref.image_token_id] * got.num_soft_tokens \
            + [ref.tokenizer.convert_tokens_to_ids("<image|>")]


def test_patches_follow_the_processor_settings(gemma4):
    """The direct patch path against transformers' processor itself, for settings the Gemma 4 config
    leaves at rest: per-channel normalize, no rescale, another resample filter, a video's patch size."""
    ours, _ = gemma4
    pil = _photo(170, 230)
    for overrides in ({}, {"do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.45]},
                      {"do_rescale": False}, {"resample": Image.Resampling.BILINEAR}, {"patch_size": 8}):
        cfg = {name: overrides.get(name, getattr(ours.images, name)) for name in _IMAGE_SETTINGS}
        for budget in (70, 280):
            got, want = ours._rgb_patches(pil, budget, cfg), ours._processor_patches(pil, budget, overrides)
            assert got[0].dtype == np.uint8 and want[0].dtype == np.float32
            values = pixel_lookup(got[0], ours._value_table(cfg))
            np.testing.assert_array_equal(values.view(np.uint32), want[0].view(np.uint32))  # bit for bit
            np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("resample", [Image.BICUBIC, Image.BILINEAR, Image.LANCZOS])
def test_resize_in_strips_is_pillows_resize_bit_for_bit(resample):
    """Both passes cut into bands (up, down, one dimension only, ragged band counts) give the
    very pixels of one resize call."""
    from concurrent.futures import ThreadPoolExecutor

    from actors.media_inputs import resize_in_strips

    rng = np.random.default_rng(3)
    with ThreadPoolExecutor(3) as pool:
        for (h, w), (out_w, out_h), strips in [((720, 1280), (960, 672), 4), ((1080, 1920), (1344, 768), 3),
                                               ((600, 800), (1000, 750), 5), ((700, 900), (900, 448), 4),
                                               ((640, 1024), (512, 640), 7), ((513, 777), (777, 300), 2)]:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            got = resize_in_strips(image, (out_w, out_h), resample, pool, strips)
            assert got.size == (out_w, out_h)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(image.resize((out_w, out_h), resample=resample)))


def test_resize_threads_give_the_same_patches_and_hash(gemma4):
    ours, _ = gemma4
    threaded = MediaProcessor(CHECKPOINT, MediaLimits(), resize_threads=4)
    try:
        data = _encode(_photo(720, 1280), "JPEG")
        for budget in (70, 280, 1120):
            a, b = ours.image(data, budget), threaded.image(data, budget)
            assert a.content_hash == b.content_hash
            np.testing.assert_array_equal(a.pixel_values, b.pixel_values)
    finally:
        threaded.close()
    assert threaded.resize_pool._shutdown


def test_image_default_budget_and_hash(gemma4):
    ours, _ = gemma4
    data = _encode(_photo(120, 90), "PNG")
    assert ours.default_image_budget == 70  # the checkpoint's processor config
    assert ours.image(data).budget == 70
    assert MediaProcessor(CHECKPOINT, MediaLimits(), default_image_budget=560).image(data).budget == 560
    a, b = ours.image(data, 280), ours.image(_encode(Image.open(io.BytesIO(data)), "PNG"), 280)
    assert a.content_hash == b.content_hash and len(a.content_hash) == 64
    assert ours.image(data, 560).content_hash != a.content_hash
    assert ours.image(_encode(_photo(120, 90, seed=1), "PNG"), 280).content_hash != a.content_hash
    with pytest.raises(ValueError):
        a.pixel_values[0, 0] = 1  # arrays are read-only
    # The key is this function of the content (a prefix-cache key: it must not drift between versions):
    # the 8-bit values with their table give the float values exactly.
    h = hashlib.sha256(f"image|280|{a.placeholder_text}".encode())
    for name in ("pixel_table", "pixel_values", "position_ids"):
        arr = getattr(a, name)
        h.update(f"|{name}|{arr.dtype.str}|{arr.shape}|".encode() + arr.tobytes())
    assert a.content_hash == h.hexdigest()


def test_unified_image_counts_and_merge(unified):
    ours, ref = unified
    data = _encode(_photo(200, 300), "PNG")
    sizes = ref._get_num_multimodal_tokens(image_sizes=[(200, 300)], max_soft_tokens=280)
    got = ours.image(data, 280)
    assert got.num_soft_tokens == sizes["num_image_tokens"][0] == got.pixel_values.shape[0]
    assert got.pixel_values.shape[1] == 48 * 48 * 3
    flat = MediaProcessor(CHECKPOINT, MediaLimits()).image(data, 280)  # 16-px patches, same resize
    torch_merge = _unified_patches_merge()
    k_ref, pos_ref = torch_merge(_t(flat.float_pixels())[None], _t(flat.position_ids).long()[None], got.num_soft_tokens)
    np.testing.assert_array_equal(got.float_pixels(), k_ref[0].numpy())
    np.testing.assert_array_equal(got.position_ids, pos_ref[0].numpy())
    assert _ids(ref.tokenizer, got.placeholder_text).count(ref.image_token_id) == got.num_soft_tokens


def _t(a):
    import torch
    return torch.from_numpy(np.array(a))


def _unified_patches_merge():
    """transformers' `patches_merge` (pure torch); its module imports torchvision only for resize."""
    fake = {name: types.ModuleType(name) for name in
            ("torchvision", "torchvision.transforms", "torchvision.transforms.v2", "torchvision.transforms.v2.functional")}
    fake["torchvision.transforms.v2.functional"].InterpolationMode = type("InterpolationMode", (), {})
    saved = {name: sys.modules.get(name) for name in fake}
    mod_name = "transformers.models.gemma4_unified.image_processing_gemma4_unified"
    try:
        sys.modules.update(fake)
        sys.modules.pop(mod_name, None)
        import importlib
        return importlib.import_module(mod_name).patches_merge
    finally:
        sys.modules.pop(mod_name, None)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_merge_patches_layout():
    # 2x2 blocks of 1-px "patches" on a 4x2 grid: each merged patch is its 2x2 HWC block.
    image = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    patches = image.reshape(8, 3)
    pos = np.array([(x, y) for y in range(2) for x in range(4)], dtype=np.int32)
    merged, mpos = merge_patches(patches, pos, 1, 2, 4, 2)
    np.testing.assert_array_equal(merged[1], image[0:2, 2:4].reshape(-1))
    np.testing.assert_array_equal(mpos, [[0, 0], [1, 0]])


# ---------------------------------------------------------------- image errors


def _png_header(width: int, height: int) -> bytes:
    """A tiny valid PNG declaring width x height (one empty IDAT): nothing of that size exists."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_image_errors(gemma4):
    ours, _ = gemma4
    png = _encode(_photo(64, 64), "PNG")
    cases = [
        (png[: len(png) // 2], "image data is truncated"),
        (np.random.default_rng(0).bytes(5000), "bytes are not an image (PNG, JPEG, GIF, WebP, BMP or TIFF)"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "bytes are not an image"),  # EPS refused
        (_png_header(20000, 20000), f"image is 20000x20000 pixels; at most {MediaLimits().max_image_pixels} pixels"),
    ]
    for data, message in cases:
        with pytest.raises(MediaError) as err:
            ours.image(data, 70, param="messages[0].content[1]")
        assert err.value.param == "messages[0].content[1]"
        assert str(err.value).startswith(message), str(err.value)
    for budget in (0, 100, 2240, True):
        with pytest.raises(MediaError, match=r"vision token budget .* is not one of \[70, 140, 280, 560, 1120\]"):
            ours.image(png, budget)
    with pytest.raises(MediaError, match="vision token budget 99 is not one of") as err:
        MediaProcessor(CHECKPOINT, MediaLimits(), default_image_budget=99)
    assert err.value.param == "default_image_budget"
    roomy = MediaProcessor(CHECKPOINT, MediaLimits(max_image_pixels=10**9))
    with pytest.raises(MediaError, match="image is 10000x10000 pixels, past PIL's decompression-bomb limit"):
        roomy.image(_png_header(10000, 10000))
    small = MediaProcessor(CHECKPOINT, MediaLimits(max_image_pixels=4000, max_item_bytes=10_000))
    with pytest.raises(MediaError, match="image is 64x64 pixels; at most 4000 pixels"):
        small.image(png)
    with pytest.raises(MediaError, match="exceeds the limit of 10000"):
        small.image(_encode(_photo(200, 200), "PNG"))


def test_prompt_counts():
    limits = MediaLimits(max_images=2, max_audios=1, max_videos=0)
    limits.check_counts(images=2, audios=1)
    with pytest.raises(MediaError, match="3 image items in one prompt; at most 2 allowed"):
        limits.check_counts(images=3)
    with pytest.raises(MediaError, match="1 video items in one prompt; at most 0 allowed"):
        limits.check_counts(videos=1, param="messages")


# ---------------------------------------------------------------- data URLs


def test_parse_data_uri():
    import base64
    data = b"\x89PNG" + bytes(range(200))
    assert parse_data_uri("data:image/png;base64," + base64.b64encode(data).decode(), 1000) == ("image/png", data)
    big = base64.b64encode(bytes(3000)).decode()
    with pytest.raises(MediaError, match="base64 payload of 3000 bytes exceeds the limit of 2999") as err:
        parse_data_uri("data:image/png;base64," + big, 2999, param="image_url")
    assert err.value.param == "image_url"
    for url, message in [("data:image/png;base64,abc$", "not valid base64"), ("data:image/png,abcd", "base64-encoded"),
                         ("http://x/y.png", "not a data URL"), ("data:image/png;base64", "no ','"),
                         ("data:image/png;base64,", "empty")]:
        with pytest.raises(MediaError, match=message):
            parse_data_uri(url, 1000)


# ---------------------------------------------------------------- audio


def test_audio_matches_gemma4_processor(gemma4):
    ours, ref = gemma4
    rng = np.random.default_rng(0)
    for seconds in (0.5, 1.37, 4.0):
        wave = (0.3 * np.sin(np.arange(int(16000 * seconds)) * 0.05) + 0.01 * rng.standard_normal(
            int(16000 * seconds))).astype(np.float32)
        got = ours.audio(_wav(wave, 16000, "WAV"))
        decoded = np.frombuffer(np.asarray(_read_wav(_wav(wave, 16000))), dtype=np.float32)
        want = ref(text="hear: <|audio|>", audio=[decoded], return_tensors="np")
        np.testing.assert_allclose(got.features, want["input_features"][0], rtol=0, atol=0)
        np.testing.assert_array_equal(got.feature_mask, want["input_features_mask"][0])
        assert got.features.shape[1] == 128 and got.feature_mask.dtype == bool
        assert want["input_ids"][0].tolist() == _ids(ref.tokenizer, "hear: " + got.placeholder_text)
        assert got.num_soft_tokens == ref._compute_audio_num_tokens(decoded, 16000)
        ids = _ids(ref.tokenizer, got.placeholder_text)
        assert ids == [ref.tokenizer.convert_tokens_to_ids("<|audio>")] + [ref.audio_token_id] * got.num_soft_tokens \
            + [ref.tokenizer.convert_tokens_to_ids("<audio|>")]


def _read_wav(data: bytes) -> np.ndarray:
    import soundfile
    return soundfile.read(io.BytesIO(data), dtype="float32")[0]


def test_unified_audio_matches_processor(unified):
    ours, ref = unified
    wave = (0.2 * np.sin(np.arange(23_000) * 0.01)).astype(np.float32)
    data = _wav(wave, 16000)
    got = ours.audio(data)
    want = ref(text="<|audio|>", audio=[_read_wav(data)], return_tensors="np")
    np.testing.assert_array_equal(got.features, want["input_features"][0])
    assert got.features.shape == (36, 640) and got.num_soft_tokens == 36 == ref._compute_audio_num_tokens(wave, 16000)
    assert want["input_ids"][0].tolist() == _ids(ref.tokenizer, got.placeholder_text)


def test_audio_resampled_to_16k_mono(gemma4):
    from actors.media_inputs import decode_audio
    t = np.arange(44100) / 44100
    left, right = np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t + 0.3)
    stereo = (0.5 * np.stack([left, right], 1)).astype(np.float32)
    mono = decode_audio(_wav(stereo, 44100, "WAV"), MediaLimits())
    assert mono.dtype == np.float32 and mono.shape == (16000,)
    ref = 0.25 * (np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) + np.sin(2 * np.pi * 440 * np.arange(16000) / 16000 + 0.3))
    np.testing.assert_allclose(mono[200:-200], ref[200:-200], atol=2e-3)  # edges: filter start-up
    flac = decode_audio(_wav(stereo, 44100, "FLAC"), MediaLimits())
    np.testing.assert_allclose(flac, mono, atol=1e-4)
    assert gemma4[0].audio(_wav(stereo, 44100)).num_soft_tokens == 25


def test_audio_errors(gemma4):
    ours, _ = gemma4
    with pytest.raises(MediaError, match="^audio could not be decoded: [A-Z]") as err:
        ours.audio(b"RIFF\x00\x00\x00\x00WAVEjunkjunk" + bytes(100), param="input_audio")
    assert err.value.param == "input_audio" and "BytesIO" not in str(err.value)
    with pytest.raises(MediaError, match="^audio could not be decoded"):
        ours.audio(_encode(_photo(10, 10), "PNG"))
    with pytest.raises(MediaError, match=r"audio is 31.0 s long; at most 30 s"):
        ours.audio(_wav(np.zeros(31 * 8000, np.float32), 8000))


# ---------------------------------------------------------------- video


def _video(frames: int, fps: int, size=(96, 128)) -> bytes:
    import av
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((*size, 3), (i * 5) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def test_video_frames_timestamps_and_layout(gemma4):
    ours, ref = gemma4
    got = ours.video(_video(frames=100, fps=10), budget=70)
    indices = [i * 100 // 32 for i in range(32)]
    assert got.frame_indices == tuple(indices) == tuple(sample_frame_indices(100, 32))
    assert got.timestamps == tuple(i / 10 for i in indices)
    # transformers' count for a frame (the video branch needs the torchvision processor; same formula)
    per_frame = ref._get_num_multimodal_tokens(image_sizes=[(96, 128)], max_soft_tokens=70)["num_image_tokens"][0]
    assert got.num_soft_tokens == 32 * per_frame
    assert got.pixel_values.shape == (32, per_frame * 9, 768) and got.position_ids.shape == (32, per_frame * 9, 2)
    body = "<|image>" + "<|video|>" * per_frame + "<image|>"
    assert got.placeholder_text.split(" ")[:4] == ["00:00", body, "00:00", body]
    assert got.placeholder_text.endswith("00:09 " + body)  # frame 96 at 9.6 s
    # brightness of the sampled frames follows the frame index (i * 5 gray levels)
    assert abs(float(got.float_pixels()[5].mean()) * 255 - indices[5] * 5) < 3
    short = ours.video(_video(frames=12, fps=24), budget=140)
    assert short.frame_indices == tuple(range(12))
    video_id = ref.tokenizer.convert_tokens_to_ids("<|video|>")
    assert _ids(ref.tokenizer, short.placeholder_text).count(video_id) == short.num_soft_tokens


def test_video_errors(gemma4):
    ours, _ = gemma4
    with pytest.raises(MediaError, match="^video could not be decoded"):
        ours.video(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    tight = MediaProcessor(CHECKPOINT, MediaLimits(max_video_seconds=2.0, max_video_frames=30))
    with pytest.raises(MediaError, match=r"video is 3.0 s long; at most 2 s"):
        tight.video(_video(frames=30, fps=10))
    with pytest.raises(MediaError, match="video has 40 frames; at most 30"):
        tight.video(_video(frames=40, fps=24))
    with pytest.raises(MediaError, match="vision token budget"):
        ours.video(_video(frames=4, fps=4), budget=71)


# ---------------------------------------------------------------- fetch_url


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/img.png":
            body = b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/chunked":  # no Content-Length: the cap applies while reading
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav; rate=16000")
            self.end_headers()
            self.wfile.write(b"y" * 300_000)
        elif self.path == "/slow":
            self.server.release.wait(5)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.2/elsewhere")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def test_fetch_url(server):
    assert fetch_url(server + "/img.png", 5000, 5) == ("image/png", b"x" * 5000)
    mime, body = fetch_url(server + "/chunked", 400_000, 5)
    assert mime == "audio/wav" and len(body) == 300_000
    with pytest.raises(MediaError, match="URL content of 5000 bytes exceeds the limit of 4999"):
        fetch_url(server + "/img.png", 4999, 5)
    with pytest.raises(MediaError, match="URL content exceeds the limit of 100000 bytes") as err:
        fetch_url(server + "/chunked", 100_000, 5, param="audio_url")
    assert err.value.param == "audio_url"
    with pytest.raises(MediaError, match="HTTP 404"):
        fetch_url(server + "/missing.png", 1000, 5)
    with pytest.raises(MediaError, match="longer than 0.5 s"):
        fetch_url(server + "/slow", 1000, 0.5)
    with pytest.raises(MediaError, match="HTTP 302 redirect to http://127.0.0.2/elsewhere not followed"):
        fetch_url(server + "/moved", 1000, 5)
    with pytest.raises(MediaError, match="only http and https"):
        fetch_url("file:///etc/passwd", 1000, 5)

"""Multimodal prefill against transformers 5.23: soft tokens from transformers' own encoders,
spliced by the engine over the prompt's placeholder ids, give the reference's logits and greedy
tokens (one chunk or many, with bidirectional image spans, audio, the prefix cache and
preemption); bad spans are refused."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import Gemma4UnifiedAudioFeatureExtractor

from gemma4_model.batch import ForwardBatch, SequenceChunk
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.media_span import (MediaSpan, MediaTokens, bidirectional_blocks, chunk_media, chunk_span_ids,
                                     page_extra_keys)
from gemma4_model.random_checkpoint import load_reference
from gemma4_model.sampling import SamplingParams

# Stand-ins for boi / eoi / boa / eoa: the tiny vocabulary (256) does not hold the real ids; the
# placeholder ids themselves stay the real (out-of-vocabulary) ones, as the reference swaps them
# for the pad id before any lookup.
BOI, EOI, BOA, EOA = 251, 252, 253, 254
NEW_TOKENS = 16
BIDIR = dict(use_bidirectional_attention="vision")


@dataclass
class Case:
    """One multimodal prompt: ids, our spans, and the reference's inputs for the same content."""

    ids: list[int]
    spans: list[MediaSpan]
    ref_inputs: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    loaded = {}

    def get(variant: str, **overrides):
        key = (variant, tuple(sorted(overrides.items())))
        if key not in loaded:
            path = tiny_checkpoint(variant, **overrides)
            config, model = load_text_decoder(path)
            loaded[key] = (config, model, load_reference(path, variant))
        return loaded[key]

    return get


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8))


def _pixels(ref, unified: bool, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values and patch positions for one image per seed, as the model family takes them."""
    if not unified:
        images = [_image(s, (40 + 8 * (s % 3), 60)) for s in seeds]
        out = Gemma4ImageProcessorPil(max_soft_tokens=70)(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_position_ids"]
    # The unified processor needs torchvision (absent here): merged 48x48 patches on a grid,
    # padded with (-1, -1) positions, are what its embedder reads.
    width = ref.config.vision_config.patch_size**2 * ref.config.vision_config.pooling_kernel_size**2 * 3
    grids = [(4 + s % 3, 5) for s in seeds]
    longest = max(h * w for h, w in grids)
    pixels = torch.zeros(len(seeds), longest, width)
    positions = torch.full((len(seeds), longest, 2), -1, dtype=torch.long)
    for i, (seed, (h, w)) in enumerate(zip(seeds, grids)):
        g = torch.Generator().manual_seed(seed)
        pixels[i, : h * w] = torch.rand(h * w, width, generator=g)
        positions[i, : h * w] = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1).reshape(-1, 2)
    return pixels, positions


@torch.no_grad()
def _image_tokens(ref, pixels, positions) -> list[torch.Tensor]:
    return [t.clone() for t in ref.model.get_image_features(pixels, positions).pooler_output]


@torch.no_grad()
def _audio(ref, seed: int) -> tuple[dict, torch.Tensor]:
    wave = np.random.RandomState(seed).randn(8000).astype(np.float32) * 0.1
    if ref.config.model_type.startswith("gemma4_unified"):  # raw waveform frames, no mel features
        frame = ref.config.audio_config.audio_embed_dim
        extractor = Gemma4UnifiedAudioFeatureExtractor(feature_size=frame, audio_samples_per_token=frame)
    else:
        extractor = Gemma4AudioFeatureExtractor()
    feats = extractor([wave], sampling_rate=16000, return_tensors="pt")
    out = ref.model.get_audio_features(feats["input_features"], feats["input_features_mask"])
    tokens = out.pooler_output[out.attention_mask]  # the reference's padding strip
    return dict(input_features=feats["input_features"], input_features_mask=feats["input_features_mask"]), tokens


def _text(seed: int, n: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _key(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(t.numpy().tobytes(), digest_size=16).digest()


def build_case(ref, config, image_seeds=(1,), audio_seed=None, text_seed=0, tail=5) -> Case:
    """text, then per image boi + placeholders + eoi and a little text, then audio, then text."""
    tokens = MediaTokens.from_special_tokens(config.special_tokens)
    unified = config.is_unified
    ids, spans, inputs = _text(text_seed, 5), [], {}
    if image_seeds:
        pixels, positions = _pixels(ref, unified, list(image_seeds))
        inputs.update(pixel_values=pixels, image_position_ids=positions)
        for i, soft in enumerate(_image_tokens(ref, pixels, positions)):
            ids.append(BOI)
            spans.append(MediaSpan(len(ids), soft, "image", _key(soft)))
            ids += [tokens.image] * soft.shape[0] + [EOI] + _text(text_seed + 10 + i, 4)
    if audio_seed is not None:
        audio_inputs, soft = _audio(ref, audio_seed)
        inputs.update(audio_inputs)
        ids.append(BOA)
        spans.append(MediaSpan(len(ids), soft, "audio", _key(soft)))
        ids += [tokens.audio] * soft.shape[0] + [EOA]
    ids += _text(text_seed + 99, tail)
    types = [1 if t == tokens.image else 3 if t == tokens.audio else 0 for t in ids]
    inputs["mm_token_type_ids"] = torch.tensor([types])
    return Case(ids, spans, inputs)


@torch.no_grad()
def reference_logits(ref, case: Case) -> torch.Tensor:
    return ref(input_ids=torch.tensor([case.ids]), use_cache=False, logits_to_keep=0, **case.ref_inputs).logits[0]


@torch.no_grad()
def reference_generate(ref, case: Case, n: int = NEW_TOKENS) -> list[int]:
    """`generate(do_sample=False)` on the same ids and media, EOS cleared (exactly n tokens)."""
    saved = ref.generation_config
    gen = copy.deepcopy(saved)
    gen.eos_token_id, gen.pad_token_id, gen.do_sample, gen.num_beams = None, 0, False, 1
    ref.generation_config = gen
    try:
        ids = torch.tensor([case.ids])
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **case.ref_inputs)
    finally:
        ref.generation_config = saved
    return out[0, len(case.ids):].tolist()


def make_engine(config, model, limits=SchedulerLimits(), page_size=4, num_pages=256) -> Engine:
    cache = PagedKVCache(config.text, page_size=page_size, num_pages=num_pages)
    engine = Engine(model, cache, limits)  # placeholder ids from the decoder's config
    assert engine.media_tokens == MediaTokens.from_special_tokens(config.special_tokens)
    return engine


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def greedy(n: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def run(engine: Engine, cases: list[Case], params: SamplingParams | None = None):
    seqs = [engine.add_request(c.ids, params or greedy(), media=c.spans) for c in cases]
    while engine.scheduler.has_work():
        engine.step()
    return seqs


VARIANTS = [("e2b", {}), ("e4b", BIDIR), ("26b_a4b", BIDIR), ("31b", BIDIR), ("12b_unified", {})]


@pytest.mark.parametrize("variant,overrides", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_prefill_logits_match_reference(setup, variant, overrides):
    config, model, ref = setup(variant, **overrides)
    case = build_case(ref, config, image_seeds=(1, 2), audio_seed=7 if config.audio else None)
    expected = reference_logits(ref, case)

    # Every position, one chunk straight through the decoder.
    spans = sorted(case.spans, key=lambda s: s.start)
    blocks = bidirectional_blocks(spans) if config.text.span_attention != "none" else ()
    n = len(case.ids)
    cache = PagedKVCache(config.text, page_size=4, num_pages=64)
    cache.add_sequence(0, case.ids)
    cache.extend(0, n)
    chunk = SequenceChunk(0, case.ids, 0, logits_rows=tuple(range(n)), span_ids=chunk_span_ids(blocks, 0, n),
                          media=chunk_media(spans, 0, n))
    with torch.inference_mode():
        ours = model(ForwardBatch.build([chunk], cache), cache).logits
    cache.free_sequence(0)
    assert rel_err(ours, expected) < 1e-4

    # The last position through the engine (scheduler, splice, sampler).
    seq, = run(make_engine(config, model), [case], greedy(1, keep_logits=True))
    assert rel_err(seq.step_logits[0], expected[-1]) < 1e-4
    assert seq.output == [int(expected[-1].argmax())]

    # The media really matter: the same ids with the placeholders embedded as pad tokens differ.
    plain = torch.tensor([case.ids]).masked_fill(torch.tensor([case.ids]) >= config.text.vocab_size, config.text.pad_token_id)
    with torch.no_grad():
        text_only = ref(input_ids=plain, use_cache=False).logits[0, -1]
    assert rel_err(text_only, expected[-1]) > 1e-2


def test_bidirectional_spans_matter(setup):
    # Without mm_token_type_ids the reference is causal over the image: a different answer.
    config, model, ref = setup("12b_unified")
    case = build_case(ref, config, image_seeds=(1,))
    causal = {k: v for k, v in case.ref_inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        causal_logits = ref(input_ids=torch.tensor([case.ids]), use_cache=False, **causal).logits[0, -1]
    seq, = run(make_engine(config, model), [case], greedy(1, keep_logits=True))
    expected = reference_logits(ref, case)[-1]
    assert rel_err(seq.step_logits[0], expected) < 1e-4
    assert rel_err(causal_logits, expected) > 1e-2


class ChunkLog:
    """Stands in for the engine's decoder and records each forward's chunks (start, length)."""

    def __init__(self, engine: Engine):
        self.model = engine.model
        self.cfg = self.model.cfg
        self.chunks: list[tuple[int, int]] = []
        engine.model = self

    def __call__(self, batch, cache):
        for b in range(batch.num_seqs):
            self.chunks.append((batch.chunk_starts[b], batch.query_starts[b + 1] - batch.query_starts[b]))
        return self.model(batch, cache)


@pytest.mark.parametrize("variant,overrides", VARIANTS, ids=[v for v, _ in VARIANTS])
def test_greedy_matches_generate_one_chunk_and_many(setup, variant, overrides):
    config, model, ref = setup(variant, **overrides)
    case = build_case(ref, config, image_seeds=(1, 2), audio_seed=7 if config.audio else None)
    expected = reference_generate(ref, case)
    one, = run(make_engine(config, model, SchedulerLimits(max_batch_tokens=512, chunk_size=512)), [case])
    assert one.output == expected
    # Small chunks: text and audio split anywhere, each image block kept whole in one forward
    # (longer than chunk_size and than max_batch_tokens here: it runs alone).
    engine = make_engine(config, model, SchedulerLimits(max_batch_tokens=24, chunk_size=7))
    log = ChunkLog(engine)
    many, = run(engine, [case])
    assert many.output == expected
    blocks = bidirectional_blocks(case.spans) if config.text.span_attention != "none" else ()
    prefill = [(s, n) for s, n in log.chunks if s < len(case.ids)]
    assert len(prefill) > 4
    for start, n in prefill:
        for lo, hi in blocks:
            assert not (lo < start < hi) and not (lo < start + n < hi), f"chunk {start}+{n} splits block {lo}..{hi}"
    if blocks:
        assert any(n > 24 for _, n in prefill)  # an image longer than the step budget ran


def test_two_images_and_audio_batched_with_text(setup):
    # e4b with bidirectional vision: PLE, audio split across chunks, two image blocks, and a
    # text-only request ahead of it in the batch. Each image is longer than what the step budget
    # leaves once the text request has its chunk: it waits a step and then runs first, whole.
    config, model, ref = setup("e4b", **BIDIR)
    case = build_case(ref, config, image_seeds=(3, 4), audio_seed=8, text_seed=3)
    assert [s.kind for s in case.spans] == ["image", "image", "audio"]
    expected = reference_generate(ref, case)
    text = Case(_text(42, 60), [])
    text_expected = reference_generate(ref, text)
    engine = make_engine(config, model, SchedulerLimits(max_batch_tokens=64, chunk_size=9))
    log = ChunkLog(engine)
    plain, mm = run(engine, [text, case])
    assert mm.output == expected
    assert plain.output == text_expected
    assert engine.stats.mixed_steps > 0
    images = [s for s in case.spans if s.kind == "image"]
    assert all((s.start, s.length) in log.chunks for s in images)  # each image alone in its chunk


@pytest.mark.parametrize("variant,overrides", [("26b_a4b", BIDIR), ("12b_unified", {})], ids=["26b_a4b", "12b_unified"])
def test_prefix_cache_keys_on_image_content(setup, variant, overrides):
    config, model, ref = setup(variant, **overrides)
    first = build_case(ref, config, image_seeds=(1,), tail=9)
    other = build_case(ref, config, image_seeds=(4,), tail=9)  # same placeholders, another image
    assert first.ids == other.ids and first.spans[0].content_key != other.spans[0].content_key
    image = first.spans[0]
    engine = make_engine(config, model, page_size=4)
    a, = run(engine, [first])
    b, = run(engine, [first])  # same image: reuse past the image
    c, = run(engine, [other])  # different image: reuse stops at the page before it
    assert b.num_cached_prompt_tokens > image.end
    assert 0 < c.num_cached_prompt_tokens <= image.start
    assert a.output == b.output == reference_generate(ref, first)
    assert c.output == reference_generate(ref, other)
    assert c.output != a.output

    # A prompt that ends just after the image could reuse pages ending inside it: the cached
    # prefix stops at the image's start instead (the block must run in one forward).
    cut = Case(first.ids[: image.end + 1], first.spans, first.ref_inputs)
    (lo, hi), = bidirectional_blocks(cut.spans)
    d, = run(engine, [cut])
    assert d.num_cached_prompt_tokens <= lo
    assert (len(cut.ids) - 1) // 4 * 4 > lo  # without the rule a longer (inside) prefix was there
    assert d.output == reference_generate(ref, cut)


def test_preemption_recomputes_media(setup):
    config, model, ref = setup("26b_a4b", **BIDIR)
    cases = [build_case(ref, config, image_seeds=(s,), text_seed=s) for s in (1, 2, 3)]
    expected = [reference_generate(ref, c) for c in cases]
    # Room for about two sequences at once: the third one's growth preempts the newest.
    page = 8
    need = max(len(c.ids) for c in cases) + NEW_TOKENS
    engine = make_engine(config, model, SchedulerLimits(max_batch_tokens=256, chunk_size=32), page_size=page,
                         num_pages={"full_attention": (2 * need) // page + 2, "sliding_attention": 40})
    seqs = run(engine, cases)
    assert [s.output for s in seqs] == expected
    recomputed = [s for s in seqs if s.num_computed_tokens > len(s.prompt) + len(s.output) - 1]
    assert recomputed, "no sequence was preempted: the test needs fewer pages"
    assert all(s.media == () for s in seqs)  # released once finished


def test_prefilled_sequence_keeps_media_for_recompute(setup):
    config, model, ref = setup("e4b", **BIDIR)
    case = build_case(ref, config, image_seeds=(1,), audio_seed=7)
    engine = make_engine(config, model)
    with pytest.raises(ValueError, match="no media span"):
        engine.add_prefilled(case.ids, 5, greedy(), install=lambda cache, seq_id: None)
    seq = engine.add_prefilled(case.ids, 5, greedy(), install=lambda cache, seq_id: cache.adopt_sequence(
        seq_id, len(case.ids), {n: [] for n in cache.groups}), media=case.spans)
    assert seq.media == tuple(sorted(case.spans, key=lambda s: s.start))
    engine.cancel(seq)


def test_bad_spans_raise(setup):
    config, model, ref = setup("e4b", **BIDIR)
    case = build_case(ref, config, image_seeds=(1,), audio_seed=7)
    image, audio = case.spans
    engine = make_engine(config, model)
    hidden = config.text.hidden_size

    def refused(spans, match, ids=None, eng=engine):
        with pytest.raises(ValueError, match=match):
            eng.add_request(case.ids if ids is None else ids, greedy(), media=spans)

    refused([image], "no media span covers")  # the audio placeholders are left bare
    refused([replace(image, start=len(case.ids) - 3), audio], "outside the prompt")
    refused([replace(image, start=image.start - 1), audio], "not the image placeholder")
    refused([replace(image, kind="audio"), audio], "not the audio placeholder")
    refused([replace(image, kind="picture"), audio], "kind must be one of")
    refused([replace(image, embeddings=torch.zeros(image.length, hidden + 1)), audio], "width")
    refused([replace(image, embeddings=image.embeddings[:-1]), audio], "no media span covers")
    refused([image, replace(image, start=image.start + 2, embeddings=image.embeddings[:3]), audio], "overlaps")
    refused([replace(image, content_key=b""), audio], "content_key")
    no_audio = Engine(model, PagedKVCache(config.text, page_size=4, num_pages=16),
                      media_tokens=replace(engine.media_tokens, audio=None))
    refused(case.spans, "no audio placeholder token", eng=no_audio)
    assert not engine.scheduler.has_work()


@pytest.mark.parametrize("variant,overrides", [("26b_a4b", BIDIR), ("12b_unified", {})], ids=["26b_a4b", "12b_unified"])
def test_video_frames_are_bidirectional_blocks(setup, variant, overrides):
    # Two video frames (soft tokens from the image encoder, handed to the reference as encoder
    # outputs of kind "video", mm_token_type 2), one right after an image: the reference joins
    # consecutive vision tokens into one block, and so do we.
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    config, model, ref = setup(variant, **overrides)
    tokens = MediaTokens.from_special_tokens(config.special_tokens)
    pixels, positions = _pixels(ref, config.is_unified, [1, 2, 3])
    image, frame1, frame2 = _image_tokens(ref, pixels, positions)
    ids = _text(1, 5) + [BOI]
    spans = [MediaSpan(len(ids), image, "image", b"i")]
    ids += [tokens.image] * image.shape[0]
    spans.append(MediaSpan(len(ids), frame1, "video", b"v1"))
    ids += [tokens.video] * frame1.shape[0] + [EOI] + _text(2, 3) + [BOI]
    spans.append(MediaSpan(len(ids), frame2, "video", b"v2"))
    ids += [tokens.video] * frame2.shape[0] + [EOI] + _text(3, 4)
    types = [1 if t == tokens.image else 2 if t == tokens.video else 0 for t in ids]
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=(image,)),
               "video": BaseModelOutputWithPooling(pooler_output=(frame1, frame2))}
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([types]),
                       mm_encoder_outputs=encoded, use_cache=False).logits[0, -1]
    assert bidirectional_blocks(spans) == ((spans[0].start, spans[1].end), (spans[2].start, spans[2].end))
    engine = make_engine(config, model, SchedulerLimits(max_batch_tokens=32, chunk_size=5))
    log = ChunkLog(engine)
    seq = engine.add_request(ids, greedy(1, keep_logits=True), media=spans)
    while engine.scheduler.has_work():
        engine.step()
    assert rel_err(seq.step_logits[0], expected) < 1e-4
    assert (spans[0].start, spans[1].end - spans[0].start) in log.chunks  # image + frame: one forward


def test_media_pages_and_chunks():
    emb = torch.zeros(6, 4)
    spans = (MediaSpan(2, emb, "image", b"A"), MediaSpan(8, emb[:3], "audio", b"B"), MediaSpan(11, emb[:2], "video", b"C"))
    assert bidirectional_blocks(spans) == ((2, 8), (11, 13))  # audio is causal
    keys = page_extra_keys(spans, 13, 4)
    assert len(keys) == 3 and all(keys)  # pages 0..2 each overlap a span
    assert b"A" in keys[0] and b"A" in keys[1] and b"B" not in keys[1] and b"B" in keys[2] and b"C" in keys[2]
    assert page_extra_keys(spans[:1], 12, 4)[2] == b""
    pieces = chunk_media(spans, 6, 10)
    assert [(o, r.shape[0]) for o, r in pieces] == [(0, 2), (2, 2)]
    assert chunk_span_ids(((2, 8), (11, 13)), 6, 12) == (1, 1, 0, 0, 0, 2)
    assert chunk_span_ids(((2, 8),), 8, 11) is None


def test_request_opening_with_an_image_waits_one_step_then_runs_first(setup):
    # Its first chunk is the whole image (longer than the step budget), and a text request is
    # already decoding: admitted without a chunk, it runs first (alone) in the next step.
    config, model, ref = setup("12b_unified")
    tokens = MediaTokens.from_special_tokens(config.special_tokens)
    pixels, positions = _pixels(ref, True, [1])
    soft, = _image_tokens(ref, pixels, positions)
    ids = [tokens.image] * soft.shape[0] + [EOI] + _text(5, 6)
    case = Case(ids, [MediaSpan(0, soft, "image", b"x")],
                dict(pixel_values=pixels, image_position_ids=positions,
                     mm_token_type_ids=torch.tensor([[int(t == tokens.image) for t in ids]])))
    text = Case(_text(6, 12), [])
    engine = make_engine(config, model, SchedulerLimits(max_batch_tokens=16, chunk_size=16))
    log = ChunkLog(engine)
    first = engine.add_request(text.ids, greedy())
    engine.step()  # the text prompt in one chunk
    second = engine.add_request(case.ids, greedy(), media=case.spans)
    engine.step()
    assert log.chunks[-1] == (len(text.ids), 1)  # only the text decode ran
    engine.step()
    assert log.chunks[-1] == (0, soft.shape[0])  # the image alone and whole (it used up the budget)
    while engine.scheduler.has_work():
        engine.step()
    assert first.output == reference_generate(ref, text)
    assert second.output == reference_generate(ref, case)

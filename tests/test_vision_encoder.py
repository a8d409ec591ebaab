"""Our image encoders against `transformers` 5.23 on tiny random checkpoints of both families.

Inputs come from transformers' own Gemma 4 image processor on PIL images of several sizes and
aspect ratios. The unified family's processor needs torchvision, which this environment lacks,
so its merged (patch_size * pooling_kernel_size)^2 patches come from the same PIL processor run
at the merged patch size (same resize rule, same row-major, channels-last patch layout); the
official processor is compared with that substitute where torchvision is installed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from gemma4_model.config import ConfigError
from gemma4_model.random_checkpoint import load_reference
from gemma4_model.vision import (
    ImageEncoder,
    UnifiedImageEncoder,
    load_image_encoder,
    parse_vision_config,
)
from gemma4_model.random_weights import random_media_encoder
from gemma4_model.weights import MissingTensorError, TensorShapeError

TOLERANCE = 1e-4  # max abs diff / max abs reference

# name -> (variant, save_tiny_checkpoint arguments)
CASES = {
    "e2b": ("e2b", {}),  # clipped linears and standardisation on (random_checkpoint's tiny tower)
    # Plain linears, no standardisation, grouped KV heads, two layers.
    "31b_gqa": ("31b", {"vision_overrides": dict(use_clipped_linears=False, standardize=False,
                                                 num_key_value_heads=1, num_hidden_layers=2)}),
    "12b_unified": ("12b_unified", {}),
}
IMAGE_SIZES = [(100, 160), (300, 90), (64, 64), (40, 200)]  # (height, width)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def random_images(sizes, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def processor_for(encoder) -> Gemma4ImageProcessorPil:
    cfg = encoder.cfg
    if isinstance(encoder, UnifiedImageEncoder):
        return Gemma4ImageProcessorPil(patch_size=cfg.model_patch_size, pooling_kernel_size=1, max_soft_tokens=70)
    return Gemma4ImageProcessorPil(patch_size=cfg.patch_size, pooling_kernel_size=cfg.pooling_kernel_size,
                                   max_soft_tokens=70)


def process(encoder, images) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    batch = processor_for(encoder)(images, return_tensors="pt")
    return batch["pixel_values"], batch["image_position_ids"], batch["num_soft_tokens_per_image"].tolist()


@pytest.fixture(scope="module")
def family(tiny_checkpoint):
    """name -> (checkpoint path, our encoder, transformers reference), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            variant, kwargs = CASES[name]
            path = tiny_checkpoint(variant, **kwargs)
            built[name] = (path, load_image_encoder(path), load_reference(path, variant))
        return built[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_images_match_reference(family, name):
    path, encoder, ref = family(name)
    assert isinstance(encoder, UnifiedImageEncoder if name == "12b_unified" else ImageEncoder)
    assert encoder.text_hidden_size == ref.config.text_config.hidden_size
    pixel_values, position_ids, soft_tokens = process(encoder, random_images(IMAGE_SIZES, seed=1))
    assert len(set(soft_tokens)) > 1  # the images really give different numbers of soft tokens
    ours = encoder.encode(pixel_values, position_ids)
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=pixel_values, image_position_ids=position_ids).pooler_output
    assert [t.shape[0] for t in ours] == soft_tokens
    assert len(ours) == len(expected)
    for mine, theirs in zip(ours, expected):
        assert mine.shape == (theirs.shape[0], encoder.text_hidden_size)
        assert rel_err(mine, theirs) < TOLERANCE


@pytest.mark.parametrize("name", list(CASES))
def test_videos_match_reference(family, name):
    path, encoder, ref = family(name)
    frames_per_video = [3, 2]  # every frame of a video has its video's size
    frames = random_images([(120, 200)] * 3 + [(210, 100)] * 2, seed=2)
    pixel_values, position_ids, _ = process(encoder, frames)
    ours = encoder.encode_video(pixel_values, position_ids, frames_per_video)
    with torch.no_grad():
        expected = ref.model.get_video_features(
            pixel_values_videos=pixel_values, video_position_ids=position_ids,
            num_frames_per_video=torch.tensor(frames_per_video)).pooler_output
    assert len(ours) == len(expected) == 2
    for mine, theirs in zip(ours, expected):
        assert rel_err(mine, theirs) < TOLERANCE
    # A video's tokens are its frames' image tokens, in order.
    per_frame = encoder.encode(pixel_values, position_ids)
    assert torch.equal(ours[1], torch.cat(per_frame[3:]))
    with pytest.raises(ValueError, match="frames_per_video"):
        encoder.encode_video(pixel_values, position_ids, [3, 3])


@pytest.mark.parametrize("name", list(CASES))
def test_batch_equals_each_image_alone(family, name):
    _, encoder, _ = family(name)
    pixel_values, position_ids, _ = process(encoder, random_images(IMAGE_SIZES, seed=3))
    batched = encoder.encode(pixel_values, position_ids)
    for i, tokens in enumerate(batched):
        alone = encoder.encode(pixel_values[i:i + 1], position_ids[i:i + 1])[0]
        assert rel_err(tokens, alone) < 1e-5
        # Without any padding patch at all: padding must not change an image's tokens.
        valid = int((position_ids[i] != -1).all(dim=-1).sum())
        assert valid < position_ids.shape[1]
        unpadded = encoder.encode(pixel_values[i:i + 1, :valid], position_ids[i:i + 1, :valid])[0]
        assert rel_err(tokens, unpadded) < 1e-5


@pytest.mark.parametrize("name, tensor", [
    ("e2b", "vision_tower.encoder.layers.0.mlp.down_proj.linear.weight"),
    ("e2b", "vision_tower.std_bias"),
    ("12b_unified", "vision_embedder.pos_embedding"),
    ("12b_unified", "embed_vision.embedding_projection.weight"),
])
def test_bound_fails_for_a_perturbed_weight(family, name, tensor):
    path, _, ref = family(name)
    encoder = load_image_encoder(path)  # a private copy to perturb
    pixel_values, position_ids, _ = process(encoder, random_images(IMAGE_SIZES[:2], seed=4))
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=pixel_values, image_position_ids=position_ids).pooler_output
        weight = encoder.get_parameter(tensor) if tensor.endswith(("weight", "embedding")) else encoder.get_buffer(tensor)
        assert max(rel_err(a, b) for a, b in zip(encoder.encode(pixel_values, position_ids), expected)) < TOLERANCE
        weight.add_(0.01 * weight.abs().mean() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    errors = [rel_err(a, b) for a, b in zip(encoder.encode(pixel_values, position_ids), expected)]
    assert max(errors) > TOLERANCE


def test_bfloat16_load_stays_close_to_float32(family):
    path, encoder, _ = family("e2b")
    half = load_image_encoder(path, dtype=torch.bfloat16)
    assert half.vision_tower.patch_embedder.input_proj.weight.dtype == torch.bfloat16
    pixel_values, position_ids, _ = process(encoder, random_images(IMAGE_SIZES[:2], seed=5))
    for low, full in zip(half.encode(pixel_values, position_ids), encoder.encode(pixel_values, position_ids)):
        assert low.dtype == torch.bfloat16
        assert rel_err(low, full) < 5e-2


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_vision_tensor_is_a_typed_error(tiny_checkpoint, tmp_path):
    for variant, missing in [("e2b", "model.vision_tower.encoder.layers.0.self_attn.q_norm.weight"),
                             ("12b_unified", "model.vision_embedder.patch_dense.bias")]:
        path = _copy_checkpoint(tiny_checkpoint(variant), tmp_path / variant)
        tensors = load_file(path / "model.safetensors")
        del tensors[missing]
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(MissingTensorError, match=missing.removeprefix("model.")):
            load_image_encoder(path)


def test_config_that_disagrees_with_the_weights_is_a_shape_error(tiny_checkpoint, tmp_path):
    path = _copy_checkpoint(tiny_checkpoint("e2b"), tmp_path / "e2b")
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["position_embedding_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TensorShapeError, match="position_embedding_table"):
        load_image_encoder(path)


def test_no_vision_section_gives_none(tiny_checkpoint, tmp_path):
    path = _copy_checkpoint(tiny_checkpoint("e2b"), tmp_path / "e2b")
    config = json.loads((path / "config.json").read_text())
    config["vision_config"] = None
    (path / "config.json").write_text(json.dumps(config))
    assert load_image_encoder(path) is None


@pytest.mark.parametrize("unified, field, value", [
    (False, "hidden_activation", "relu"),
    (False, "num_key_value_heads", 3),
    (False, "head_dim", 6),
    (False, "rope_parameters", {"rope_type": "yarn"}),
    (False, "standardize", "yes"),
    (True, "output_proj_dims", 7),
    (True, "mm_embed_dim", 0),
])
def test_bad_vision_config_names_the_field(unified, field, value):
    base = {"hidden_size": 16, "num_attention_heads": 2, "head_dim": 8} if not unified else {"mm_embed_dim": 32}
    parse_vision_config(base, text_hidden_size=64, unified=unified)  # the base itself is fine
    with pytest.raises(ConfigError) as info:
        parse_vision_config({**base, field: value}, text_hidden_size=64, unified=unified)
    assert info.value.field == f"vision_config.{field}"


def test_published_vision_configs_parse():
    from pathlib import Path
    from gemma4_model.config import parse_config

    for name, unified in [("gemma-4-E2B-it", False), ("gemma-4-31B-it", False), ("gemma-4-12B-it", True)]:
        raw = json.loads((Path(__file__).parent / "fixtures" / "hf_configs" / f"{name}.json").read_text())
        config = parse_config(raw)
        vcfg = parse_vision_config(config.vision, config.text.hidden_size, config.is_unified)
        assert vcfg.pooling_kernel_size == 3 and vcfg.patch_size == 16
        assert vcfg.patch_dim == (6912 if unified else 768)




@pytest.mark.parametrize("name", ["e2b", "12b_unified"])
def test_random_weights_at_the_checkpoints_shape(family, name):
    """`--load-format dummy`'s encoder: the loaded encoder's tensors by name and shape, seeded,
    and it encodes images to as many finite soft tokens."""
    path, encoder, _ = family(name)
    random = random_media_encoder(path, "vision", "cpu", torch.float32, seed=3)
    want = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in random.state_dict().items()} == want
    again = random_media_encoder(path, "vision", "cpu", torch.float32, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(random.state_dict().values(), again.state_dict().values()))
    pixel_values, position_ids, soft_tokens = process(encoder, random_images(IMAGE_SIZES[:2], seed=2))
    out = random.encode(pixel_values, position_ids)
    assert [t.shape[0] for t in out] == soft_tokens and all(t.isfinite().all() for t in out)

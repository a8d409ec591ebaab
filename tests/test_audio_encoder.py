"""Our audio encoders (`gemma4_model/audio.py`) against `transformers` 5.23 on tiny random checkpoints.

Features come from transformers' own feature extractors on synthetic 16 kHz clips of different
lengths; the reference is `get_audio_features` followed by the padding strip `forward` does
(`pooler_output[attention_mask]`). Float32 on CPU.
"""

from __future__ import annotations

import copy
import json
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Gemma4AudioFeatureExtractor, Gemma4UnifiedAudioFeatureExtractor
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

from gemma4_model.audio import (
    AudioConfig,
    AudioEncoder,
    UnifiedAudioConfig,
    UnifiedAudioEncoder,
    build_audio_encoder,
    load_audio_encoder,
    parse_audio_config,
)
from gemma4_model.config import ConfigError, load_config, parse_config
from gemma4_model.random_checkpoint import load_reference, save_tiny_checkpoint
from gemma4_model.random_weights import random_media_encoder
from gemma4_model.weights import MissingTensorError

TOLERANCE = 1e-4  # max |ours - ref| / max |ref|
RATE = 16_000
FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
DEFAULT_MODEL = Path(__file__).parent.parent / "default_model" / "checkpoint"

# name -> (variant, audio_overrides). The second standard case gives the attention future
# context, several blocks per context and two layers, and turns clipping off.
CASES = {
    "e2b": ("e2b", {}),
    "e4b_right_context": ("e4b", dict(attention_chunk_size=3, attention_context_left=6, attention_context_right=3,
                                      num_hidden_layers=2, use_clipped_linears=False, hidden_act="gelu_pytorch_tanh")),
    "12b_unified": ("12b_unified", {}),
}


def clips() -> list[np.ndarray]:
    """0.5 s tone, 1.3 s noise, 3 s chirp + noise (seeded), float32 at 16 kHz."""
    rng = np.random.default_rng(7)
    t = lambda s: np.arange(int(RATE * s)) / RATE  # noqa: E731
    tone = 0.6 * np.sin(2 * np.pi * 440 * t(0.5))
    noise = 0.3 * rng.standard_normal(len(t(1.3)))
    chirp = 0.5 * np.sin(2 * np.pi * (200 + 300 * t(3.0)) * t(3.0)) + 0.05 * rng.standard_normal(len(t(3.0)))
    return [w.astype(np.float32) for w in (tone, noise, chirp)]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours - ref).abs().max() / ref.abs().max())


@dataclass
class Case:
    path: Path
    variant: str
    reference: torch.nn.Module
    encoder: AudioEncoder | UnifiedAudioEncoder
    extractor: object
    processor_class: type

    @property
    def unified(self) -> bool:
        return self.variant == "12b_unified"

    def features(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.extractor(waves, sampling_rate=RATE, return_tensors="pt")
        return out["input_features"], out["input_features_mask"]

    @torch.no_grad()
    def reference_tokens(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's stripped soft tokens (all clips, flattened) and its output mask."""
        out = self.reference.model.get_audio_features(features, mask, return_dict=True)
        return out.pooler_output[out.attention_mask], out.attention_mask


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> Case:
    variant, overrides = CASES[request.param]
    path = save_tiny_checkpoint(variant, tmp_path_factory.mktemp(request.param), seed=11, audio_overrides=overrides)
    unified = variant == "12b_unified"
    if unified:
        frame = load_config(path).audio["audio_embed_dim"]
        extractor = Gemma4UnifiedAudioFeatureExtractor(feature_size=frame, audio_samples_per_token=frame)
    else:
        extractor = Gemma4AudioFeatureExtractor()
    return Case(path, variant, load_reference(path, variant), load_audio_encoder(path), extractor,
                Gemma4UnifiedProcessor if unified else Gemma4Processor)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def test_loads_the_right_family(case: Case):
    want = UnifiedAudioEncoder if case.unified else AudioEncoder
    assert type(case.encoder) is want
    assert case.encoder.text_hidden_size == case.reference.config.text_config.hidden_size
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in case.encoder.state_dict().values())


def test_batched_clips_match_reference(case: Case):
    features, mask = case.features(clips())
    ref, ref_mask = case.reference_tokens(features, mask)
    ours = case.encoder.encode(features, mask)
    assert [len(o) for o in ours] == ref_mask.sum(-1).tolist()
    assert len(set(len(o) for o in ours)) == 3  # three lengths: padding really was stripped
    assert relative_error(torch.cat(ours), ref) < TOLERANCE


def test_each_clip_alone_matches_reference_and_batch(case: Case):
    features, mask = case.features(clips())
    batched = case.encoder.encode(features, mask)
    for i, wave in enumerate(clips()):
        f, m = case.features([wave])
        alone = case.encoder.encode(f, m)
        assert len(alone) == 1
        ref, _ = case.reference_tokens(f, m)
        assert relative_error(alone[0], ref) < TOLERANCE
        assert relative_error(batched[i], alone[0]) < TOLERANCE


def test_num_soft_tokens_is_output_length_and_processor_count(case: Case, tokenizer):
    """The count a prompt needs before encoding, against the reference processor's own arithmetic."""
    stub = types.SimpleNamespace(boa_token=tokenizer.boa_token, audio_token=tokenizer.audio_token,
                                 eoa_token=tokenizer.eoa_token, feature_extractor=case.extractor, audio_seq_length=750)
    waves = clips()
    features, mask = case.features(waves)
    ours = case.encoder.encode(features, mask)
    for i, wave in enumerate(waves):
        n = case.encoder.num_soft_tokens(mask[i])
        assert n == len(ours[i]) > 0
        placeholder = case.processor_class.replace_audio_token(stub, {"input_features_mask": mask}, i)
        ids = tokenizer(placeholder, add_special_tokens=False).input_ids
        assert ids.count(tokenizer.audio_token_id) == n
        assert case.processor_class._compute_audio_num_tokens(stub, wave, RATE) == n


def test_the_bound_catches_a_perturbed_weight(case: Case):
    """A small change to one weight breaks the 1e-4 bound, so the parity checks can fail."""
    features, mask = case.features(clips())
    ref, _ = case.reference_tokens(features, mask)
    broken = copy.deepcopy(case.encoder)
    with torch.no_grad():
        if case.unified:
            weight = broken.embed_audio.embedding_projection.weight
        else:
            weight = broken.audio_tower.layers[0].self_attn.per_dim_scale
        weight.add_(1e-2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    assert relative_error(torch.cat(broken.encode(features, mask)), ref) > TOLERANCE
    assert relative_error(torch.cat(case.encoder.encode(features, mask)), ref) < TOLERANCE


def test_missing_tensor_raises_typed_error(case: Case, tmp_path):
    for file in case.path.iterdir():
        shutil.copy(file, tmp_path / file.name)
    gone = ("model.embed_audio.embedding_projection.weight" if case.unified
            else "model.audio_tower.layers.0.self_attn.per_dim_scale")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors[gone]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingTensorError, match=gone.removeprefix("model.")):
        load_audio_encoder(tmp_path)


def _config_only(case_path: Path, tmp_path: Path, edit) -> Path:
    raw = json.loads((case_path / "config.json").read_text())
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_no_audio_section_gives_none(case: Case, tmp_path):
    path = _config_only(case.path, tmp_path, lambda raw: raw.update(audio_config=None))
    assert load_audio_encoder(path) is None


def test_random_weights_at_the_checkpoints_shape(case: Case, tmp_path):
    """`--load-format dummy`'s encoder: the loaded encoder's tensors by name and shape, and as many
    finite soft tokens per clip; None without an audio section."""
    random = random_media_encoder(case.path, "audio", "cpu", torch.float32, seed=1)
    assert type(random) is type(case.encoder)
    assert ({k: tuple(v.shape) for k, v in random.state_dict().items()}
            == {k: tuple(v.shape) for k, v in case.encoder.state_dict().items()})
    features, mask = case.features(clips())
    got, want = random.encode(features, mask), case.encoder.encode(features, mask)
    assert [len(t) for t in got] == [len(t) for t in want] and all(t.isfinite().all() for t in got)
    path = _config_only(case.path, tmp_path, lambda raw: raw.update(audio_config=None))
    assert random_media_encoder(path, "audio", "cpu", torch.float32) is None


def test_bad_audio_field_names_it(tmp_path):
    path = _config_only(DEFAULT_MODEL, tmp_path, lambda raw: raw["audio_config"].update(num_attention_heads=3))
    with pytest.raises(ConfigError) as err:
        load_audio_encoder(path)
    assert err.value.field == "audio_config.num_attention_heads"
    path = _config_only(DEFAULT_MODEL, tmp_path, lambda raw: raw["audio_config"].update(hidden_act="tanh"))
    with pytest.raises(ConfigError) as err:
        load_audio_encoder(path)
    assert err.value.field == "audio_config.hidden_act"


@pytest.mark.parametrize("name", ["gemma-4-E2B-it", "gemma-4-E4B-it", "gemma-4-12B-it"])
def test_published_configs_build_the_reference_shapes(name):
    """The released audio sections give modules with the reference's tensor names and shapes (meta device)."""
    from transformers import Gemma4Config, Gemma4UnifiedConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4MultimodalEmbedder
    from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedMultimodalEmbedder

    raw = json.loads((FIXTURES / f"{name}.json").read_text())
    parsed = parse_config(raw)
    cfg = parse_audio_config(parsed.audio, text_hidden_size=parsed.text.hidden_size, unified=parsed.is_unified)
    ours = {k: tuple(v.shape) for k, v in build_audio_encoder(cfg).state_dict().items()}
    with torch.device("meta"):
        if parsed.is_unified:
            assert isinstance(cfg, UnifiedAudioConfig)
            hf = Gemma4UnifiedConfig.from_dict(raw)
            ref = {"embed_audio." + k: v for k, v in
                   Gemma4UnifiedMultimodalEmbedder(hf.audio_config, hf.text_config).state_dict().items()}
        else:
            assert isinstance(cfg, AudioConfig)
            hf = Gemma4Config.from_dict(raw)
            ref = {"audio_tower." + k: v for k, v in Gemma4AudioModel(hf.audio_config).state_dict().items()}
            ref.update({"embed_audio." + k: v for k, v in
                        Gemma4MultimodalEmbedder(hf.audio_config, hf.text_config).state_dict().items()})
    assert ours == {k: tuple(v.shape) for k, v in ref.items()}

"""Gemma 4 audio encoders: audio features of a clip -> soft tokens in the text decoder's space.

Two families, one interface (`encode`, `num_soft_tokens`, `text_hidden_size`):

- `AudioEncoder` (E2B / E4B): log-mel features [N, T, 128] through a USM-style conformer
  (`audio_tower`: two stride-2 conv blocks that quarter the frame rate, conformer blocks with
  chunked local self-attention and a causal light conv, an output projection), then
  `embed_audio` (scale-free RMSNorm + linear) into the text hidden size. A clip of mask row m
  yields `m[::2][::2].sum()` soft tokens, exactly the rows the reference keeps.
- `UnifiedAudioEncoder` (12B unified): no tower; each raw waveform frame of `audio_embed_dim`
  samples is one soft token, projected by `embed_audio` alone.

Module and parameter names equal the checkpoint's names under `model.audio_tower.*` and
`model.embed_audio.*`, so the loader only strips the `model.` prefix. The math follows
`transformers` 5.23 (`Gemma4AudioModel`, `Gemma4MultimodalEmbedder`,
`Gemma4UnifiedMultimodalEmbedder`); `tests/test_audio_encoder.py` checks it against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .audio_conformer import ACTIVATIONS, AudioTower, ConformerSpec
from .config import ConfigError
from .layers import SoftTokenProjection
from .loader import checkpoint_config
from .weights import CheckpointFiles, load_tensors

_TOWER_PREFIXES = ("model.audio_tower.", "model.embed_audio.")
_UNIFIED_PREFIXES = ("model.embed_audio.",)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class AudioConfig:
    """The conformer audio tower of the standard family, plus the text width it projects to."""

    tower: ConformerSpec
    text_hidden_size: int


@dataclass(frozen=True)
class UnifiedAudioConfig:
    """The unified family's audio: raw waveform frames of `frame_samples` samples per soft token."""

    frame_samples: int
    rms_norm_eps: float
    text_hidden_size: int


def parse_audio_config(raw: Mapping[str, Any], *, text_hidden_size: int, unified: bool) -> AudioConfig | UnifiedAudioConfig:
    """Build the audio config from a checkpoint's raw `audio_config` (transformers' defaults fill gaps)."""
    expected_type = "gemma4_unified_audio" if unified else "gemma4_audio"
    model_type = raw.get("model_type", expected_type)
    if model_type != expected_type:
        raise ConfigError("audio_config.model_type", f"expected {expected_type!r}, got {model_type!r}")
    eps = _number(raw, "rms_norm_eps", 1e-6, positive=True)
    if unified:
        return UnifiedAudioConfig(_integer(raw, "audio_embed_dim", 640), eps, text_hidden_size)
    hidden = _integer(raw, "hidden_size", 1024)
    heads = _integer(raw, "num_attention_heads", 8)
    if hidden % heads:
        raise ConfigError("audio_config.num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
    if hidden % 2:
        raise ConfigError("audio_config.hidden_size", f"must be even (sin/cos position halves), got {hidden}")
    channels = raw.get("subsampling_conv_channels", (128, 32))
    if (not isinstance(channels, (list, tuple)) or len(channels) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels)):
        raise ConfigError("audio_config.subsampling_conv_channels", f"expected two positive integers, got {channels!r}")
    activation = raw.get("hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise ConfigError("audio_config.hidden_act", f"unsupported {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    clipped = raw.get("use_clipped_linears", True)
    if not isinstance(clipped, bool):
        raise ConfigError("audio_config.use_clipped_linears", f"expected true or false, got {clipped!r}")
    return AudioConfig(ConformerSpec(
        hidden_size=hidden,
        num_layers=_integer(raw, "num_hidden_layers", 12),
        num_heads=heads,
        subsampling_channels=(channels[0], channels[1]),
        conv_kernel_size=_integer(raw, "conv_kernel_size", 5),
        chunk_size=_integer(raw, "attention_chunk_size", 12),
        context_left=_integer(raw, "attention_context_left", 13),
        context_right=_integer(raw, "attention_context_right", 0, minimum=0),
        logit_cap=_number(raw, "attention_logit_cap", 50.0, positive=True),
        invalid_logit=_number(raw, "attention_invalid_logits_value", -1.0e9),
        residual_weight=_number(raw, "residual_weight", 0.5),
        gradient_clipping=_number(raw, "gradient_clipping", 1e10, positive=True),
        rms_norm_eps=eps,
        activation=activation,
        clipped_linears=clipped,
        output_dim=_integer(raw, "output_proj_dims", 1536),
    ), text_hidden_size)


def _integer(raw: Mapping[str, Any], name: str, default: int, *, minimum: int = 1) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"audio_config.{name}", f"expected an integer >= {minimum}, got {value!r}")
    return value


def _number(raw: Mapping[str, Any], name: str, default: float, *, positive: bool = False) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise ConfigError(f"audio_config.{name}", f"expected a {'positive ' if positive else ''}finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- soft-token counts


def conformer_soft_tokens(mask_row: Any) -> int:
    """Soft tokens of one standard-family clip: its valid frames after two stride-2 subsamplings."""
    mask = torch.as_tensor(mask_row, dtype=torch.bool)
    return int(mask[::2][::2].sum())


def unified_soft_tokens(mask_row: Any) -> int:
    """Soft tokens of one unified-family clip: one per valid waveform frame."""
    return int(torch.as_tensor(mask_row, dtype=torch.bool).sum())


# --------------------------------------------------------------------------- encoders


def _check_inputs(features: torch.Tensor, mask: torch.Tensor, feature_dim: int | None) -> None:
    if features.dim() != 3:
        raise ValueError(f"audio features must be [clips, frames, features], got shape {tuple(features.shape)}")
    if features.shape[1] == 0:
        raise ValueError("audio features have no frames")
    if tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(f"audio mask shape {tuple(mask.shape)} does not match features {tuple(features.shape[:2])}")
    if feature_dim is not None and features.shape[-1] != feature_dim:
        raise ValueError(f"audio features have {features.shape[-1]} values per frame, the encoder takes {feature_dim}")


def _split_valid(soft: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """Per clip, its valid rows in order: the same rows the reference's `features[mask]` keeps."""
    return [soft[i][valid[i]] for i in range(soft.shape[0])]


class AudioEncoder(nn.Module):
    """The standard family's audio path: conformer tower + `embed_audio` projection."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.audio_tower = AudioTower(cfg.tower)
        self.embed_audio = SoftTokenProjection(cfg.tower.output_dim, cfg.text_hidden_size, cfg.tower.rms_norm_eps)

    @property
    def text_hidden_size(self) -> int:
        return self.cfg.text_hidden_size

    def num_soft_tokens(self, mask_row: Any) -> int:
        """How many soft tokens `encode` returns for a clip with this feature mask row."""
        return conformer_soft_tokens(mask_row)

    @torch.no_grad()
    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Log-mel features [N, T, mel] and mask [N, T] (True = valid) -> per clip [n_soft_i, text_hidden]."""
        _check_inputs(features, mask, None)
        if not self.audio_tower.accepts_mel_bins(features.shape[-1]):
            raise ValueError(f"audio features have {features.shape[-1]} mel bins, which this tower's projection does not fit")
        weight = self.embed_audio.embedding_projection.weight
        hidden, valid = self.audio_tower(features.to(weight.device, weight.dtype), mask.to(weight.device, torch.bool))
        return _split_valid(self.embed_audio(hidden), valid)


class UnifiedAudioEncoder(nn.Module):
    """The unified family's audio path: each raw waveform frame projected straight to a soft token."""

    def __init__(self, cfg: UnifiedAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_audio = SoftTokenProjection(cfg.frame_samples, cfg.text_hidden_size, cfg.rms_norm_eps)

    @property
    def text_hidden_size(self) -> int:
        return self.cfg.text_hidden_size

    def num_soft_tokens(self, mask_row: Any) -> int:
        """How many soft tokens `encode` returns for a clip with this frame mask row."""
        return unified_soft_tokens(mask_row)

    @torch.no_grad()
    def encode(self, features: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Waveform frames [N, T, frame_samples] and mask [N, T] -> per clip [n_soft_i, text_hidden]."""
        _check_inputs(features, mask, self.cfg.frame_samples)
        weight = self.embed_audio.embedding_projection.weight
        soft = self.embed_audio(features.to(weight.device, weight.dtype))
        return _split_valid(soft, mask.to(weight.device, torch.bool))


# --------------------------------------------------------------------------- loading


def build_audio_encoder(cfg: AudioConfig | UnifiedAudioConfig) -> AudioEncoder | UnifiedAudioEncoder:
    """An empty encoder (weights on the meta device) ready for `load_state_dict(assign=True)`."""
    with torch.device("meta"):
        return AudioEncoder(cfg) if isinstance(cfg, AudioConfig) else UnifiedAudioEncoder(cfg)


def load_audio_encoder(
    checkpoint_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AudioEncoder | UnifiedAudioEncoder | None:
    """The checkpoint's audio encoder, ready on `device` in `dtype`; None when it has no audio section.

    Raises `ConfigError` (naming the field) for a bad audio config and the `weights` errors
    (`MissingTensorError`, `UnexpectedTensorError`, `TensorShapeError`, ...) for bad tensors.
    """
    config = checkpoint_config(checkpoint_dir)
    if config.audio is None:
        return None
    cfg = parse_audio_config(config.audio, text_hidden_size=config.text.hidden_size, unified=config.is_unified)
    model = build_audio_encoder(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    prefixes = _UNIFIED_PREFIXES if config.is_unified else _TOWER_PREFIXES

    def rename(name: str) -> str | None:
        return name[len("model."):] if name.startswith(prefixes) else None

    tensors = load_tensors(CheckpointFiles(checkpoint_dir), expected, device=device, dtype=dtype, rename=rename)
    model.load_state_dict(tensors, assign=True, strict=True)
    return model.eval()

"""Load a Hugging Face Gemma 4 checkpoint, unchanged, into our text decoder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig, load_config
from .decoder import TextDecoder
from .layers import RotaryEmbedding
from .weights import CheckpointFiles, UnknownModelTypeError, load_tensors, read_model_type

# Where the language model's tensors sit in each checkpoint layout.
_TEXT_PREFIXES = ("model.language_model.", "model.")
_KV_TENSORS = ("k_proj", "v_proj", "k_norm", "v_norm")


def text_tensor_name(checkpoint_name: str) -> str | None:
    """Our decoder's name for a checkpoint tensor, or None if it belongs to another component."""
    if checkpoint_name == "lm_head.weight":
        return checkpoint_name
    for prefix in _TEXT_PREFIXES:
        if checkpoint_name.startswith(prefix):
            rest = checkpoint_name[len(prefix):]
            if prefix == "model." and not _is_text_tensor(rest):
                return None  # vision_tower., audio_tower., embed_vision., ... of a multimodal checkpoint
            return rest
    return None


def _is_text_tensor(rest: str) -> bool:
    head = rest.split(".", 1)[0]
    return head in {"embed_tokens", "layers", "norm", "embed_tokens_per_layer",
                    "per_layer_model_projection", "per_layer_projection_norm"}


def _unused_kv_tensor(model: TextDecoder):
    """Checkpoints may carry K/V weights for KV-shared layers, which never run: skip them."""
    shared = {spec.index for spec in model.cfg.layers if not spec.owns_kv}

    def ignore(name: str) -> bool:
        rest = text_tensor_name(name)
        if rest is None or not rest.startswith("layers."):
            return False
        parts = rest.split(".")
        return int(parts[1]) in shared and parts[2] == "self_attn" and parts[3] in _KV_TENSORS

    return ignore


def build_decoder(config: ModelConfig) -> TextDecoder:
    """An empty decoder (weights on the meta device) ready for `load_state_dict(assign=True)`."""
    with torch.device("meta"):
        model = TextDecoder(config.text)
    return model


def checkpoint_config(checkpoint_dir: str | Path) -> ModelConfig:
    """A checkpoint's config for a loader: an unknown `model_type` is an `UnknownModelTypeError`."""
    try:
        return load_config(checkpoint_dir)
    except ConfigError as exc:
        if exc.field == "model_type":
            raise UnknownModelTypeError(str(exc)) from None
        raise


def load_text_decoder(
    checkpoint_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[ModelConfig, TextDecoder]:
    """Read config and safetensors of a checkpoint and return the ready text decoder."""
    model_type = read_model_type(checkpoint_dir)
    config = checkpoint_config(checkpoint_dir)
    if config.is_assistant:
        raise UnknownModelTypeError(f"{model_type!r} is an assistant (draft) model, not a text decoder")
    model = build_decoder(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.text.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    unused = _unused_kv_tensor(model)

    def rename(name: str) -> str | None:
        internal = text_tensor_name(name)
        if internal == "lm_head.weight" and config.text.tie_word_embeddings:
            return None  # tied: the embedding is the head
        return internal

    files = CheckpointFiles(checkpoint_dir)
    tensors = load_tensors(files, expected, device=device, dtype=dtype, rename=rename, ignore=unused)
    model.load_state_dict(tensors, assign=True, strict=True)
    # RoPE tables are not in checkpoints: build them for real on the target device.
    model.rotary = nn.ModuleDict({name: RotaryEmbedding(spec) for name, spec in config.text.rope.items()}).to(device)
    return config, model.eval()

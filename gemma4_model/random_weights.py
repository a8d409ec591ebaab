"""Random weights at a real Gemma 4 shape, built straight on the device (for speed benchmarks).

Speed does not depend on weight values, so a benchmark at the 31B shape needs no checkpoint:
the modules are built on the meta device in the target dtype, given storage on the device with
`to_empty` (no host copy, no float32 detour: the 31B's ~61 GB of bf16 fits an 80 GB GPU), and
filled in place from a seeded device generator. Norm weights, `layer_scalar` and router scales
are ones; linear and embedding weights are small normals; RoPE tables are rebuilt for real (they
are derived, not weights); a centroid-masked assistant gets a random token ordering. The image
and audio encoders (`random_media_encoder`, a fraction of the decoder's size) are built on the
device by their constructors and filled the same way.

`post_norm_scale` < 1 shrinks the norms that scale each layer's contribution to the residual
stream, so the token embedding dominates it and the tied lm_head's argmax is the input token by
a wide margin: greedy decoding then repeats a token, but no bf16 rounding difference between a
one-token step and a verify run flips it (an oracle drafter's futures stay the target's own).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .audio import AudioConfig, AudioEncoder, UnifiedAudioEncoder, parse_audio_config
from .config import ModelConfig, TextConfig
from .decoder import TextDecoder
from .drafter import Drafter, TokenEmbed, check_fits_target
from .layers import RMSNorm, RotaryEmbedding, Router
from .loader import checkpoint_config
from .vision import ImageEncoder, UnifiedImageEncoder, UnifiedVisionConfig, parse_vision_config

# The norms whose output is added to the residual stream (scaled by `post_norm_scale`).
_RESIDUAL_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm", "post_per_layer_input_norm")


def random_text_decoder(cfg: TextConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0, *,
                        std: float = 0.02, post_norm_scale: float = 1.0) -> TextDecoder:
    """A `TextDecoder` of `cfg`'s shape with seeded random weights, allocated once on `device`."""
    with torch.device("meta"):
        model = TextDecoder(cfg)
    model = model.to(dtype).to_empty(device=device)
    _fill(model, torch.Generator(device=device).manual_seed(seed), std, post_norm_scale)
    model.rotary = nn.ModuleDict({name: RotaryEmbedding(spec) for name, spec in cfg.rope.items()}).to(device)
    return model.requires_grad_(False).eval()


def random_drafter(config: ModelConfig, target: TextConfig, target_embed: TokenEmbed, device: torch.device | str,
                   dtype: torch.dtype, seed: int = 0, *, std: float = 0.02) -> Drafter:
    """A Gemma 4 assistant of `config`'s shape (an `-assistant` config.json) with seeded random
    weights, for a target of shape `target` whose scaled embedding is `target_embed`.
    Raises `DrafterMismatchError` when the shapes cannot read the target's KV."""
    check_fits_target(config, target)
    with torch.device("meta"):
        drafter = Drafter(config, target, target_embed)
    drafter = drafter.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    _fill(drafter, generator, std, 1.0)
    if drafter.masked_embedding is not None:
        ordering = drafter.masked_embedding.token_ordering
        ordering.copy_(torch.randperm(ordering.numel(), generator=generator, device=device))
    drafter.rotary = nn.ModuleDict({n: RotaryEmbedding(r) for n, r in config.text.rope.items()}).to(device)
    return drafter.requires_grad_(False).eval()


def random_media_encoder(checkpoint: str | Path, kind: str, device: torch.device | str, dtype: torch.dtype,
                         seed: int = 0, *, std: float = 0.02) -> nn.Module | None:
    """The checkpoint's image (`kind` "vision") or audio encoder at its config's shape with seeded
    random weights (`--load-format dummy`), or None when the config has no such section. Built on
    the device by its constructors (buffers such as clipping bounds as they make them); norm
    weights ones, LayerNorm biases zeros, every other parameter N(0, std)."""
    if kind not in ("vision", "audio"):
        raise ValueError(f"kind must be 'vision' or 'audio', got {kind!r}")
    config = checkpoint_config(checkpoint)
    if kind == "vision":
        if config.vision is None:
            return None
        vcfg = parse_vision_config(config.vision, config.text.hidden_size, config.is_unified)
        build = UnifiedImageEncoder if isinstance(vcfg, UnifiedVisionConfig) else ImageEncoder
        cfg = vcfg
    else:
        if config.audio is None:
            return None
        cfg = parse_audio_config(config.audio, text_hidden_size=config.text.hidden_size, unified=config.is_unified)
        build = AudioEncoder if isinstance(cfg, AudioConfig) else UnifiedAudioEncoder
    with torch.device(device):
        model = build(cfg).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, (RMSNorm, nn.LayerNorm)):
                    param.fill_(1.0 if name == "weight" else 0.0)
                else:
                    param.normal_(0.0, std, generator=generator)
    return model.requires_grad_(False).eval()


@torch.no_grad()
def _fill(model: nn.Module, generator: torch.Generator, std: float, post_norm_scale: float) -> None:
    """Ones for norms, router scales and `layer_scalar`; N(0, std) for everything else."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, RMSNorm):
                param.fill_(post_norm_scale if leaf in _RESIDUAL_NORMS else 1.0)
            elif isinstance(module, Router) and name in ("scale", "per_expert_scale"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
        for name, buf in module.named_buffers(recurse=False):
            if name == "layer_scalar":
                buf.fill_(1.0)
            elif name == "token_ordering":
                pass  # set by random_drafter (a permutation)
            elif name != "inv_freq":  # rotary tables are rebuilt by the callers
                raise AssertionError(f"random_weights does not know how to fill buffer {module_name}.{name}")

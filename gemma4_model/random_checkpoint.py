"""Tiny random Gemma 4 checkpoints written with `transformers` 5.23's own classes (demo and parity tests).

Each variant is shaped like a released checkpoint (same top-level class, same kinds of layers,
same sharing / MoE / PLE / k_eq_v features) but small enough to build, save and run on a CPU in
well under a second. After construction every persistent tensor that `transformers` initialises
to a constant (norm weights, `layer_scalar`, router scales, clip bounds, ...) is randomised, so a
mistake such as `1 + weight` instead of `weight`, or a forgotten `layer_scalar`, shows up as a
logit mismatch instead of hiding behind an all-ones tensor.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4UnifiedAudioConfig,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedTextConfig,
    Gemma4UnifiedVisionConfig,
    Gemma4VisionConfig,
)

VARIANTS = ("e2b", "e4b", "31b", "26b_a4b", "12b_unified")

VOCAB = 256
SLIDING, FULL = "sliding_attention", "full_attention"

# Random weight scales, found by experiment over all variants and several seeds. Every layer's
# output is RMS-normed, so the embedding std sets how much the current token dominates the
# residual (too big and greedy repeats the input token: the lm_head is the tied embedding);
# the final norm's scale then sets the logit spread, so top-2 gaps sit well above float noise
# (64-token greedy runs: ~45 distinct tokens, top-2 gap < 1e-3 in ~0.2% of steps).
WEIGHT_STD = 0.1  # linear layers, MoE experts
EMBED_STD = 0.05  # token embedding = tied lm_head
PLE_EMBED_STD = 0.3  # per-layer embedding table (scaled by sqrt(8) in the model)
FINAL_NORM_SCALE = 5.0  # final RMSNorm weight ~ 5 * (1 + 0.2 randn): logit std ~2
ROUTER_STD = 1.0  # expert scores with std ~1: top-k choices are not near-ties

# Shared by every text decoder: the released checkpoints' constants at toy sizes.
_TEXT_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    sliding_window=16,
    max_position_embeddings=1024,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)

_TEXT: dict[str, dict[str, Any]] = {
    # 4 sliding : 1 full, last 4 of 10 layers KV-shared (6 owners hold a full layer at 4),
    # double-wide MLP in the shared layers, per-layer embeddings, 1 KV head.
    "e2b": dict(
        num_hidden_layers=10,
        layer_types=([SLIDING] * 4 + [FULL]) * 2,
        num_key_value_heads=1,
        num_kv_shared_layers=4,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
    ),
    # 5 : 1, last 4 of 12 layers shared (owners 0..7 hold the full layer 5), PLE, 2 KV heads.
    "e4b": dict(
        num_hidden_layers=12,
        layer_types=([SLIDING] * 5 + [FULL]) * 2,
        num_key_value_heads=2,
        num_kv_shared_layers=4,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
    ),
    # Dense, no PLE, no sharing; full layers use k_eq_v with fewer KV heads (real: 16 / 4).
    "31b": dict(
        num_hidden_layers=6,
        layer_types=[SLIDING] * 5 + [FULL],
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB,
    ),
    # Dense MLP + 8 experts (top 2) in every layer; k_eq_v full layers (real: 8 / 2 KV heads).
    "26b_a4b": dict(
        num_hidden_layers=6,
        layer_types=[SLIDING] * 5 + [FULL],
        intermediate_size=48,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=24,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=VOCAB,
    ),
    # Gemma4UnifiedTextConfig: no PLE or MoE fields at all; bidirectional "vision" by default.
    "12b_unified": dict(
        num_hidden_layers=6,
        layer_types=[SLIDING] * 5 + [FULL],
        num_key_value_heads=2,
    ),
}

# Vision encoders: one tiny layer. Patch size and pooling kernel keep the released values so the
# stock image processors produce inputs these towers accept.
_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=128,
    use_clipped_linears=True,  # exercise the clip buffers (randomised below)
    standardize=True,  # exercise std_bias / std_scale (randomised below)
)
_UNIFIED_VISION = dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=32, mm_posemb_size=64, output_proj_dims=32)

# Audio conformer: one tiny layer. The subsampling channels stay at the released (128, 32) since
# the first one must equal the feature extractor's 128 mel bins.
_AUDIO = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    subsampling_conv_channels=(128, 32),
    conv_kernel_size=5,
    attention_chunk_size=4,
    attention_context_left=5,
    attention_context_right=0,
    output_proj_dims=24,
)
# The unified family has no audio tower: raw waveform frames of `audio_embed_dim` samples are
# projected straight into the text space (released: 640 samples = 40 ms; here 160 = 10 ms).
_UNIFIED_AUDIO = dict(audio_embed_dim=160)
_AUDIO_VARIANTS = ("e2b", "e4b", "12b_unified")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; expected one of {VARIANTS}")


def tiny_config(
    variant: str,
    *,
    vision_overrides: dict[str, Any] | None = None,
    audio_overrides: dict[str, Any] | None = None,
    **text_overrides: Any,
) -> Gemma4Config | Gemma4UnifiedConfig:
    """The top-level config of the class the released checkpoint uses, at toy sizes.

    `text_overrides` replace text-decoder fields (e.g. `sliding_window=8`, `num_hidden_layers=7`).
    Changing `num_hidden_layers` without `layer_types` re-derives the variant's pattern with the
    last layer full.
    """
    _check_variant(variant)
    text = {**_TEXT_COMMON, **_TEXT[variant]}
    if "num_hidden_layers" in text_overrides and "layer_types" not in text_overrides:
        n = text_overrides["num_hidden_layers"]
        period = 5 if variant == "e2b" else 6
        types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(n)]
        text["layer_types"] = types[:-1] + [FULL]
    text.update(text_overrides)
    text["layer_types"] = list(text["layer_types"])

    if variant == "12b_unified":
        vision = {**_UNIFIED_VISION, **(vision_overrides or {})}
        audio = {**_UNIFIED_AUDIO, **(audio_overrides or {})}
        return Gemma4UnifiedConfig(
            text_config=Gemma4UnifiedTextConfig(**text),
            vision_config=Gemma4UnifiedVisionConfig(**vision),
            audio_config=Gemma4UnifiedAudioConfig(**audio),
        )

    vision = {**_VISION, **(vision_overrides or {})}
    audio = {**_AUDIO, **(audio_overrides or {})} if variant in _AUDIO_VARIANTS else None
    return Gemma4Config(
        text_config=Gemma4TextConfig(**text),
        vision_config=Gemma4VisionConfig(**vision),
        audio_config=Gemma4AudioConfig(**audio) if audio is not None else None,
        tie_word_embeddings=True,
    )


def _model_class(variant: str) -> type[nn.Module]:
    _check_variant(variant)
    return Gemma4UnifiedForConditionalGeneration if variant == "12b_unified" else Gemma4ForConditionalGeneration


def _near_one(shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    return 1.0 + 0.2 * torch.randn(shape, generator=g)


def _random_parameter(module_name: str, module: nn.Module, name: str, shape: torch.Size, g: torch.Generator):
    """A seeded random value for one parameter, by what the parameter does."""
    kind = type(module).__name__
    randn = lambda std: std * torch.randn(shape, generator=g)  # noqa: E731
    if "Norm" in kind:  # Gemma4 RMSNorm multiplies by `weight` (not 1 + weight); LayerNorm alike
        if name == "bias":
            return randn(0.1)
        scale = FINAL_NORM_SCALE if module_name.endswith("language_model.norm") else 1.0
        return scale * _near_one(shape, g)
    if kind.endswith("TextRouter") and name in ("scale", "per_expert_scale"):
        return _near_one(shape, g)
    if name == "per_dim_scale":  # audio attention: q is scaled by softplus(per_dim_scale)
        return randn(0.3)
    if name == "bias":
        return randn(0.1)
    if module_name.endswith("embed_tokens_per_layer"):
        return randn(PLE_EMBED_STD)
    if isinstance(module, nn.Embedding):  # also the tied lm_head
        return randn(EMBED_STD)
    if module_name.endswith("router.proj"):
        return randn(ROUTER_STD)
    fan_in = shape[-1] if len(shape) > 1 else 1
    # Text matrices are narrow; the encoders' patch/conv inputs are wide and get 1/sqrt(fan_in).
    return randn(WEIGHT_STD if fan_in <= 256 else fan_in**-0.5)


def _random_buffer(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """A seeded random value for one persistent buffer; an unknown buffer is an error."""
    if name == "layer_scalar":
        return 0.5 + torch.rand(shape, generator=g)
    if name in ("input_min", "output_min", "input_max", "output_max"):
        # Finite clip bounds that bite now and then: |bound| in [4, 8].
        bound = 4.0 + 4.0 * torch.rand(shape, generator=g)
        return -bound if name.endswith("min") else bound
    if name == "std_scale":
        return _near_one(shape, g)
    if name == "std_bias":
        return 0.2 * torch.randn(shape, generator=g)
    raise AssertionError(f"random_checkpoint does not know how to randomise buffer {name!r}")


@torch.no_grad()
def _randomise(model: nn.Module, g: torch.Generator) -> None:
    """Overwrite every parameter and persistent buffer with seeded random values.

    Non-persistent buffers (rotary inv_freq, embed_scale, audio timescales, softcap) are derived
    from the config and left alone.
    """
    seen: set[int] = set()  # the tied lm_head shares the embedding's tensor: draw it once
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                param.copy_(_random_parameter(module_name, module, name, param.shape, g))
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                buf.copy_(_random_buffer(name, buf.shape, g))


def build_tiny_model(variant: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """The randomised float32 conditional-generation model, in eval mode, not saved."""
    config = tiny_config(variant, **overrides)
    torch.manual_seed(seed)
    model = _model_class(variant)(config).to(torch.float32).eval()
    _randomise(model, torch.Generator().manual_seed(seed))
    return model


def save_tiny_checkpoint(
    variant: str,
    path: str | pathlib.Path,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **text_overrides: Any,
) -> pathlib.Path:
    """Build, randomise and `save_pretrained` a tiny checkpoint of `variant` into `path`.

    Same `seed` and overrides give bit-identical weights. `max_shard_size` (e.g. "100KB") splits
    the weights into several `model-XXXXX-of-YYYYY.safetensors` plus
    `model.safetensors.index.json`. `text_overrides` go to `tiny_config` (so `vision_overrides=`
    and `audio_overrides=` dicts pass through too).
    """
    path = pathlib.Path(path)
    model = build_tiny_model(variant, seed=seed, **text_overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def load_reference(path: str | pathlib.Path, variant: str) -> nn.Module:
    """The saved checkpoint reloaded with the released class: float32, eager attention, eval."""
    model = _model_class(variant).from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def reference_greedy(model: nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """`generate(do_sample=False)` for a batch of one: exactly `max_new_tokens` new token ids.

    EOS never stops it and no logits processor touches the scores, so the result is the plain
    argmax chain. `generate` fills every unset (None) option from `model.generation_config`, so
    EOS is cleared there for the duration of the call rather than by passing `eos_token_id=None`.
    """
    saved = model.generation_config
    gen = copy.deepcopy(saved)
    gen.eos_token_id = None
    gen.pad_token_id = 0
    gen.do_sample = False
    gen.num_beams = 1
    model.generation_config = gen
    try:
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    finally:
        model.generation_config = saved
    new = out[0, len(prompt_ids) :].tolist()
    assert len(new) == max_new_tokens, f"generate stopped after {len(new)} of {max_new_tokens} tokens"
    return new


@torch.no_grad()
def reference_logits(model: nn.Module, prompt_ids: list[int]) -> torch.Tensor:
    """Softcapped logits for every prompt position from one forward pass: [len, vocab], float32."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=input_ids, use_cache=False, logits_to_keep=0)
    return out.logits[0].float()

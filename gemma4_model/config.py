"""Typed, frozen Gemma 4 configs read from a checkpoint's `config.json`.

Every released variant is described by one `ModelConfig`: the text decoder as a tuple of
`LayerSpec`s that carry the per-layer facts the KV cache and the attention need (layer type,
head dim, KV heads, which layer owns the KV a shared layer reads), plus the raw vision and
audio sections for the encoders. Both spellings of the full-attention overrides are read: the
published one (`global_head_dim`, `num_global_key_value_heads`) and the one `transformers`
5.x writes (`per_layer_config`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping

SLIDING = "sliding_attention"
FULL = "full_attention"
LayerType = Literal["sliding_attention", "full_attention"]

TEXT_MODEL_TYPES = {"gemma4_text", "gemma4_unified_text"}
CONDITIONAL_MODEL_TYPES = {"gemma4", "gemma4_unified"}
ASSISTANT_MODEL_TYPES = {"gemma4_assistant", "gemma4_unified_assistant"}
KNOWN_MODEL_TYPES = TEXT_MODEL_TYPES | CONDITIONAL_MODEL_TYPES | ASSISTANT_MODEL_TYPES
SUPPORTED_ACTIVATIONS = {"gelu_pytorch_tanh"}
SUPPORTED_ROPE_TYPES = {"default", "proportional"}


class ConfigError(ValueError):
    """A config.json that is unknown or inconsistent; the message names the field."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"config field '{field_name}': {problem}")
        self.field = field_name


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type (`default`, or `proportional` with a rotated fraction)."""

    rope_type: str
    theta: float
    head_dim: int
    partial_rotary_factor: float = 1.0
    factor: float = 1.0

    def inverse_frequencies(self) -> list[float]:
        """head_dim/2 inverse frequencies; the un-rotated tail of a proportional RoPE is 0."""
        half = self.head_dim // 2
        if self.rope_type == "default":
            rotated = half
        else:
            rotated = int(self.partial_rotary_factor * self.head_dim // 2)
        freqs = [1.0 / (self.theta ** (2 * i / self.head_dim)) / self.factor for i in range(rotated)]
        return freqs + [0.0] * (half - rotated)


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is, as far as attention and the KV cache are concerned."""

    index: int
    layer_type: LayerType
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # values are the normed key projection (no v_proj)
    kv_owner: int | None  # layer whose KV this layer reads; itself if it owns KV; None = target's KV
    intermediate_size: int
    sliding_window: int | None  # None for full attention

    @property
    def owns_kv(self) -> bool:
        return self.kv_owner == self.index

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    intermediate_size: int


@dataclass(frozen=True)
class TextConfig:
    """The text decoder of any Gemma 4 variant."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    layers: tuple[LayerSpec, ...]
    rope: Mapping[str, RopeSpec]
    rms_norm_eps: float
    sliding_window: int
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    ple_dim: int  # per-layer-embedding width, 0 when the variant has none
    ple_vocab_size: int
    moe: MoESpec | None
    bidirectional: str | None  # None, "vision" or "all"
    span_attention: str  # how image spans attend: "none", "sliding_layers" (gemma4), "all_layers" (unified)
    max_position_embeddings: int
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Placeholder ids of media soft tokens by kind ("image", "video", "audio"), from the
    # multimodal checkpoint's top level (empty for text-only checkpoints).
    media_token_ids: Mapping[str, int] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_layers(self) -> tuple[LayerSpec, ...]:
        """Layers that write KV into the cache."""
        return tuple(layer for layer in self.layers if layer.owns_kv)

    @property
    def first_shared_layer(self) -> int:
        """Index of the first layer that reads another layer's KV (num_layers if none)."""
        return next((l.index for l in self.layers if not l.owns_kv), self.num_layers)

    def last_kv_owner(self, layer_type: str) -> int | None:
        """The last KV-owning layer of a type: the one KV-shared layers and assistants read."""
        owners = [l.index for l in self.layers if l.owns_kv and l.layer_type == layer_type]
        return owners[-1] if owners else None

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> dict[str, int]:
        """KV bytes one token occupies in the cache, per layer type (K and V both stored)."""
        out = {SLIDING: 0, FULL: 0}
        for layer in self.kv_layers:
            out[layer.layer_type] += 2 * layer.num_kv_heads * layer.head_dim * dtype_bytes
        return out


@dataclass(frozen=True)
class AssistantSpec:
    """The MTP drafter's extra facts (its decoder is `ModelConfig.text`)."""

    backbone_hidden_size: int
    use_ordered_embeddings: bool
    num_centroids: int
    centroid_intermediate_top_k: int


@dataclass(frozen=True)
class ModelConfig:
    """One checkpoint's config: the text decoder plus the raw encoder sections."""

    model_type: str
    text: TextConfig
    vision: Mapping[str, Any] | None = None
    audio: Mapping[str, Any] | None = None
    assistant: AssistantSpec | None = None
    special_tokens: Mapping[str, int] = field(default_factory=dict)

    @property
    def is_unified(self) -> bool:
        return self.model_type.startswith("gemma4_unified")

    @property
    def is_assistant(self) -> bool:
        return self.assistant is not None


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory."""
    path = Path(checkpoint_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config.json", f"not found in {checkpoint_dir}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("config.json", f"not valid JSON ({exc})") from None
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> ModelConfig:
    """Build a `ModelConfig` from a config.json mapping of any Gemma 4 variant."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config.json", "must be a JSON object")
    model_type = raw.get("model_type")
    if model_type not in KNOWN_MODEL_TYPES:
        raise ConfigError("model_type", f"unknown model_type {model_type!r}; expected one of {sorted(KNOWN_MODEL_TYPES)}")
    if model_type in TEXT_MODEL_TYPES:
        return ModelConfig(model_type=model_type, text=parse_text_config(raw))
    text_raw = raw.get("text_config")
    if not isinstance(text_raw, Mapping):
        raise ConfigError("text_config", "missing or not an object")
    if model_type in ASSISTANT_MODEL_TYPES:
        return _parse_assistant(model_type, raw, text_raw)
    tokens = {k: raw[k] for k in _SPECIAL_TOKEN_FIELDS if isinstance(raw.get(k), int)}
    media = {kind: tokens[f"{kind}_token_id"] for kind in ("image", "video", "audio") if f"{kind}_token_id" in tokens}
    return ModelConfig(
        model_type=model_type,
        text=replace(parse_text_config(text_raw, prefix="text_config."), media_token_ids=media),
        vision=_optional_section(raw, "vision_config"),
        audio=_optional_section(raw, "audio_config"),
        special_tokens=tokens,
    )


_SPECIAL_TOKEN_FIELDS = (
    "boi_token_id", "eoi_token_id", "image_token_id", "video_token_id",
    "boa_token_id", "eoa_token_index", "eoa_token_id", "audio_token_id",
)


def _optional_section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    section = raw.get(name)
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(name, "must be an object or null")
    return dict(section)


def _parse_assistant(model_type: str, raw: Mapping[str, Any], text_raw: Mapping[str, Any]) -> ModelConfig:
    text_raw = dict(text_raw)
    layers = _int(text_raw, "num_hidden_layers", minimum=1, prefix="text_config.")
    shared = text_raw.get("num_kv_shared_layers") or layers
    if shared != layers:
        raise ConfigError("text_config.num_kv_shared_layers", f"an assistant shares every layer's KV: expected {layers}, got {shared}")
    text = parse_text_config(text_raw, reads_target_kv=True, prefix="text_config.")
    if text.ple_dim or text.moe is not None:
        raise ConfigError("text_config", "an assistant has no per-layer embeddings and no MoE block")
    spec = AssistantSpec(
        backbone_hidden_size=_int(raw, "backbone_hidden_size", minimum=1, default=1536),
        use_ordered_embeddings=bool(raw.get("use_ordered_embeddings", False)),
        num_centroids=_int(raw, "num_centroids", minimum=1, default=2048),
        centroid_intermediate_top_k=_int(raw, "centroid_intermediate_top_k", minimum=1, default=32),
    )
    if spec.use_ordered_embeddings and text.vocab_size % spec.num_centroids:
        raise ConfigError("num_centroids", f"must divide vocab_size {text.vocab_size}")
    if spec.centroid_intermediate_top_k > spec.num_centroids:
        raise ConfigError("centroid_intermediate_top_k", f"exceeds num_centroids {spec.num_centroids}")
    return ModelConfig(model_type=model_type, text=text, assistant=spec)


def _int(raw: Mapping[str, Any], name: str, *, minimum: int = 0, default: Any = ..., prefix: str = "") -> int:
    value = raw.get(name, default)
    if value is ...:
        raise ConfigError(prefix + name, "missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(prefix + name, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _float(raw: Mapping[str, Any], name: str, default: Any = ...) -> float:
    value = raw.get(name, default)
    if value is ...:
        raise ConfigError(name, "missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(name, f"expected a number, got {value!r}")
    return float(value)


def parse_text_config(raw: Mapping[str, Any], *, reads_target_kv: bool = False, prefix: str = "") -> TextConfig:
    """Build the text decoder's `TextConfig` from a (text_)config mapping.

    `prefix` is how error messages name the section ("text_config." inside a full config).
    """
    p = prefix
    unified = str(raw.get("model_type", "")).startswith("gemma4_unified")
    num_layers = _int(raw, "num_hidden_layers", minimum=1, prefix=p)
    hidden = _int(raw, "hidden_size", minimum=1, prefix=p)
    num_heads = _int(raw, "num_attention_heads", minimum=1, prefix=p)
    vocab = _int(raw, "vocab_size", minimum=1, prefix=p)
    act = raw.get("hidden_activation", "gelu_pytorch_tanh")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(p + "hidden_activation", f"unsupported {act!r}; expected one of {sorted(SUPPORTED_ACTIVATIONS)}")
    if raw.get("attention_bias", False):
        raise ConfigError(p + "attention_bias", "Gemma 4 has no attention bias; got true")
    layer_types = _layer_types(raw, num_layers, p)
    bidirectional = raw.get("use_bidirectional_attention")
    if bidirectional not in (None, "vision", "all"):
        raise ConfigError(p + "use_bidirectional_attention", f"expected null, 'vision' or 'all', got {bidirectional!r}")
    if bidirectional == "all" and not reads_target_kv:
        raise ConfigError(p + "use_bidirectional_attention", "'all' (non-causal) is not a generative decoder")
    window = _int(raw, "sliding_window", minimum=1, default=512, prefix=p)
    head_dims, kv_heads = _per_layer_attention(raw, layer_types, p)
    owners = _kv_owners(raw, layer_types, num_layers, reads_target_kv, p)
    k_eq_v = bool(raw.get("attention_k_eq_v", False))
    intermediate = _int(raw, "intermediate_size", minimum=1, prefix=p)
    double_wide = bool(raw.get("use_double_wide_mlp", False))
    for i, (d, h) in enumerate(zip(head_dims, kv_heads)):
        if num_heads % h:
            raise ConfigError(p + "num_key_value_heads", f"layer {i}: {num_heads} heads not divisible by {h} KV heads")
        if d % 2:
            raise ConfigError(p + "head_dim", f"layer {i}: head dim {d} must be even for RoPE")
    layers = tuple(
        LayerSpec(
            index=i,
            layer_type=t,
            head_dim=head_dims[i],
            num_kv_heads=kv_heads[i],
            k_eq_v=k_eq_v and t == FULL,
            kv_owner=owners[i],
            intermediate_size=intermediate * (2 if double_wide and owners[i] != i else 1),
            sliding_window=window if t == SLIDING else None,
        )
        for i, t in enumerate(layer_types)
    )
    ple_dim = raw.get("hidden_size_per_layer_input") or 0
    if not isinstance(ple_dim, int) or ple_dim < 0:
        raise ConfigError(p + "hidden_size_per_layer_input", f"expected an integer >= 0, got {ple_dim!r}")
    eos = raw.get("eos_token_id", 1)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_heads=num_heads,
        layers=layers,
        rope=_rope_specs(raw, layers, p),
        rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
        sliding_window=window,
        final_logit_softcapping=None if raw.get("final_logit_softcapping") is None else _float(raw, "final_logit_softcapping"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        ple_dim=ple_dim,
        ple_vocab_size=(raw.get("vocab_size_per_layer_input") or vocab) if ple_dim else 0,
        moe=_moe_spec(raw, p),
        bidirectional=bidirectional,
        span_attention=_span_attention(bidirectional, unified),
        max_position_embeddings=_int(raw, "max_position_embeddings", minimum=1, default=131072, prefix=p),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _span_attention(bidirectional: str | None, unified: bool) -> str:
    """Image spans attend bidirectionally: Gemma 4 on sliding layers inside the window; the
    unified family (Gemma 3 style) on every layer, the span overriding the window."""
    if bidirectional != "vision":
        return "none"
    return "all_layers" if unified else "sliding_layers"


def _layer_types(raw: Mapping[str, Any], num_layers: int, p: str) -> list[str]:
    types = raw.get("layer_types")
    if types is None:
        # transformers' default: every sixth layer is full attention
        types = [SLIDING if (i + 1) % 6 else FULL for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers:
        raise ConfigError(p + "layer_types", f"expected a list of {num_layers} layer types")
    for t in types:
        if t not in (SLIDING, FULL):
            raise ConfigError(p + "layer_types", f"unknown layer type {t!r}; expected {SLIDING!r} or {FULL!r}")
    types = list(types)
    types[-1] = FULL  # the reference forces the last layer to full attention
    return types


def _per_layer_attention(raw: Mapping[str, Any], layer_types: list[str], p: str) -> tuple[list[int], list[int]]:
    head_dim = _int(raw, "head_dim", minimum=1, prefix=p)
    kv = _int(raw, "num_key_value_heads", minimum=1, prefix=p)
    dims = [head_dim] * len(layer_types)
    heads = [kv] * len(layer_types)
    overrides = raw.get("per_layer_config")
    if overrides is None:
        global_dim = _int(raw, "global_head_dim", minimum=1, default=512, prefix=p)
        global_kv = raw.get("num_global_key_value_heads")
        if global_kv is not None and not raw.get("attention_k_eq_v", True):
            global_kv = None  # the reference applies it only where k_eq_v is declared
        overrides = {}
        for i, t in enumerate(layer_types):
            if t == FULL:
                overrides[str(i)] = {"head_dim": global_dim}
                if global_kv is not None:
                    overrides[str(i)]["num_key_value_heads"] = global_kv
    if not isinstance(overrides, Mapping):
        raise ConfigError(p + "per_layer_config", "expected an object of layer index -> overrides")
    for key, layer_over in overrides.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ConfigError(p + "per_layer_config", f"key {key!r} is not a layer index") from None
        if not 0 <= i < len(layer_types) or not isinstance(layer_over, Mapping):
            raise ConfigError(p + "per_layer_config", f"entry {key!r} is not a valid layer override")
        unknown = set(layer_over) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(p + "per_layer_config", f"layer {i} overrides unsupported fields {sorted(unknown)}")
        dims[i] = _int(layer_over, "head_dim", minimum=1, default=dims[i], prefix=f"{p}per_layer_config.{i}.")
        heads[i] = _int(layer_over, "num_key_value_heads", minimum=1, default=heads[i], prefix=f"{p}per_layer_config.{i}.")
    return dims, heads


def _kv_owners(raw: Mapping[str, Any], layer_types: list[str], n: int, reads_target_kv: bool, p: str) -> list[int | None]:
    if reads_target_kv:
        return [None] * n
    shared = raw.get("num_kv_shared_layers") or 0
    if not isinstance(shared, int) or not 0 <= shared < n:
        raise ConfigError(p + "num_kv_shared_layers", f"expected 0 <= value < {n}, got {shared!r}")
    first_shared = n - shared
    owners: list[int | None] = list(range(first_shared))
    for i in range(first_shared, n):
        candidates = [j for j in range(first_shared) if layer_types[j] == layer_types[i]]
        if not candidates:
            raise ConfigError(
                p + "num_kv_shared_layers",
                f"layer {i} ({layer_types[i]}) shares KV but no earlier layer of that type owns any",
            )
        owners.append(candidates[-1])
    return owners


def _rope_specs(raw: Mapping[str, Any], layers: tuple[LayerSpec, ...], p: str) -> dict[str, RopeSpec]:
    params = raw.get("rope_parameters") or {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }
    specs = {}
    for layer_type in sorted({l.layer_type for l in layers}):
        entry = params.get(layer_type) if isinstance(params, Mapping) else None
        name = f"{p}rope_parameters.{layer_type}"
        if not isinstance(entry, Mapping):
            raise ConfigError(name, "missing")
        rope_type = entry.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(name + ".rope_type", f"unsupported {rope_type!r}; expected one of {sorted(SUPPORTED_ROPE_TYPES)}")
        dims = {l.head_dim for l in layers if l.layer_type == layer_type}
        if len(dims) != 1:
            raise ConfigError(p + "per_layer_config", f"{layer_type} layers must share one head dim, got {sorted(dims)}")
        fraction = _float(entry, "partial_rotary_factor", 1.0)
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(name + ".partial_rotary_factor", f"expected (0, 1], got {fraction}")
        specs[layer_type] = RopeSpec(
            rope_type=rope_type,
            theta=_float(entry, "rope_theta", 10_000.0),
            head_dim=dims.pop(),
            partial_rotary_factor=fraction,
            factor=_float(entry, "factor", 1.0),
        )
    return specs


def _moe_spec(raw: Mapping[str, Any], p: str) -> MoESpec | None:
    if not raw.get("enable_moe_block", False):
        return None
    experts = _int(raw, "num_experts", minimum=1, prefix=p)
    top_k = _int(raw, "top_k_experts", minimum=1, prefix=p)
    if top_k > experts:
        raise ConfigError(p + "top_k_experts", f"{top_k} exceeds num_experts {experts}")
    return MoESpec(experts, top_k, _int(raw, "moe_intermediate_size", minimum=1, prefix=p))

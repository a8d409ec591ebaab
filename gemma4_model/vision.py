"""Gemma 4 image encoders: pixel patches in, soft tokens in the language model's space out.

Two families share one interface (`encode`, `encode_video`, `text_hidden_size`):

- `ImageEncoder` (E2B, E4B, 31B, 26B-A4B): a ViT over 16x16 patches with learned 2D position
  tables and axial 2D RoPE, average-pooled over k x k patch groups, scaled by sqrt(hidden),
  optionally standardised, then RMS-normed (no weight) and projected into LM space.
- `UnifiedImageEncoder` (the encoder-free 12B): each pre-merged (k*16)^2 patch goes through
  LayerNorm -> Linear -> LayerNorm, + a factorised 2D position embedding, LayerNorm, then the
  same RMS-norm + projection. One soft token per merged patch.

Module and parameter names equal the checkpoint's tensor names with the leading `model.`
removed, so `load_image_encoder` is a direct name mapping. Inputs are what the Gemma 4 image
processors produce: `pixel_values [N, max_patches, patch_dim]` and `position_ids [N,
max_patches, 2]` holding (x, y) per patch, with (-1, -1) marking padding patches.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .config import ConfigError
from .layers import RMSNorm, SoftTokenProjection, gelu_tanh
from .loader import checkpoint_config
from .weights import CheckpointFiles, load_tensors

# Checkpoint prefixes of the vision components (standard: tower + projection; unified: the
# patch embedder + projection). Everything else belongs to other components.
_VISION_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.vision_embedder.")


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class VisionConfig:
    """The ViT image tower of the standard Gemma 4 family (`vision_config`, model_type gemma4_vision)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    rms_norm_eps: float
    rope_theta: float
    use_clipped_linears: bool
    standardize: bool
    soft_token_dim: int  # width fed to the LM projection (`output_proj_dims`, else hidden_size)
    text_hidden_size: int

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2


@dataclass(frozen=True)
class UnifiedVisionConfig:
    """The encoder-free patch embedder of the unified 12B (`vision_config`, gemma4_unified_vision)."""

    patch_size: int
    pooling_kernel_size: int
    mm_embed_dim: int
    mm_posemb_size: int
    rms_norm_eps: float
    text_hidden_size: int

    @property
    def model_patch_size(self) -> int:
        return self.patch_size * self.pooling_kernel_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.model_patch_size**2


def _vint(raw: Mapping[str, Any], name: str, default: Any = ..., minimum: int = 1) -> int:
    value = raw.get(name, default)
    if value is ...:
        raise ConfigError(f"vision_config.{name}", "missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"vision_config.{name}", f"expected an integer >= {minimum}, got {value!r}")
    return value


def _vfloat(raw: Mapping[str, Any], name: str, default: float) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"vision_config.{name}", f"expected a positive number, got {value!r}")
    return float(value)


def _vbool(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"vision_config.{name}", f"expected true or false, got {value!r}")
    return value


def parse_vision_config(
    raw: Mapping[str, Any], text_hidden_size: int, unified: bool
) -> VisionConfig | UnifiedVisionConfig:
    """Build the vision config of either family from the raw `vision_config` mapping."""
    if unified:
        cfg = UnifiedVisionConfig(
            patch_size=_vint(raw, "patch_size", 16),
            pooling_kernel_size=_vint(raw, "pooling_kernel_size", 3),
            mm_embed_dim=_vint(raw, "mm_embed_dim", 3840),
            mm_posemb_size=_vint(raw, "mm_posemb_size", 1120),
            rms_norm_eps=_vfloat(raw, "rms_norm_eps", 1e-6),
            text_hidden_size=text_hidden_size,
        )
        # The projection reads the embedder's output, so its input width must be mm_embed_dim.
        if _vint(raw, "output_proj_dims", cfg.mm_embed_dim) != cfg.mm_embed_dim:
            raise ConfigError("vision_config.output_proj_dims", f"must equal mm_embed_dim {cfg.mm_embed_dim}")
        return cfg
    activation = raw.get("hidden_activation", "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ConfigError("vision_config.hidden_activation", f"unsupported activation {activation!r}")
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, Mapping) or rope.get("rope_type", "axial") not in ("axial", "default"):
        raise ConfigError("vision_config.rope_parameters", f"expected axial (or default) rope, got {rope!r}")
    hidden = _vint(raw, "hidden_size", 768)
    heads = _vint(raw, "num_attention_heads", 12)
    kv_heads = _vint(raw, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ConfigError("vision_config.num_key_value_heads", f"must divide num_attention_heads {heads}")
    head_dim = _vint(raw, "head_dim", hidden // heads)
    if head_dim % 4:
        raise ConfigError("vision_config.head_dim", "axial 2D RoPE needs a multiple of 4")
    soft_dim = _vint(raw, "output_proj_dims", hidden)
    if soft_dim != hidden:
        raise ConfigError("vision_config.output_proj_dims", f"the tower emits hidden_size {hidden} features")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=_vint(raw, "intermediate_size", 3072),
        num_layers=_vint(raw, "num_hidden_layers", 16),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        patch_size=_vint(raw, "patch_size", 16),
        pooling_kernel_size=_vint(raw, "pooling_kernel_size", 3),
        position_embedding_size=_vint(raw, "position_embedding_size", 10240),
        rms_norm_eps=_vfloat(raw, "rms_norm_eps", 1e-6),
        rope_theta=_vfloat(rope, "rope_theta", 100.0),
        use_clipped_linears=_vbool(raw, "use_clipped_linears"),
        standardize=_vbool(raw, "standardize"),
        soft_token_dim=soft_dim,
        text_hidden_size=text_hidden_size,
    )


# --------------------------------------------------------------------------- shared pieces


def _padding_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a patch is padding: both coordinates are -1."""
    return (position_ids == -1).all(dim=-1)


def _check_inputs(pixel_values: torch.Tensor, position_ids: torch.Tensor, patch_dim: int) -> None:
    if pixel_values.dim() != 3 or pixel_values.shape[-1] != patch_dim:
        raise ValueError(f"pixel_values must be [N, max_patches, {patch_dim}], got {tuple(pixel_values.shape)}")
    if tuple(position_ids.shape) != (*pixel_values.shape[:2], 2):
        want = (*pixel_values.shape[:2], 2)
        raise ValueError(f"position_ids must be [N, max_patches, 2] = {want}, got {tuple(position_ids.shape)}")


def _split_videos(per_frame: list[torch.Tensor], frames_per_video: list[int]) -> list[torch.Tensor]:
    """Concatenate consecutive frames' soft tokens, `frames_per_video[i]` frames per video."""
    if sum(frames_per_video) != len(per_frame) or any(n < 1 for n in frames_per_video):
        raise ValueError(f"frames_per_video {frames_per_video} must be positive and add up to {len(per_frame)} frames")
    out, start = [], 0
    for n in frames_per_video:
        out.append(torch.cat(per_frame[start:start + n], dim=0))
        start += n
    return out


# --------------------------------------------------------------------------- standard tower


class ClippedLinear(nn.Module):
    """A bias-free linear map whose input and output may be clamped to stored bounds."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(math.inf if name.endswith("max") else -math.inf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        y = self.linear(torch.clamp(x, self.input_min, self.input_max))
        return torch.clamp(y, self.output_min, self.output_max)


def _rotate_axial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Axial 2D RoPE on x [N, L, heads, head_dim]: the first half rotates by x, the second by y.

    cos/sin are [N, L, 2, head_dim/2] (per axis); each half is rotated rotate-half style.
    """
    parts = []
    for axis, part in enumerate(x.chunk(2, dim=-1)):
        c, s = cos[:, :, None, axis], sin[:, :, None, axis]
        half = part.shape[-1] // 2
        rotated = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
        parts.append(part * c + rotated * s)
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    """Bidirectional attention over one image's patches; q/k RMS-normed per head, v without scale, scale 1."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        clip = cfg.use_clipped_linears
        self.q_proj = ClippedLinear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, clip)
        self.k_proj = ClippedLinear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, clip)
        self.v_proj = ClippedLinear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, clip)
        self.o_proj = ClippedLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, clip)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q = _rotate_axial(self.q_norm(self.q_proj(x).view(n, length, self.heads, self.head_dim)), cos, sin)
        k = _rotate_axial(self.k_norm(self.k_proj(x).view(n, length, self.kv_heads, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(n, length, self.kv_heads, self.head_dim))
        if self.kv_heads != self.heads:  # query head h reads kv head h // group
            group = self.heads // self.kv_heads
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_ok[:, None, None, :], scale=1.0
        )
        return self.o_proj(out.transpose(1, 2).reshape(n, length, self.heads * self.head_dim))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        clip = cfg.use_clipped_linears
        self.gate_proj = ClippedLinear(cfg.hidden_size, cfg.intermediate_size, clip)
        self.up_proj = ClippedLinear(cfg.hidden_size, cfg.intermediate_size, clip)
        self.down_proj = ClippedLinear(cfg.intermediate_size, cfg.hidden_size, clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionEncoderLayer(nn.Module):
    """Sandwich-normed pre-norm block: x + post_norm(attn(pre_norm(x))), the same for the MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_ok: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, key_ok))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def run_layer(layer: VisionEncoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              key_ok: torch.Tensor) -> torch.Tensor:
    """One encoder layer: what `ImageEncoder.enable_graphs(compile=True)` compiles, once for every layer."""
    return layer(h, cos, sin, key_ok)


class VisionEncoderStack(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_layers))


class PatchEmbedder(nn.Module):
    """Pixels in [0, 1] -> [-1, 1] -> linear, + the sum of learned x and y position rows."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.zeros(2, cfg.position_embedding_size, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.input_proj((2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype))
        pos = position_ids.clamp(min=0)  # padding rows read row 0; they never reach an output
        table = self.position_embedding_table
        return x + table[0][pos[..., 0]] + table[1][pos[..., 1]]


class VisionTower(nn.Module):
    """Patch embedder, encoder layers, k x k average pooling by position, scaling, standardisation."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedder = PatchEmbedder(cfg)
        self.encoder = VisionEncoderStack(cfg)
        if cfg.standardize:
            self.register_buffer("std_bias", torch.zeros(cfg.hidden_size))
            self.register_buffer("std_scale", torch.ones(cfg.hidden_size))
        self.graphs = None  # a vision_graphs.TowerGraphs once `ImageEncoder.enable_graphs` is called

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, L, 2, head_dim/2]: head_dim/4 frequencies per axis, each used twice (rotate-half)."""
        quarter = self.cfg.head_dim // 4
        steps = torch.arange(quarter, device=position_ids.device, dtype=torch.float32)
        exponents = steps * 2 / (self.cfg.head_dim // 2)
        inv_freq = 1.0 / (self.cfg.rope_theta ** exponents)
        angles = position_ids[..., None].float() * inv_freq  # padding keeps its -1: those rows are never read
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _pool(
        self, h: torch.Tensor, position_ids: torch.Tensor, padding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Average each k x k block of patches into one soft token, scaled by sqrt(hidden) in float32.

        Slot of a patch = (x // k) + (width // k) * (y // k), width = the image's largest x + 1.
        Padding patches are zeroed and counted at (0, 0), as the reference counts them.
        Returns pooled [N, L / k^2, hidden] (float32) and which slots hold a block.
        """
        n, length, hidden = h.shape
        k = self.cfg.pooling_kernel_size
        if length % (k * k):
            raise ValueError(f"max_patches {length} is not a multiple of pooling_kernel_size^2 = {k * k}")
        slots_per_image = length // (k * k)
        pos = position_ids.clamp(min=0)
        width = pos[..., 0].amax(dim=-1, keepdim=True) + 1
        slot = pos[..., 0] // k + (width // k) * (pos[..., 1] // k)  # [N, L]
        if int(slot.max()) >= slots_per_image:
            raise ValueError("patch positions do not tile into k x k blocks within max_patches / k^2 soft tokens")
        values = h.masked_fill(padding[..., None], 0.0).float() / (k * k)
        flat = (slot + torch.arange(n, device=slot.device)[:, None] * slots_per_image).reshape(-1)
        pooled = torch.zeros(n * slots_per_image, hidden, device=h.device, dtype=torch.float32)
        pooled.index_add_(0, flat, values.reshape(-1, hidden))
        counts = torch.zeros(n * slots_per_image, device=h.device, dtype=torch.long)
        counts.index_add_(0, flat, torch.ones_like(flat))
        pooled = pooled.view(n, slots_per_image, hidden).to(h.dtype).float() * hidden**0.5
        return pooled, counts.view(n, slots_per_image) > 0

    def transformer(self, pixel_values: torch.Tensor, position_ids: torch.Tensor,
                    layer_fn: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Patch embedding and the encoder layers: h [N, L, hidden] (no host reads: capturable).
        `layer_fn(layer, h, cos, sin, key_ok)` runs each layer (`run_layer` compiled, say)."""
        padding = _padding_mask(position_ids)
        h = self.patch_embedder(pixel_values, position_ids)
        cos, sin = self._rope(position_ids, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, ~padding) if layer_fn is None else layer_fn(layer, h, cos, sin, ~padding)
        return h

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per image, its pooled (and standardised) soft tokens [n_soft_i, hidden] in the model dtype.
        With `graphs` set (`vision_graphs.TowerGraphs`) on a CUDA input, the transformer replays a
        CUDA graph of the input's bucketed shape."""
        dtype = self.patch_embedder.input_proj.weight.dtype
        images = pixel_values.shape[0]
        if self.graphs is not None and pixel_values.is_cuda:
            pixel_values, position_ids = self.graphs.bucketed(pixel_values, position_ids)
            h = self.graphs(pixel_values, position_ids)
        else:
            h = self.transformer(pixel_values, position_ids)
        padding = _padding_mask(position_ids)
        pooled, slot_ok = self._pool(h, position_ids, padding)
        if self.cfg.standardize:  # in float32: the bias subtraction cancels large values
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        pooled = pooled.to(dtype)
        k2 = self.cfg.pooling_kernel_size**2
        valid_patches = (~padding).sum(dim=-1).tolist()
        out = []
        for i, ok in enumerate(slot_ok[:images]):
            tokens = pooled[i][ok]
            if tokens.shape[0] != valid_patches[i] // k2:
                raise ValueError(f"image {i}: {valid_patches[i]} patches do not form {tokens.shape[0]} k x k blocks")
            out.append(tokens)
        return out


class _ImageEncoderBase(nn.Module):
    """What both families' image encoders share: the LM width and video as frames (each subclass
    defines `encode`)."""

    cfg: VisionConfig | UnifiedVisionConfig

    @property
    def text_hidden_size(self) -> int:
        return self.cfg.text_hidden_size

    def encode_video(
        self, pixel_values: torch.Tensor, position_ids: torch.Tensor, frames_per_video: list[int]
    ) -> list[torch.Tensor]:
        """Per video, every frame's soft tokens concatenated in frame order."""
        return _split_videos(self.encode(pixel_values, position_ids), frames_per_video)


class ImageEncoder(_ImageEncoderBase):
    """Standard Gemma 4 image encoder: `vision_tower` + `embed_vision` (names as in the checkpoint)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg)
        self.embed_vision = SoftTokenProjection(cfg.soft_token_dim, cfg.text_hidden_size, cfg.rms_norm_eps)

    def enable_graphs(self, max_graphs: int = 8, compile: bool = False) -> None:
        """Replay the tower's transformer as CUDA graphs on CUDA inputs (one per bucketed shape,
        captured on first use): an eager pass is ~2,000 small launches, far more host time than
        GPU time at a few images. With `compile` the captured pass is `torch.compile`'s (shapes
        symbolic): the ~90 element-wise launches a layer (norms in float32, clamps, axial RoPE)
        fused into a few; the plain pass if compiling fails."""
        from .vision_graphs import TowerGraphs

        tower = self.vision_tower
        fn = tower.transformer
        if compile:  # one compiled layer for all: the modules are its inputs (a 16th of the graph to compile)
            fn = functools.partial(tower.transformer, layer_fn=torch.compile(run_layer, dynamic=True, fullgraph=True))
        tower.graphs = TowerGraphs(fn, self.cfg.pooling_kernel_size, max_graphs, fallback=tower.transformer)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per image, its soft tokens in LM space [n_soft_i, text_hidden]; padding stripped."""
        _check_inputs(pixel_values, position_ids, self.cfg.patch_dim)
        per_image = self.vision_tower(pixel_values, position_ids)
        sizes = [t.shape[0] for t in per_image]
        projected = self.embed_vision(torch.cat(per_image, dim=0))
        return list(projected.split(sizes))


# --------------------------------------------------------------------------- unified (encoder-free)


class UnifiedPatchEmbedder(nn.Module):
    """Merged patch -> LayerNorm -> Linear -> LayerNorm, + factorised (x, y) position rows, LayerNorm."""

    def __init__(self, cfg: UnifiedVisionConfig):
        super().__init__()
        self.patch_ln1 = nn.LayerNorm(cfg.patch_dim)
        self.patch_dense = nn.Linear(cfg.patch_dim, cfg.mm_embed_dim)
        self.patch_ln2 = nn.LayerNorm(cfg.mm_embed_dim)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.mm_posemb_size, 2, cfg.mm_embed_dim))
        self.pos_norm = nn.LayerNorm(cfg.mm_embed_dim)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.patch_ln2(self.patch_dense(self.patch_ln1(pixel_values.to(self.patch_dense.weight.dtype))))
        pos = position_ids.clamp(min=0)
        table = self.pos_embedding
        # Each axis contributes only where its own coordinate is not -1.
        pos_emb = sum(
            table[pos[..., axis], axis] * (position_ids[..., axis] != -1)[..., None].to(table.dtype) for axis in (0, 1)
        )
        return self.pos_norm(x + pos_emb)


class UnifiedImageEncoder(_ImageEncoderBase):
    """Unified (encoder-free) 12B image front end: `vision_embedder` + `embed_vision` (checkpoint names)."""

    def __init__(self, cfg: UnifiedVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_embedder = UnifiedPatchEmbedder(cfg)
        self.embed_vision = SoftTokenProjection(cfg.mm_embed_dim, cfg.text_hidden_size, cfg.rms_norm_eps)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per image, one LM-space soft token per non-padding merged patch [n_i, text_hidden]."""
        _check_inputs(pixel_values, position_ids, self.cfg.patch_dim)
        tokens = self.embed_vision(self.vision_embedder(pixel_values, position_ids))
        keep = ~_padding_mask(position_ids)
        return [tokens[i][keep[i]] for i in range(tokens.shape[0])]


# --------------------------------------------------------------------------- loading


def vision_tensor_name(checkpoint_name: str) -> str | None:
    """Our encoder's name for a checkpoint tensor (the name without `model.`), or None if not vision."""
    if checkpoint_name.startswith(_VISION_PREFIXES):
        return checkpoint_name[len("model."):]
    return None


def load_image_encoder(
    checkpoint_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageEncoder | UnifiedImageEncoder | None:
    """The checkpoint's image encoder with its weights on `device` in `dtype`; None without `vision_config`.

    Raises ConfigError for a bad vision section and the `weights` errors (MissingTensorError,
    UnexpectedTensorError, TensorShapeError, ...) for tensors that do not fit the config.
    """
    config = checkpoint_config(checkpoint_dir)
    if config.vision is None:
        return None
    vcfg = parse_vision_config(config.vision, config.text.hidden_size, config.is_unified)
    with torch.device("meta"):
        model = UnifiedImageEncoder(vcfg) if isinstance(vcfg, UnifiedVisionConfig) else ImageEncoder(vcfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    files = CheckpointFiles(checkpoint_dir)
    tensors = load_tensors(files, expected, device=device, dtype=dtype, rename=vision_tensor_name)
    model.load_state_dict(tensors, assign=True, strict=True)
    return model.eval()

"""The standard Gemma 4 audio tower (USM-style conformer), module names as in the checkpoint.

features [N, T, mel] --subsample_conv_projection--> [N, ceil(T/4), hidden]
  --layers (feed-forward/2, chunked local attention, light conv, feed-forward/2)--> --output_proj-->
  [N, ceil(T/4), output_dim], plus the validity of each output frame (the mask taken every
  second frame, twice).

Padding never reaches a valid frame: masked input frames are zeroed before each subsampling
conv, attention keys outside a clip's valid frames are masked, and the light conv is causal
while padding only ever trails. So a clip encodes the same alone or batched with longer ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .layers import RMSNorm

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# The reference uses RMSNorm's default eps, not the config's, for these norms.
_DEFAULT_EPS = 1e-6


@dataclass(frozen=True)
class ConformerSpec:
    """Everything the tower's modules need (parsed by `audio.parse_audio_config`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    subsampling_channels: tuple[int, int]
    conv_kernel_size: int
    chunk_size: int
    context_left: int  # keys this far back are in a block's context (the mask admits one fewer)
    context_right: int
    logit_cap: float
    invalid_logit: float
    residual_weight: float
    gradient_clipping: float
    rms_norm_eps: float
    activation: str  # a key of ACTIVATIONS
    clipped_linears: bool
    output_dim: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def past_keys(self) -> int:
        return self.context_left - 1

    @property
    def context_size(self) -> int:
        """Keys each block of `chunk_size` queries sees: past keys, the block, future keys."""
        return self.past_keys + self.chunk_size + self.context_right


def _clip(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Clamp to +-bound, the bound capped at the dtype's largest value (1e10 overflows float16)."""
    limit = min(bound, torch.finfo(x.dtype).max)
    return torch.clamp(x, -limit, limit)


class ClippedLinear(nn.Module):
    """A bias-free linear whose input and output are clamped to learned bounds (when enabled)."""

    def __init__(self, in_dim: int, out_dim: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class SubsampleBlock(nn.Module):
    """3x3 stride-2 conv over (time, mel), LayerNorm over channels, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # [N, C, T', F']
        return F.relu(self.norm(x.movedim(1, -1))).movedim(-1, 1)


class Subsampler(nn.Module):
    """`subsample_conv_projection`: two subsample blocks (time and mel / 4), then a linear to hidden."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        c0, c1 = spec.subsampling_channels
        self.layer0 = SubsampleBlock(1, c0, spec.rms_norm_eps)
        self.layer1 = SubsampleBlock(c0, c1, spec.rms_norm_eps)
        # The reference sizes this as if the input had c0 mel bins (c0 / 4 left after subsampling).
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, spec.hidden_size, bias=False)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features.unsqueeze(1)  # [N, 1, T, mel]
        for block in (self.layer0, self.layer1):
            x = block(x * valid[:, None, :, None].to(x.dtype))  # padded frames enter as zeros
            valid = valid[:, ::2]  # an output frame is valid iff its centre input frame was
        n, channels, frames, bins = x.shape
        x = x.permute(0, 2, 3, 1).reshape(n, frames, bins * channels)
        return self.input_proj_linear(x), valid


class ConformerFeedForward(nn.Module):
    """Clamp, RMSNorm, 4x MLP, clamp, RMSNorm, then a half-weighted residual."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        self.spec = spec
        self.pre_layer_norm = RMSNorm(spec.hidden_size, _DEFAULT_EPS)
        self.ffw_layer_1 = ClippedLinear(spec.hidden_size, 4 * spec.hidden_size, spec.clipped_linears)
        self.ffw_layer_2 = ClippedLinear(4 * spec.hidden_size, spec.hidden_size, spec.clipped_linears)
        self.post_layer_norm = RMSNorm(spec.hidden_size, _DEFAULT_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre_layer_norm(_clip(x, self.spec.gradient_clipping))
        h = self.ffw_layer_2(ACTIVATIONS[self.spec.activation](self.ffw_layer_1(h)))
        h = self.post_layer_norm(_clip(h, self.spec.gradient_clipping))
        return x + h * self.spec.residual_weight


class LightConv(nn.Module):
    """RMSNorm, linear + GLU, causal depthwise conv over time, clamp, RMSNorm, act, linear; residual."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        self.pre_layer_norm = RMSNorm(d, spec.rms_norm_eps)
        self.linear_start = ClippedLinear(d, 2 * d, spec.clipped_linears)
        self.depthwise_conv1d = nn.Conv1d(d, d, spec.conv_kernel_size, groups=d, bias=False)
        self.conv_norm = RMSNorm(d, spec.rms_norm_eps)
        self.linear_end = ClippedLinear(d, d, spec.clipped_linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1).transpose(1, 2)  # [N, d, T]
        h = self.depthwise_conv1d(F.pad(h, (self.spec.conv_kernel_size - 1, 0))).transpose(1, 2)
        h = self.conv_norm(_clip(h, self.spec.gradient_clipping))
        return x + self.linear_end(ACTIVATIONS[self.spec.activation](h))


def relative_position_table(spec: ConformerSpec, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoids [context_size // 2 + 1, hidden] for distances context_size // 2 down to 0 ([sin | cos])."""
    half = spec.hidden_size // 2
    step = math.log(10000.0) / max(half - 1, 1)
    inv_timescales = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -step)
    distances = torch.arange(spec.context_size // 2, -1, -1, device=device, dtype=torch.float32)
    angles = distances[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def _relative_shift(scores: torch.Tensor, context: int) -> torch.Tensor:
    """[..., rows, P] scores per distance -> [..., rows, context] per key (Transformer-XL's skew).

    Row i is padded to context + 1 columns and the rows are re-read `context` at a time, which
    moves row i right by i: column c then holds the score for distance index c - i.
    """
    *lead, rows, width = scores.shape
    padded = F.pad(scores, (0, context + 1 - width)).reshape(*lead, rows * (context + 1))
    return padded[..., : rows * context].reshape(*lead, rows, context)


def block_attention_mask(valid: torch.Tensor, spec: ConformerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Which context key each query may attend to, per block: [N, blocks, chunk, context] bool.

    Also returns the key index of every (block, context slot), [blocks, context], in a frame
    axis padded by `past_keys` in front. A query at q may see a key at k when k is a valid frame
    and 0 <= q - k < past_keys, or 0 < k - q < context_right.
    """
    n, frames = valid.shape
    chunk, context, past = spec.chunk_size, spec.context_size, spec.past_keys
    blocks = -(-frames // chunk)
    device = valid.device
    starts = torch.arange(blocks, device=device) * chunk
    query = starts[:, None, None] + torch.arange(chunk, device=device)[None, :, None]  # [B, chunk, 1]
    slot = starts[:, None] + torch.arange(context, device=device)[None, :]  # [B, context], padded axis
    key = (slot - past)[:, None, :]  # [B, 1, context], real frame index
    distance = query - key
    in_window = ((distance >= 0) & (distance < past)) | ((distance < 0) & (-distance < spec.context_right))
    in_clip = (key >= 0) & (key < frames) & (query < frames)
    key_valid = valid[:, key.clamp(0, frames - 1)]  # [N, B, 1, context]
    return key_valid & (in_window & in_clip)[None], slot


class ChunkedLocalAttention(nn.Module):
    """Blocks of `chunk_size` queries attend to their local context with a learned relative bias."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        self.spec = spec
        d, clipped = spec.hidden_size, spec.clipped_linears
        self.q_proj = ClippedLinear(d, d, clipped)
        self.k_proj = ClippedLinear(d, d, clipped)
        self.v_proj = ClippedLinear(d, d, clipped)
        self.post = ClippedLinear(d, d, clipped)
        self.relative_k_proj = nn.Linear(d, d, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(spec.head_dim))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        n, frames, _ = x.shape
        heads, head_dim, chunk = spec.num_heads, spec.head_dim, spec.chunk_size
        blocks = slots.shape[0]
        # Scores are in base 2 by the reference's convention: both scales carry a 1 / ln 2.
        q_scale = head_dim**-0.5 / math.log(2) * F.softplus(self.per_dim_scale.float())
        k_scale = math.log(1 + math.e) / math.log(2)
        q = self.q_proj(x).float().view(n, frames, heads, head_dim) * q_scale
        k = self.k_proj(x).float().view(n, frames, heads, head_dim) * k_scale
        v = self.v_proj(x).float().view(n, frames, heads, head_dim)

        q = F.pad(q, (0, 0, 0, 0, 0, blocks * chunk - frames)).view(n, blocks, chunk, heads, head_dim)
        tail = blocks * chunk + spec.context_right - frames  # room for the last block's context
        k = F.pad(k, (0, 0, 0, 0, spec.past_keys, tail))[:, slots]  # [N, B, context, H, D]
        v = F.pad(v, (0, 0, 0, 0, spec.past_keys, tail))[:, slots]

        rel = self.relative_k_proj(positions).float().view(-1, heads, head_dim)  # [P, H, D]
        content = torch.einsum("nbihd,nbjhd->nhbij", q, k)
        position = _relative_shift(torch.einsum("nbihd,phd->nhbip", q, rel), spec.context_size)
        logits = torch.tanh((content + position) / spec.logit_cap) * spec.logit_cap
        logits = logits.masked_fill(~allowed[:, None], spec.invalid_logit)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        out = torch.einsum("nhbij,nbjhd->nbihd", probs, v).reshape(n, blocks * chunk, heads * head_dim)
        return self.post(out[:, :frames].to(x.dtype))


class ConformerBlock(nn.Module):
    """Feed-forward, attention, light conv, feed-forward, each clamped and RMS-normed."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        self.feed_forward1 = ConformerFeedForward(spec)
        self.norm_pre_attn = RMSNorm(d, _DEFAULT_EPS)
        self.self_attn = ChunkedLocalAttention(spec)
        self.norm_post_attn = RMSNorm(d, _DEFAULT_EPS)
        self.lconv1d = LightConv(spec)
        self.feed_forward2 = ConformerFeedForward(spec)
        self.norm_out = RMSNorm(d, _DEFAULT_EPS)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        clip = self.spec.gradient_clipping
        x = self.feed_forward1(x)
        attended = self.self_attn(self.norm_pre_attn(_clip(x, clip)), allowed, slots, positions)
        x = x + self.norm_post_attn(_clip(attended, clip))
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(_clip(x, clip))


class AudioTower(nn.Module):
    """`audio_tower`: features [N, T, mel] + valid [N, T] -> hidden [N, T', output_dim] + valid [N, T']."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        self.spec = spec
        self.subsample_conv_projection = Subsampler(spec)
        self.layers = nn.ModuleList(ConformerBlock(spec) for _ in range(spec.num_layers))
        self.output_proj = nn.Linear(spec.hidden_size, spec.output_dim, bias=True)

    def accepts_mel_bins(self, mel_bins: int) -> bool:
        """Whether features with this many mel bins fit `input_proj_linear` after subsampling."""
        c0, c1 = self.spec.subsampling_channels
        return math.ceil(math.ceil(mel_bins / 2) / 2) * c1 == (c0 // 4) * c1

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, valid = self.subsample_conv_projection(features, valid)
        allowed, slots = block_attention_mask(valid, self.spec)
        positions = relative_position_table(self.spec, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, allowed, slots, positions)
        return self.output_proj(x), valid

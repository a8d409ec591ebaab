"""The Gemma 4 building blocks: RMSNorm, RoPE, gated MLP, the MoE block.

Module and parameter names follow the checkpoint's own tensor names, so a state dict read from
safetensors loads into these modules as it is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import MoESpec, RopeSpec


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of the last dim in float32, times `weight` when given, back in x's dtype."""
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def pack_rows(*linears: nn.Linear) -> torch.Tensor:
    """One [sum of out features, in] weight whose row blocks the given layers' weights become views
    of (their names and shapes unchanged): a fused projection is then one matrix product."""
    packed = torch.cat([lin.weight.data for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = packed[start:start + rows]
        start += rows
    return packed


def is_packed(packed: torch.Tensor | None, linears) -> bool:
    """Whether the linears' weights are still consecutive row views of `packed`."""
    if packed is None:
        return False
    start = packed.data_ptr()
    for lin in linears:
        w = lin.weight
        if w.data_ptr() != start or w.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr():
            return False
        start += w.numel() * w.element_size()
    return True


class RMSNorm(nn.Module):
    """RMSNorm in float32, scaled by `weight` (not 1 + weight); `with_scale=False` has no weight."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for one layer type, computed per position on the fly."""

    def __init__(self, spec: RopeSpec):
        super().__init__()
        self.register_buffer("inv_freq", torch.tensor(spec.inverse_frequencies(), dtype=torch.float32), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, heads, head_dim] with cos/sin [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self._gate_up: torch.Tensor | None = None  # gate|up rows, once packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))

    def packed_gate_up(self) -> torch.Tensor:
        """One weight of gate|up rows, gate_proj/up_proj made views of it (see `pack_rows`)."""
        if not is_packed(self._gate_up, (self.gate_proj, self.up_proj)):
            self._gate_up = pack_rows(self.gate_proj, self.up_proj)
        return self._gate_up


class Router(nn.Module):
    """Top-k expert choice: normed, scaled input -> softmax (float32) -> top-k renormalised."""

    def __init__(self, hidden: int, spec: MoESpec, eps: float):
        super().__init__()
        self.top_k = spec.top_k
        self.norm = RMSNorm(hidden, eps, with_scale=False)
        self.proj = nn.Linear(hidden, spec.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(spec.num_experts))
        self.root = hidden**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x) * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


class Experts(nn.Module):
    """Expert FFNs stored as [E, 2I, H] (gate|up) and [E, H, I]; computed expert by expert."""

    def __init__(self, hidden: int, spec: MoESpec):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(spec.num_experts, 2 * spec.intermediate_size, hidden))
        self.down_proj = nn.Parameter(torch.empty(spec.num_experts, hidden, spec.intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(experts).tolist():
            rows, which = torch.where(experts == e)
            gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(gelu_tanh(gate) * up, self.down_proj[e])
            out.index_add_(0, rows, (y * weights[rows, which, None]).to(out.dtype))
        return out


class SoftTokenProjection(nn.Module):
    """An encoder's features -> LM space (`embed_vision` / `embed_audio`): RMSNorm without a
    weight, then a bias-free linear map to the text hidden size."""

    def __init__(self, in_dim: int, text_hidden: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_dim, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def add_sandwich_norms(layer: nn.Module, hidden: int, eps: float) -> None:
    """The four RMSNorms around a Gemma 4 layer's attention and MLP, under the checkpoint's names."""
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"):
        setattr(layer, name, RMSNorm(hidden, eps))

"""The Gemma 4 assistant (MTP drafter), reading the target's KV from Tandem's paged cache.

Both assistant families (`gemma4_assistant`, `gemma4_unified_assistant`) are the same network:
a small decoder whose every layer is KV-shared with the *target*, so it keeps no KV of its own.
Drafting from the last seen token x_q at position q (the target has KV for positions < q):

  step 1: x = pre_projection(concat(target_embed(x_q), h_{q-1}))  (h: the target's final-norm
          hidden state, target_embed: the target's scaled token embedding)
  layers at position q: pre-norm attention over the target's KV of the target's last KV-owning
          layer of the same type (full layers: every position < q; sliding layers: the
          `window + 1` positions q-1-window .. q-1, as `transformers`' flipped bidirectional
          sliding mask gives), softmax scale 1, then the gated MLP, as in the target's layers
  final norm -> logits (lm_head, tied to `model.embed_tokens` by default; no softcapping, as the
          reference applies none) and post_projection -> the state fed to the next step
  step j > 1: the drafted token's target embedding with that state, still at position q, over
          the same frozen target KV.

With `use_ordered_embeddings` the logits are computed only for the tokens of the
`centroid_intermediate_top_k` best of `num_centroids` centroids (`masked_embedding`); every other
token gets (the smallest computed logit - 1). `transformers` takes that minimum over its whole
batch; here it is per sequence, so a sequence drafts the same alone or batched (and equals the
reference's generator, which drafts one sequence at a time).

What the cache must hold: the target's KV of every position a draft at q reads, so a sequence
must not be slid (`PagedKVCache.slide`) past q - 2 before drafting (the target's own query at q
needs only q-window+1 .. q). Only the first drafting round after a prefill is comparable with
`transformers`' generator: in later rounds it hands its assistant the verify forward's KV
(including rejected drafts' KV at q and, for sliding layers, beyond), while Tandem keeps to
positions < q, as the documented protocol and the default model's training do.

Parameter names equal the checkpoint's, so loading is a direct mapping (`load_drafter`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .config import ASSISTANT_MODEL_TYPES, SLIDING, LayerSpec, ModelConfig, TextConfig
from .kv_cache import NO_PAGE, PagedKVCache
from .layers import MLP, RMSNorm, RotaryEmbedding, add_sandwich_norms, apply_rope
from .loader import checkpoint_config
from .weights import CheckpointError, CheckpointFiles, load_tensors, read_model_type

TokenEmbed = Callable[[torch.Tensor], torch.Tensor]  # token ids [N] -> target embeddings [N, hidden]
DraftSample = Callable[[torch.Tensor, int], torch.Tensor]  # (logits [B, vocab] float32, step) -> ids [B]


class DrafterMismatchError(CheckpointError):
    """The assistant checkpoint does not fit the target it is meant to draft for."""


@dataclass(frozen=True)
class DraftResult:
    """k drafted tokens per sequence and the logits each was chosen from."""

    tokens: torch.Tensor  # [B, k] long
    logits: torch.Tensor  # [B, k, vocab] float32


@dataclass(frozen=True)
class TargetKV:
    """One layer type's frozen target KV as the draft queries see it, padded over the batch."""

    k: torch.Tensor  # [B, L, kv_heads, head_dim]
    v: torch.Tensor
    visible: torch.Tensor  # [B, L] bool


class DraftAttention(nn.Module):
    """Queries only: keys and values are the target's."""

    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * spec.head_dim, bias=False)
        self.q_norm = RMSNorm(spec.head_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(cfg.num_heads * spec.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: TargetKV) -> torch.Tensor:
        B, d = x.shape[0], self.spec.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, self.heads, d)), cos, sin)
        groups = kv.k.shape[2]
        q = q.view(B, groups, self.heads // groups, d)  # GQA: query heads grouped by their KV head
        scores = torch.einsum("bgrd,blgd->bgrl", q, kv.k.to(q.dtype)).float()
        scores = scores.masked_fill(~kv.visible[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.einsum("bgrl,blgd->bgrd", probs, kv.v.to(q.dtype))
        return self.o_proj(out.reshape(B, -1))


class DraftLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.spec = spec
        self.self_attn = DraftAttention(cfg, spec)
        self.mlp = MLP(h, spec.intermediate_size)
        add_sandwich_norms(self, h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, kv: TargetKV):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv))
        return (h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))) * self.layer_scalar


class DraftStack(nn.Module):
    """The assistant's decoder (`model.*`): its embedding table is only the tied lm_head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DraftLayer(cfg, spec) for spec in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CentroidMask(nn.Module):
    """`masked_embedding`: logits of the tokens of the top-k centroids only."""

    def __init__(self, hidden: int, vocab: int, num_centroids: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.num_centroids = num_centroids
        self.centroids = nn.Linear(hidden, num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(vocab, dtype=torch.long))

    def forward(self, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """h [B, hidden], head [vocab, hidden] -> logits [B, vocab]."""
        chosen = torch.topk(self.centroids(h), self.top_k, dim=-1).indices  # [B, top_k]
        members = self.token_ordering.view(self.num_centroids, -1)[chosen].flatten(1)  # [B, top_k * per]
        logits = torch.einsum("bh,bnh->bn", h, head[members])
        floor = logits.min(dim=-1, keepdim=True).values - 1.0
        return floor.expand(-1, head.shape[0]).clone().scatter_(1, members, logits)


class Drafter(nn.Module):
    """A Gemma 4 assistant; parameter names equal its checkpoint's."""

    def __init__(self, config: ModelConfig, target: TextConfig, target_embed: TokenEmbed, tied: bool = True):
        super().__init__()
        assert config.assistant is not None, "a drafter needs an assistant config"
        cfg, spec = config.text, config.assistant
        self.cfg, self.spec, self.target = cfg, spec, target
        self.target_embed = target_embed
        self.tied = tied
        self.model = DraftStack(cfg)
        self.lm_head = None if tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.pre_projection = nn.Linear(2 * spec.backbone_hidden_size, cfg.hidden_size, bias=False)
        self.post_projection = nn.Linear(cfg.hidden_size, spec.backbone_hidden_size, bias=False)
        self.masked_embedding = (CentroidMask(cfg.hidden_size, cfg.vocab_size, spec.num_centroids,
                                              spec.centroid_intermediate_top_k) if spec.use_ordered_embeddings else None)
        self.rotary = nn.ModuleDict({name: RotaryEmbedding(r) for name, r in cfg.rope.items()})
        # Which target layer each layer type reads: the target's last KV owner of that type.
        self.reads = {t: target.last_kv_owner(t) for t in {layer.layer_type for layer in cfg.layers}}

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def target_kv(self, cache: PagedKVCache, seq_ids: Sequence[int], positions: torch.Tensor) -> dict[str, TargetKV]:
        """Gather, per layer type, the target KV the queries at `positions` see (frozen for all k steps)."""
        out = {}
        for layer_type, owner in self.reads.items():
            group = cache.groups[layer_type]
            window = self.cfg.sliding_window if layer_type == SLIDING else None
            out[layer_type] = gather_target_kv(cache, layer_type, group.slot_of(owner), seq_ids, positions, window)
        return out

    def step(self, embeds: torch.Tensor, state: torch.Tensor, rope: dict, kv: dict[str, TargetKV]):
        """One draft step for B sequences: (logits [B, vocab], next state [B, backbone_hidden])."""
        dtype = self.pre_projection.weight.dtype
        x = self.pre_projection(torch.cat([embeds.to(dtype), state.to(dtype)], dim=-1))
        for layer in self.model.layers:
            cos, sin = rope[layer.spec.layer_type]
            x = layer(x, cos, sin, kv[layer.spec.layer_type])
        h = self.model.norm(x)
        head = self.head_weight
        logits = self.masked_embedding(h, head) if self.masked_embedding is not None else F.linear(h, head)
        return logits, self.post_projection(h)

    @torch.inference_mode()
    def draft(self, cache: PagedKVCache, seq_ids: Sequence[int], last_tokens: torch.Tensor, hidden: torch.Tensor,
              positions: torch.Tensor, k: int, sample: DraftSample | None = None) -> DraftResult:
        """Draft `k` tokens for each sequence after its last seen token.

        `last_tokens` [B]: x_q; `positions` [B]: q (the target holds KV for positions < q, pages
        included: full from 0, sliding from q-1-window); `hidden` [B, backbone_hidden]: the
        target's final-norm hidden state at q-1. `sample(logits [B, vocab] float32, step)` picks
        the drafted ids (greedy argmax when None).
        """
        if k < 1 or not seq_ids:
            raise ValueError(f"drafting needs k >= 1 and at least one sequence (k={k}, {len(seq_ids)} sequences)")
        device = self.pre_projection.weight.device
        positions = torch.as_tensor(positions, dtype=torch.long, device=device).view(-1)
        tokens = torch.as_tensor(last_tokens, dtype=torch.long, device=device).view(-1)
        if not (len(seq_ids) == positions.numel() == tokens.numel() == hidden.shape[0]):
            raise ValueError("seq_ids, last_tokens, hidden and positions must have one entry per sequence")
        if int(positions.min()) < 1:
            raise ValueError("drafting needs the target's state at q-1: every position must be >= 1")
        kv = self.target_kv(cache, seq_ids, positions)
        dtype = self.pre_projection.weight.dtype
        rope = {name: r(positions, dtype) for name, r in self.rotary.items()}  # every step stays at q
        state = hidden.to(device)
        all_tokens, all_logits = [], []
        for j in range(k):
            logits, state = self.step(self.target_embed(tokens), state, rope, kv)
            logits = logits.float()
            tokens = logits.argmax(dim=-1) if sample is None else sample(logits, j).to(device=device, dtype=torch.long)
            all_tokens.append(tokens)
            all_logits.append(logits)
        return DraftResult(tokens=torch.stack(all_tokens, dim=1), logits=torch.stack(all_logits, dim=1))


def gather_target_kv(cache: PagedKVCache, layer_type: str, slot: int, seq_ids: Sequence[int], positions: torch.Tensor,
                     window: int | None) -> TargetKV:
    """K/V of one target layer at positions [q - 1 - window, q) (full: [0, q)) through each page table."""
    group = cache.groups[layer_type]
    device = group.k.device
    P = cache.page_size
    q = positions.to(device)
    first = torch.zeros_like(q) if window is None else (q - 1 - window).clamp(min=0)
    length = int((q - first).max())
    pos = first[:, None] + torch.arange(length, device=device)[None, :]  # [B, L]
    visible = pos < q[:, None]
    tables = [cache.page_table(s, layer_type) for s in seq_ids]
    width = max(1, max(len(t) for t in tables))
    table = torch.full((len(seq_ids), width), NO_PAGE, dtype=torch.long)
    for b, t in enumerate(tables):
        table[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    table = table.to(device)
    logical = torch.where(visible, pos // P, 0)
    if bool((logical >= width).any()):
        raise ValueError(f"a sequence's {layer_type} page table does not reach its draft position")
    pages = table.gather(1, logical)
    missing = visible & (pages == NO_PAGE)
    if bool(missing.any()):
        b = int(missing.any(dim=1).nonzero()[0])
        raise ValueError(f"sequence {seq_ids[b]} no longer holds the {layer_type} KV a draft at {int(q[b])} reads")
    slots = torch.where(visible, pages * P + pos % P, 0)
    kv_heads, head_dim = group.k.shape[-2:]
    k = group.k[slot].view(-1, kv_heads, head_dim)[slots]
    v = group.v[slot].view(-1, kv_heads, head_dim)[slots]
    return TargetKV(k=k, v=v, visible=visible)


def check_fits_target(config: ModelConfig, target: TextConfig) -> None:
    """Refuse an assistant whose shapes cannot read this target's KV (DrafterMismatchError)."""
    assert config.assistant is not None
    cfg = config.text
    if config.assistant.backbone_hidden_size != target.hidden_size:
        raise DrafterMismatchError(f"assistant backbone_hidden_size {config.assistant.backbone_hidden_size} != "
                                   f"target hidden size {target.hidden_size}")
    if cfg.vocab_size != target.vocab_size:
        raise DrafterMismatchError(f"assistant vocab_size {cfg.vocab_size} != target vocab_size {target.vocab_size}")
    for layer in cfg.layers:
        owner = target.last_kv_owner(layer.layer_type)
        if owner is None:
            raise DrafterMismatchError(f"assistant layer {layer.index} is {layer.layer_type} but the target has "
                                       "no KV-owning layer of that type")
        theirs = target.layers[owner]
        if (theirs.num_kv_heads, theirs.head_dim) != (layer.num_kv_heads, layer.head_dim):
            raise DrafterMismatchError(
                f"assistant layer {layer.index} ({layer.layer_type}) expects KV of {layer.num_kv_heads} heads x "
                f"{layer.head_dim}; target layer {owner} has {theirs.num_kv_heads} x {theirs.head_dim}")
    if any(l.is_sliding for l in cfg.layers) and cfg.sliding_window > target.sliding_window:
        raise DrafterMismatchError(f"assistant sliding_window {cfg.sliding_window} exceeds the target's "
                                   f"{target.sliding_window}: the cache would not keep what it reads")


def load_drafter(assistant_dir: str | Path, target_config: ModelConfig | TextConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, *, target_embed: TokenEmbed) -> Drafter:
    """Load an assistant checkpoint (either family) for a target.

    `target_embed` is the target's scaled token embedding (`TextDecoder.embed`). Errors: those of
    `weights.py` (`UnknownModelTypeError` for a non-assistant checkpoint, missing / unexpected /
    mis-shaped tensors) and `DrafterMismatchError` when it does not fit the target.
    """
    read_model_type(assistant_dir, ASSISTANT_MODEL_TYPES)
    config = checkpoint_config(assistant_dir)
    target = target_config.text if isinstance(target_config, ModelConfig) else target_config
    check_fits_target(config, target)
    raw = json.loads((Path(assistant_dir) / "config.json").read_text())
    tied = bool(raw.get("tie_word_embeddings", True))  # the reference ties on the top-level flag
    with torch.device("meta"):
        drafter = Drafter(config, target, target_embed, tied)
    expected = {name: tuple(t.shape) for name, t in drafter.state_dict().items()}

    def rename(name: str) -> str | None:
        return None if tied and name == "lm_head.weight" else name  # tied: the embedding is the head

    tensors = load_tensors(CheckpointFiles(assistant_dir), expected, device=device, dtype=dtype, rename=rename)
    drafter.load_state_dict(tensors, assign=True, strict=True)
    # RoPE tables are not in checkpoints: build them for real on the device.
    drafter.rotary = nn.ModuleDict({n: RotaryEmbedding(r) for n, r in config.text.rope.items()}).to(device)
    return drafter.eval()

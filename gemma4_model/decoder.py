"""The Gemma 4 text decoder for serving: one forward over a ragged batch on the paged cache.

Covers every text feature of the family: sliding and full layers with their own head dims and
KV heads, default and proportional RoPE, q/k/v norms, k_eq_v, KV sharing, double-wide MLPs, the
MoE block, per-layer embeddings (PLE), final logit softcapping and tied embeddings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from .attention import paged_attention, write_kv
from .batch import ForwardBatch
from .config import LayerSpec, TextConfig
from .kernels.fused import KVWrite, gelu_mul, head_norm_rope, ple_combine, ple_combine_torch, residual_norm
from .kernels.gemv import decode_gate_up_gelu, decode_linear, decode_linear_norm, decode_qkv_norm_rope
from .kernels.l2_prefetch import WeightPrefetch
from .kernels.ple_tail import PleTail
from .kernels.moe import moe_combine, moe_combine_tail, moe_expert_rows, moe_route
from .kernels.paged_attention import paged_attention_triton
from .kv_cache import PagedKVCache
from .layers import (MLP, Experts, RMSNorm, RotaryEmbedding, Router, add_sandwich_norms, apply_rope, gelu_tanh,
                     is_packed, pack_rows)


@dataclass(frozen=True)
class DecoderOutput:
    logits: torch.Tensor  # [N, vocab] for the batch's logits rows
    # [N, hidden] the final-norm hidden state at those rows (what the lm_head reads; an MTP
    # assistant drafts from the one of the position that produced a sequence's newest token)
    hidden: torch.Tensor


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, kernels: bool = False):
        super().__init__()
        self.spec = spec
        self.kernels = kernels  # the Triton paged-attention kernel instead of its PyTorch twin
        self.heads = cfg.num_heads
        self.span_mode = _span_mode(cfg.span_attention, spec)
        d = spec.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        if spec.owns_kv:
            self.k_proj = nn.Linear(cfg.hidden_size, spec.num_kv_heads * d, bias=False)
            self.v_proj = None if spec.k_eq_v else nn.Linear(cfg.hidden_size, spec.num_kv_heads * d, bias=False)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(d, cfg.rms_norm_eps, with_scale=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)
        self._qkv: torch.Tensor | None = None  # q|k|v rows, once packed

    def packed_qkv(self) -> torch.Tensor:
        """One weight of q|k|v rows, q_proj/k_proj/v_proj made views of it (packed again if a
        move or a new weight tensor undid that)."""
        projections = [p for p in (self.q_proj, self.k_proj, self.v_proj) if p is not None]
        if not is_packed(self._qkv, projections):
            self._qkv = pack_rows(*projections)
        return self._qkv

    def input_weight(self) -> torch.Tensor:
        """The weight of the layer's first product: q|k|v packed, or q alone (KV-shared layers)."""
        return self.packed_qkv() if self.spec.owns_kv else self.q_proj.weight

    def forward_kernels(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                        cache: PagedKVCache, after_qkv: Callable[[], None] | None = None) -> torch.Tensor:
        """`forward` on normed input `y` through the fused kernels (q, k, v in one product, their
        norms, RoPE and the cache write in one launch, then the Triton attention); `after_qkv` is
        called once the q|k|v product is queued (a weight prefetch's fork point)."""
        return decode_linear(self.attend_kernels(y, cos, sin, batch, cache, after_qkv), self.o_proj.weight)

    def attend_kernels(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                       cache: PagedKVCache, after_qkv: Callable[[], None] | None = None) -> torch.Tensor:
        """`forward_kernels` up to the o projection's input [T, heads * head_dim]."""
        spec = self.spec
        group = cache.groups[spec.layer_type]
        slot = group.slot_of(spec.kv_owner)
        eps = self.q_norm.eps
        kv = None
        if spec.owns_kv:
            shape = (-1, spec.num_kv_heads, spec.head_dim)
            kv = KVWrite(self.k_norm.weight, spec.num_kv_heads, spec.k_eq_v, group.k[slot].view(shape),
                         group.v[slot].view(shape), batch.groups[spec.layer_type].write_slots)
        if after_qkv is None:  # the norms may add the product's K splits (TANDEM_SPLITS_IN_NORM_ROWS)
            q = decode_qkv_norm_rope(y, self.input_weight(), self.heads, spec.head_dim, self.q_norm.weight, cos, sin,
                                     eps, kv)
        else:
            qkv = decode_linear(y, self.input_weight())
            after_qkv()
            q = head_norm_rope(qkv, self.heads, spec.head_dim, self.q_norm.weight, cos, sin, eps, kv)
        out = paged_attention_triton(q, group, slot, batch, spec.layer_type, self.span_mode)
        return out.reshape(y.shape[0], -1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        spec = self.spec
        T = x.shape[0]
        q = apply_rope(self.q_norm(self.q_proj(x).view(T, self.heads, spec.head_dim)), cos, sin)
        group = cache.groups[spec.layer_type]
        slot = group.slot_of(spec.kv_owner)
        if spec.owns_kv:
            raw_k = self.k_proj(x).view(T, spec.num_kv_heads, spec.head_dim)
            raw_v = raw_k if self.v_proj is None else self.v_proj(x).view(T, spec.num_kv_heads, spec.head_dim)
            k = apply_rope(self.k_norm(raw_k), cos, sin)
            write_kv(group, slot, batch.groups[spec.layer_type].write_slots, k, self.v_norm(raw_v))
        attend = paged_attention_triton if self.kernels else paged_attention
        out = attend(q, group, slot, batch, spec.layer_type, self.span_mode)
        return self.o_proj(out.reshape(T, -1))


def _span_mode(span_attention: str, spec: LayerSpec) -> str:
    if span_attention == "all_layers":
        return "override"
    if span_attention == "sliding_layers" and spec.is_sliding:
        return "windowed"
    return "none"


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, spec: LayerSpec, kernels: bool = False):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.spec = spec
        self.self_attn = Attention(cfg, spec, kernels)
        self.mlp = MLP(h, spec.intermediate_size)
        add_sandwich_norms(self, h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.moe = cfg.moe is not None
        if self.moe:
            self.router = Router(h, cfg.moe, eps)
            self.experts = Experts(h, cfg.moe)
            self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
            self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.ple = cfg.ple_dim > 0
        if self.ple:
            self.per_layer_input_gate = nn.Linear(h, cfg.ple_dim, bias=False)
            self.per_layer_projection = nn.Linear(cfg.ple_dim, h, bias=False)
            self.post_per_layer_input_norm = RMSNorm(h, eps)
            self.ple_tail = PleTail()  # the fused tail's row counters (decode batch sizes)

    def forward(self, x, ple_input, cos, sin, batch, cache):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, batch, cache))
        m = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe:
            weights, experts = self.router(h)
            routed = self.experts(self.pre_feedforward_layernorm_2(h), weights, experts)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(routed)
        x = h + self.post_feedforward_layernorm(m)
        if self.ple:
            gated = gelu_tanh(self.per_layer_input_gate(x)) * ple_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return x * self.layer_scalar

    def forward_kernels(self, x: torch.Tensor, y: torch.Tensor, ple_input: torch.Tensor | None, cos, sin, batch,
                        cache, next_norm: torch.Tensor, prefetch: WeightPrefetch | None = None,
                        next_layer: DecoderLayer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` through the fused kernels: x is the residual stream, y = input_layernorm(x);
        returns the layer's output and its norm by `next_norm` (the next layer's input norm, or
        the final norm), each norm fused with the residual add before it. With `prefetch`, the o
        projection (and the head of gate|up) are read into L2 while attention runs, and the
        per-layer-embedding weights and `next_layer`'s first product while the layer's tail runs."""
        eps = self.input_layernorm.eps
        after_qkv = None if prefetch is None else partial(
            prefetch, self.self_attn.o_proj.weight, prefetch.mlp_head(self.mlp.packed_gate_up()))
        attn = self.self_attn
        h, y = decode_linear_norm(attn.attend_kernels(y, cos, sin, batch, cache, after_qkv), attn.o_proj.weight, x,
                                  self.post_attention_layernorm.weight, eps,
                                  next_weight=self.pre_feedforward_layernorm.weight)
        mlp = self.mlp
        act = decode_gate_up_gelu(y, mlp.packed_gate_up())
        # the norms after the down product may add its K splits (TANDEM_SPLITS_IN_NORM_ROWS); MoE's combination
        # may not
        m = decode_linear(act, mlp.down_proj.weight, norm_next=not self.moe)
        if self.moe:  # routing, two grouped matrix products and the combination; no host read: capturable
            expert_in, weights, experts = moe_route(h, self.router, self.pre_feedforward_layernorm_2)
            rows = moe_expert_rows(expert_in, weights, experts, self.experts.gate_up_proj, self.experts.down_proj)
        if prefetch is not None:
            prefetch(*((self.per_layer_input_gate.weight, self.per_layer_projection.weight) if self.ple else ()),
                     None if next_layer is None else next_layer.self_attn.input_weight())
        if self.moe:
            norms = self.post_feedforward_layernorm_1.weight, self.post_feedforward_layernorm_2.weight
            if not self.ple:  # the combination, the post-feed-forward norm and the next input norm in one launch
                return moe_combine_tail(m, rows, *norms, eps, h, self.post_feedforward_layernorm.weight,
                                        self.layer_scalar, next_norm)
            m = moe_combine(m, rows, *norms, eps)
        if not self.ple:
            return residual_norm(m, h, self.post_feedforward_layernorm.weight, eps, self.layer_scalar, next_norm)
        if PleTail.fits(m):  # decode batch sizes: the post-feed-forward norm to the next norm in two launches
            return self.ple_tail(m, h, self.post_feedforward_layernorm.weight, self.per_layer_input_gate.weight,
                                 ple_input, self.per_layer_projection.weight, self.post_per_layer_input_norm.weight,
                                 eps, self.layer_scalar, next_norm)
        x, _ = residual_norm(m, h, self.post_feedforward_layernorm.weight, eps)
        gated = gelu_mul(self.per_layer_input_gate(x), ple_input)
        return residual_norm(self.per_layer_projection(gated), x, self.post_per_layer_input_norm.weight, eps,
                             self.layer_scalar, next_norm)


class TextDecoder(nn.Module):
    """Gemma 4 text decoder; parameter names match the checkpoint's language-model tensors.

    `kernels=True` (`set_kernels`) runs the layers through the Triton kernels (CUDA tensors, or
    Triton's interpreter on CPU): the fused norms, RoPE and activations of `kernels.fused` and
    the paged attention kernel, over packed q|k|v and gate|up weights; off, the PyTorch twins.
    """

    def __init__(self, cfg: TextConfig, kernels: bool = False):
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spec, kernels) for spec in cfg.layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = nn.ModuleDict({name: RotaryEmbedding(spec) for name, spec in cfg.rope.items()})
        if cfg.ple_dim:
            n = cfg.num_layers * cfg.ple_dim
            self.embed_tokens_per_layer = nn.Embedding(cfg.ple_vocab_size, n)
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, n, bias=False)
            self.per_layer_projection_norm = RMSNorm(cfg.ple_dim, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # weights read into L2 ahead of their products at decode batch sizes (kernels on, CUDA; see
        # kernels/l2_prefetch.py); None: off
        self.weight_prefetch: WeightPrefetch | None = None

    def set_kernels(self, on: bool) -> None:
        """Run the layers through the Triton kernels (on) or their PyTorch twins (off).

        The kernels' first forward packs each layer's q|k|v and gate|up weights into one tensor
        apiece, the checkpoint-named parameters becoming views of it (`load_state_dict` writes
        through them; a move to another device is packed again at the next forward)."""
        self.kernels = on
        for layer in self.layers:
            layer.self_attn.kernels = on

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(hidden), the scale rounded to the weight dtype first."""
        w = self.embed_tokens.weight
        return F.embedding(token_ids, w) * torch.tensor(self.cfg.hidden_size**0.5, dtype=w.dtype)

    def per_layer_inputs(self, token_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """PLE input [T, layers, ple_dim]: (normed projection of the embeddings + token table) / sqrt 2.

        As the reference does for multimodal rows, `token_ids` there are the pad id (the table
        part) while `embeds` hold the spliced soft tokens (the projection part).
        """
        cfg = self.cfg
        combine = ple_combine if self.kernels else ple_combine_torch
        return combine(self.per_layer_model_projection(embeds), token_ids, self.embed_tokens_per_layer.weight,
                       self.per_layer_projection_norm.weight, cfg.num_layers, cfg.hidden_size, cfg.rms_norm_eps)

    def input_embeddings(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids with media rows set to the pad id, embeddings with the soft tokens spliced in)."""
        ids = batch.token_ids
        if batch.media_rows is None:
            return ids, self.embed(ids)
        pad = self.cfg.pad_token_id
        assert pad is not None, "media rows need the text config's pad_token_id"
        ids = ids.index_fill(0, batch.media_rows, pad)  # placeholder ids may lie outside the vocabulary
        x = self.embed(ids)
        return ids, x.index_copy(0, batch.media_rows, batch.media_embeds.to(x.dtype))

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """(Tied) lm_head and softcapping over final-norm hidden states."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = decode_linear(normed, weight)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> DecoderOutput:
        """Run the batch's query tokens, write their KV, return logits at its logits rows.

        The batch's media rows (multimodal soft tokens) replace those rows' token embeddings.
        """
        x, ple, rope = self._inputs(batch)
        if self.kernels:
            y, batch = self._forward_kernels(x, ple, rope, batch, cache)
            hidden = y[batch.logits_rows]
            return DecoderOutput(logits=self.head(hidden), hidden=hidden)
        first_shared = self.cfg.first_shared_layer
        for i, layer in enumerate(self.layers):
            if i == first_shared and batch.logits_rows.numel() < x.shape[0]:
                batch, rope, x, ple = self._rows_going_on(batch, rope, x, ple)
            cos, sin = rope[layer.spec.layer_type]
            x = layer(x, None if ple is None else ple[:, i], cos, sin, batch, cache)
        hidden = self.norm(x[batch.logits_rows])
        return DecoderOutput(logits=self.head(hidden), hidden=hidden)

    def final_hidden(self, batch: ForwardBatch, cache: PagedKVCache,
                     narrowed: tuple[torch.Tensor, ForwardBatch] | None = None) -> torch.Tensor:
        """Final-norm hidden states through the kernels with fixed shapes (what a captured graph
        runs; the lm_head is left to the caller, for the rows it wants): of every row of the batch
        [T, hidden], or with `narrowed` = (rows, the batch of those rows) only those rows go past
        the last KV-owning layer [len(rows), hidden]."""
        assert self.kernels, "final_hidden runs the Triton kernels"
        x, ple, rope = self._inputs(batch)
        return self._forward_kernels(x, ple, rope, batch, cache, narrow=narrowed or False)[0]

    def _inputs(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """The embeddings, the per-layer inputs (None without PLE) and the RoPE tables per layer type."""
        ids, x = self.input_embeddings(batch)
        ple = self.per_layer_inputs(ids, x) if self.cfg.ple_dim else None
        return x, ple, {name: r(batch.positions, x.dtype) for name, r in self.rotary.items()}

    @staticmethod
    def _rows_going_on(batch: ForwardBatch, rope: dict, *tensors: torch.Tensor | None,
                       narrowed: tuple[torch.Tensor, ForwardBatch] | None = None) -> tuple:
        """KV-shared layers write no KV: only rows whose outputs are wanted go on. The batch, the
        RoPE tables and each given row tensor (None stays None) narrowed to those rows (the rows
        with logits, or `narrowed`'s rows and batch)."""
        if narrowed is None:
            rows, host_rows = batch.rows_with_logits()
            narrowed = rows, batch.select_rows(rows, host_rows)
        rows, batch = narrowed
        rope = {name: (c[rows], s[rows]) for name, (c, s) in rope.items()}
        return batch, rope, *(None if t is None else t[rows] for t in tensors)

    def _forward_kernels(self, x, ple, rope, batch: ForwardBatch, cache: PagedKVCache,
                         narrow: bool | tuple[torch.Tensor, ForwardBatch] = True) -> tuple[torch.Tensor, ForwardBatch]:
        """The layers through the fused kernels: each layer's last norm is the next one's input
        norm (the last layer's, the final norm). The final-norm hidden states and the batch they
        belong to (with `narrow`, only the rows with logits, or the given (rows, batch), go past
        the last KV-owning layer)."""
        layers, first_shared = self.layers, self.cfg.first_shared_layer
        given = narrow if isinstance(narrow, tuple) else None
        prefetch = self.weight_prefetch if self.weight_prefetch is not None and self.weight_prefetch.applies(x) else None
        y, _ = residual_norm(x, None, layers[0].input_layernorm.weight, self.cfg.rms_norm_eps)
        for i, layer in enumerate(layers):
            if i == first_shared and (given is not None or narrow and batch.logits_rows.numel() < x.shape[0]):
                batch, rope, x, y, ple = self._rows_going_on(batch, rope, x, y, ple, narrowed=given)
            cos, sin = rope[layer.spec.layer_type]
            last = i + 1 == len(layers)
            next_norm = self.norm.weight if last else layers[i + 1].input_layernorm.weight
            x, y = layer.forward_kernels(x, y, None if ple is None else ple[:, i], cos, sin, batch, cache, next_norm,
                                         prefetch, None if last else layers[i + 1])
        if prefetch is not None:
            prefetch.join()
        return y, batch

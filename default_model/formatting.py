"""Tokenizer and rendering of task instances in the Gemma 4 chat format.

The tokenizer is a small byte-level BPE trained on the task text, carrying the 24 Gemma 4
special tokens (same strings, their own ids) and the published Gemma 4 chat template, so the
same parsers and templates serve this model and a real checkpoint. Rendering turns a
`TaskInstance` into prompt ids (through the chat template) plus the answer the model must
write, with image and audio placeholders expanded as the Gemma 4 processor does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tasks import TaskInstance, ToolCall

FORMAT_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gemma4_format"
SPECIAL = json.loads((FORMAT_DIR / "special_tokens.json").read_text())
_CORE_ROLES = ("pad_token", "eos_token", "bos_token", "unk_token", "mask_token")
STRING_QUOTE = '<|"|>'


def build_tokenizer(corpus: list[str], vocab_size: int):
    """Train the byte-level BPE on `corpus` and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL["tokens"])  # <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, then the rest
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits stay single tokens so arithmetic is learnable digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    roles = SPECIAL["roles"]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{role: roles[role] for role in _CORE_ROLES},
        extra_special_tokens={k: v for k, v in roles.items() if k not in _CORE_ROLES},
    )
    hf.chat_template = (FORMAT_DIR / "chat_template.jinja").read_text()
    return hf


def format_value(value) -> str:
    """Gemma 4's argument syntax: bare keys, strings quoted by the <|"|> token."""
    if isinstance(value, str):
        return f"{STRING_QUOTE}{value}{STRING_QUOTE}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return json.dumps(value)


def answer_text(inst: TaskInstance) -> str:
    """What the model writes after the generation prompt, stop token included."""
    if inst.tool_call is not None:
        return f"<|tool_call>call:{_call_body(inst.tool_call)}<tool_call|><|tool_response>"
    thought = f"<|channel>thought\n{inst.thinking}<channel|>" if inst.thinking is not None else ""
    return f"{thought}{inst.answer}<turn|>"


def _call_body(call: ToolCall) -> str:
    return call.name + format_value(call.arguments)


@dataclass
class Rendered:
    """Token ids of one instance and its media, ready for a transformers forward."""

    prompt_ids: list[int]
    answer_ids: list[int]
    mm_token_type_ids: list[int]  # over prompt_ids + answer_ids: 1 image, 3 audio, 0 text
    pixel_values: torch.Tensor | None = None
    image_position_ids: torch.Tensor | None = None
    input_features: torch.Tensor | None = None
    input_features_mask: torch.Tensor | None = None


class Renderer:
    """Chat template + media expansion with the tokenizer, image processor and feature extractor."""

    def __init__(self, tokenizer, image_processor, feature_extractor):
        self.tok = tokenizer
        self.images = image_processor
        self.audio = feature_extractor

    def prompt_text(self, inst: TaskInstance) -> str:
        return self.tok.apply_chat_template(
            list(inst.messages), tools=list(inst.tools) or None, tokenize=False,
            add_generation_prompt=True, enable_thinking=inst.enable_thinking,
        )

    def render(self, inst: TaskInstance, with_answer: bool = True) -> Rendered:
        text = self.prompt_text(inst)
        out = Rendered([], [], [])
        if inst.image is not None:
            from PIL import Image

            feats = self.images([Image.fromarray(inst.image)], return_tensors="pt")
            n = int(feats["num_soft_tokens_per_image"][0])
            text = text.replace(self.tok.image_token, self.tok.boi_token + self.tok.image_token * n + self.tok.eoi_token, 1)
            out.pixel_values, out.image_position_ids = feats["pixel_values"], feats["image_position_ids"]
        if inst.audio is not None:
            feats = self.audio([inst.audio], sampling_rate=16_000, return_tensors="pt")
            n = audio_soft_tokens(feats["input_features_mask"][0])
            text = text.replace(self.tok.audio_token, self.tok.boa_token + self.tok.audio_token * n + self.tok.eoa_token, 1)
            out.input_features, out.input_features_mask = feats["input_features"], feats["input_features_mask"]
        out.prompt_ids = self.tok(text, add_special_tokens=False).input_ids
        if with_answer:
            out.answer_ids = self.tok(answer_text(inst), add_special_tokens=False).input_ids
        ids = out.prompt_ids + out.answer_ids
        image_id, audio_id = self.tok.image_token_id, self.tok.audio_token_id
        out.mm_token_type_ids = [1 if t == image_id else 3 if t == audio_id else 0 for t in ids]
        return out


def audio_soft_tokens(mask: torch.Tensor) -> int:
    """Soft tokens of one clip: the feature mask after two stride-2 convolutions (as the processor)."""
    m = np.asarray(mask)
    for _ in range(2):
        t_out = (len(m) + 2 - 3) // 2 + 1
        m = m[::2][:t_out]
    return int(m.sum())

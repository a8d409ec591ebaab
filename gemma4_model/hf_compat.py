"""A documented work-around for one defect of `transformers` 5.23's Gemma 4 assistant classes.

Every Gemma 4 assistant (`Gemma4AssistantForCausalLM`, `Gemma4UnifiedAssistantForCausalLM`) is
KV-shared in every layer: its config sets `num_kv_shared_layers = num_hidden_layers`. In 5.23
the text configs' `kv_sharing_modes` property then raises ("The set of layer types producing a
cache is different than the set of layer types using them"), because it looks for a producing
layer of each type among the assistant's own layers, and there are none. Each decoder layer
reads that property in its constructor, so no assistant checkpoint (the published ones
included) can be built. The intended meaning is plain: every layer of an assistant reuses the
target's KV ("reuse"). Inside `assistant_kv_sharing()` the property answers exactly that for
all-shared configs and defers to the original otherwise; the original is restored on exit.
Tandem's own code never needs this; only the reference side of tests and the default model's
training and evaluation (which use `transformers`' classes) do.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


def _config_classes():
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

    return Gemma4TextConfig, Gemma4UnifiedTextConfig


@contextmanager
def assistant_kv_sharing():
    """Within this block, all-KV-shared Gemma 4 text configs report every layer as 'reuse'."""
    originals = {cls: cls.__dict__["kv_sharing_modes"] for cls in _config_classes()}

    def patched(original):
        def modes(self):
            layers = self.num_hidden_layers
            if layers and self.num_kv_shared_layers == layers:
                return ["reuse"] * layers
            return original.fget(self)

        return property(modes)

    for cls, original in originals.items():
        cls.kv_sharing_modes = patched(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.kv_sharing_modes = original


def load_reference_assistant(path: str | Path, **kwargs):
    """`transformers`' own assistant class for a checkpoint directory (float32 on CPU by default)."""
    import torch
    from transformers import AutoConfig, Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    config = AutoConfig.from_pretrained(path)
    cls = Gemma4UnifiedAssistantForCausalLM if config.model_type == "gemma4_unified_assistant" else Gemma4AssistantForCausalLM
    with assistant_kv_sharing():
        return cls.from_pretrained(path, **kwargs).eval()

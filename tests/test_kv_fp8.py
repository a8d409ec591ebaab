"""An FP8 (e4m3) KV cache: values saturate instead of overflowing, pages travel bit for bit, and
the default model answers with it as with a full-precision cache."""

from __future__ import annotations

import pytest
import torch

from gemma4_model.attention import FP8_MAX, to_cache
from gemma4_model.config import FULL, SLIDING

FP8 = torch.float8_e4m3fn


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def test_values_saturate_at_the_largest_finite():
    x = torch.tensor([1e4, -1e4, 1.0, 0.3, float("inf")])
    y = to_cache(x, FP8).float()
    assert y[0] == FP8_MAX and y[1] == -FP8_MAX and y[2] == 1.0 and abs(y[3] - 0.3) < 0.02 and y[4] == FP8_MAX


def test_fp8_pages_survive_the_wire():
    from actors.handoff import handoff_message, payload_of
    from actors.messages import SamplingSpec, decode, encode
    from transfer.kv_pages import GroupPages, KVPayload

    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 3, 4, 1, 8, generator=g).to(FP8) for _ in range(2))
    payload = KVPayload(10, {FULL: GroupPages((0, 1, 2), k, v), SLIDING: GroupPages((2,), k[:, :1], v[:, :1])})
    msg = handoff_message("r", [5, 6, 7], 9, SamplingSpec(max_tokens=3), payload)
    assert msg.kv_dtype == "float8_e4m3fn"
    back = payload_of(decode([bytes(f) for f in encode(msg)]))
    assert back.groups[FULL].k.dtype == FP8 and back.nbytes == payload.nbytes == k.numel() * 2 + k[:, :1].numel() * 2
    assert torch.equal(bits(back.groups[FULL].v), bits(v)) and torch.equal(bits(back.groups[SLIDING].k), bits(k[:, :1]))


def test_the_topology_field_and_flag():
    import argparse

    from actors.cli import add_scheduler_options, scheduler_overrides
    from topology.config import EXAMPLES, TopologyError, load_topology, with_model_overrides

    topology = load_topology(EXAMPLES / "cpu_colocated.toml")
    assert topology.model.kv_cache_dtype == "auto"
    ap = argparse.ArgumentParser()
    add_scheduler_options(ap)
    flags = dict(scheduler_overrides(ap.parse_args(["--kv-cache-dtype", "fp8_e4m3"])))
    assert with_model_overrides(topology, flags).model.kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(TopologyError) as err:
        with_model_overrides(topology, {"kv_cache_dtype": "int4"})
    assert err.value.field == "model.kv_cache_dtype"


def default_model_runs(device: str, dtype: torch.dtype, cache_dtypes, kernels: bool = False):
    """Held-out prompts, their answers, and per cache dtype the default model's greedy outputs."""
    from transformers import AutoTokenizer

    from default_model import CHECKPOINT
    from default_model.formatting import Renderer, answer_text
    from default_model.tasks import make_set
    from gemma4_model.engine import Engine
    from gemma4_model.kv_cache import PagedKVCache
    from gemma4_model.loader import load_text_decoder
    from gemma4_model.sampling import SamplingParams

    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    instances = make_set(5, 16, heldout=True, kinds=("add", "copy", "reverse", "tool_call", "json"))
    renderer = Renderer(tok, None, None)
    prompts = [renderer.render(i, with_answer=False).prompt_ids for i in instances]
    params = SamplingParams(max_tokens=40, stop_token_ids=(1, tok.convert_tokens_to_ids("<turn|>")))
    config, model = load_text_decoder(CHECKPOINT, device=device, dtype=dtype)
    model.set_kernels(kernels)
    outputs = {}
    for cache_dtype in cache_dtypes:
        cache = PagedKVCache(config.text, page_size=16, num_pages=256, device=device, dtype=cache_dtype)
        outputs[cache_dtype] = [s.output for s in Engine(model, cache).generate(prompts, params)]
    answers = [answer_text(i) for i in instances]
    return tok, answers, outputs


@pytest.mark.gpu
def test_fp8_cache_through_the_triton_attention_on_the_device():
    tok, answers, outputs = default_model_runs("cuda", torch.bfloat16, (torch.bfloat16, FP8), kernels=True)
    right = [i for i, out in enumerate(outputs[torch.bfloat16]) if tok.decode(out) == answers[i]]
    same = [i for i in right if outputs[FP8][i] == outputs[torch.bfloat16][i]]
    assert len(right) >= 12 and len(same) >= len(right) - 1, (len(right), len(same))


def test_default_model_answers_with_an_fp8_cache():
    """Held-out tasks the default model answers right with a float32 cache: nearly all come out
    token for token the same with FP8 K and V (rounding may flip a near-tied step)."""
    tok, answers, outputs = default_model_runs("cpu", torch.float32, (torch.float32, FP8))
    right = [i for i, out in enumerate(outputs[torch.float32]) if tok.decode(out) == answers[i]]
    same = [i for i in right if outputs[FP8][i] == outputs[torch.float32][i]]
    assert len(right) >= 12 and len(same) >= len(right) - 1, (len(right), len(same))

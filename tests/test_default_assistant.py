"""The default model's assistant as `default_model.train` builds it: the Gemma 4 assistant format,
loaded by transformers' own class, and a drafting protocol identical to transformers' MTP
candidate generator. (Freshly initialised here, seeded: the format and the protocol do not
depend on the trained weights; draft acceptance of the trained one is in the evaluation.)"""

import json

import pytest
import torch

from default_model import CHECKPOINT
from default_model.assistant import (assistant_forward, build_assistant, draft_kv, sliding_span, target_pass,
                                     teacher_forced_steps)
from default_model.evaluate import model_inputs
from default_model.formatting import Renderer
from default_model.tasks import make_set
from default_model.train import media_processors
from gemma4_model.hf_compat import assistant_kv_sharing, load_reference_assistant


@pytest.fixture(scope="module")
def assistant_dir(tmp_path_factory):
    from transformers import AutoConfig

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("assistant")
    build_assistant(AutoConfig.from_pretrained(CHECKPOINT), "cpu").to(torch.bfloat16).save_pretrained(out)  # as trained
    return out


@pytest.fixture(scope="module")
def models(assistant_dir):
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    target = Gemma4ForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    return tokenizer, target, load_reference_assistant(assistant_dir)


def test_transformers_5_23_needs_the_documented_work_around(assistant_dir):
    """Fails once transformers builds all-shared assistants itself; then drop hf_compat."""
    from transformers import AutoConfig, Gemma4AssistantForCausalLM

    config = AutoConfig.from_pretrained(assistant_dir)
    with pytest.raises(ValueError, match="producing a cache"):
        Gemma4AssistantForCausalLM(config)
    with assistant_kv_sharing():
        assert config.text_config.kv_sharing_modes == ["reuse"] * config.text_config.num_hidden_layers
    with pytest.raises(ValueError):  # restored on exit
        config.text_config.kv_sharing_modes


def test_assistant_checkpoint_is_in_the_gemma4_assistant_format(models, assistant_dir):
    _, target, assistant = models
    config = json.loads((assistant_dir / "config.json").read_text())
    assert config["model_type"] == "gemma4_assistant" and config["architectures"] == ["Gemma4AssistantForCausalLM"]
    text = config["text_config"]
    assert text["num_kv_shared_layers"] == text["num_hidden_layers"]
    assert text["hidden_size_per_layer_input"] == 0 and not text["enable_moe_block"]
    assert config["backbone_hidden_size"] == target.config.text_config.hidden_size
    assert text["vocab_size"] == target.config.text_config.vocab_size
    assert json.loads((assistant_dir / "generation_config.json").read_text())["num_assistant_tokens"] == 5
    assert type(assistant).__name__ == "Gemma4AssistantForCausalLM"


def _our_drafts(target, assistant, kwargs, q: int, steps: int) -> list[int]:
    embeds, hidden, _, kv = target_pass(target, kwargs)
    window = assistant.config.get_text_config().sliding_window
    shared = draft_kv(kv, q, window)
    state, token_embed, drafts = hidden[:, q - 1: q], embeds[:, q: q + 1], []
    for _ in range(steps):
        logits, state = assistant_forward(assistant, token_embed, state, torch.tensor([[q]]), shared,
                                          {"full_attention": None, "sliding_attention": None})
        drafts.append(int(logits[0, -1].argmax()))
        token_embed = target.get_input_embeddings()(torch.tensor([drafts[-1:]]))
    return drafts


def _prompts(tokenizer, window: int):
    """Held-out prompts: two shorter than the sliding window, two longer (one beyond twice the
    window), and one with an image and one with audio."""
    renderer = Renderer(tokenizer, *media_processors())
    insts = make_set(3, 40, heldout=True)
    text = [renderer.render(i, with_answer=False) for i in insts if i.image is None and i.audio is None]
    short = [r for r in text if len(r.prompt_ids) < window][:2]
    long = [r for r in text if len(r.prompt_ids) > window + 10]
    longest = max(long, key=lambda r: len(r.prompt_ids))
    assert len(short) == 2 and len(long) >= 2 and len(longest.prompt_ids) > 2 * window
    image = next(i for i in insts if i.image is not None)
    audio = next(i for i in insts if i.audio is not None)
    media = [renderer.render(i, with_answer=False) for i in (image, audio)]
    return short + [long[0], longest] + media


@torch.no_grad()
def test_drafting_protocol_matches_transformers_candidate_generator(models):
    """First drafts after a prefill: prompts shorter and longer than the sliding window, media."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    tokenizer, target, assistant = models
    window = assistant.config.get_text_config().sliding_window
    for prompt in _prompts(tokenizer, window):
        kwargs = model_inputs(target, prompt, "cpu")
        out = target(**kwargs, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
        first = int(out.logits[0, -1].argmax())
        ids = torch.cat([kwargs["input_ids"], torch.tensor([[first]])], dim=1)
        generator = SinglePositionMultiTokenCandidateGenerator(assistant, target.get_input_embeddings(),
                                                               GenerationConfig(max_length=4096))
        candidates, _ = generator.get_candidates(ids, {"attention_mask": torch.ones_like(ids)}, out,
                                                 is_first_iteration=False, n_last_matches=0)
        theirs = candidates[0, ids.shape[1]:].tolist()
        ours = _our_drafts(target, assistant, model_inputs(target, prompt, "cpu", [first]), ids.shape[1] - 1, 5)
        assert ours == theirs, (len(prompt.prompt_ids), ours, theirs)


@torch.no_grad()
def test_training_steps_equal_transformers_assistant_calls(models):
    """Training's all-anchors pass gives, at every anchor q, the logits of transformers' own
    assistant called as its generator calls it (one query at q, the target's KV below q, an
    all-ones attention mask), teacher-forced on the data tokens, across the sliding window edge."""
    tokenizer, target, assistant = models
    window = assistant.config.get_text_config().sliding_window
    prompt = max(_prompts(tokenizer, window)[:4], key=lambda r: len(r.prompt_ids))
    kwargs = model_inputs(target, prompt, "cpu")
    embeds, hidden, _, kv = target_pass(target, kwargs)
    steps, length = 3, kwargs["input_ids"].shape[1]
    edge = sliding_span(window)
    anchors = [1, 7, edge - 1, edge, edge + 1, 2 * window + 1, length - steps]
    assert 2 * window + 1 < length - steps
    batched = list(teacher_forced_steps(assistant, embeds, hidden, kv, steps, window))
    for q in anchors:
        shared = {k: (v[0][:, :, :q], v[1][:, :, :q]) for k, v in kv.items()}
        state = hidden[:, q - 1: q]
        for j in range(steps):
            out = assistant(inputs_embeds=torch.cat([embeds[:, q + j: q + j + 1], state], dim=-1),
                            attention_mask=torch.ones(1, q + 1, dtype=torch.long), position_ids=torch.tensor([[q]]),
                            shared_kv_states=shared, use_cache=False)
            state = out.last_hidden_state
            torch.testing.assert_close(batched[j][0, q], out.logits[0, 0], rtol=1e-4, atol=1e-4)

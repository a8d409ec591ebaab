"""Tandem's Gemma 4 assistant (`gemma4_model/drafter.py`) against `transformers`' own assistant
classes driven by their MTP candidate generator (`SinglePositionMultiTokenCandidateGenerator`),
on tiny random checkpoints, float32 on CPU.

Tandem side: the target prefills several prompts of different lengths (one beyond twice the
sliding window) in one batch of its own `TextDecoder` on a `PagedKVCache`; the drafter then
drafts for all of them at once from that cache. Reference side: each prompt alone through
`transformers`' target, then the generator's first drafting round after that prefill.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from gemma4_model.batch import ForwardBatch, SequenceChunk
from gemma4_model.config import load_config
from gemma4_model.drafter import DrafterMismatchError, load_drafter
from gemma4_model.hf_compat import assistant_kv_sharing, load_reference_assistant
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.random_checkpoint import load_reference, save_tiny_checkpoint
from gemma4_model.weights import MissingTensorError, UnknownModelTypeError

K = 4
PAGE = 4
WINDOW = 16  # the tiny targets' sliding window
PROMPT_LENGTHS = (9, 17, 18, 40)  # below, at and past window + 1; past twice the window
REL_TOL = 1e-4
# drafts chain K steps, each reading the last: float32 rounding grows (1.8e-4 seen at step 3 on
# a 2-core CPU's matrix kernels); a wrong mask or position errs by far more (see below)
DRAFT_REL_TOL = 4e-4


def _assistant_config(target_dir, family: str, ordered: bool, **overrides):
    """A 4-layer assistant (3 sliding, 1 full) whose attention shapes read the target's KV."""
    from transformers import Gemma4AssistantConfig, Gemma4UnifiedAssistantConfig

    target = load_config(target_dir).text
    sliding = target.layers[target.last_kv_owner("sliding_attention")]
    full = target.layers[target.last_kv_owner("full_attention")]
    text = dict(
        vocab_size=target.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=target.num_heads, num_key_value_heads=sliding.num_kv_heads, head_dim=sliding.head_dim,
        per_layer_config={"3": {"head_dim": full.head_dim, "num_key_value_heads": full.num_kv_heads}},
        layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=target.sliding_window,
        rope_parameters=json.loads((target_dir / "config.json").read_text())["text_config"]["rope_parameters"],
        rms_norm_eps=1e-6, final_logit_softcapping=30.0,  # the reference assistant applies no softcap
        num_kv_shared_layers=4, pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    if family == "standard":
        text.update(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0)
    cls = Gemma4AssistantConfig if family == "standard" else Gemma4UnifiedAssistantConfig
    top = dict(backbone_hidden_size=target.hidden_size, use_ordered_embeddings=ordered, num_centroids=16,
               centroid_intermediate_top_k=4)
    return cls(text_config=text, **{**top, **overrides})


@torch.no_grad()
def _randomise(model, g: torch.Generator) -> None:
    """Every parameter and persistent buffer random (norm scales near one, a random token order)."""
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if "Norm" in type(module).__name__:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif module_name.endswith("embed_tokens") or module_name == "lm_head":
                p.copy_(0.3 * torch.randn(p.shape, generator=g))  # the head: logit std ~2
            elif module_name == "post_projection":
                # A smaller state gain keeps the K-step chain from amplifying float noise ~10x a step
                # (the target's own float32 differences with transformers are ~1e-6 relative).
                p.copy_(0.03 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, buf in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                continue
            if name == "layer_scalar":
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
            elif name == "token_ordering":
                buf.copy_(torch.randperm(buf.numel(), generator=g))
            else:
                raise AssertionError(f"unknown buffer {module_name}.{name}")


def _save_assistant(target_dir, out, family: str, ordered: bool, seed: int, **overrides):
    from transformers import Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantForCausalLM

    cls = Gemma4AssistantForCausalLM if family == "standard" else Gemma4UnifiedAssistantForCausalLM
    with assistant_kv_sharing():
        model = cls(_assistant_config(target_dir, family, ordered, **overrides)).float()
    _randomise(model, torch.Generator().manual_seed(seed))
    model.generation_config.num_assistant_tokens = K
    model.save_pretrained(out)
    return out


CASES = {  # name: (target variant, assistant family, use_ordered_embeddings)
    "e4b": ("e4b", "standard", False),
    "e4b_centroids": ("e4b", "standard", True),
    "31b_centroids": ("31b", "standard", True),  # k_eq_v full layers with fewer KV heads
    "12b_unified": ("12b_unified", "unified", False),
    "12b_unified_centroids": ("12b_unified", "unified", True),
}


# transformers' targets hand their assistant KV only from KV-sharing ("store") layers, so the
# variants released without sharing get two shared layers here (the assistant reads layers 4 and 2).
SHARED_TAIL = dict(num_hidden_layers=7, num_kv_shared_layers=2,
                   layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 3
                   + ["full_attention"])
TARGET_OVERRIDES = {"e4b": {}, "31b": SHARED_TAIL, "12b_unified": SHARED_TAIL}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    out = {}
    for variant in sorted({v for v, _, _ in CASES.values()}):
        path = save_tiny_checkpoint(variant, tmp_path_factory.mktemp(variant), seed=3, **TARGET_OVERRIDES[variant])
        out[variant] = (path, load_text_decoder(path), load_reference(path, variant))
    return out


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@contextmanager
def _tandem_prefill(config, decoder, prompts):
    """One batched prefill; yields (cache, first tokens x_q, final-norm hidden at q-1, q), then frees."""
    cache = PagedKVCache(config.text, page_size=PAGE, num_pages=64)
    chunks = []
    for seq_id, prompt in enumerate(prompts):
        cache.add_sequence(seq_id, prompt)
        cache.extend(seq_id, len(prompt))
        chunks.append(SequenceChunk(seq_id, prompt, start=0))
    with torch.no_grad():
        out = decoder(ForwardBatch.build(chunks, cache), cache)
        hidden = out.hidden  # already the final-norm state
    positions = torch.tensor([len(p) for p in prompts])
    try:
        yield cache, out.logits.argmax(-1), hidden, positions
    finally:
        for seq_id in range(len(prompts)):
            cache.free_sequence(seq_id)


@torch.no_grad()
def _reference_round(target, assistant, prompt):
    """The generator's first drafting round after the target prefilled `prompt`: ([K], [K, vocab])."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    ids = torch.tensor([prompt])
    out = target(input_ids=ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
    generator = SinglePositionMultiTokenCandidateGenerator(assistant, target.get_input_embeddings(),
                                                           GenerationConfig(max_length=4096))
    candidates, logits = generator.get_candidates(ids, {"attention_mask": torch.ones_like(ids)}, out,
                                                  is_first_iteration=False, n_last_matches=0)
    return candidates[0, ids.shape[1]:], logits[0].float()


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture(scope="module")
def case(request, targets, prompts, tmp_path_factory):
    variant, family, ordered = CASES[request.param]
    target_dir, (config, decoder), reference = targets[variant]
    assistant_dir = _save_assistant(target_dir, tmp_path_factory.mktemp(request.param), family, ordered, seed=5)
    drafter = load_drafter(assistant_dir, config, "cpu", torch.float32, target_embed=decoder.embed)
    theirs = [_reference_round(reference, load_reference_assistant(assistant_dir), p) for p in prompts]
    return dict(config=config, decoder=decoder, drafter=drafter, theirs=theirs, dir=assistant_dir, family=family)


@pytest.mark.parametrize("case", list(CASES), indirect=True)
def test_draft_logits_match_transformers_generator(case, prompts):
    """k = 1..K steps, four prompts drafted in one batch: logits within 4e-4 relative, greedy tokens equal."""
    with _tandem_prefill(case["config"], case["decoder"], prompts) as (cache, first, hidden, positions):
        drafter = case["drafter"]
        assert type(drafter.masked_embedding).__name__ == ("CentroidMask" if drafter.spec.use_ordered_embeddings
                                                           else "NoneType")
        result = drafter.draft(cache, list(range(len(prompts))), first, hidden, positions, K)
        assert result.tokens.shape == (len(prompts), K) and result.tokens.dtype == torch.long
        assert result.logits.shape == (len(prompts), K, 256) and result.logits.dtype == torch.float32
        for b, (tokens, logits) in enumerate(case["theirs"]):
            for j in range(K):
                err = _rel_err(result.logits[b, j], logits[j])
                assert err < DRAFT_REL_TOL, (PROMPT_LENGTHS[b], j, err)
            assert result.tokens[b].tolist() == tokens.tolist(), PROMPT_LENGTHS[b]
        if drafter.spec.use_ordered_embeddings:  # masked rows hold the per-sequence floor, as the reference's
            floor = result.logits.min(dim=-1).values
            masked = (result.logits == floor[..., None]).sum(-1)
            assert bool((masked == 256 - 4 * 16).all())
        # Fewer steps give the same prefix; one sequence alone drafts what it drafts in the batch.
        short = drafter.draft(cache, [0, 1, 2, 3], first, hidden, positions, 2)
        assert torch.equal(short.tokens, result.tokens[:, :2])
        alone = drafter.draft(cache, [3], first[3:], hidden[3:], positions[3:], K)
        # CPU matrix products block differently by batch size: float32 rounding, not a different draft
        assert max(_rel_err(alone.logits[0, j], result.logits[3, j]) for j in range(K)) < 5e-5
        assert torch.equal(alone.tokens[0], result.tokens[3])


@pytest.mark.parametrize("case", ["e4b_centroids"], indirect=True)
def test_the_bound_fails_for_a_perturbed_weight(case, prompts):
    with _tandem_prefill(case["config"], case["decoder"], prompts) as (cache, first, hidden, positions):
        drafter = case["drafter"]
        weight = drafter.model.layers[1].self_attn.q_proj.weight
        saved = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.add_(1e-2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
            result = drafter.draft(cache, list(range(len(prompts))), first, hidden, positions, K)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        worst = max(_rel_err(result.logits[b, j], case["theirs"][b][1][j]) for b in range(len(prompts)) for j in range(K))
        assert worst > DRAFT_REL_TOL


@pytest.mark.parametrize("case", ["e4b"], indirect=True)
def test_the_bound_fails_for_a_sliding_span_of_window(case, prompts, monkeypatch):
    """The target's own span (window positions up to the query) is not what the assistant sees."""
    from gemma4_model import drafter as module

    original = module.gather_target_kv
    monkeypatch.setattr(module, "gather_target_kv",
                        lambda *args: original(*args[:-1], None if args[-1] is None else args[-1] - 1))
    with _tandem_prefill(case["config"], case["decoder"], prompts) as (cache, first, hidden, positions):
        result = case["drafter"].draft(cache, list(range(len(prompts))), first, hidden, positions, K)
    errors = [max(_rel_err(result.logits[b, j], case["theirs"][b][1][j]) for j in range(K)) for b in range(len(prompts))]
    assert errors[0] < REL_TOL  # q = 9 <= window: every position is inside either span
    assert all(e > REL_TOL for e in errors[1:])  # q = 17 already needs position 0 = q - 1 - window


@pytest.mark.parametrize("case", ["e4b"], indirect=True)
def test_sliding_layers_read_window_plus_one_positions(case, prompts):
    """The sliding layers read q-1-window .. q-1: a cache that slid to q-2 still drafts the same;
    one slid to q-1 (its pages start at q-window) fails loudly."""
    with _tandem_prefill(case["config"], case["decoder"], prompts) as (cache, first, hidden, positions):
        drafter, seqs = case["drafter"], list(range(len(prompts)))
        full = drafter.draft(cache, seqs, first, hidden, positions, K)
        for s, q in zip(seqs, positions.tolist()):
            cache.slide(s, q - 2)
        slid = drafter.draft(cache, seqs, first, hidden, positions, K)
        assert torch.equal(slid.logits, full.logits)
        longest = seqs[-1]
        q = int(positions[-1])
        assert (q - WINDOW) % PAGE == 0  # so q-1-window ends a page: sliding to q-1 releases it
        cache.slide(longest, q - 1)
        with pytest.raises(ValueError, match="no longer holds the sliding_attention KV"):
            drafter.draft(cache, seqs, first, hidden, positions, K)


def test_loader_refuses_what_does_not_fit(targets, tmp_path):
    target_dir, (config, decoder), _ = targets["e4b"]
    other_dir, (other, _), _ = targets["31b"]
    good = _save_assistant(target_dir, tmp_path / "good", "standard", True, seed=1)
    with pytest.raises(DrafterMismatchError, match="expects KV of"):  # 31b's full layers: 1 KV head
        load_drafter(good, other, target_embed=decoder.embed)
    with pytest.raises(UnknownModelTypeError):  # a target is not an assistant
        load_drafter(target_dir, config, target_embed=decoder.embed)
    wide = _save_assistant(target_dir, tmp_path / "wide", "standard", False, seed=1, backbone_hidden_size=32)
    with pytest.raises(DrafterMismatchError, match="backbone_hidden_size"):
        load_drafter(wide, config, target_embed=decoder.embed)
    untied = _save_assistant(target_dir, tmp_path / "untied", "standard", False, seed=1, tie_word_embeddings=False)
    drafter = load_drafter(untied, config, target_embed=decoder.embed)  # its own lm_head.weight
    assert drafter.lm_head is not None
    (good / "model.safetensors").rename(tmp_path / "moved")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "moved")
    del tensors["masked_embedding.token_ordering"]
    save_file(tensors, good / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingTensorError, match="token_ordering"):
        load_drafter(good, config, target_embed=decoder.embed)


@pytest.mark.parametrize("case", ["e4b_centroids", "12b_unified"], indirect=True)
def test_greedy_with_a_random_assistant_equals_plain_greedy(case):
    """The real MTP path on tiny random configs: the assistant drafts (mostly wrong) from the
    engine's paged cache, prompts up to past twice the window; 50 prompts at batch 1 and 8 give
    plain greedy's tokens, and the draft context never runs short."""
    from gemma4_model.engine import Engine, SchedulerLimits
    from gemma4_model.sampling import SamplingParams
    from gemma4_model.speculative import AssistantDrafter

    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, 256, (int(torch.randint(2, 3 * WINDOW, (1,), generator=g)),), generator=g).tolist()
               for _ in range(50)]
    cfg, decoder = case["config"].text, case["decoder"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: more threads only wait on each other

    def generate(drafter, batch):
        limits = SchedulerLimits(max_batch_tokens=512, max_running=batch, chunk_size=32)
        engine = Engine(decoder, PagedKVCache(cfg, page_size=PAGE, num_pages=400), limits, drafter=drafter,
                        num_speculative_tokens=K)
        seqs = engine.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
        return [s.output for s in seqs], engine.stats

    try:
        plain, _ = generate(None, 8)
        for batch in (1, 8):
            outputs, stats = generate(AssistantDrafter(case["drafter"]), batch)
            assert outputs == plain and stats.drafted_tokens > 0 and stats.verify_runs > 0, batch
    finally:
        torch.set_num_threads(threads)

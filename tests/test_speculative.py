"""Speculative decoding: greedy output token-identical to plain greedy whatever the drafts, the
sampled output distribution unchanged (chi-square), logprobs, grammars, stats, no page leaks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from gemma4_model.engine import Engine, GenerationSequence, Scheduler, SchedulerLimits, Status
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.sampling import SamplingParams
from gemma4_model.speculative import OracleDrafter, Proposal, RandomDrafter

VARIANTS = ("e4b", "26b_a4b", "12b_unified")


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny per-sequence ops: intra-op threads only wait on each other (tenfold
    slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
ROOMY = SchedulerLimits(max_batch_tokens=512, max_running=64, chunk_size=64)


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request, tiny_checkpoint):
    config, model = load_text_decoder(tiny_checkpoint(request.param), device="cpu", dtype=torch.float32)
    return config.text, model


def short_prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run(model, cfg, requests, drafter=None, k=4, max_running=8, pages=400, seed=None):
    """Run (prompt, params) requests to completion; returns the engine and the sequences."""
    limits = SchedulerLimits(max_batch_tokens=512, max_running=max_running, chunk_size=64)
    engine = Engine(model, PagedKVCache(cfg, page_size=4, num_pages=pages), limits, seed=seed, drafter=drafter,
                    num_speculative_tokens=k)
    seqs = [engine.add_request(p, params) for p, params in requests]
    while engine.scheduler.has_work():
        advanced = engine.step()
        for seq in advanced:
            assert seq.new_tokens and seq.output[len(seq.output) - len(seq.new_tokens):] == seq.new_tokens
            assert len(seq.new_tokens) <= k + 1
    assert not any(engine.cache.pages_in_use().values())
    return engine, seqs


def greedy_cases(cfg, model):
    """50 short prompts, each with its own max_tokens and (for some) a stop token taken from the
    middle of its unstopped greedy output; and the unstopped outputs, the oracle's futures."""
    prompts = short_prompts(50)
    _, free = run(model, cfg, [(p, SamplingParams(max_tokens=16, ignore_eos=True)) for p in prompts])
    requests = []
    for i, (p, seq) in enumerate(zip(prompts, free)):
        stops = (seq.output[3 + i % 7],) if i % 3 == 0 else ()
        requests.append((p, SamplingParams(max_tokens=5 + i % 11, ignore_eos=True, stop_token_ids=stops)))
    futures = {tuple(p): seq.output for p, seq in zip(prompts, free)}
    return requests, futures


def test_greedy_with_drafts_equals_plain_greedy(tiny):
    cfg, model = tiny
    requests, futures = greedy_cases(cfg, model)
    _, plain = run(model, cfg, requests)
    expected = [(s.output, s.finish_reason) for s in plain]
    assert any(r == "stop" for _, r in expected) and any(r == "length" for _, r in expected)
    plain_steps = run(model, cfg, requests)[0].stats.steps
    cases = [(OracleDrafter(futures, cfg.vocab_size), k, 8) for k in (1, 2, 4)]
    cases += [(RandomDrafter(cfg.vocab_size, seed=k), k, 8) for k in (1, 3)]
    cases += [(OracleDrafter(futures, cfg.vocab_size, wrong_every=3), 3, 1), (RandomDrafter(cfg.vocab_size), 2, 1)]
    for drafter, k, batch in cases:
        engine, seqs = run(model, cfg, requests, drafter, k=k, max_running=batch)
        assert [(s.output, s.finish_reason) for s in seqs] == expected, (type(drafter).__name__, k, batch)
        stats = engine.stats
        assert stats.drafted_tokens > 0 and stats.verify_runs > 0
        if isinstance(drafter, RandomDrafter):
            assert stats.acceptance_rate < 0.2  # random drafts are mostly rejected
        elif not drafter.wrong_every:
            # the oracle's drafts are right up to a stop token: nearly all are accepted, in fewer steps
            assert stats.acceptance_rate > 0.8 and stats.mean_accept_length >= 0.8 * min(k, 4)
            assert stats.steps < plain_steps


def test_a_tight_pool_drops_drafts_or_preempts_and_output_does_not_change(tiny_checkpoint):
    config, model = load_text_decoder(tiny_checkpoint("e4b"), device="cpu", dtype=torch.float32)
    cfg = config.text
    requests = [(p, SamplingParams(max_tokens=16, ignore_eos=True)) for p in short_prompts(8, seed=21)]
    _, plain = run(model, cfg, requests)
    futures = {tuple(p): s.output for (p, _), s in zip(requests, plain)}
    for drafter in (OracleDrafter(futures, cfg.vocab_size), RandomDrafter(cfg.vocab_size, seed=3)):
        engine, seqs = run(model, cfg, requests, drafter, k=4, pages=14)
        assert [s.output for s in seqs] == [s.output for s in plain]
        assert engine.stats.drafted_tokens > 0


def test_draft_limit_stops_short_of_max_tokens_and_model_length():
    class Cache:
        pass

    scheduler = Scheduler(Cache(), SchedulerLimits(), max_model_len=20)
    scheduler.num_speculative_tokens = 4
    seq = GenerationSequence(0, list(range(10)), SamplingParams(max_tokens=10), output=[1])
    assert scheduler.draft_limit(seq) == 4
    seq.output = [1] * 7  # 3 tokens left: at most 2 drafts + the bonus token
    assert scheduler.draft_limit(seq) == 2
    seq.output = [1] * 9
    assert scheduler.draft_limit(seq) == 0
    seq = GenerationSequence(1, list(range(17)), SamplingParams(max_tokens=3), output=[1])
    assert scheduler.draft_limit(seq) == 1  # 18 tokens of 20: two more may come


def test_logprobs_and_hidden_states_with_drafts(tiny_checkpoint):
    config, model = load_text_decoder(tiny_checkpoint("e4b"), device="cpu", dtype=torch.float32)
    cfg = config.text
    prompts = short_prompts(6, seed=3)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3, keep_logits=True)
    _, plain = run(model, cfg, [(p, params) for p in prompts])
    futures = {tuple(p): s.output for p, s in zip(prompts, plain)}
    engine, seqs = run(model, cfg, [(p, params) for p in prompts], OracleDrafter(futures, cfg.vocab_size,
                                                                                  wrong_every=4), k=3)
    assert engine.stats.accepted_tokens > 0
    for before, seq in zip(plain, seqs):
        assert seq.output == before.output
        assert len(seq.logprobs) == len(seq.top_ids) == len(seq.output) == len(seq.step_logits)
        np.testing.assert_allclose(seq.logprobs, before.logprobs, atol=1e-4)
        assert [t.tolist() for t in seq.top_ids] == [t.tolist() for t in before.top_ids]
        # last_hidden is the final-norm state that produced the newest token: the head gives its logits
        with torch.no_grad():
            torch.testing.assert_close(model.head(seq.last_hidden), seq.step_logits[-1], atol=1e-4, rtol=1e-4)


def test_actor_sends_every_token_of_a_step_with_its_logprobs(tiny_checkpoint):
    from actors.engine_actor import EngineActor
    from actors.messages import PrefillJob, SamplingSpec, TokenBatch, decode, encode

    class ListChannel:
        def __init__(self):
            self.sent = []

        def send(self, msg):
            self.sent.append(decode([bytes(f) for f in encode(msg)]))

    config, model = load_text_decoder(tiny_checkpoint("e4b"), device="cpu", dtype=torch.float32)
    cfg = config.text
    prompt = short_prompts(1, seed=5)[0]
    [plain] = run(model, cfg, [(prompt, SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2))])[1]
    engine = Engine(model, PagedKVCache(cfg, page_size=4, num_pages=80),
                    drafter=OracleDrafter({tuple(prompt): plain.output}, cfg.vocab_size), num_speculative_tokens=3)
    actor = EngineActor(engine, None, ListChannel())
    actor.handle(PrefillJob("r", np.array(prompt, dtype=np.int32), SamplingSpec(max_tokens=10, ignore_eos=True,
                                                                                 logprobs=2)))
    while engine.scheduler.has_work():
        actor.step()
    batches = actor.outbox.sent
    assert all(isinstance(b, TokenBatch) for b in batches)
    assert [len(b.token_ids) for b in batches] == [1, 4, 4, 1]  # prefill, 3 + bonus twice, the last one
    assert [t for b in batches for t in b.token_ids] == plain.output
    assert batches[0].prompt_tokens == len(prompt) and all(b.prompt_tokens is None for b in batches[1:])
    assert all(b.top_ids.shape == (len(b.token_ids), 2) and len(b.logprobs) == len(b.token_ids) for b in batches)
    np.testing.assert_allclose([x for b in batches for x in b.logprobs], plain.logprobs, atol=1e-4)
    assert batches[-1].finish_reason == "length" and all(b.finish_reason is None for b in batches[:-1])


# ---- the sampled distribution ----------------------------------------------------------------


class SupportDrafter(RandomDrafter):
    """RandomDrafter whose q lives on a few tokens, so drafts are sometimes accepted, sometimes not."""

    def __init__(self, vocab_size, support, seed=0, deterministic=False):
        super().__init__(vocab_size, seed, deterministic=deterministic)
        self.support = torch.tensor(support)

    def draft(self, cache, seqs, k):
        tokens, probs = [], []
        for seq in seqs:
            g = torch.Generator().manual_seed(seq.seq_id * 7919 + len(seq.tokens))
            weights = torch.zeros(k, self.vocab_size)
            weights[:, self.support] = torch.rand(k, len(self.support), generator=g) + 0.2
            q = weights / weights.sum(-1, keepdim=True)
            tokens.append(torch.multinomial(q, 1, generator=g)[:, 0].tolist())
            probs.append(None if self.deterministic else q)
        return Proposal(tokens, probs)


def exact_two_token_distribution(model, cfg, context, params):
    """P(t1, t2 | context) of plain sampling, from the target's logits (same transforms)."""
    from gemma4_model.sampling import SamplingRow, sampling_probs, transform_logits

    def probs_after(prefixes):
        _, seqs = run(model, cfg, [(c, SamplingParams(max_tokens=1, keep_logits=True, ignore_eos=True))
                                   for c in prefixes], max_running=64, pages=2000)
        logits = torch.stack([s.step_logits[0] for s in seqs])
        rows = [SamplingRow(params, c[:0], (), False) for c in prefixes]
        _, x = transform_logits(logits, rows, cfg.eos_token_ids)
        return sampling_probs(x, [params] * len(prefixes))

    p1 = probs_after([context])[0]
    firsts = torch.nonzero(p1 > 0)[:, 0].tolist()
    p2 = probs_after([context + [t] for t in firsts])
    return {(t, u): float(p1[t] * p2[j, u])
            for j, t in enumerate(firsts) for u in torch.nonzero(p2[j] > 0)[:, 0].tolist()}


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_sampling_keeps_the_distribution_of_the_next_two_tokens(tiny_checkpoint, deterministic):
    """A fixed context already in decode (its first output token given), then 2 more tokens with
    speculation (1 draft + the bonus / correction): their joint distribution must be plain
    sampling's. Chi-square goodness of fit against the exact distribution, p > 0.001."""
    from transfer.kv_pages import export_pages, import_pages

    config, model = load_text_decoder(tiny_checkpoint("e4b"), device="cpu", dtype=torch.float32)
    cfg = config.text
    prompt = short_prompts(1, seed=9)[0]
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=6, ignore_eos=True)
    prefill = Engine(model, PagedKVCache(cfg, page_size=4, num_pages=20))
    first = prefill.add_request(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    while not first.output:
        prefill.step()
    payload = export_pages(prefill.cache, first.seq_id)
    prefill.cancel(first)
    exact = exact_two_token_distribution(model, cfg, prompt + first.output, params)
    likely = sorted(exact, key=exact.get, reverse=True)
    support = sorted({t for t, _ in likely[:4]} | {u for _, u in likely[:8]} | {3, 4})
    engine = Engine(model, PagedKVCache(cfg, page_size=4, num_pages=6000),
                    SchedulerLimits(max_batch_tokens=4096, max_running=1000), seed=1,
                    drafter=SupportDrafter(cfg.vocab_size, support, deterministic=deterministic),
                    num_speculative_tokens=2)
    n = 3000
    seqs = [engine.add_prefilled(prompt, first.output[0], params,
                                 lambda cache, seq_id: import_pages(cache, seq_id, payload)) for _ in range(n)]
    while engine.scheduler.has_work():
        engine.step()
    assert engine.stats.verify_runs == n and engine.stats.drafted_tokens == n  # max_tokens leaves room for 1
    assert 0.02 < engine.stats.acceptance_rate < 0.9  # both the accept and the reject paths ran
    observed: dict = {}
    for s in seqs:
        assert s.status is Status.FINISHED and len(s.output) == 3
        observed[tuple(s.output[1:])] = observed.get(tuple(s.output[1:]), 0) + 1
    assert set(observed) <= set(exact)  # nothing outside the top-k support
    big = [c for c in likely if exact[c] * n >= 5]
    rest = 1.0 - sum(exact[c] for c in big)
    obs = [observed.get(c, 0) for c in big] + [n - sum(observed.get(c, 0) for c in big)]
    exp = [exact[c] * n for c in big] + [rest * n]
    if exp[-1] < 5:  # pool a tiny remainder into the last big cell
        obs[-2:] = [obs[-2] + obs[-1]]
        exp[-2:] = [exp[-2] + exp[-1]]
    exp = np.array(exp) * (n / sum(exp))
    assert len(big) >= 10
    assert chisquare(obs, exp).pvalue > 0.001


def test_seeded_sampling_with_drafts_is_deterministic(tiny_checkpoint):
    config, model = load_text_decoder(tiny_checkpoint("e4b"), device="cpu", dtype=torch.float32)
    cfg = config.text
    prompts = short_prompts(4, seed=11)
    params = SamplingParams(max_tokens=14, temperature=0.8, top_p=0.9, seed=123, ignore_eos=True,
                            repetition_penalty=1.2)
    outs = []
    for engine_seed in (0, 1):  # unseeded rows would differ; seeded ones may not
        engine, seqs = run(model, cfg, [(p, params) for p in prompts], RandomDrafter(cfg.vocab_size, seed=4),
                           k=3, seed=engine_seed)
        outs.append([s.output for s in seqs])
        assert engine.stats.drafted_tokens > 0
    assert outs[0] == outs[1] and all(len(o) == 14 for o in outs[0])


# ---- the default model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    from transformers import AutoTokenizer

    from actors.main import stop_token_ids
    from default_model import CHECKPOINT
    from gemma4_model.grammar import GrammarBook

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    config, model = load_text_decoder(CHECKPOINT, device="cpu", dtype=torch.float32)
    stops = stop_token_ids(CHECKPOINT)
    book = GrammarBook.from_checkpoint(CHECKPOINT, config.text.vocab_size,
                                       sorted(set(stops) | set(config.text.eos_token_ids)))
    return tokenizer, config.text, model, stops, book


def heldout_requests(tokenizer, stops, seed: int, per_kind: int):
    """The default model's held-out text prompts (every text kind), greedy up to 64 tokens."""
    from default_model.formatting import Renderer
    from default_model.tasks import make_set

    text_kinds = ("add", "think", "copy", "reverse", "tool_call", "tool_answer", "json")
    renderer = Renderer(tokenizer, None, None)
    prompts = [renderer.render(inst, with_answer=False).prompt_ids
               for inst in make_set(seed, per_kind * len(text_kinds), heldout=True, kinds=text_kinds)]
    params = SamplingParams(max_tokens=64, stop_token_ids=tuple(stops))
    return prompts, [(p, params) for p in prompts]


def test_default_model_greedy_with_an_oracle_equals_plain_greedy(default_model):
    tokenizer, cfg, model, stops, _ = default_model
    prompts, requests = heldout_requests(tokenizer, stops, seed=7, per_kind=3)
    _, plain = run(model, cfg, requests, pages=600)
    assert all(s.finish_reason == "stop" for s in plain)
    futures = {tuple(p): s.output for p, s in zip(prompts, plain)}
    for drafter, k in ((OracleDrafter(futures, cfg.vocab_size), 4), (RandomDrafter(cfg.vocab_size, seed=2), 2)):
        engine, seqs = run(model, cfg, requests, drafter, k=k, pages=600)
        assert [s.output for s in seqs] == [s.output for s in plain], type(drafter).__name__
    assert engine.stats.drafted_tokens > 0


def test_default_model_with_its_trained_assistant_equals_plain_greedy(default_model):
    """The real MTP path: the embedded model's assistant drafts from Tandem's paged cache; greedy
    output equals plain greedy at batch sizes 1 and 8, and most drafts are accepted."""
    from default_model import ASSISTANT
    from gemma4_model.drafter import load_drafter
    from gemma4_model.speculative import AssistantDrafter

    tokenizer, cfg, model, stops, _ = default_model
    _, requests = heldout_requests(tokenizer, stops, seed=9, per_kind=2)
    _, plain = run(model, cfg, requests, pages=600)
    drafter = AssistantDrafter(load_drafter(ASSISTANT, cfg, target_embed=model.embed))
    for batch in (1, 8):
        engine, seqs = run(model, cfg, requests, drafter, k=5, max_running=batch, pages=600)
        assert [s.output for s in seqs] == [s.output for s in plain], batch
        assert engine.stats.drafted_tokens > 0 and engine.stats.acceptance_rate > 0.5, engine.stats


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}


def test_json_schema_grammar_with_drafts(default_model):
    from gemma4_model.grammar import GrammarSpec

    tokenizer, cfg, model, stops, book = default_model
    messages = [{"role": "user", "content": f"Extract name, age and city as JSON: {who}"}
                for who in ("Mia is 41 years old and lives in Oslo.", "Tom is 29 years old and lives in Lima.",
                            "Ada is 36 years old and lives in Rome.")]
    texts = [tokenizer.apply_chat_template([m], tokenize=False, add_generation_prompt=True) for m in messages]
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    grammar = GrammarSpec("json_schema", json.dumps(PERSON))

    def go(params, drafter=None, k=4, seed=None):
        engine = Engine(model, PagedKVCache(cfg, page_size=16, num_pages=256), ROOMY, seed=seed, grammars=book,
                        drafter=drafter, num_speculative_tokens=k)
        seqs = [engine.add_request(p, params) for p in prompts]
        while engine.scheduler.has_work():
            engine.step()
        return engine, seqs

    greedy = SamplingParams(max_tokens=48, stop_token_ids=tuple(stops), grammar=grammar, logprobs=1)
    _, plain = go(greedy)
    futures = {tuple(p): s.output for p, s in zip(prompts, plain)}
    for drafter in (OracleDrafter(futures, cfg.vocab_size), RandomDrafter(cfg.vocab_size, seed=6)):
        engine, seqs = go(greedy, drafter)
        assert [s.output for s in seqs] == [s.output for s in plain]
        assert all(len(s.logprobs) == len(s.output) for s in seqs)
    # sampled under the grammar: drafts the grammar forbids are rejected; every answer parses
    sampled = SamplingParams(max_tokens=48, temperature=1.0, seed=5, stop_token_ids=tuple(stops), grammar=grammar)
    runs = [[s.output for s in go(sampled, RandomDrafter(cfg.vocab_size, seed=1, sharpness=4.0), k=3, seed=s)[1]]
            for s in (0, 1)]
    assert runs[0] == runs[1]  # seeded requests stay deterministic
    for out in runs[0]:
        assert out[-1] in stops
        value = json.loads(tokenizer.decode(out[:-1]))
        assert set(value) == {"name", "age", "city"} and isinstance(value["age"], int)


def test_a_kv_handoff_carries_the_hidden_state_so_decode_drafts_from_its_first_token(default_model):
    """prefill -> decode with MTP: the handoff (through the wire format) carries the target's
    final-norm hidden state of the first token, so decode's very first step verifies drafts;
    output equals plain greedy; a handoff without it still decodes the same, one step later."""
    from actors.handoff import handoff_hidden, handoff_message, hidden_of
    from actors.messages import SamplingSpec, decode, encode
    from default_model import ASSISTANT
    from gemma4_model.drafter import load_drafter
    from gemma4_model.speculative import AssistantDrafter
    from transfer.kv_pages import PayloadError, export_pages, import_pages

    tokenizer, cfg, model, stops, _ = default_model
    prompts, requests = heldout_requests(tokenizer, stops, seed=11, per_kind=1)
    _, plain = run(model, cfg, requests, pages=600)
    drafter = AssistantDrafter(load_drafter(ASSISTANT, cfg, target_embed=model.embed))
    spec = SamplingSpec(max_tokens=64, stop_token_ids=list(stops))
    for prompt, (_, params), expected in zip(prompts, requests, plain):
        prefill = Engine(model, PagedKVCache(cfg, page_size=4, num_pages=300), ROOMY, draft_context=True)
        seq = prefill.add_request(prompt, params)
        while not seq.output:
            prefill.step()
        for with_hidden in (True, False):
            wire = handoff_message("r", prompt, seq.output[0], spec, None,
                                   **(handoff_hidden(seq.last_hidden) if with_hidden else {}))
            msg = decode([bytes(f) for f in encode(wire)])
            payload = export_pages(prefill.cache, seq.seq_id, prefill.scheduler.reach_back)
            engine = Engine(model, PagedKVCache(cfg, page_size=4, num_pages=300), ROOMY, drafter=drafter,
                            num_speculative_tokens=5)
            out = engine.add_prefilled(prompt, msg.first_token, params,
                                       lambda cache, sid: import_pages(cache, sid, payload),
                                       last_hidden=hidden_of(msg, cfg.hidden_size, "cpu"))
            first = engine.step()
            assert (engine.stats.verify_runs == 1) == with_hidden and first == [out]
            while engine.scheduler.has_work():
                engine.step()
            assert out.output == expected.output
        prefill.cancel(seq)  # as the prefill actor does once the pages are out
        bad = handoff_message("r", prompt, seq.output[0], spec, None, **handoff_hidden(seq.last_hidden[:-1]))
        with pytest.raises(PayloadError, match="first_hidden"):
            hidden_of(bad, cfg.hidden_size, "cpu")


def test_recommended_drafts_per_step_follow_the_recipes_for_each_released_target():
    from pathlib import Path

    from gemma4_model.config import parse_config
    from gemma4_model.speculative import recommended_num_speculative_tokens

    fixtures = Path(__file__).parent / "fixtures" / "hf_configs"
    expected = {"E2B": 2, "E4B": 4, "12B": 4, "26B-A4B": 4, "31B": 4}
    for name, k in expected.items():
        text = parse_config(json.loads((fixtures / f"gemma-4-{name}-it.json").read_text())).text
        assert recommended_num_speculative_tokens(text.hidden_size, text.num_layers) == k, name
    assert recommended_num_speculative_tokens(256, 8) == 4  # any other target (the embedded model)

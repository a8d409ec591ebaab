"""The sampler: the batched path against the one-row reference, each option's effect, seeds,
logprobs, validation, and the engine and engine actors end to end with logprobs."""

import math

import numpy as np
import pytest
import torch

from actors.engine_actor import EngineActor
from actors.messages import KVHandoff, PrefillJob, SamplingSpec, TokenBatch, decode, encode
from gemma4_model.engine import Engine
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.sampling import (
    LOGPROBS_PROCESSED, LOGPROBS_RAW, Sampler, SamplingParams, SamplingRow, draw_noise, sample_batch, sample_one,
)

VOCAB = 64
EOS = (1, 2)


def random_rows(params_list, seed=0):
    """Rows with random prompts and outputs (outputs of varied lengths, with repeats)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, params in enumerate(params_list):
        prompt = torch.randint(0, VOCAB, (5 + i,), generator=g).tolist()
        output = torch.randint(0, VOCAB // 4, (i % 7,), generator=g).tolist()
        rows.append(SamplingRow(params, prompt, output))
    return rows


def random_logits(n, seed=0, scale=3.0):
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


def assert_batch_matches_oracle(params_list, mode=LOGPROBS_RAW, seeds=range(6)):
    for seed in seeds:
        rows = random_rows(params_list, seed)
        logits = random_logits(len(rows), seed)
        noise = draw_noise(rows, VOCAB, torch.Generator().manual_seed(seed))
        batched = sample_batch(logits, rows, EOS, noise, mode)
        for i, (row, got) in enumerate(zip(rows, batched)):
            want = sample_one(logits[i], row, EOS, None if noise is None else noise[i], mode)
            assert got.token == want.token, f"row {i} ({row.params}): {got.token} != {want.token}"
            if row.params.logprobs is None:
                assert got.logprob is None and got.top_ids is None
            else:
                assert math.isclose(got.logprob, want.logprob, rel_tol=1e-6, abs_tol=1e-6)
                assert np.array_equal(got.top_ids, want.top_ids)
                np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-6, atol=1e-6)
                assert got.top_ids.dtype == np.int32 and got.top_logprobs.dtype == np.float32


OPTIONS = {
    "greedy": dict(),
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=2.5),
    "top_k": dict(temperature=1.0, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.6),
    "min_p": dict(temperature=1.0, min_p=0.2),
    "repetition": dict(temperature=1.0, repetition_penalty=1.7),
    "repetition_greedy": dict(repetition_penalty=3.0),
    "presence": dict(temperature=0.8, presence_penalty=1.5),
    "frequency": dict(temperature=0.8, frequency_penalty=-1.2),
    "min_tokens": dict(temperature=1.0, min_tokens=5, stop_token_ids=(7,)),
    "logprobs": dict(temperature=1.0, logprobs=5),
    "logprobs_greedy": dict(logprobs=0),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_batched_equals_one_row_reference_per_option(name):
    params = [SamplingParams(seed=s, **OPTIONS[name]) for s in range(8)]
    assert_batch_matches_oracle(params)


@pytest.mark.parametrize("mode", [LOGPROBS_RAW, LOGPROBS_PROCESSED])
def test_batched_equals_one_row_reference_for_mixed_rows(mode):
    mixes = [
        dict(),
        dict(temperature=0.9, top_k=8, top_p=0.8, min_p=0.05, logprobs=3),
        dict(temperature=1.3, repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.7, logprobs=20),
        dict(temperature=0.5, min_tokens=6, ignore_eos=False, logprobs=1),
        dict(repetition_penalty=0.8, frequency_penalty=2.0, logprobs=2),
        dict(temperature=1.0, top_k=1, logprobs=4),
        dict(temperature=1.1, top_p=0.3, min_tokens=2, stop_token_ids=(3, 4), ignore_eos=True),
    ]
    params = [SamplingParams(seed=None if i % 3 == 0 else i, **mixes[i % len(mixes)]) for i in range(21)]
    assert_batch_matches_oracle(params, mode)


def processed_logprobs(logits, row):
    noise = torch.ones(1, logits.numel())
    return sample_batch(logits[None], [row], EOS, noise, LOGPROBS_PROCESSED)[0]


def test_penalties_change_the_logits_as_specified():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 0.0])
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=0.5,
                            presence_penalty=0.25, logprobs=5, seed=0)
    got = processed_logprobs(logits, SamplingRow(params, prompt=[0], output=[1, 3, 3]))
    # 0: seen in the prompt, positive -> halved; 1: output once, negative -> doubled, then
    # -0.5 (frequency) -0.25 (presence); 2, 4: unseen; 3: output twice -> 0.25 - 1.0 - 0.25.
    expected = torch.log_softmax(torch.tensor([1.0, -4.75, 1.0, -1.0, 0.0]), dim=-1)
    by_id = dict(zip(got.top_ids.tolist(), got.top_logprobs.tolist()))
    for t in range(5):
        assert by_id[t] == pytest.approx(float(expected[t]), abs=1e-6)


def test_presence_and_frequency_ignore_prompt_tokens_and_repetition_covers_them():
    logits = torch.tensor([3.0, 1.0, 1.0])
    presence = SamplingParams(presence_penalty=2.0, frequency_penalty=2.0, logprobs=3)
    got = processed_logprobs(logits, SamplingRow(presence, prompt=[0, 0], output=[]))
    assert got.token == 0 and got.top_ids[0] == 0  # prompt repeats are not penalised
    repetition = SamplingParams(repetition_penalty=4.0, logprobs=3)
    got = processed_logprobs(logits, SamplingRow(repetition, prompt=[0, 0], output=[]))
    assert got.token in (1, 2) and by_id(got)[0] == pytest.approx(by_id(got)[1] - 0.25, abs=1e-6)  # 3 / 4 vs 1


def by_id(sample):
    return dict(zip(sample.top_ids.tolist(), sample.top_logprobs.tolist()))


def test_greedy_with_repetition_penalty_moves_off_a_repeated_token():
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0])
    plain = SamplingRow(SamplingParams(), prompt=[1], output=[])
    penalised = SamplingRow(SamplingParams(repetition_penalty=2.0), prompt=[1], output=[])
    ones = torch.ones(1, 4)
    assert sample_batch(logits[None], [plain], EOS, ones)[0].token == 1
    assert sample_batch(logits[None], [penalised], EOS, ones)[0].token == 2


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos):
    logits = torch.zeros(VOCAB)
    logits[EOS[0]], logits[7], logits[9] = 10.0, 9.0, 8.0
    params = SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=(7,), ignore_eos=ignore_eos)
    tokens = []
    for n in range(5):
        row = SamplingRow(params, prompt=[5], output=[9] * n)
        tokens.append(sample_batch(logits[None], [row], EOS, torch.ones(1, VOCAB))[0].token)
    first = 9 if not ignore_eos else EOS[0]  # ignore_eos: EOS is no stop, so nothing hides it
    assert tokens == [first] * 3 + [EOS[0]] * 2


def test_same_seed_same_tokens_whatever_the_batch_mates():
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    mates = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, seed=99), SamplingParams()]
    logits = random_logits(1, seed=3, scale=1.0)[0]
    for position in range(10):
        row = SamplingRow(params, [4, 5], [0] * position)
        alone = Sampler(EOS, seed=0)(logits[None], [row])[0].token
        others = [SamplingRow(m, [6], [0] * position) for m in mates]
        crowd = Sampler(EOS, seed=77)(torch.stack([logits] * 4), [others[0], row, *others[1:]])[1].token
        assert alone == crowd


def draw_sequence(params, steps=40, sampler_seed=0):
    logits = random_logits(1, seed=5, scale=0.5)[0]
    sampler = Sampler(EOS, seed=sampler_seed)
    return [sampler(logits[None], [SamplingRow(params, [3], [0] * n)])[0].token for n in range(steps)]


def test_different_seeds_differ_and_the_engine_seed_repeats_unseeded_rows():
    one = draw_sequence(SamplingParams(temperature=1.0, seed=1))
    assert one == draw_sequence(SamplingParams(temperature=1.0, seed=1), sampler_seed=9)
    assert one != draw_sequence(SamplingParams(temperature=1.0, seed=2))
    unseeded = SamplingParams(temperature=1.0)
    assert draw_sequence(unseeded, sampler_seed=3) == draw_sequence(unseeded, sampler_seed=3)
    assert draw_sequence(unseeded, sampler_seed=3) != draw_sequence(unseeded, sampler_seed=4)


def test_top_k_1_is_greedy_and_greedy_is_argmax():
    rows = random_rows([SamplingParams(temperature=t, top_k=1, seed=i) for i, t in enumerate([0.3, 1.0, 4.0] * 4)])
    logits = random_logits(len(rows), seed=11)
    got = Sampler(EOS, seed=0)(logits, rows)
    assert [s.token for s in got] == torch.argmax(logits, dim=-1).tolist()
    greedy = Sampler(EOS, seed=0)(logits, [SamplingRow(SamplingParams(), r.prompt, r.output) for r in rows])
    assert [s.token for s in greedy] == torch.argmax(logits, dim=-1).tolist()


def test_samples_follow_the_distribution_and_truncation_is_respected():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 6000
    counts = lambda params: np.bincount(  # noqa: E731
        [s.token for s in Sampler(EOS, seed=1)(logits.expand(n, -1), [SamplingRow(params, [0], [])] * n)],
        minlength=8) / n
    probs = torch.softmax(logits / 0.8, dim=-1).numpy()
    np.testing.assert_allclose(counts(SamplingParams(temperature=0.8)), probs, atol=0.025)
    assert counts(SamplingParams(temperature=1.0, top_k=3))[3:].sum() == 0
    p = torch.softmax(logits, dim=-1)  # 0.41, 0.25, 0.15, ...: top_p=0.6 keeps two tokens
    assert p[0] < 0.6 < p[0] + p[1]
    nucleus = counts(SamplingParams(temperature=1.0, top_p=0.6))
    assert nucleus[2:].sum() == 0 and nucleus[0] == pytest.approx(float(p[0] / (p[0] + p[1])), abs=0.025)
    kept = counts(SamplingParams(temperature=1.0, min_p=0.3))  # p >= 0.3 * p[0] = 0.124: tokens 0-2
    assert kept[3:].sum() == 0 and kept[2] > 0


@pytest.mark.parametrize("mode", [LOGPROBS_RAW, LOGPROBS_PROCESSED])
def test_logprobs_are_log_softmax_values_best_first(mode):
    params = SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=6, seed=3)
    rows = random_rows([params] * 4, seed=2)
    logits = random_logits(4, seed=2)
    got = Sampler(EOS, logprobs_mode=mode)(logits, rows)
    for i, sample in enumerate(got):
        if mode == LOGPROBS_RAW:
            source = logits[i]
        else:  # the penalised logits over the temperature
            source = logits[i].clone()
            for t in set(rows[i].prompt) | set(rows[i].output):
                source[t] = source[t] / 1.5 if source[t] > 0 else source[t] * 1.5
            source = source / 0.5
        lp = torch.log_softmax(source.double(), dim=-1)
        assert sample.logprob == pytest.approx(float(lp[sample.token]), abs=1e-5)
        assert sample.top_ids.tolist() == torch.argsort(lp, descending=True)[:6].tolist()
        np.testing.assert_allclose(sample.top_logprobs, lp[sample.top_ids.astype(np.int64)].numpy(), atol=1e-5)
        assert np.all(np.diff(sample.top_logprobs) <= 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=1.2), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(seed=1.5), "seed"),
])
def test_out_of_range_values_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_all_greedy_steps_draw_no_noise_and_sampling_rows_need_it():
    greedy = random_rows([SamplingParams(), SamplingParams(top_k=1, temperature=1.0)])
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert draw_noise(greedy, VOCAB, generator) is None and torch.equal(generator.get_state(), state)
    with pytest.raises(ValueError, match="noise"):
        sample_batch(random_logits(1), random_rows([SamplingParams(temperature=1.0)]), EOS, None)


def test_unknown_logprobs_mode_is_refused():
    with pytest.raises(ValueError, match="logprobs_mode"):
        Sampler(EOS, logprobs_mode="softmax")


# ---- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gemma4_model.random_checkpoint import save_tiny_checkpoint

    return load_text_decoder(save_tiny_checkpoint("e2b", tmp_path_factory.mktemp("tiny-e2b-sampling")))


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (9 + 4 * i,), generator=g).tolist() for i in range(n)]


def test_engine_records_logprobs_and_greedy_tokens_do_not_change(tiny):
    config, model = tiny
    ps = prompts(3)
    plain = Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80)).generate(
        ps, SamplingParams(max_tokens=8, ignore_eos=True))
    engine = Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80))
    seqs = engine.generate(ps, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=4, keep_logits=True))
    for before, seq in zip(plain, seqs):
        assert seq.output == before.output and not before.logprobs
        assert len(seq.logprobs) == len(seq.top_ids) == len(seq.output) == len(seq.step_logits)
        for token, logprob, top, logits in zip(seq.output, seq.logprobs, seq.top_ids, seq.step_logits):
            lp = torch.log_softmax(logits, dim=-1)
            assert logprob == pytest.approx(float(lp[token]), abs=1e-5)
            assert top[0] == token and top.tolist() == torch.topk(lp, 4).indices.tolist()


def test_engine_seeded_request_ignores_its_batch_mates(tiny):
    config, model = tiny
    ps = prompts(4, seed=1)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=5, ignore_eos=True)
    alone = Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80), seed=0).generate([ps[0]], params)[0]
    engine = Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80), seed=1)
    seq = engine.add_request(ps[0], params)
    for p in ps[1:]:
        engine.add_request(p, SamplingParams(max_tokens=6, temperature=0.7, presence_penalty=1.0))
    while engine.scheduler.has_work():
        engine.step()
    assert seq.output == alone.output
    other = Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80), seed=0).generate(
        [ps[0]], SamplingParams(max_tokens=10, temperature=1.0, top_k=40, seed=6, ignore_eos=True))[0]
    assert other.output != alone.output


class ListChannel:
    """An outbox that keeps what is sent, through the real wire encoding."""

    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(decode([bytes(f) for f in encode(msg)]))


def test_actors_send_logprobs_disaggregated_as_colocated(tiny):
    config, model = tiny
    spec = SamplingSpec(max_tokens=6, temperature=0.9, seed=21, ignore_eos=True, logprobs=3)
    prompt = prompts(1, seed=2)[0]
    job = PrefillJob("r", np.array(prompt, dtype=np.int32), spec)

    def drive(actor, message):
        actor.handle(message)
        while actor.engine.scheduler.has_work():
            actor.step()

    colocated = EngineActor(Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80)),
                            None, ListChannel())
    drive(colocated, job)
    api, kv = ListChannel(), ListChannel()
    prefill = EngineActor(Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80)), None, api,
                          role="prefill", handoff=kv)
    decoder = EngineActor(Engine(model, PagedKVCache(config.text, page_size=4, num_pages=80)), None, api,
                          role="decode")
    drive(prefill, job)
    [handoff] = kv.sent
    assert isinstance(handoff, KVHandoff)
    drive(decoder, handoff)
    for got in (colocated.outbox.sent, api.sent):
        assert all(isinstance(m, TokenBatch) for m in got) and len(got) == 6
        assert all(len(m.logprobs) == 1 and m.top_ids.shape == (1, 3) and m.top_logprobs.shape == (1, 3)
                   for m in got)
    assert [m.token_ids for m in api.sent] == [m.token_ids for m in colocated.outbox.sent]
    np.testing.assert_allclose([m.logprobs[0] for m in api.sent], [m.logprobs[0] for m in colocated.outbox.sent],
                               atol=1e-5)
    assert [m.top_ids.tolist() for m in api.sent] == [m.top_ids.tolist() for m in colocated.outbox.sent]

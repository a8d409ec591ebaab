"""Overlap scheduling (`Engine(overlap=True)`): plain decode steps launch before the previous
step's tokens reach the host, with exactly the outputs of the engine that waits for each step."""

from __future__ import annotations

import pytest

from gemma4_model.engine import PLACEHOLDER, Engine, SchedulerLimits, Status
from gemma4_model.grammar import GrammarBook, GrammarSpec
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.sampling import SamplingParams
from test_engine import model, prompts  # noqa: F401  (the module's tiny decoder fixture)


def engine_for(model, overlap, pages=128, limits=SchedulerLimits(), grammars=None):
    cache = PagedKVCache(model.cfg, page_size=4, num_pages=pages)
    return Engine(model, cache, limits, seed=5, overlap=overlap, grammars=grammars)


def drive(engine, requests, arrivals=(), cancel_at=None):
    """Add `requests` [(prompt, params)], more from `arrivals` [(call, prompt, params)] at those
    step() calls, cancel the sequence `cancel_at` = (index, call); collect what step() reports.
    Returns the sequences and, per sequence, the tokens reported one step() call at a time."""
    seqs = [engine.add_request(p, params) for p, params in requests]
    reported: dict[int, list[int]] = {}
    call = 0
    while engine.has_work() or any(call <= c for c, _, _ in arrivals):
        for c, p, params in arrivals:
            if c == call:
                seqs.append(engine.add_request(p, params))
        if cancel_at is not None and cancel_at[1] == call:
            engine.cancel(seqs[cancel_at[0]])
        for seq in engine.step():
            assert PLACEHOLDER not in seq.new_tokens
            reported.setdefault(seq.seq_id, []).extend(seq.new_tokens)
        call += 1
        assert call < 500
    assert all(v == 0 for v in engine.cache.pages_in_use().values()), "pages leaked"
    return seqs, reported


def assert_same_run(model, requests, arrivals=(), cancel_at=None, pages=128, limits=SchedulerLimits(), grammars=None):
    plain_seqs, plain_rep = drive(engine_for(model, False, pages, limits, grammars), requests, arrivals, cancel_at)
    engine = engine_for(model, True, pages, limits, grammars)
    seqs, rep = drive(engine, requests, arrivals, cancel_at)
    for want, got in zip(plain_seqs, seqs):
        assert got.status is Status.FINISHED and PLACEHOLDER not in got.output
        if cancel_at is None or got.seq_id != plain_seqs[cancel_at[0]].seq_id:
            assert (got.output, got.finish_reason) == (want.output, want.finish_reason)
            assert rep[got.seq_id] == got.output  # every token reported once, in order
    return engine, seqs


def test_greedy_and_seeded_sampling_match_the_waiting_engine(model):
    ps = prompts(5)
    requests = [(ps[0], SamplingParams(max_tokens=12, ignore_eos=True)),
                (ps[1], SamplingParams(max_tokens=7, ignore_eos=True)),
                (ps[2], SamplingParams(max_tokens=15, temperature=0.8, seed=11, ignore_eos=True)),
                (ps[3], SamplingParams(max_tokens=9, temperature=1.2, top_k=5, top_p=0.9, min_p=0.05, seed=3,
                                       min_tokens=4)),
                (ps[4], SamplingParams(max_tokens=1))]
    engine, _ = assert_same_run(model, requests)
    assert engine.stats.decode_tokens > 0


def test_a_stop_token_drops_the_step_launched_after_it(model):
    """A stop token is only seen a step late: the step already launched for that sequence is
    void (no token, no leaked page), and the others go on."""
    ps = prompts(3)
    plain = engine_for(model, False).generate([ps[0]], SamplingParams(max_tokens=12, ignore_eos=True))[0].output
    stop = plain[5]  # greedy: this id comes out at the sixth token
    requests = [(ps[0], SamplingParams(max_tokens=12, stop_token_ids=(stop,), ignore_eos=True)),
                (ps[1], SamplingParams(max_tokens=12, ignore_eos=True)),
                (ps[2], SamplingParams(max_tokens=12, stop_token_ids=(stop,), ignore_eos=True))]
    _, seqs = assert_same_run(model, requests)
    assert seqs[0].finish_reason == "stop" and seqs[0].output[-1] == stop and len(seqs[0].output) <= 6


def test_arrivals_and_a_cancel_while_a_step_is_in_flight(model):
    ps = prompts(4)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    arrivals = [(4, ps[2], params), (9, ps[3], SamplingParams(max_tokens=6, temperature=0.7, seed=2))]
    engine, seqs = assert_same_run(model, [(ps[0], params), (ps[1], params)], arrivals, cancel_at=(1, 6))
    assert seqs[1].finish_reason == "cancelled"


def test_pages_running_short_wait_for_the_step_in_flight(model):
    """A pool too small for everyone: preemption and waiting happen between reported steps only."""
    ps = prompts(6)
    requests = [(p, SamplingParams(max_tokens=14, ignore_eos=True)) for p in ps]
    assert_same_run(model, requests, pages=30, limits=SchedulerLimits(max_batch_tokens=64, max_running=4, chunk_size=8))


def test_a_token_budget_below_the_batch_waits_between_steps(model):
    """More decoding sequences than query tokens per step: steps take turns, none runs ahead
    of a sequence left out."""
    ps = prompts(5)
    requests = [(p, SamplingParams(max_tokens=9, ignore_eos=True)) for p in ps]
    assert_same_run(model, requests, limits=SchedulerLimits(max_batch_tokens=3, max_running=5, chunk_size=3))


def test_steps_do_run_ahead(model):
    """Between two step() calls the host has seen one step's tokens less than was launched:
    prefill, decodes, and decodes beside a newcomer's prefill alike."""
    engine = engine_for(model, True)
    seq = engine.add_request(prompts(1)[0], SamplingParams(max_tokens=8, ignore_eos=True))
    assert engine.step() == [] and seq.output == [PLACEHOLDER]  # the prefill runs ahead too
    assert engine.step() == [seq] and seq.output[-1] == PLACEHOLDER and PLACEHOLDER not in seq.output[:-1]
    assert seq.num_reported == 1 == len(seq.output) - 1  # what the actor's first token batch counts
    for _ in range(2):
        assert engine.step() == [seq]
        assert seq.output[-1] == PLACEHOLDER and PLACEHOLDER not in seq.output[:-1]
        assert seq.new_tokens == [seq.output[-2]]
    late = engine.add_request(prompts(2)[1], SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.step() == [seq] and engine._launched is not None  # launched with late's prefill in it
    assert late.output == [PLACEHOLDER]
    while engine.has_work():
        engine.step()
    assert len(seq.output) == 8 and seq.finish_reason == "length" and len(late.output) == 3


def test_a_sequence_at_its_length_limit_does_not_stop_the_others_running_ahead(model):
    """The step launched while one sequence's last token is in flight leaves that sequence out;
    the others run on, and every output equals the waiting engine's."""
    ps = prompts(3)
    requests = [(ps[0], SamplingParams(max_tokens=3, ignore_eos=True)),
                (ps[1], SamplingParams(max_tokens=9, ignore_eos=True)),
                (ps[2], SamplingParams(max_tokens=5, ignore_eos=True))]
    assert_same_run(model, requests)
    engine = engine_for(model, True)
    short, long_ = (engine.add_request(p, params) for p, params in requests[:2])
    while not (short.output and short.output[-1] == PLACEHOLDER and len(short.output) == 3):
        engine.step()
    assert engine.scheduler.last_in_flight(short) and not engine.scheduler.last_in_flight(long_)
    assert engine.step() and engine._launched is not None  # the next step went out all the same ...
    assert short.finish_reason == "length" and len(short.output) == 3 and PLACEHOLDER not in short.output
    assert long_.output[-1] == PLACEHOLDER  # ... with the other sequence in it
    while engine.has_work():
        engine.step()
    assert len(long_.output) == 9 and engine.cache.pages_in_use() == {n: 0 for n in engine.cache.groups}


def test_long_prompts_prefill_in_chunks_while_others_decode(model):
    ps = prompts(4, length=30)
    requests = [(p, SamplingParams(max_tokens=10, ignore_eos=True)) for p in ps[:2]]
    arrivals = [(3, ps[2], SamplingParams(max_tokens=7, ignore_eos=True)),
                (5, ps[3], SamplingParams(max_tokens=12, temperature=0.6, seed=9))]
    assert_same_run(model, requests, arrivals, limits=SchedulerLimits(max_batch_tokens=16, max_running=4, chunk_size=8))


@pytest.mark.parametrize("which", ["grammar", "logprobs", "penalty"])
def test_requests_that_need_each_token_on_the_host_do_not_run_ahead(model, which):
    ps = prompts(2)
    special = {"grammar": SamplingParams(max_tokens=8, grammar=GrammarSpec("ebnf", "root ::= [a-z ]+")),
               "logprobs": SamplingParams(max_tokens=8, logprobs=2, ignore_eos=True),
               "penalty": SamplingParams(max_tokens=8, repetition_penalty=1.3, ignore_eos=True)}[which]
    grammars = None
    if which == "grammar":  # a made-up vocabulary: ids 2.. are runs of letters and spaces
        import string

        import xgrammar as xgr

        chars = string.ascii_lowercase + " "
        vocab = ["<pad>", "<eos>"] + [chars[i % len(chars)] * (1 + i // len(chars)) for i in range(94)]
        grammars = GrammarBook(xgr.TokenizerInfo(vocab, stop_token_ids=[1], vocab_size=96), 96)
    requests = [(ps[0], special), (ps[1], SamplingParams(max_tokens=8, ignore_eos=True))]
    engine = engine_for(model, True, grammars=grammars)
    seqs = [engine.add_request(p, params) for p, params in requests]
    while engine.has_work():
        engine.step()
        assert engine._launched is None
    assert all(s.status is Status.FINISHED for s in seqs)
    if which != "grammar":
        assert_same_run(model, requests)


@pytest.mark.gpu
def test_gpu_overlapped_graph_steps_match_and_never_wait_for_the_device(tiny_checkpoint):
    """On CUDA with graphs: the same tokens as the waiting engine (greedy and seeded sampling,
    sequences finishing at different steps), and a step that runs ahead makes no synchronising
    call (torch's sync debug mode raises on one) but the wait for the previous step's event."""
    import torch

    from gemma4_model.loader import load_text_decoder

    path = tiny_checkpoint("e4b")
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (37, 9, 23, 61, 5)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.9 if n == 16 else 0.0, seed=4)
              for n in (24, 7, 16, 30, 3)]
    outputs, ahead = {}, 0
    for overlap in (False, True):
        config, model = load_text_decoder(path, device="cuda", dtype=torch.float32)
        model.set_kernels(True)
        cache = PagedKVCache(config.text, page_size=4, num_pages=160, device="cuda", dtype=torch.float32)
        engine = Engine(model, cache, SchedulerLimits(max_batch_tokens=64, max_running=8, chunk_size=16),
                        overlap=overlap)
        engine.capture_decode_graphs()
        seqs = [engine.add_request(p, sp) for p, sp in zip(ps, params)]
        while engine.has_work():
            scheduler = engine.scheduler  # steady: decodes only (a prefill's row selection reads the host)
            steady = (engine._launched is not None and engine._can_follow(engine._launched) and not scheduler.waiting
                      and all(engine.cache.num_computed(q.seq_id) == q.num_tokens - 1 for q in scheduler.running))
            if steady:
                torch.cuda.set_sync_debug_mode("error")
            try:
                engine.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            ahead += steady
        outputs[overlap] = [s.output for s in seqs]
        assert engine.graphs.replays > 20
        engine.graphs.close()
    assert outputs[True] == outputs[False]
    assert ahead > 15

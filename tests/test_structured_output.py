"""Structured output (constrained decoding with xgrammar): the masked batched sampler against
the one-row oracle, JSON outputs of the default model through the real API (100 of 100 valid at
temperature 1), a grammar that waits for the end of a thinking block, disaggregated decode that
rebuilds the matcher, preemption, and bad formats refused with 400."""

import asyncio
import contextlib
import json
import random
import re

import openai
import pytest
import torch
from transformers import AutoTokenizer

from actors.engine_actor import sampling_params
from actors.handoff import handoff_message
from actors.main import stop_token_ids
from actors.messages import GenerateRequest, SamplingSpec, decode, encode
from actors.preprocess import Preprocessor
from api_pipeline import API_KEY, MODEL_NAME, start_pipeline
from default_model import CHECKPOINT
from default_model.tasks import TIME_TOOL, WEATHER_TOOL, make_instance
from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.grammar import GrammarBook, GrammarError, GrammarSpec
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.sampling import SamplingParams, SamplingRow, sample_batch, sample_one
from gemma4_model.tool_grammar import forced_tool_call_ebnf
from transfer.kv_pages import export_pages, import_pages

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}


def person_errors(value) -> list[str]:
    """What keeps `value` from matching PERSON (a small validator for this one schema)."""
    if not isinstance(value, dict):
        return [f"not an object: {value!r}"]
    errors = [f"missing {k}" for k in PERSON["required"] if k not in value]
    errors += [f"extra {k}" for k in value if k not in PERSON["properties"]]
    if not isinstance(value.get("name"), str) or not isinstance(value.get("city"), str):
        errors.append("name and city must be strings")
    if not isinstance(value.get("age"), int) or isinstance(value.get("age"), bool):
        errors.append("age must be an integer")
    return errors


# ---- the sampler ----------------------------------------------------------------------------


def random_bitmask(rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    allowed = torch.rand(rows, vocab, generator=gen) < 0.1
    allowed[:, 0] = True  # at least one token per row
    words = (vocab + 31) // 32
    padded = torch.zeros(rows, words * 32, dtype=torch.bool)
    padded[:, :vocab] = allowed
    bits = padded.reshape(rows, words, 32).to(torch.int64) << torch.arange(32)
    packed = bits.sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@pytest.mark.parametrize("vocab", [100, 1024])
def test_masked_batch_sampling_equals_the_one_row_oracle(vocab):
    gen = torch.Generator().manual_seed(vocab)
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, logprobs=3),
              SamplingParams(repetition_penalty=1.3, logprobs=2), SamplingParams(temperature=1.0, min_tokens=3)]
    for trial in range(5):
        n = len(params)
        logits = torch.randn(n, vocab, generator=gen) * 3
        bitmask = random_bitmask(n, vocab, gen)
        constrained = [bool(b) for b in torch.rand(n, generator=gen) < 0.6]
        rows = [SamplingRow(p, [1, 2, 3], [4, 5], c) for p, c in zip(params, constrained)]
        noise = torch.empty(n, vocab).exponential_(generator=gen)
        batch = sample_batch(logits, rows, [1], noise, token_bitmask=bitmask)
        for i, row in enumerate(rows):
            one = sample_one(logits[i], row, [1], noise[i], token_bitmask=bitmask[i])
            assert batch[i].token == one.token, (trial, i)
            if row.params.logprobs is not None:
                assert batch[i].logprob == pytest.approx(one.logprob, abs=1e-5)
            word = int(bitmask[i, one.token // 32]) & (1 << (one.token % 32))
            assert word or not constrained[i], "a constrained row chose a forbidden token"
    # rows without a grammar are untouched by the bitmask
    unconstrained = [SamplingRow(p, [1], []) for p in params]
    noise = torch.empty(len(params), vocab).exponential_(generator=gen)
    assert [s.token for s in sample_batch(logits, unconstrained, [1], noise, token_bitmask=bitmask)] == \
        [s.token for s in sample_batch(logits, unconstrained, [1], noise)]


# ---- the engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model():
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    config, model = load_text_decoder(CHECKPOINT, device="cpu", dtype=torch.float32)
    stops = stop_token_ids(CHECKPOINT)
    book = GrammarBook.from_checkpoint(CHECKPOINT, config.text.vocab_size, sorted(set(stops) | set(config.text.eos_token_ids)))
    return tokenizer, config, model, stops, book


def engine_of(default_model, pages=256, limits=SchedulerLimits()) -> Engine:
    tokenizer, config, model, stops, book = default_model
    return Engine(model, PagedKVCache(config.text, page_size=16, num_pages=pages), limits, grammars=book)


def prefill_job(default_model, question: str, sampling: SamplingSpec, thinking: bool):
    tokenizer, _, _, stops, _ = default_model
    messages = {"messages": [{"role": "user", "content": question}],
                "chat_template_kwargs": {"enable_thinking": thinking}}
    return Preprocessor(tokenizer, stops).prefill_job(GenerateRequest("r", json.dumps(messages), sampling))


def test_grammar_starts_after_the_thinking_block(default_model):
    tokenizer = default_model[0]
    integer = SamplingSpec(max_tokens=40, grammar_kind="json_schema", grammar=json.dumps({"type": "integer"}))
    job = prefill_job(default_model, "What is 12 + 30?", integer, thinking=True)
    assert job.sampling.grammar_after_token_id == tokenizer.convert_tokens_to_ids("<channel|>")
    [seq] = engine_of(default_model).generate([job.token_ids.tolist()], sampling_params(job.sampling))
    text = tokenizer.decode(seq.output)
    # the thinking is free text; the answer after it is the grammar's (an integer), then the stop
    assert text == "<|channel>thought\n12 + 30 = 42.<channel|>42<turn|>" and seq.finish_reason == "stop"
    # the same grammar from the first token: no thinking block can open, the output is an integer
    job = prefill_job(default_model, "What is 12 + 30?", integer, thinking=False)
    [seq] = engine_of(default_model).generate([job.token_ids.tolist()], sampling_params(job.sampling))
    assert seq.finish_reason == "stop" and seq.output[-1] in job.sampling.stop_token_ids
    assert isinstance(json.loads(tokenizer.decode(seq.output[:-1])), int)
    # thinking enabled, but the model answers at once: the grammar holds from the first token
    person = SamplingSpec(max_tokens=40, grammar_kind="json_schema", grammar=json.dumps(PERSON))
    job = prefill_job(default_model, "Extract name, age and city as JSON: Anna is 30 years old and lives in Paris.",
                      person, thinking=True)
    [seq] = engine_of(default_model).generate([job.token_ids.tolist()], sampling_params(job.sampling))
    assert seq.grammar.mode == "active" and seq.finish_reason == "stop"
    assert json.loads(tokenizer.decode(seq.output[:-1])) == {"name": "Anna", "age": 30, "city": "Paris"}


def test_disaggregated_decode_rebuilds_the_matcher_and_equals_colocated(default_model):
    tokenizer, config, model, stops, book = default_model
    spec = SamplingSpec(max_tokens=48, temperature=1.0, seed=7, stop_token_ids=list(stops),
                        grammar_kind="json_schema", grammar=json.dumps(PERSON))
    prompt = prefill_job(default_model, "Extract name, age and city as JSON: Mia is 41 years old and lives in Oslo.",
                         spec, thinking=False).token_ids.tolist()
    [colocated] = engine_of(default_model).generate([prompt], sampling_params(spec))

    prefill = engine_of(default_model)
    seq = prefill.add_request(prompt, sampling_params(spec))
    while not seq.output:
        prefill.step()
    payload = export_pages(prefill.cache, seq.seq_id)
    prefill.cancel(seq)
    wire = decode([bytes(f) for f in encode(handoff_message("r", prompt, seq.output[0], spec, None))])
    decode_engine = engine_of(default_model)
    moved = decode_engine.add_prefilled(wire.prompt_ids.tolist(), wire.first_token, sampling_params(wire.sampling),
                                        lambda cache, seq_id: import_pages(cache, seq_id, payload))
    assert moved.grammar.seen == 1  # the matcher has taken the first token
    while decode_engine.scheduler.has_work():
        decode_engine.step()
    assert moved.output == colocated.output and moved.finish_reason == colocated.finish_reason == "stop"
    assert person_errors(json.loads(tokenizer.decode(moved.output[:-1]))) == []


def test_preemption_keeps_the_matcher_in_step(default_model):
    tokenizer, _, _, stops, _ = default_model
    rng = random.Random(3)
    questions = [make_instance("json", rng, heldout=False).messages[0]["content"] for _ in range(6)]
    spec = SamplingSpec(max_tokens=40, temperature=1.0, seed=11, stop_token_ids=list(stops),
                        grammar_kind="json_schema", grammar=json.dumps(PERSON))
    prompts = [prefill_job(default_model, q, spec, thinking=False).token_ids.tolist() for q in questions]
    roomy = engine_of(default_model).generate(prompts, sampling_params(spec))
    tight = engine_of(default_model, pages=12, limits=SchedulerLimits(chunk_size=16))
    seqs = [tight.add_request(p, sampling_params(spec)) for p in prompts]
    preempted = 0
    while tight.scheduler.has_work():
        before = len(tight.scheduler.waiting)
        tight.step()
        preempted += len(tight.scheduler.waiting) > before
    assert preempted, "the small cache should have forced a preemption"
    assert [s.output for s in seqs] == [s.output for s in roomy]
    for s in seqs:
        assert s.finish_reason == "stop" and person_errors(json.loads(tokenizer.decode(s.output[:-1]))) == []


def test_a_grammar_that_cannot_compile_is_a_grammar_error(default_model):
    book = default_model[4]
    with pytest.raises(GrammarError):
        book.compile("json_schema", "{not json")
    with pytest.raises(GrammarError):
        book.compile("ebnf", "root ::= undefined_rule")
    first = book.compile("ebnf", 'root ::= "a" | "b"')
    assert book.compile("ebnf", 'root ::= "a" | "b"') is first  # cached by (kind, text)
    with pytest.raises(GrammarError):
        GrammarSpec("regex", "a+")


def forced_call(default_model, question: str, name: str | None) -> tuple[str, str]:
    tokenizer, _, _, stops, _ = default_model
    tools = [WEATHER_TOOL, TIME_TOOL]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], tools=tools,
                                        add_generation_prompt=True, tokenize=True)["input_ids"]
    params = SamplingParams(max_tokens=40, stop_token_ids=tuple(stops),
                            grammar=GrammarSpec("ebnf", forced_tool_call_ebnf(tools, name)))
    [seq] = engine_of(default_model).generate([ids], params)
    assert seq.finish_reason == "stop" and seq.output[-1] in stops
    return tokenizer.decode(seq.output[:-1]), seq.finish_reason


def test_a_forced_tool_call_is_a_well_formed_gemma4_call(default_model):
    call = re.compile(r'<\|tool_call>call:(get_weather|get_time)\{location:<\|"\|>([^<]*)<\|"\|>'
                      r'(,unit:<\|"\|>(celsius|fahrenheit)<\|"\|>)?\}<tool_call\|>')
    # a question the model answers in text without a grammar still gets a call
    text, _ = forced_call(default_model, "What is 12 + 30?", None)
    assert call.fullmatch(text), text
    # a named function is the one called, even where the model would call another
    text, _ = forced_call(default_model, "What's the weather in Paris?", "get_time")
    assert call.fullmatch(text) and call.fullmatch(text).group(1) == "get_time", text
    text, _ = forced_call(default_model, "What's the weather in Paris?", None)
    assert text == '<|tool_call>call:get_weather{location:<|"|>Paris<|"|>}<tool_call|>'
    with pytest.raises(ValueError):
        forced_tool_call_ebnf([WEATHER_TOOL], "no_such_tool")


# ---- the API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        yield start_pipeline(tmp_path_factory.mktemp("run"), stack)


def json_questions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_instance("json", rng, heldout=bool(i % 2)).messages[0]["content"] for i in range(count)]


async def ask(client, question: str, response_format: dict, stream: bool, seed: int) -> tuple[str, str]:
    """Seeded, so a run is reproducible; room for a long (but grammatical) answer."""
    kwargs = dict(model=MODEL_NAME, messages=[{"role": "user", "content": question}], temperature=1.0,
                  max_tokens=128, response_format=response_format, seed=seed)
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    async for chunk in await client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_json_outputs_parse_and_validate_100_of_100_at_temperature_1(pipeline, kind):
    fmt = {"type": "json_object"} if kind == "json_object" else \
        {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    questions = json_questions(100, seed=len(kind))

    async def run_all():
        async with openai.AsyncOpenAI(base_url=pipeline.base_url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*[ask(client, q, fmt, stream=bool(i % 2), seed=i) for i, q in enumerate(questions)])

    results = asyncio.run(run_all())
    failures = []
    for question, (text, finish) in zip(questions, results):
        try:
            value = json.loads(text)
            problems = person_errors(value) if kind == "json_schema" else ([] if isinstance(value, dict) else ["not an object"])
        except json.JSONDecodeError as exc:
            problems = [str(exc)]
        if problems or finish != "stop":
            failures.append((question, text, finish, problems))
    assert not failures, f"{len(failures)} of 100 failed: {failures[:3]}"


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}},
     "response_format"),
    ({"type": "yaml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format"),
])
def test_a_bad_response_format_is_a_400_naming_the_field(pipeline, response_format, param):
    client = openai.OpenAI(base_url=pipeline.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                               response_format=response_format, max_tokens=8, stream=stream)
            list(r) if stream else None
        assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    # the server goes on serving, and completions take response_format too
    messages = [{"role": "user", "content": json_questions(1, seed=5)[0]}]
    prompt = pipeline.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ok = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=48, temperature=1.0,
                                   extra_body={"response_format": {"type": "json_schema",
                                                                   "json_schema": {"name": "p", "schema": PERSON}}})
    assert ok.choices[0].finish_reason == "stop" and person_errors(json.loads(ok.choices[0].text)) == []

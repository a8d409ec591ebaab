"""`tandem serve` with MTP (issue 7): the speculative flags, the embedded model's assistant in
the decode actor (drafting from the first token, whose hidden state rides in the KV handoff),
greedy output equal to plain greedy, acceptance in /metrics and in the trace, structured output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from actors.cli import main as cli_main
from tests.serving import REPO, Served


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    argv = ["serve", "--topology", "cpu_disaggregated", "--speculative-algorithm", "NEXTN",
            "--speculative-draft-model-path", "default", "--speculative-num-steps", "5",
            "--speculative-num-draft-tokens", "6", "--speculative-eagle-topk", "1", "--trace-dir", str(root / "traces")]
    with Served(argv, log=root / "tandem.log") as s:
        s.trace_dir = root / "traces"
        yield s


def plain_greedy(prompts: list[list[int]], stops: list[int]) -> list[list[int]]:
    from default_model import CHECKPOINT
    from gemma4_model.engine import Engine
    from gemma4_model.kv_cache import PagedKVCache
    from gemma4_model.loader import load_text_decoder
    from gemma4_model.sampling import SamplingParams

    config, model = load_text_decoder(CHECKPOINT, device="cpu", dtype=torch.float32)
    engine = Engine(model, PagedKVCache(config.text, page_size=16, num_pages=512))
    return [s.output for s in engine.generate(prompts, SamplingParams(max_tokens=64, stop_token_ids=tuple(stops)))]


def metric(text: str, name: str, actor: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(f'{name}{{actor="{actor}"')]
    assert lines, f"{name} for {actor} missing from /metrics"
    return float(lines[0].rsplit(" ", 1)[1])


def test_greedy_with_mtp_equals_plain_and_acceptance_shows_in_metrics_and_trace(served):
    from transformers import AutoTokenizer

    from actors.main import stop_token_ids
    from actors.tracing import draft_summary, read_spans
    from default_model import CHECKPOINT
    from default_model.formatting import Renderer
    from default_model.tasks import make_set

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    kinds = ("add", "think", "copy", "reverse", "tool_call", "tool_answer", "json")
    renderer = Renderer(tokenizer, None, None)
    prompts = [renderer.render(inst, with_answer=False).prompt_ids
               for inst in make_set(21, 2 * len(kinds), heldout=True, kinds=kinds)]

    def complete(prompt: list[int]) -> list[int]:
        reply = httpx.post(f"{served.url}/v1/completions", timeout=120, json={
            "model": "tandem-default", "prompt": prompt, "max_tokens": 64, "temperature": 0,
            "return_token_ids": True})
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(8) as pool:  # batched in decode, as users run it
        got = list(pool.map(complete, prompts))
    assert got == plain_greedy(prompts, stop_token_ids(CHECKPOINT))

    metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert metric(metrics, "tandem_spec_acceptance_rate", "decode") > 0.5
    assert metric(metrics, "tandem_spec_mean_accept_length", "decode") > 2
    assert metric(metrics, "tandem_spec_drafted_tokens", "prefill") == 0  # prefill hands on; it never drafts
    deadline = time.monotonic() + 15  # actors flush their spans about once a second
    while (summary := draft_summary(read_spans(served.trace_dir))) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert summary is not None and "accepted" in summary
    decode_spans = [s for s in read_spans(served.trace_dir) if s.stage == "decode" and s.attrs.get("drafted")]
    assert all(0 <= s.attrs["accepted"] <= s.attrs["drafted"] for s in decode_spans)
    printed = subprocess.run([sys.executable, "-m", "actors.cli", "trace", str(served.trace_dir)], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and "MTP:" in printed.stdout, printed.stderr


def test_json_schema_output_with_mtp(served):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    for temperature in (0, 1):
        reply = httpx.post(f"{served.url}/v1/chat/completions", timeout=120, json={
            "model": "tandem-default", "temperature": temperature, "seed": 3, "max_tokens": 96,
            "messages": [{"role": "user", "content": "Extract name and age as JSON: Mia is 41 years old."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}})
        assert reply.status_code == 200, reply.text
        value = json.loads(reply.json()["choices"][0]["message"]["content"])
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)


@pytest.mark.parametrize("flags, problem", [
    (["--speculative-eagle-topk", "4"], "only 1"),
    (["--speculative-num-steps", "4", "--speculative-num-draft-tokens", "6"], "num-steps + 1"),
    (["--speculative-config", '{"model": "default", "method": "eagle3"}'], "not served"),
    (["--speculative-algorithm", "NEXTN"], "needs --speculative-draft-model-path"),
    (["--speculative-num-steps", "4"], "speculative.draft_model_path"),
    (["--speculative-draft-model-path", "default", "--speculative-num-steps", "0"], "num_speculative_tokens"),
    (["--speculative-draft-model-path", "/nonexistent/assistant"], "config.json"),
])
def test_bad_speculative_flags_are_refused_before_anything_starts(flags, problem, capsys):
    try:
        status = cli_main(["serve", "--topology", "cpu_colocated", *flags])
    except SystemExit as exc:
        status, message = 2, str(exc)
    else:
        message = capsys.readouterr().err
    assert status == 2 and problem in message, message

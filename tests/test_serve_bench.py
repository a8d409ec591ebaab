"""bench/serve_bench.py: workloads, figures and failures against a fake server with known timings,
and the sweep's JSON and plots. (The run against the real `tandem serve` is in test_serve.py, which
already has a server up.)"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from bench.loadgen.client import EventStream, RequestResult
from bench.loadgen.metrics import Goodput, summarize
from bench.loadgen.runner import arrival_times
from bench.loadgen.workload import TokenSource, Workload, WorkloadConfig, sample_lengths
from bench.serve_bench import main, parse_args, workload_config
from default_model import CHECKPOINT
from tests.fake_openai import FakeConfig, FakeOpenAI


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(CHECKPOINT))


def bench(tmp_path: Path, url: str, *args: str, name: str = "out.json") -> tuple[int, dict]:
    """Run bench/serve_bench.py's main against `url`; its exit status and the JSON it wrote."""
    out = tmp_path / name
    code = main(["--base-url", url, "--disable-tqdm", "--output-file", str(out), *args])
    return code, json.loads(out.read_text())


def test_lengths_are_drawn_as_sglang_random_dataset():
    # seed 1, 10 prompts of up to 1024: SGLang's published latency workload averages 610 input tokens
    inputs, outputs = sample_lengths(WorkloadConfig(num_prompts=10, seed=1))
    assert np.mean(inputs) == pytest.approx(610.1)
    assert all(1 <= n <= 1024 for n in inputs + outputs)
    inputs, outputs = sample_lengths(WorkloadConfig(num_prompts=200, input_len=100, output_len=40, range_ratio=0.5))
    assert min(inputs) >= 50 and max(inputs) <= 100 and min(outputs) >= 20 and max(outputs) <= 40
    assert len(set(inputs)) > 20  # drawn, not fixed
    fixed = sample_lengths(WorkloadConfig(num_prompts=5, input_len=77, output_len=9, range_ratio=1.0))
    assert fixed == ([77] * 5, [9] * 5)


def test_prompts_have_exact_token_lengths(tokenizer):
    source = TokenSource(tokenizer)
    special = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    config = WorkloadConfig(num_prompts=20, input_len=300, output_len=5, seed=3)
    ids = Workload(config, tokenizer)
    assert [len(p) for p in ids.prompts] == ids.input_lens
    assert not special & {t for p in ids.prompts for t in p}
    texts = Workload(WorkloadConfig(api="chat", num_prompts=20, input_len=300, output_len=5, seed=3), tokenizer)
    assert [source.count(t) for t in texts.prompts] == texts.input_lens == ids.input_lens
    assert len(set(texts.prompts)) == 20
    assert len(source.words) > 100 and all(w.startswith(" ") for w in source.words)
    for n in (1, 2, 7, 128):
        text, count = source.text(np.random.default_rng(n), n)
        assert count == n and source.count(text) == n


def test_text_prompts_from_a_sentencepiece_style_vocabulary():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "\u2581the": 2, "\u2581cat": 3, "\u2581sat": 4, "\u2581": 5, "t": 6, "x": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    backend.decoder = decoders.Metaspace(prepend_scheme="never")
    source = TokenSource(PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>"))
    assert sorted(source.words) == [" cat", " sat", " the"]
    text, count = source.text(np.random.default_rng(0), 9)
    assert count == 9 and source.count(text) == 9 and set(text.split()) <= {"the", "cat", "sat"}


def test_request_bodies_force_the_output_length(tokenizer):
    workload = Workload(WorkloadConfig(num_prompts=3, input_len=10, output_len=6, range_ratio=1.0), tokenizer)
    body = json.loads(workload.request(1, "m").body)
    assert body["prompt"] == workload.prompts[1] and body["model"] == "m"
    assert body["max_tokens"] == body["min_tokens"] == 6 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert workload.request(1, "m").body == workload.request(1, "m").body  # deterministic per index
    free = Workload(WorkloadConfig(num_prompts=1, input_len=4, output_len=6, ignore_eos=False,
                                   extra_body={"top_k": 5}), tokenizer)
    body = json.loads(free.request(0, "m").body)
    assert "ignore_eos" not in body and "min_tokens" not in body and body["top_k"] == 5


def test_image_workload_defaults_to_two_720p_images(tokenizer):
    args = parse_args(["--dataset-name", "image", "--num-prompts", "2"])
    config = workload_config(args, 2)
    assert (args.api, config.input_len, config.output_len, config.range_ratio) == ("chat", 128, 1024, 1.0)
    workload = Workload(config, tokenizer)
    request = workload.request(0, "m")
    assert request.route == "/v1/chat/completions" and request.images == 2
    content = json.loads(request.body)["messages"][0]["content"]
    urls = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    assert len(urls) == 2 and urls[0] != urls[1]  # every image distinct: no encoder-cache hits
    for url in urls:
        assert url.startswith("data:image/jpeg;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (1280, 720)
    assert TokenSource(tokenizer).count(content[-1]["text"]) == 128


def test_mixed_workload_gives_a_seeded_share_of_requests_images(tokenizer):
    args = parse_args(["--dataset-name", "mixed", "--num-prompts", "100", "--image-fraction", "0.3"])
    assert (args.api, workload_config(args, 100).input_len, workload_config(args, 100).output_len) == ("chat", 512, 512)
    args = parse_args(["--dataset-name", "mixed", "--num-prompts", "100", "--image-fraction", "0.3",
                       "--image-resolution", "64x96", "--random-input-len", "12"])
    config = workload_config(args, 100)
    assert config.image_fraction == 0.3
    workload = Workload(config, tokenizer)
    flags = [workload.has_images(i) for i in range(100)]
    assert 15 <= sum(flags) <= 45 and flags == [Workload(config, tokenizer).has_images(i) for i in range(100)]
    for i in (flags.index(True), flags.index(False)):
        request = workload.request(i, "m")
        content = json.loads(request.body)["messages"][0]["content"]
        assert request.route == "/v1/chat/completions" and request.images == (2 if flags[i] else 0)
        text = content[-1]["text"] if flags[i] else content
        assert TokenSource(tokenizer).count(text) == workload.input_lens[i]
    assert not any(Workload(dataclasses.replace(config, image_fraction=0.0), tokenizer).has_images(i) for i in range(100))
    with pytest.raises(ValueError, match="needs --api chat"):
        WorkloadConfig(dataset="mixed", api="completions")
    with pytest.raises(ValueError, match="image_fraction"):
        WorkloadConfig(dataset="mixed", api="chat", image_fraction=1.5)


def test_event_stream_splits_events_across_any_pieces():
    stream = (b'data: {"a": 1}\r\n\r\n: keep-alive comment\r\n\r\nevent: x\r\ndata: {"b":\r\ndata: 2}\r\n\r\n'
              b'data: [DONE]\r\n\r\ndata: tail')
    expected = [b'{"a": 1}', b'{"b":\n2}', b"[DONE]", b"tail"]
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = sorted(rng.choice(np.arange(1, len(stream)), size=6, replace=False).tolist())
        events, got = EventStream(), []
        for a, b in zip([0, *cuts], [*cuts, len(stream)]):
            got += events.feed(stream[a:b])
        assert got + events.close() == expected
    assert EventStream().feed(stream.replace(b"\r\n", b"\n")) == expected[:3]


def test_poisson_arrivals():
    assert arrival_times(4, math.inf, 0) == [0.0] * 4
    times = arrival_times(4000, 50.0, 1)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert np.mean(gaps) == pytest.approx(1 / 50, rel=0.06)
    assert np.std(gaps) == pytest.approx(1 / 50, rel=0.1)  # exponential: std equals mean


def timed(index: int, ttft: float, gaps: list[float], tokens: int) -> RequestResult:
    times = list(np.cumsum([ttft, *gaps]))
    return RequestResult(index, success=True, ttft=ttft, e2e=times[-1], chunk_times=times, prompt_tokens=10,
                         output_tokens=tokens, output_len_asked=tokens, usage_reported=True)


def test_summary_definitions():
    results = [timed(0, 0.1, [0.02, 0.04], 3), timed(1, 0.3, [0.01] * 4, 5),
               RequestResult(2, error="HTTP 500: boom"), timed(3, 0.2, [], 1)]
    s = summarize(results, duration_s=2.0, goodput=Goodput.parse(["ttft:250", "tpot:25"]))
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["HTTP 500: boom"])
    assert s["total_output_tokens"] == 9 and s["output_throughput"] == 4.5 and s["request_throughput"] == 1.5
    assert s["total_input_tokens"] == 30 and s["total_throughput"] == pytest.approx(19.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(200) and s["ttft_ms"]["median"] == pytest.approx(200)
    # TPOT per request: (0.16 - 0.1) / 2 = 30 ms and (0.34 - 0.3) / 4 = 10 ms; one-token requests have none
    assert s["tpot_ms"]["mean"] == pytest.approx(20) and s["tpot_ms"]["p99"] == pytest.approx(29.8)
    assert s["itl_ms"]["mean"] == pytest.approx(1e3 * 0.1 / 6) and s["itl_ms"]["max"] == pytest.approx(40)
    assert s["e2e_latency_ms"]["median"] == pytest.approx(200)
    assert s["concurrency"] == pytest.approx((0.16 + 0.34 + 0.2) / 2)
    # goodput: request 0 misses TPOT, request 1 misses TTFT, request 3 meets both
    assert s["goodput"]["requests_met"] == 1 and s["goodput"]["request_goodput"] == 0.5


def test_figures_match_the_fake_servers_timings(tmp_path):
    ttft, itl, out, n, conc = 0.06, 0.015, 9, 12, 4
    with FakeOpenAI(FakeConfig(ttft_s=ttft, itl_s=itl)) as server:
        code, doc = bench(tmp_path, server.url, "--num-prompts", str(n), "--random-input-len", "32",
                          "--random-output-len", str(out), "--random-range-ratio", "1", "--max-concurrency",
                          str(conc), "--output-details", "--label", "fake", "--meta", "gpu=none", "--meta", "k=v=w")
        bodies = server.bodies
    assert code == 0
    assert len(bodies) == n + 1  # one warm-up
    assert bodies[0]["max_tokens"] == 9 and all(len(b["prompt"]) == 32 for b in bodies)
    p = doc["points"][0]
    assert (p["completed"], p["failed"], p["total_output_tokens"], p["total_input_tokens"]) == (n, 0, n * out, n * 32)
    assert p["output_len_mismatches"] == 0 and p["usage_missing"] == 0
    assert all(r["output_tokens"] == out and len(r["itl_ms"]) == out - 1 for r in p["requests"])
    # the client adds little: a few ms at most on a busy 2-core machine
    assert ttft * 1e3 <= p["ttft_ms"]["median"] <= ttft * 1e3 + 25
    assert p["tpot_ms"]["median"] == pytest.approx(itl * 1e3, abs=3)
    assert p["itl_ms"]["median"] == pytest.approx(itl * 1e3, abs=3)
    e2e = ttft + (out - 1) * itl
    assert e2e * 1e3 <= p["e2e_latency_ms"]["median"] <= e2e * 1e3 + 35
    assert p["output_throughput"] == pytest.approx(n * out / p["duration_s"])
    waves = n / conc  # requests of equal length in 3 waves of 4
    assert waves * e2e <= p["duration_s"] <= waves * e2e * 1.5
    assert p["concurrency"] == pytest.approx(conc, rel=0.2)
    assert doc["server"]["model"] == "fake-model" and doc["server"]["base_url"] == server.url
    assert doc["label"] == "fake" and doc["meta"] == {"gpu": "none", "k": "v=w"}
    assert doc["command"].startswith("python bench/serve_bench.py --base-url") and "--max-concurrency 4" in doc["command"]
    assert doc["workload"]["input_len"] == 32 and doc["load"]["max_concurrency"] == 4 and doc["git_commit"]


def test_failures_are_counted_with_their_messages(tmp_path):
    # requests numbered from 1 in arrival order (no warm-up): 3, 6, 9, 12 get HTTP 500; 4 and 8 an error event
    with FakeOpenAI(FakeConfig(ttft_s=0.01, itl_s=0.002, http_error_every=3, midstream_error_every=4)) as server:
        code, doc = bench(tmp_path, server.url, "--num-prompts", "12", "--random-input-len", "8",
                          "--random-output-len", "5", "--random-range-ratio", "1", "--max-concurrency", "1",
                          "--warmup-requests", "0")
    p = doc["points"][0]
    assert code == 0 and (p["completed"], p["failed"]) == (6, 6)
    assert p["errors"][:2] == ["HTTP 500: fake overload on request 3", "error event (503): fake decode crash on request 4"]
    assert sum(p["error_counts"].values()) == 6 and p["total_output_tokens"] == 30


def test_exit_status_is_nonzero_when_every_request_fails(tmp_path):
    with FakeOpenAI(FakeConfig(ttft_s=0.01, itl_s=0.002, http_error_every=1)) as server:
        code, doc = bench(tmp_path, server.url, "--num-prompts", "3", "--random-output-len", "4", "--warmup-requests", "0")
        assert code == 1 and doc["points"][0]["completed"] == 0 and doc["points"][0]["failed"] == 3
        code, doc = bench(tmp_path, server.url, "--num-prompts", "3", "--random-output-len", "4", name="warm.json")
        assert code == 1 and doc["points"] == [] and doc["warmup_errors"] == ["HTTP 500: fake overload on request 4"]
    with FakeOpenAI(FakeConfig(ttft_s=2.0)) as server:
        code, doc = bench(tmp_path, server.url, "--num-prompts", "2", "--random-output-len", "4", "--warmup-requests",
                          "0", "--request-timeout", "0.2", name="slow.json")
    assert code == 1 and doc["points"][0]["errors"] == ["timeout: no complete answer within 0.2 s"] * 2


def test_sweep_writes_every_point_and_the_plots(tmp_path):
    with FakeOpenAI(FakeConfig(ttft_s=0.03, itl_s=0.01)) as server:
        code, doc = bench(tmp_path, server.url, "--api", "chat", "--sweep-concurrency", "1,2,4",
                          "--prompts-per-concurrency", "2", "--random-input-len", "16", "--random-output-len", "6",
                          "--random-range-ratio", "1", name="sweep.json")
        assert all(b["messages"][0]["content"] and "prompt" not in b for b in server.bodies)
    assert code == 0
    points = doc["points"]
    assert [p["max_concurrency"] for p in points] == [1, 2, 4] and [p["num_prompts"] for p in points] == [2, 4, 8]
    assert all(p["failed"] == 0 and p["total_output_tokens"] == 6 * p["num_prompts"] for p in points)
    # the role-only first chunk is not output: TTFT is the server's 30 ms, not ~0
    assert all(p["ttft_ms"]["median"] >= 30 for p in points)
    assert points[2]["output_throughput"] > 2.5 * points[0]["output_throughput"]  # the fake scales perfectly
    for name in ("ttft", "tpot", "throughput"):
        png = tmp_path / f"sweep_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(png).size[0] > 300


def test_anchor_block_sets_results_beside_sglang():
    from tests.bench_scripts import load_bench

    anchors = load_bench("anchors")
    result = {"meta": {"model_shape": "gemma-4-E4B-it"}, "workload": {"dataset": "random"}, "points": [
        {"max_concurrency": 1, "tpot_ms": {"mean": 2.82}, "ttft_ms": {"mean": 105.6}, "output_throughput": 300.0},
        {"max_concurrency": 100, "tpot_ms": {"mean": 9.0}, "ttft_ms": {"mean": 200.0}, "output_throughput": 14006.0},
        {"max_concurrency": 8, "tpot_ms": {"mean": 3.0}, "ttft_ms": {"mean": 80.0}, "output_throughput": 2000.0}]}
    block = anchors.serve_anchor(result)
    one, hundred = block["points"]  # no published figure at concurrency 8
    assert (one["tpot_speedup"], one["ttft_speedup"]) == (2.0, 0.5)
    assert hundred["throughput_ratio"] == 2.0 and hundred["sglang_output_tok_per_s"] == 7003
    result["workload"]["dataset"] = "image"  # SGLang's image run: its TTFT and throughput
    one, hundred = anchors.serve_anchor(result)["points"]
    assert (one["sglang_ttft_ms"], one["ttft_speedup"]) == (110.2, round(110.2 / 105.6, 3))
    assert hundred["sglang_output_tok_per_s"] == 4687

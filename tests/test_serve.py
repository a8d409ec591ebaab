"""`tandem serve` end to end: real actor processes started by the launcher, the OpenAI API over
HTTP, on the CPU colocated and disaggregated topologies (issue 4, acceptance 2, 3, 4, 6)."""

from __future__ import annotations

import ast
import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from default_model import CHECKPOINT
from default_model.tasks import KINDS, make_set
from tests.serving import Served

TEXT_KINDS = tuple(k for k in KINDS if k not in ("colour", "tone", "beeps"))
MAX_TOKENS = 40


def _chat_body(inst, **extra) -> dict:
    body = {"model": "tandem-default", "messages": list(inst.messages), "max_tokens": MAX_TOKENS,
            "temperature": 0, "return_token_ids": True,
            "chat_template_kwargs": {"enable_thinking": inst.enable_thinking}, **extra}
    if inst.tools:
        body["tools"] = list(inst.tools)
    return body


def _chat(url: str, body: dict) -> dict:
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture(scope="module")
def prompts():
    return make_set(21, 2, heldout=True, kinds=TEXT_KINDS)


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    log = tmp_path_factory.mktemp("colocated") / "tandem.log"
    with Served(["serve", "--topology", "cpu_colocated"], log=log) as served:
        yield served


@pytest.fixture(scope="module")
def disaggregated(tmp_path_factory):
    root = tmp_path_factory.mktemp("disaggregated")
    with Served(["serve", "--topology", "cpu_disaggregated", "--trace-dir", str(root / "traces")],
                log=root / "tandem.log") as served:
        served.trace_dir = root / "traces"
        yield served


@torch.no_grad()
def test_disaggregated_equals_colocated_equals_transformers(colocated, disaggregated, prompts):
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    reference = Gemma4ForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()
    eos = json.loads((CHECKPOINT / "generation_config.json").read_text())["eos_token_id"]
    for inst in prompts:
        text = tokenizer.apply_chat_template(list(inst.messages), tools=list(inst.tools) or None, tokenize=False,
                                             add_generation_prompt=True, enable_thinking=inst.enable_thinking)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = reference.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos)
        expected = out[0, ids.shape[1]:].tolist()
        coloc = _chat(colocated.url, _chat_body(inst))
        disagg = _chat(disaggregated.url, _chat_body(inst))
        assert coloc["choices"][0]["token_ids"] == expected, inst.kind
        assert disagg["choices"][0]["token_ids"] == expected, inst.kind
        assert coloc["usage"] == disagg["usage"]
        assert coloc["usage"]["prompt_tokens"] == ids.shape[1]


def test_64_concurrent_streams_batch_in_decode(disaggregated):
    from openai import AsyncOpenAI

    async def one(client, i: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model="tandem-default", messages=[{"role": "user", "content": f"Copy: apple tree {i}"}],
            max_tokens=12, temperature=0.7, seed=i, stream=True, extra_body={"ignore_eos": True})
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_of_them():
        async with AsyncOpenAI(base_url=f"{disaggregated.url}/v1", api_key="none", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert len(results) == 64 and all(reason == "length" for _, reason in results)
    metrics = httpx.get(f"{disaggregated.url}/metrics", timeout=10).text
    peak = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith('tandem_peak_batch_size{actor="decode"')]
    assert peak and peak[0] > 1, f"no decode step ran more than one request: {peak}"
    # the api's request spans carry its TTFT (the engine's first token reaching it), inside the span
    from actors.tracing import read_spans

    deadline = time.monotonic() + 10
    while not (requests := [s for s in read_spans(disaggregated.trace_dir) if s.stage == "request"]) \
            and time.monotonic() < deadline:  # the tracer appends its buffer about once a second
        time.sleep(0.2)
    assert requests
    assert all(0 < s.attrs["ttft_ms"] <= (s.end_ns - s.start_ns) / 1e6 for s in requests)


def test_killed_decode_ends_streams_with_an_error_then_recovers(disaggregated):
    """Clients see an error within 2 s; /health is 503 until the launcher has restarted decode."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{disaggregated.url}/v1", api_key="none", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="tandem-default", messages=[{"role": "user", "content": "Copy: a b c"}],
        max_tokens=3000, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    disaggregated.actor_process("decode").kill()
    killed = time.monotonic()
    with pytest.raises(Exception) as failure:
        for _ in chunks:
            pass
    assert time.monotonic() - killed < 2.0
    assert "decode" in str(failure.value)
    assert disaggregated.health() == 503
    deadline = time.monotonic() + 120
    while disaggregated.health() != 200:
        assert time.monotonic() < deadline, "decode was not restarted"
        time.sleep(0.25)
    answer = _chat(disaggregated.url, {"model": "tandem-default", "max_tokens": 8,
                                       "messages": [{"role": "user", "content": "Add 2 and 3."}]})
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


TWO_NODE = """
name = "two-netns"
[model]
path = "default"
[api]
host = "{front}"
port = {port}
node = "front"
[nodes.front]
host = "{front}"
base_port = 5600
[nodes.back]
host = "{back}"
base_port = 5700
[[actors]]
kind = "preprocess"
node = "front"
[[actors]]
kind = "prefill"
node = "front"
[[actors]]
kind = "decode"
node = "back"
[transfer]
backend = "tcp"
[security]
curve_keys = "{keys}"
"""


def _netns_available() -> str | None:
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 to create network namespaces"
    probe = subprocess.run(["ip", "netns", "add", "tandem-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add refused here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "tandem-probe"], check=True)
    return None


@pytest.fixture
def two_namespaces():
    import subprocess
    import uuid

    reason = _netns_available()
    if reason:
        pytest.skip(f"two-node test needs network namespaces, which this machine refuses: {reason}")
    tag = uuid.uuid4().hex[:6]
    front, back = f"tandem-f-{tag}", f"tandem-b-{tag}"
    cmds = [f"ip netns add {front}", f"ip netns add {back}",
            f"ip link add tvf{tag} type veth peer name tvb{tag}",
            f"ip link set tvf{tag} netns {front}", f"ip link set tvb{tag} netns {back}",
            f"ip -n {front} addr add 10.231.0.1/24 dev tvf{tag}", f"ip -n {back} addr add 10.231.0.2/24 dev tvb{tag}",
            f"ip -n {front} link set tvf{tag} up", f"ip -n {back} link set tvb{tag} up",
            f"ip -n {front} link set lo up", f"ip -n {back} link set lo up"]
    try:
        for cmd in cmds:
            subprocess.run(cmd.split(), check=True, capture_output=True)
        yield front, back
    finally:
        for ns in (front, back):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in_ns(ns: str, body: dict, url: str) -> tuple[int, dict]:
    import subprocess
    import sys

    code = ("import httpx, json, sys; r = httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=120); "
            "print(json.dumps([r.status_code, r.json()]))")
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, url, json.dumps(body)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    status, reply = json.loads(out.stdout)
    return status, reply


def _ns_health(ns: str, url: str) -> int | None:
    import subprocess
    import sys

    code = "import httpx, sys\ntry: print(httpx.get(sys.argv[1], timeout=2).status_code)\nexcept Exception: print(0)"
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, f"{url}/health"],
                         capture_output=True, text=True, timeout=30)
    return int(out.stdout.strip() or 0)


def test_two_nodes_in_network_namespaces_kv_over_tcp(two_namespaces, colocated, prompts, tmp_path):
    """Prefill (with api and preprocess) in one namespace, decode in another, joined by a veth pair;
    every TCP link between them CURVE-authenticated and encrypted (`[security]`)."""
    from actors.security import make_keys

    front, back = two_namespaces
    topology = tmp_path / "two.toml"
    keys = make_keys(tmp_path / "keys")
    topology.write_text(TWO_NODE.format(front="10.231.0.1", back="10.231.0.2", port=8000, keys=keys))
    back_node = Served(["node", "--topology", str(topology), "--node", "back"], prefix=["ip", "netns", "exec", back],
                       log=tmp_path / "back.log", wait_health=False)
    front_node = Served(["node", "--topology", str(topology), "--node", "front"], host="10.231.0.1", port=8000,
                        prefix=["ip", "netns", "exec", front], log=tmp_path / "front.log", wait_health=False)
    with back_node, front_node:
        deadline = time.monotonic() + 240
        while _ns_health(front, front_node.url) != 200:
            for node in (front_node, back_node):
                assert node.process.poll() is None, node.log()
            assert time.monotonic() < deadline, front_node.log() + back_node.log()
            time.sleep(0.5)
        for inst in prompts[:4]:
            status, reply = _in_ns(front, _chat_body(inst), f"{front_node.url}/v1/chat/completions")
            assert status == 200, reply
            assert reply["choices"][0]["token_ids"] == _chat(colocated.url, _chat_body(inst))["choices"][0]["token_ids"]
        assert front_node.stop() == 0 and back_node.stop() == 0


def test_openai_client_against_tandem_serve(colocated):
    """Acceptance 1 on the real server: the official client, streaming and not."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    client = OpenAI(base_url=f"{colocated.url}/v1", api_key="none", max_retries=0, timeout=120)
    conversation = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Add 12 and 30."}, {"role": "assistant", "content": "42"},
                    {"role": "user", "content": "Copy: river stone lantern"}]
    reply = client.chat.completions.create(model="tandem-default", messages=conversation, temperature=0, max_tokens=30,
                                           extra_body={"return_token_ids": True})
    prompt_ids = tokenizer(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False).input_ids
    assert reply.choices[0].finish_reason in ("stop", "length")  # the model is trained on single turns
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(reply.choices[0].model_extra["token_ids"])

    chunks = list(client.chat.completions.create(model="tandem-default", messages=conversation, temperature=0,
                                                 max_tokens=30, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens

    short = client.chat.completions.create(model="tandem-default", messages=conversation, max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2

    question = [{"role": "user", "content": "Repeat these words: river stone lantern"}]
    full = client.chat.completions.create(model="tandem-default", messages=question, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "stop" and len(text) >= 4, text
    assert full.usage.completion_tokens == len(tokenizer(text + "<turn|>", add_special_tokens=False).input_ids)
    cut = client.chat.completions.create(model="tandem-default", messages=question, temperature=0, max_tokens=30,
                                         stop=[text[2:4]])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:2]

    two = client.chat.completions.create(model="tandem-default", messages=question, n=2, seed=5, temperature=1.0,
                                         max_tokens=12)
    again = client.chat.completions.create(model="tandem-default", messages=question, n=2, seed=5, temperature=1.0,
                                           max_tokens=12)
    assert len(two.choices) == 2
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]

    scored = client.chat.completions.create(model="tandem-default", messages=question, temperature=0, max_tokens=6,
                                            logprobs=True, top_logprobs=3)
    entries = scored.choices[0].logprobs.content
    assert entries and all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)


def _readme_examples() -> list[str]:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Examples", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_examples_run_against_tandem_serve(colocated, tmp_path):
    """Issue 5 acceptance 3 (and issue 6's image and audio): the README's openai-client examples, as printed there."""
    import subprocess
    import sys

    blocks = _readme_examples()
    assert len(blocks) == 6
    outputs = []
    for i, block in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(block.replace("http://127.0.0.1:8000", colocated.url))
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"README example {i} failed:\n{block}\n{run.stderr}"
        outputs.append(run.stdout)
    chat, thinking, tool, extraction, image, audio = outputs
    assert chat.strip() == "42"
    assert "17 + 25 = 42" in thinking and "answer: 42" in thinking
    assert tool.splitlines()[0] == 'tool_calls get_weather {"location": "Tokyo"}'
    assert "sunny" in tool.splitlines()[1] and "21" in tool.splitlines()[1]
    person = ast.literal_eval(extraction.strip())  # sampled at temperature 1.0: the schema holds, values may vary
    assert set(person) == {"name", "age", "city"} and isinstance(person["age"], int)
    assert isinstance(person["name"], str) and isinstance(person["city"], str)
    assert image.strip() == "blue" and audio.strip() == "high"


def test_serve_bench_against_tandem_serve(colocated, tmp_path):
    """bench/serve_bench.py against the real server: every request decodes the forced length."""
    from tests.test_serve_bench import bench

    code, doc = bench(tmp_path, colocated.url, "--num-prompts", "8", "--random-input-len", "16",
                      "--random-output-len", "8", "--random-range-ratio", "1", "--max-concurrency", "8",
                      "--warmup-requests", "0", "--output-details")
    p = doc["points"][0]
    assert code == 0, p["errors"]
    assert (p["completed"], p["failed"], p["usage_missing"], doc["server"]["model"]) == (8, 0, 0, "tandem-default")
    assert all((r["output_tokens"], r["prompt_tokens"], r["finish_reason"]) == (8, 16, "length") for r in p["requests"])
    assert 0 < p["ttft_ms"]["median"] < p["e2e_latency_ms"]["median"] and p["tpot_ms"]["median"] > 0
    code, doc = bench(tmp_path, colocated.url, "--dataset-name", "image", "--num-prompts", "2", "--image-resolution",
                      "96x128", "--random-input-len", "16", "--random-output-len", "6", "--warmup-requests", "0",
                      "--output-details", name="image.json")
    p = doc["points"][0]
    assert code == 0, p["errors"]
    assert p["completed"] == 2 and all(r["output_tokens"] == 6 for r in p["requests"])
    assert all(r["prompt_tokens"] > 16 + 2 * 64 for r in p["requests"])  # text, template and two images

"""bench/handoff.py in its CPU smoke mode: the nccl protocol over gloo with the tiny E4B config,
its workers as threads of the test process (`--in-process`), every part writing records whose
numbers follow from what was measured and from the config."""

from __future__ import annotations

import json
import math
import pathlib

import pytest

from gemma4_model.config import FULL, SLIDING, parse_config
from gemma4_model.random_checkpoint import tiny_config
from tests.bench_scripts import load_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = 4  # the smoke run's page size
ELEMENT = 4  # float32


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_bench("handoff")
    out = tmp_path_factory.mktemp("handoff") / "handoff.json"
    returned = bench.main(["--smoke", "--in-process", "--out", str(out), "--commit", "abc1234"])
    return bench, json.loads(out.read_text()), returned


def by_part(doc, part):
    return [r for r in doc["records"] if r["part"] == part]


def tiny_text():
    return parse_config(tiny_config("e4b").to_dict()).text


def expected_payload_bytes(tokens: int) -> int:
    """What a handoff of `tokens` must carry, from the config alone: every full page; the sliding
    pages from the one holding the first position a query at `tokens` can still see."""
    cfg = tiny_text()
    per_token = cfg.kv_bytes_per_token(ELEMENT)
    width = math.ceil(tokens / PAGE)
    first_sliding = max(0, tokens - cfg.sliding_window + 1) // PAGE
    return PAGE * (per_token[FULL] * width + per_token[SLIDING] * (width - first_sliding))


def test_header_names_the_command_commit_and_device(smoke):
    _, doc, returned = smoke
    header = doc["header"]
    assert header["commit"] == "abc1234" and header["command"].startswith("python bench/handoff.py --smoke")
    assert header["device"] == "cpu" and header["dtype"] == "float32" and header["torch"]
    assert returned["records"] == doc["records"]


def test_bandwidth_records_time_real_handoffs_against_the_ceiling(smoke):
    _, doc, _ = smoke
    [ceiling] = by_part(doc, "ceiling")
    assert ceiling["gbps"] > 0 and len(ceiling["times_ms"]) >= 2
    records = by_part(doc, "bandwidth")
    assert [r["prompt_tokens"] for r in records] == [64, 256]
    for r in records:
        assert "error" not in r and r["errors"] == [] and r["backend"] == "nccl" and r["process_group"] == "gloo"
        assert r["reps"] == 2 == len(r["times_ms"])  # the warm-up handoff is not among them
        assert all(t > 0 for t in r["times_ms"]) and min(r["times_ms"]) <= r["median_ms"] <= max(r["times_ms"])
        assert r["payload_bytes"] == expected_payload_bytes(r["prompt_tokens"])
        assert r["gbps"] == pytest.approx(r["payload_bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["ceiling_gbps"] == ceiling["gbps"]
        assert r["fraction_of_ceiling"] == pytest.approx(r["gbps"] / ceiling["gbps"])
        assert 0 < r["decode_side_median_ms"] <= r["median_ms"]  # decode accepts after prefill began


def test_bytes_record_is_the_sliding_window_handoff_against_every_layer_every_token(smoke):
    _, doc, _ = smoke
    [record] = by_part(doc, "bytes")
    cfg = tiny_text()
    tokens = record["prompt_tokens"]
    assert tokens == 256 > cfg.sliding_window  # the window matters at this length
    naive = sum(2 * layer.num_kv_heads * layer.head_dim * ELEMENT for layer in cfg.layers) * tokens
    assert record["handoff_bytes"] == expected_payload_bytes(tokens)
    assert record["naive_bytes_every_layer_every_token"] == naive
    assert record["naive_over_handoff"] == pytest.approx(naive / record["handoff_bytes"]) and naive > record["handoff_bytes"]
    assert record["groups"][FULL]["pages"] == tokens // PAGE
    assert record["groups"][SLIDING]["pages"] < tokens // PAGE
    assert record["measured_payload_bytes"] == [record["handoff_bytes"]] and record["measured_equals_computed"]


def test_ttft_records_compare_disaggregated_with_colocated(smoke):
    _, doc, _ = smoke
    colocated, disaggregated = by_part(doc, "ttft")
    assert colocated["setup"] == "colocated" and disaggregated["backend"] == "nccl"
    for r in (colocated, disaggregated):
        assert r["requests"] == 2 and all(len(t) == 2 for t in r["tokens"])  # max_tokens 2, ignore_eos
        assert all(0 < a < b for a, b in zip(r["ttft_ms"], r["second_token_ms"]))
        assert r["exit_codes"] == {name: 0 for name in r["exit_codes"]}
    assert disaggregated["ttft_over_colocated"] == pytest.approx(disaggregated["median_ttft_ms"]
                                                                 / colocated["median_ttft_ms"])
    assert disaggregated["second_token_over_colocated"] == pytest.approx(
        disaggregated["median_second_token_ms"] / colocated["median_second_token_ms"])
    assert disaggregated["same_tokens_as_colocated"] is True  # same seed, same weights, greedy


def test_report_is_rewritten_after_every_record(tmp_path):
    bench = load_bench("handoff")
    out = tmp_path / "r.json"
    report = bench.Report(out, {"commit": "x"})
    assert json.loads(out.read_text())["records"] == []
    report.add({"part": "ceiling", "gbps": 1.0})
    assert json.loads(out.read_text())["records"] == [{"part": "ceiling", "gbps": 1.0}]


def test_in_process_workers_are_refused_outside_the_smoke_run(tmp_path):
    bench = load_bench("handoff")
    with pytest.raises(SystemExit):
        bench.parse_args(["--in-process", "--out", str(tmp_path / "x.json")])


def test_summary_reads_the_acceptance_figures_off_the_records(smoke):
    _, doc, _ = smoke
    [summary] = by_part(doc, "summary")
    largest = by_part(doc, "bandwidth")[-1]
    [setup] = summary["bandwidth"]
    assert summary["bandwidth"][setup]["fraction_of_ceiling"] == largest["fraction_of_ceiling"]
    assert summary["bandwidth"][setup]["meets_70_percent"] == (largest["fraction_of_ceiling"] >= 0.7)
    assert summary["bytes"]["naive_over_handoff"] == by_part(doc, "bytes")[0]["naive_over_handoff"]
    ratio = by_part(doc, "ttft")[1]["ttft_over_colocated"]
    assert summary["ttft"]["nccl_over_gloo_cpu"]["meets_10_percent"] == (ratio <= 1.10)


def test_handoff_host_times_each_part_of_one_handoff():
    """bench/handoff_host.py at E4B's shape: one record per size, its pages those a prompt of that
    many tokens holds (every full page; the sliding window's), every part timed, the sums right."""
    bench = load_bench("handoff_host")
    record = bench.one_size(256, reps=2)
    cfg, _ = load_bench("handoff").text_config(False)
    assert cfg.sliding_window >= 256 and record["pages"] == 2 * 256 // 16  # both groups hold all 16 pages
    assert set(record["ms"]) == {"held_pages_hold", "message_encode", "message_decode", "check_payload",
                                 "adopt_sequence", "page_runs"} and all(v > 0 for v in record["ms"].values())
    ms = record["ms"]
    assert record["sender_ms"] == pytest.approx(ms["held_pages_hold"] + ms["message_encode"], abs=1e-3)
    assert record["receiver_ms"] == pytest.approx(sum(ms.values()) - record["sender_ms"], abs=1e-3)

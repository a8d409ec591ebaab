"""bench/decode_step.py's CPU smoke run: a record per batch with its timing and floor."""

from tests.bench_scripts import load_bench


def test_smoke_run_records_each_batch(tmp_path):
    bench = load_bench("decode_step")
    out = tmp_path / "ds.json"
    result = bench.main(["--smoke", "--batches", "1,2", "--steps", "2", "--warmup", "1", "--context", "16",
                         "--out", str(out)])
    records = result["records"]
    assert [(r["batch"], r["mode"]) for r in records] == [(1, "eager"), (2, "eager")]
    for r in records:
        assert r["median_ms"] > 0 and r["floor_ms"] > 0 and len(r["times_ms"]) == 2 and r["graph_replays"] == 0
    assert out.exists() and result["header"]["device"] == "cpu"

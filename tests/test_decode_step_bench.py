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
    # the decode launch's settings that change a step's time travel with it
    header = result["header"]
    assert header["split_keys"] == 16 and header["max_splits"] == 32 and header["programs_per_sm"] == 2


def test_smoke_run_per_kv_cache_dtype_with_its_floor(tmp_path):
    bench = load_bench("decode_step")
    result = bench.main(["--smoke", "--batches", "2", "--steps", "2", "--warmup", "1", "--context", "64",
                         "--kv-dtypes", "auto,fp8_e4m3", "--out", str(tmp_path / "ds.json")])
    auto, fp8 = result["records"]
    assert (auto["kv_dtype"], fp8["kv_dtype"]) == ("auto", "fp8_e4m3")
    assert "error" not in fp8 and fp8["median_ms"] > 0
    assert fp8["floor_ms"] < auto["floor_ms"]  # the KV part of the floor at one byte a value

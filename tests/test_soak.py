"""bench/soak.py's verdict (the soak itself runs for minutes: `bench/results/soak_cpu.json`)."""

from tests.bench_scripts import load_bench


def window(start, p99, rss, **outcomes):
    return {"start_s": start, "finished": 10, "p50_s": p99 / 2, "p99_s": p99, "outcomes": outcomes or {"ok": 10},
            "rss_mib": rss}


def test_verdict():
    soak = load_bench("soak")
    steady = [window(s, 1.0, 100.0) for s in range(0, 60, 10)]
    assert soak.verdict(steady, warmup_s=10)["pass"]
    grown = steady[:-1] + [window(50, 1.0, 106.0)]
    assert not soak.verdict(grown, 10)["pass"] and soak.verdict(grown, 10)["memory_growth"] > 0.05
    slower = steady[:3] + [window(s, 2.0, 100.0) for s in (30, 40, 50)]
    assert not soak.verdict(slower, 10)["pass"]
    failing = steady[:-1] + [window(50, 1.0, 100.0, ok=9, **{"unexpected:status 500": 1})]
    assert soak.verdict(failing, 10)["unexpected"] == {"unexpected:status 500": 1} and not soak.verdict(failing, 10)["pass"]
    assert not soak.verdict(steady[:1], 0)["pass"]  # too short to judge
    assert not soak.verdict(steady, 10, p99_first=1.0, p99_last=1.6)["pass"]  # pooled figures win
    windows = [soak.Window(float(s), latencies=[0.1 * (s + 1)] * 10) for s in range(0, 100, 10)]
    assert soak.pooled_p99(windows, warmup_s=10, judge_s=20) == (2.1, 9.1)  # windows 10-20 and 80-90


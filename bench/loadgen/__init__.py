"""A serving benchmark client for any OpenAI-compatible server (Tandem, SGLang, vLLM).

`workload` builds the requests (random text as token ids or text, random images), `client`
streams one request and times its chunks, `runner` offers the load (Poisson arrivals, a
concurrency cap, warm-up), `metrics` turns the timings into `sglang.bench_serving`'s figures,
and `report` prints them, writes the JSON and draws the sweep plots. `bench/serve_bench.py` is
the command line.
"""

"""Serving benchmark: load any OpenAI-compatible server and report what sglang.bench_serving reports.

    python bench/serve_bench.py --base-url http://127.0.0.1:8000 [--model NAME] [--tokenizer PATH]
        [--api completions|chat] [--dataset-name random|image|mixed] [--image-fraction F] [--num-prompts N]
        [--random-input-len N] [--random-output-len N] [--random-range-ratio R]
        [--image-count N] [--image-resolution 720p|HxW] [--image-format jpeg|png] [--image-content random|blank]
        [--max-concurrency C] [--request-rate R] [--warmup-requests N] [--seed S] [--request-timeout S]
        [--sweep-concurrency 1,4,16,64] [--prompts-per-concurrency K] [--goodput ttft:MS tpot:MS e2el:MS]
        [--output-file FILE.json] [--output-details] [--label TEXT] [--meta KEY=VALUE ...]

Random text (default): lengths as sglang's random dataset (defaults 1024 / 1024, range ratio 0,
seed 1), prompts of exact token length from the served model's tokenizer (default: the embedded
model's), sent as token ids to /v1/completions, or as text with `--api chat`. Image: N images
(default two 720p, random pixels, JPEG) plus text (default 128 tokens) per chat request, 1024
output tokens. Mixed: chat requests of random text (defaults 512 / 512), a seeded
`--image-fraction` of them (default 0.5) with the images too. Output length is forced (ignore_eos,
max_tokens = min_tokens) unless `--disable-ignore-eos`. Streams every request (usage included) to time TTFT and each chunk.

A sweep runs the workload at each concurrency and writes one JSON with every point plus
`<output>_ttft.png`, `<output>_tpot.png` and `<output>_throughput.png`. The JSON names the command,
the git commit, the workload, the load, the server and model, and `--label` / `--meta`. The exit
status is 1 when the warm-up or every request of a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.loadgen.metrics import Goodput, request_details, summarize  # noqa: E402
from bench.loadgen.report import format_point, format_sweep, plot_sweep  # noqa: E402
from bench.loadgen.runner import LoadConfig, WarmupFailed, run_load  # noqa: E402
from bench.loadgen.workload import Workload, WorkloadConfig, parse_resolution  # noqa: E402

# Per dataset: (input length, output length, range ratio) unless given.
DEFAULT_LENGTHS = {"random": (1024, 1024, 0.0), "image": (128, 1024, 1.0), "mixed": (512, 512, 0.0)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="serve_bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    server = ap.add_argument_group("server")
    server.add_argument("--base-url", default=None, help="the server (default http://HOST:PORT)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--model", help="model name in the requests (default: the first of GET /v1/models)")
    server.add_argument("--tokenizer", help="tokenizer directory for the prompts (default: the embedded model's)")
    server.add_argument("--api", choices=("completions", "chat"), default=None,
                        help="completions: token-id prompts to /v1/completions (random default); "
                             "chat: text to /v1/chat/completions (image needs it)")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default $OPENAI_API_KEY")
    work = ap.add_argument_group("workload")
    work.add_argument("--dataset-name", "--workload", dest="dataset", choices=("random", "image", "mixed"),
                      default="random")
    work.add_argument("--num-prompts", type=int, default=1000)
    work.add_argument("--random-input-len", type=int, help="text tokens per prompt (random 1024, image 128)")
    work.add_argument("--random-output-len", type=int, help="output tokens per request (1024)")
    work.add_argument("--random-range-ratio", type=float,
                      help="lengths drawn in [len * ratio, len] (random 0.0 as SGLang; image 1.0: fixed)")
    work.add_argument("--image-count", type=int, default=2)
    work.add_argument("--image-fraction", type=float, default=0.5, help="mixed: the share of requests with images")
    work.add_argument("--image-resolution", default="720p", help="4k, 1080p, 720p, 360p or HEIGHTxWIDTH (SGLang's order)")
    work.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    work.add_argument("--image-content", choices=("random", "blank"), default="random")
    work.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    work.add_argument("--temperature", type=float, default=0.0)
    work.add_argument("--extra-request-body", type=json.loads, default={}, metavar="JSON",
                      help="merged into every request body, e.g. '{\"mm_processor_kwargs\": {\"max_soft_tokens\": 280}}'")
    load = ap.add_argument_group("load")
    load.add_argument("--max-concurrency", type=int, help="most requests in flight (default: no cap)")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf: all at once)")
    load.add_argument("--warmup-requests", type=int, default=1)
    load.add_argument("--seed", type=int, default=1)
    load.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                      help="a request not finished in this time fails (default: none)")
    load.add_argument("--sweep-concurrency", type=lambda s: [int(x) for x in s.split(",") if x],
                      metavar="C1,C2,...", help="run at each concurrency; one JSON + PNG plots")
    load.add_argument("--prompts-per-concurrency", type=int, metavar="K",
                      help="in a sweep, K * concurrency prompts per point (default --num-prompts each)")
    load.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                      help="request goodput under limits: ttft:MS tpot:MS e2el:MS")
    out = ap.add_argument_group("output")
    out.add_argument("--output-file", type=Path, help="JSON with every figure (a sweep's default: ./serve_sweep-<time>.json)")
    out.add_argument("--output-details", action="store_true", help="also each request's timings and error")
    out.add_argument("--label", help="a name for this run, kept in the JSON")
    out.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="extra metadata (repeatable)")
    out.add_argument("--disable-tqdm", action="store_true")
    args = ap.parse_args(argv)
    args.api = args.api or ("chat" if args.dataset in ("image", "mixed") else "completions")
    in_len, out_len, ratio = DEFAULT_LENGTHS[args.dataset]
    args.random_input_len = args.random_input_len or in_len
    args.random_output_len = args.random_output_len or out_len
    args.random_range_ratio = ratio if args.random_range_ratio is None else args.random_range_ratio
    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    for item in args.meta:
        if "=" not in item:
            ap.error(f"--meta {item!r}: write KEY=VALUE")
    return args


def served_models(base_url: str, api_key: str | None) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxies from the environment
    with opener.open(urllib.request.Request(base_url + "/v1/models", headers=headers), timeout=30) as response:
        return [m["id"] for m in json.loads(response.read()).get("data", [])]


def git_state() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def workload_config(args: argparse.Namespace, num_prompts: int) -> WorkloadConfig:
    height, width = parse_resolution(args.image_resolution)
    return WorkloadConfig(dataset=args.dataset, api=args.api, num_prompts=num_prompts,
                          input_len=args.random_input_len, output_len=args.random_output_len,
                          range_ratio=args.random_range_ratio, seed=args.seed, image_count=args.image_count,
                          image_height=height, image_width=width, image_format=args.image_format,
                          image_content=args.image_content, image_fraction=args.image_fraction,
                          ignore_eos=not args.disable_ignore_eos,
                          temperature=args.temperature, extra_body=args.extra_request_body)


def load_config(args: argparse.Namespace, model: str, concurrency: int | None) -> LoadConfig:
    return LoadConfig(base_url=args.base_url, model=model, max_concurrency=concurrency,
                      request_rate=args.request_rate, warmup_requests=args.warmup_requests,
                      request_timeout_s=args.request_timeout, seed=args.seed, api_key=args.api_key,
                      progress=not args.disable_tqdm)


def _rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


async def run_points(args, model: str, tokenizer, concurrencies: list[int | None], goodput) -> list[dict]:
    """One run per concurrency (warm-up before the first); each point's figures, printed as it ends."""
    points = []
    for position, concurrency in enumerate(concurrencies):
        num_prompts = args.num_prompts
        if args.prompts_per_concurrency and concurrency:
            num_prompts = args.prompts_per_concurrency * concurrency
        workload = Workload(workload_config(args, num_prompts), tokenizer)
        load = load_config(args, model, concurrency)
        run = await run_load(workload, load, warmup=position == 0,
                             description=f"concurrency {concurrency or 'unbounded'}")
        point = {"max_concurrency": concurrency, "request_rate": _rate(args.request_rate),
                 "num_prompts": num_prompts, **summarize(run.results, run.duration_s, goodput)}
        if args.output_details:
            point["requests"] = request_details(run.results)
        header = {"Backend": f"openai-{args.api}", "Dataset": args.dataset, "Model": model,
                  "Traffic request rate": args.request_rate, "Max request concurrency": concurrency or "not set"}
        print(format_point(point, header), flush=True)
        points.append(point)
    return points


def document(args, argv: list[str], model: str, models: list[str], points: list[dict], **extra) -> dict:
    workload = dataclasses.asdict(workload_config(args, args.num_prompts))
    if args.prompts_per_concurrency and args.sweep_concurrency:
        workload["num_prompts"] = f"{args.prompts_per_concurrency} x concurrency"
    return {
        "tool": "bench/serve_bench.py",
        "command": shlex.join(["python", "bench/serve_bench.py", *argv]),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        "client": {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version()},
        "server": {"base_url": args.base_url, "model": model, "models": models, "api": args.api},
        "label": args.label,
        "meta": dict(item.split("=", 1) for item in args.meta),
        "workload": {**workload, "tokenizer": str(args.tokenizer)},
        "load": {"request_rate": _rate(args.request_rate), "max_concurrency": args.max_concurrency,
                 "sweep_concurrency": args.sweep_concurrency, "warmup_requests": args.warmup_requests,
                 "request_timeout_s": args.request_timeout, "seed": args.seed},
        **extra,
        "points": points,
    }


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop
        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        return asyncio.Runner()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    goodput = Goodput.parse(args.goodput) if args.goodput else None
    try:
        models = served_models(args.base_url, args.api_key)
    except (OSError, ValueError) as exc:  # urllib's errors are OSErrors
        models = []
        if not args.model:
            print(f"serve_bench: cannot list the models at {args.base_url}/v1/models: {exc}", file=sys.stderr)
            return 1
    model = args.model or models[0]
    if args.tokenizer is None:
        from default_model import CHECKPOINT
        args.tokenizer = CHECKPOINT
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    sweep = args.sweep_concurrency
    output = args.output_file
    if sweep and output is None:
        output = Path(f"serve_sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    concurrencies = sweep or [args.max_concurrency]
    warmup_errors = None
    with _event_loop_runner() as runner:
        try:
            points = runner.run(run_points(args, model, tokenizer, concurrencies, goodput))
        except WarmupFailed as exc:
            print(f"serve_bench: {exc}", file=sys.stderr)
            points, warmup_errors = [], exc.errors
    if sweep and points:
        print(format_sweep(points))
    if output is not None:
        extra = {"warmup_errors": warmup_errors} if warmup_errors else {}
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(document(args, argv, model, models, points, **extra), indent=1) + "\n")
        print(f"wrote {output}")
        if sweep and points:
            title = f"{model} · {args.dataset} · {args.label or ''}".strip(" ·")
            for path in plot_sweep(points, output.with_suffix(""), title):
                print(f"wrote {path}")
    if warmup_errors is not None or any(p["completed"] == 0 for p in points):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

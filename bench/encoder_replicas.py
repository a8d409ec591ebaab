"""Image-heavy load against `tandem serve` with 1 and with 2 vision-encoder replicas.

    PYTHONPATH=. python bench/encoder_replicas.py [--replicas 1 2] [--requests 24] [--concurrency 8]
        [--images 2] [--budget 1120] [--device cpu] [--engine-device DEV] [--threads N]
        [--preprocess-replicas P] [--out FILE.json]

For each replica count it writes a colocated topology whose `vision_encoder` actor has that many
replicas (on `--device`; with `--threads N` each CPU replica and the engine use N threads, so that
replicas get cores of their own; preprocess has `--preprocess-replicas` one-thread replicas), starts `tandem serve` with the embedded model, sends one warm-up request,
then `--requests` chat requests (`--concurrency` at a time), each with `--images` distinct random
images at `--budget` soft tokens (all distinct, so the encoders' cache never answers) and
`max_tokens` 1, and reports images per second and request latency. The result names its command,
commit and machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serving import Served  # noqa: E402

TOPOLOGY = """name = "bench-encoders"
[model]
path = "default"
[nodes.local]
host = "127.0.0.1"
base_port = {port}
[[actors]]
kind = "preprocess"
replicas = {preprocess}
threads = 1
[[actors]]
kind = "vision_encoder"
device = "{device}"
replicas = {replicas}
threads = {threads}
[[actors]]
kind = "engine"
device = "{engine_device}"
threads = {threads}
"""


def image_uri(rng: np.random.Generator, side: int) -> str:
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(uris: list[str], budget: int) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in uris]
    return {"model": "tandem-default", "max_tokens": 1, "temperature": 0,
            "mm_processor_kwargs": {"max_soft_tokens": budget},
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What is the main colour?"}]}]}


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float]]:
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async with httpx.AsyncClient(timeout=600) as client:
        async def one(b: dict) -> None:
            async with limit:
                t0 = time.perf_counter()
                reply = await client.post(f"{url}/v1/chat/completions", json=b)
                reply.raise_for_status()
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, latencies


def run(replicas: int, args, bodies: list[dict], warmup: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "topology.toml"
        topology.write_text(TOPOLOGY.format(port=6100 + 50 * replicas, device=args.device, replicas=replicas,
                                            preprocess=args.preprocess_replicas, threads=args.threads,
                                            engine_device=args.engine_device or args.device))
        with Served(["serve", "--topology", str(topology), "--max-body-bytes", str(64 << 20)],
                    log=Path(tmp) / "tandem.log") as served:
            try:
                asyncio.run(load(served.url, [warmup], 1))
                wall, latencies = asyncio.run(load(served.url, bodies, args.concurrency))
            except httpx.HTTPStatusError as exc:
                raise SystemExit(f"{exc.response.text}\n--- server log ---\n{served.log()}") from None
    images = len(bodies) * args.images
    return {"vision_encoder_replicas": replicas, "requests": len(bodies), "images": images,
            "wall_s": round(wall, 3), "images_per_s": round(images / wall, 3),
            "latency_mean_s": round(statistics.mean(latencies), 3),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_max_s": round(max(latencies), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--budget", type=int, default=1120)
    ap.add_argument("--side", type=int, default=768, help="image side in pixels")
    ap.add_argument("--device", default="cpu", help="the vision encoders' device")
    ap.add_argument("--engine-device", help="the engine's device (default: --device)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per encoder replica and engine (0: torch's)")
    ap.add_argument("--preprocess-replicas", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    runs = []
    for replicas in args.replicas:  # fresh images for every run: no cache hits anywhere
        bodies = [body([image_uri(rng, args.side) for _ in range(args.images)], args.budget)
                  for _ in range(args.requests)]
        runs.append(run(replicas, args, bodies, body([image_uri(rng, args.side)], args.budget)))
        print(json.dumps(runs[-1]), flush=True)
    base = runs[0]["images_per_s"]
    for r in runs:
        r["speedup_vs_first"] = round(r["images_per_s"] / base, 3)
    result = {"command": "PYTHONPATH=. python bench/encoder_replicas.py " + " ".join(sys.argv[1:]),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=REPO).stdout.strip(),
              "device": f"{args.device}; host CPU {platform.machine()}, {os.cpu_count()} cores",
              "workload": {"images_per_request": args.images, "budget": args.budget, "side_px": args.side,
                           "concurrency": args.concurrency, "max_tokens": 1},
              "topology": {"preprocess_replicas": args.preprocess_replicas, "threads": args.threads,
                           "encoder_device": args.device, "engine_device": args.engine_device or args.device},
              "runs": runs}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

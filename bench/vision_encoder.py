"""The vision encoder actor's batch encoder at a real shape with random weights, on the device:
one and two 720p-sized images (42 x 60 patches = 280 soft tokens each, as uint8 jobs with a
value table, as preprocess sends them), with the tower's CUDA graphs replaying the plain pass and
the torch.compile'd one (`compile_vision_encoder`). Start-up (compile and capture) is timed too.

    PYTHONPATH=. python bench/vision_encoder.py --commit <sha> --out bench/results/vision_encoder_h100.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.encoder_actor import make_batch_encoder  # noqa: E402
from actors.messages import EncodeJob  # noqa: E402
from gemma4_model.random_weights import random_media_encoder  # noqa: E402

CONFIGS = {"e4b": "gemma-4-E4B-it.json", "e2b": "gemma-4-E2B-it.json", "31b": "gemma-4-31B-it.json"}
GRID = (42, 60)  # a 720p image at the 280-token budget: 42 x 60 patches of 16 px


def jobs(count: int) -> list[EncodeJob]:
    h, w = GRID
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pos = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.int32)[None]
    table = np.tile(np.linspace(-1, 1, 256, dtype=np.float32), (3, 1))
    return [EncodeJob("r", i, "image", f"k{i}", 0, position_ids=pos, pixel_table=table,
                      pixel_values=np.random.default_rng(i).integers(0, 256, (1, h * w, 768), dtype=np.uint8))
            for i in range(count)]


def median_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--model", default="e4b", choices=sorted(CONFIGS))
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("vision_encoder needs a CUDA device")
    ckpt = tempfile.mkdtemp()
    shutil.copy(ROOT / "tests/fixtures/hf_configs" / CONFIGS[args.model], f"{ckpt}/config.json")
    work = jobs(2)
    records = []
    for compiled in (False, True):
        encoder = random_media_encoder(ckpt, "vision", "cuda:0", torch.bfloat16)
        start = time.perf_counter()
        encode = make_batch_encoder(encoder, "cuda:0", torch.bfloat16, compile_tower=compiled)
        setup_s = time.perf_counter() - start
        outputs = encode(work)
        records.append({"compiled": compiled, "setup_s": round(setup_s, 1),
                        "one_image_ms": median_ms(lambda: encode(work[:1]), args.reps),
                        "two_images_ms": median_ms(lambda: encode(work), args.reps),
                        "tokens_per_image": int(outputs[0][0].shape[0])})
        print(records[-1], flush=True)
        if compiled:
            plain = records[0]
            records[-1]["speedup_two_images"] = round(plain["two_images_ms"] / records[-1]["two_images_ms"], 2)
        encoder = encode = None  # freed before the next encoder loads
        torch.cuda.empty_cache()
    shutil.rmtree(ckpt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "vision_encoder", "commit": args.commit, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "command": " ".join(["python"] + sys.argv), "model": args.model,
        "grid": GRID, "records": records}, indent=1))


if __name__ == "__main__":
    main()

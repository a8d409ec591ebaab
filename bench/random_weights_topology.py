"""The topology `bench/serve_random_weights.sh` serves a random-weight checkpoint with.

    python3 bench/random_weights_topology.py OUT.toml CHECKPOINT [--gpus 1|2] [--split] [--vision]
        [--kv-pages N] [--page-size N] [--kv-dtype auto|fp8_e4m3] [--prefetch-bs N] [--compile-vision 0|1]
        [--preprocess N] [--vision-gpu 0|1]

One GPU: preprocess and an engine on cuda:0, or with --split a prefill and a decode process on it
(KV pages over CUDA IPC); --vision adds a vision encoder on cuda:0. Two GPUs: with --split, prefill
and the vision encoder on cuda:0 (cuda:1 with --vision-gpu 1, beside decode) and decode on cuda:1;
without, two colocated replicas, an engine and a vision encoder on each GPU. --preprocess sets the
preprocess replicas (CPU processes that decode and resize images; the api deals requests to them in
turn), so that an image-heavy load measures the GPUs, not one CPU process. The file is checked by
loading it before it is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from topology.config import load_topology  # noqa: E402


def topology_text(checkpoint: str, gpus: int = 1, split: bool = False, vision: bool = False, kv_pages: int = 16384,
                  kv_dtype: str = "auto", prefetch_bs: int = 0, compile_vision: bool = True, preprocess: int = 1,
                  vision_gpu: int = 0, page_size: int = 16) -> str:
    if gpus not in (1, 2):
        raise ValueError(f"gpus is 1 or 2, got {gpus}")
    if preprocess < 1:
        raise ValueError(f"preprocess replicas are at least 1, got {preprocess}")
    if not 0 <= vision_gpu < gpus or (vision_gpu and not split):
        raise ValueError(f"vision_gpu places a split topology's encoder on one of its {gpus} GPUs, got {vision_gpu}")
    lines = ['name = "random-weights"', "", "[model]", f'path = "{checkpoint}"', 'dtype = "bfloat16"',
             'load_format = "dummy"', f"compile_vision_encoder = {str(compile_vision).lower()}",
             "max_num_batched_tokens = 8192", "chunked_prefill_size = 4096", "max_running_requests = 128",
             f"page_size = {page_size}", f"kv_pages = {kv_pages}", f'kv_cache_dtype = "{kv_dtype}"',
             f"weight_prefetch_max_bs = {prefetch_bs}",
             "", "[nodes.local]", 'host = "127.0.0.1"']
    actors: list[tuple[str, str, int]] = [("preprocess", '"cpu"', preprocess)]
    if gpus == 2 and not split:  # two colocated replicas, an engine and an encoder a GPU
        actors += [("vision_encoder", '["cuda:0", "cuda:1"]', 2), ("engine", '["cuda:0", "cuda:1"]', 2)]
    else:
        if vision:
            actors.append(("vision_encoder", f'"cuda:{vision_gpu}"', 1))
        if split:  # decode on the second GPU where there is one
            actors += [("prefill", '"cuda:0"', 1), ("decode", f'"cuda:{gpus - 1}"', 1)]
        else:
            actors.append(("engine", '"cuda:0"', 1))
    for kind, device, replicas in actors:
        lines += ["", "[[actors]]", f'kind = "{kind}"', f"device = {device}"] + (
            [f"replicas = {replicas}"] if replicas > 1 else [])
    if split:
        lines += ["", "[transfer]", 'backend = "cuda_ipc"']
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("checkpoint")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--vision", action="store_true")
    ap.add_argument("--kv-pages", type=int, default=16384)
    ap.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--kv-dtype", default="auto")
    ap.add_argument("--prefetch-bs", type=int, default=0)
    ap.add_argument("--compile-vision", type=int, default=1)
    ap.add_argument("--preprocess", type=int, default=1, help="preprocess replicas")
    ap.add_argument("--vision-gpu", type=int, default=0, help="the split topology's vision encoder GPU")
    args = ap.parse_args(argv)
    text = topology_text(args.checkpoint, args.gpus, args.split, args.vision, args.kv_pages, args.kv_dtype,
                         args.prefetch_bs, bool(args.compile_vision), args.preprocess, args.vision_gpu,
                         args.page_size)
    args.out.write_text(text, encoding="utf-8")
    load_topology(args.out)  # a TopologyError names the field at fault


if __name__ == "__main__":
    main()

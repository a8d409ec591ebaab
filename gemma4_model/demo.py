"""`tandem-demo`: generate with Tandem's own Gemma 4 decoder on a paged cache.

Without `--model`, it writes a tiny random Gemma 4 checkpoint with `transformers` (no weights
can be downloaded here), loads it through Tandem's loader, runs several prompts together with
continuous batching, and checks the greedy tokens against `transformers`' `generate`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .engine import Engine, SchedulerLimits
from .kv_cache import PagedKVCache
from .loader import load_text_decoder
from .random_checkpoint import VARIANTS, load_reference, reference_greedy, save_tiny_checkpoint
from .sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tandem-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a Hugging Face Gemma 4 checkpoint directory")
    ap.add_argument("--variant", choices=VARIANTS, default="e4b", help="shape of the tiny random model")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = save_tiny_checkpoint(args.variant, Path(tmp) / args.variant, seed=0)
            print(f"wrote a tiny random Gemma 4 ({args.variant}-shaped) checkpoint to {path}")
        config, model = load_text_decoder(path, device=args.device, dtype=DTYPES[args.dtype])
        text = config.text
        print(f"loaded {config.model_type}: {text.num_layers} layers ({len(text.kv_layers)} own KV), "
              f"hidden {text.hidden_size}, vocab {text.vocab_size}")
        cache = PagedKVCache(text, page_size=args.page_size, num_pages=args.num_pages, device=args.device,
                             dtype=DTYPES[args.dtype])
        engine = Engine(model, cache, SchedulerLimits(chunk_size=32))
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, text.vocab_size, (args.prompt_len + 7 * i,), generator=g).tolist()
                   for i in range(args.prompts)]
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        start = time.perf_counter()
        seqs = engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
        for seq in seqs:
            print(f"request {seq.seq_id}: {len(seq.prompt)} prompt tokens -> {seq.output[:12]}...")
        produced = sum(len(s.output) for s in seqs)
        print(f"{produced} tokens in {engine.stats.steps} steps ({engine.stats.mixed_steps} mixed "
              f"prefill+decode), {elapsed:.2f} s; pages in use after: {cache.pages_in_use()}")
        if args.model is None:
            reference = reference_greedy(load_reference(path, args.variant), prompts[0], args.max_tokens)
            same = reference == seqs[0].output
            print(f"greedy tokens identical to transformers generate: {'yes' if same else 'NO'}")
            return 0 if same else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`tandem-demo`: chat with the embedded default model through Tandem's own decoder.

The prompts go through the checkpoint's Gemma 4 chat template, run together on the paged
cache with continuous batching, and are decoded back to text. `--model DIR` takes any Gemma 4
checkpoint with a tokenizer; `--tiny-random VARIANT` instead writes a tiny random checkpoint of
that shape with `transformers` and checks Tandem's greedy tokens against `transformers`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from gemma4_model.engine import Engine, SchedulerLimits
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder
from gemma4_model.random_checkpoint import VARIANTS, load_reference, reference_greedy, save_tiny_checkpoint
from gemma4_model.sampling import SamplingParams

from . import CHECKPOINT
from .tasks import TIME_TOOL, WEATHER_TOOL

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUESTIONS = [
    ({"role": "user", "content": "What is 38 + 47?"}, False, ()),
    ({"role": "user", "content": "Add 19 and 64."}, True, ()),
    ({"role": "user", "content": "Reverse the order of these words: kano bero misa"}, False, ()),
    ({"role": "user", "content": "What's the weather in Lisbon?"}, False, (WEATHER_TOOL, TIME_TOOL)),
    ({"role": "user", "content": "Extract name, age and city as JSON: Ada is 36 years old and lives in Turin."}, False, ()),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tandem-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=CHECKPOINT, help="a Gemma 4 checkpoint directory")
    ap.add_argument("--tiny-random", choices=VARIANTS, help="use a tiny random checkpoint of this shape instead")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return ap.parse_args(argv)


def make_engine(path: Path, args) -> tuple:
    config, model = load_text_decoder(path, device=args.device, dtype=DTYPES[args.dtype])
    cache = PagedKVCache(config.text, page_size=16, num_pages=512, device=args.device, dtype=DTYPES[args.dtype])
    return config, Engine(model, cache, SchedulerLimits(chunk_size=128)), cache


def chat(args) -> int:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(args.model)
    stops = GenerationConfig.from_pretrained(args.model).eos_token_id
    stops = tuple(stops if isinstance(stops, list) else [stops])
    config, engine, cache = make_engine(args.model, args)
    print(f"model {args.model} ({config.model_type}, {config.text.num_layers} layers)")
    params = SamplingParams(max_tokens=args.max_tokens, stop_token_ids=stops)
    seqs = []
    for message, thinking, tools in QUESTIONS:
        text = tok.apply_chat_template([message], tools=list(tools) or None, tokenize=False,
                                       add_generation_prompt=True, enable_thinking=thinking)
        seqs.append(engine.add_request(tok(text, add_special_tokens=False).input_ids, params))
    start = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
    elapsed = time.perf_counter() - start
    for (message, thinking, _), seq in zip(QUESTIONS, seqs):
        print(f"\n> {message['content']}{'  [thinking on]' if thinking else ''}")
        print(tok.decode(seq.output, skip_special_tokens=False))
    produced = sum(len(s.output) for s in seqs)
    print(f"\n{produced} tokens for {len(seqs)} requests in {engine.stats.steps} steps, {elapsed:.2f} s; "
          f"pages in use after: {cache.pages_in_use()}")
    return 0


def tiny_random(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_checkpoint(args.tiny_random, Path(tmp) / args.tiny_random, seed=0)
        config, engine, _ = make_engine(path, args)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, config.text.vocab_size, (48 + 7 * i,), generator=g).tolist() for i in range(4)]
        seqs = engine.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
        reference = reference_greedy(load_reference(path, args.tiny_random), prompts[0], args.max_tokens)
        same = reference == seqs[0].output
        print(f"tiny random {args.tiny_random}: {sum(len(s.output) for s in seqs)} tokens in {engine.stats.steps} "
              f"steps; greedy tokens identical to transformers generate: {'yes' if same else 'NO'}")
        return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return tiny_random(args) if args.tiny_random else chat(args)


if __name__ == "__main__":
    raise SystemExit(main())

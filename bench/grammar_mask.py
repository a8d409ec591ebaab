"""Per-step cost of structured output on CPU: filling the token bitmask of a batch of 16
constrained rows (one xgrammar call), applying it to the logits (the sampler's mask step), and
accepting the chosen tokens; the rest of the sampler (temperature, softmax, the race) for scale.

    PYTHONPATH=. python bench/grammar_mask.py [--vocab 262144] [--rows 16] [--steps 200] [--out FILE.json]

The result names its command, commit and machine; its anchor is the rest of the sampler in
the same step (`overhead_vs_rest_of_sampler` = mask overhead / unconstrained sampling time).

Vocabularies: the default model's tokenizer (1024 ids), and a synthetic one of `--vocab` ids
(byte strings of a real tokenizer's shape: single bytes, then letter n-grams with and without a
leading space) standing in for Gemma 4's 262144 where no Gemma tokenizer can be downloaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import string
import subprocess
import sys
import time

import torch
import xgrammar as xgr

from gemma4_model.grammar import GrammarBook, GrammarSpec
from gemma4_model.sampling import SamplingParams, SamplingRow, _mask_by_grammar, sample_batch

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "city", "tags"]}


def synthetic_vocab(size: int) -> list[str]:
    vocab = ["<pad>", "<eos>"] + [chr(b) for b in range(32, 127)]
    letters = string.ascii_letters + string.digits + "{}[]\":,. "
    for n in itertools.count(2):
        for combo in itertools.product(letters, repeat=n):
            word = "".join(combo)
            vocab += [word, " " + word]
            if len(vocab) >= size:
                return vocab[:size]


def measure(book: GrammarBook, rows: int, steps: int, vocab: int) -> dict:
    """Median milliseconds per step (medians: the machine is shared, means chase its noise)."""
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    logits = torch.randn(rows, vocab)
    params = SamplingParams(temperature=1.0)
    states = [book.start(spec, [1]) for _ in range(rows)]
    times: dict[str, list[float]] = {"fill": [], "mask": [], "accept": [], "sampler": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        bitmask, constrained = book.fill(states)
        t1 = time.perf_counter()
        masked = _mask_by_grammar(logits, [SamplingRow(params, [], [], c) for c in constrained], bitmask)
        t2 = time.perf_counter()
        noise = torch.empty(rows, vocab).exponential_()
        picks = sample_batch(masked, [SamplingRow(params, [], []) for _ in range(rows)], [1], noise)
        t3 = time.perf_counter()
        for i, (s, p) in enumerate(zip(states, picks)):
            s.matcher.accept_token(p.token)
            if s.matcher.is_terminated():
                states[i] = book.start(spec, [1])  # keep the batch full
        t4 = time.perf_counter()
        for name, dt in (("fill", t1 - t0), ("mask", t2 - t1), ("sampler", t3 - t2 - 0), ("accept", t4 - t3)):
            times[name].append(dt)
    med = {k: round(1000 * statistics.median(v), 3) for k, v in times.items()}
    return {"vocab": vocab, "rows": rows, "steps": steps, "fill_ms": med["fill"], "mask_ms": med["mask"],
            "accept_ms": med["accept"], "overhead_ms": round(med["fill"] + med["mask"] + med["accept"], 3),
            "rest_of_sampler_ms": med["sampler"], "cpus": os.cpu_count(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", help="also write the result (with command, commit, device) here")
    args = ap.parse_args()
    torch.manual_seed(0)
    from default_model import CHECKPOINT

    small = GrammarBook.from_checkpoint(CHECKPOINT, 1024, [1, 16])
    info = xgr.TokenizerInfo(synthetic_vocab(args.vocab), vocab_size=args.vocab, stop_token_ids=[1])
    big = GrammarBook(info, args.vocab)
    runs = [measure(small, args.rows, args.steps, 1024), measure(big, args.rows, args.steps, args.vocab)]
    for run in runs:
        run["overhead_vs_rest_of_sampler"] = round(run["overhead_ms"] / run["rest_of_sampler_ms"], 4)
    result = {"command": "PYTHONPATH=. python bench/grammar_mask.py " + " ".join(sys.argv[1:]),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}",
              "runs": runs}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

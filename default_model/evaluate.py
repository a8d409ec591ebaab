"""Score the default model on held-out task instances with `transformers`' own classes.

    python -m default_model.evaluate --checkpoint default_model/checkpoint [--per-kind 20] [--seed 7]

Held-out instances use another seed and the held-out value pools (cities, words, names,
number pairs, colour shades, tone frequencies never seen in training). Greedy output must equal
the expected answer text exactly (stop token included). For text-only instances Tandem's own
decoder also runs on the same prompt and its greedy tokens are compared with `transformers`'.
Writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from .formatting import Renderer, answer_text
from .tasks import KINDS, make_set
from .train import media_processors

EVAL_SEED = 7


def transformers_greedy(model, rendered, max_new_tokens: int, device) -> list[int]:
    ids = torch.tensor([rendered.prompt_ids], device=device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=torch.tensor([rendered.mm_token_type_ids], device=device))
    if rendered.pixel_values is not None:
        kwargs.update(pixel_values=rendered.pixel_values.to(device, model.dtype),
                      image_position_ids=rendered.image_position_ids.to(device))
    if rendered.input_features is not None:
        kwargs.update(input_features=rendered.input_features.to(device, model.dtype),
                      input_features_mask=rendered.input_features_mask.to(device).bool())
    out = model.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, ids.shape[1]:].tolist()


def tandem_greedy(engine, prompt_ids: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    from gemma4_model.sampling import SamplingParams

    [seq] = engine.generate([prompt_ids], SamplingParams(max_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids)))
    return seq.output


def evaluate(checkpoint: Path, per_kind: int, seed: int, device: str, max_new_tokens: int = 64) -> dict:
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    from gemma4_model.engine import Engine
    from gemma4_model.kv_cache import PagedKVCache
    from gemma4_model.loader import load_text_decoder

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    image, audio = media_processors()
    renderer = Renderer(tok, image, audio)
    config, ours = load_text_decoder(checkpoint, device=device, dtype=torch.float32)
    stop_ids = list(model.generation_config.eos_token_id)
    instances = make_set(seed, per_kind * len(KINDS), heldout=True)
    right = defaultdict(int)
    total = defaultdict(int)
    same_as_tandem = compared = 0
    failures = []
    start = time.time()
    for inst in instances:
        rendered = renderer.render(inst, with_answer=False)
        with torch.no_grad():
            tokens = transformers_greedy(model, rendered, max_new_tokens, device)
        text = tok.decode(tokens, skip_special_tokens=False)
        ok = text == answer_text(inst)
        total[inst.kind] += 1
        right[inst.kind] += ok
        if not ok and len(failures) < 20:
            failures.append({"kind": inst.kind, "expected": answer_text(inst), "got": text})
        if inst.image is None and inst.audio is None:
            cache = PagedKVCache(config.text, page_size=16, num_pages=64, device=device)
            theirs = tandem_greedy(Engine(ours, cache), rendered.prompt_ids, max_new_tokens, stop_ids)
            compared += 1
            same_as_tandem += theirs == tokens
    accuracy = {k: right[k] / total[k] for k in total}
    return {
        "checkpoint": str(checkpoint), "seed": seed, "instances": len(instances), "device": device,
        "accuracy_overall": sum(right.values()) / len(instances), "accuracy_per_kind": accuracy,
        "tandem_matches_transformers": {"compared": compared, "identical": same_as_tandem},
        "failures": failures, "seconds": round(time.time() - start, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Held-out accuracy of the default model.")
    ap.add_argument("--checkpoint", type=Path, default=Path("default_model/checkpoint"))
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    report = evaluate(args.checkpoint, args.per_kind, args.seed, args.device)
    report["command"] = "python -m default_model.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({k: report[k] for k in ("accuracy_overall", "accuracy_per_kind", "tandem_matches_transformers")}, indent=2))


if __name__ == "__main__":
    main()

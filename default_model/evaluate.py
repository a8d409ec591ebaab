"""Score the default model on held-out task instances with `transformers`' own classes.

    python -m default_model.evaluate --checkpoint default_model/checkpoint [--per-kind 20] [--seed 7] \
        [--assistant default_model/assistant]

Held-out instances use another seed and the held-out value pools (cities, words, names,
number pairs, colour shades, tone frequencies never seen in training). Greedy output must equal
the expected answer text exactly (stop token included). Tandem's own model code also runs on
every prompt (its vision and audio encoders, the soft tokens spliced into its decoder's prefill)
and its greedy tokens are compared with `transformers`'.
With `--assistant`, the assistant's greedy drafts (5 per round by default) are replayed over
each greedy generation and the mean acceptance length is reported. Writes a JSON report.
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

from gemma4_model.hf_compat import load_reference_assistant

from .assistant import DRAFT_STEPS, accepted_drafts
from .formatting import Renderer, answer_text
from .tasks import KINDS, make_set
from .train import media_processors

EVAL_SEED = 7


def model_inputs(model, rendered, device, extra_tokens: list[int] = ()) -> dict:
    """`transformers` inputs for a rendered prompt (plus tokens appended after it), media included."""
    ids = torch.tensor([list(rendered.prompt_ids) + list(extra_tokens)], device=device)
    types = list(rendered.mm_token_type_ids) + [0] * len(extra_tokens)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.tensor([types], device=device))
    if rendered.pixel_values is not None:
        kwargs.update(pixel_values=rendered.pixel_values.to(device, model.dtype),
                      image_position_ids=rendered.image_position_ids.to(device))
    if rendered.input_features is not None:
        kwargs.update(input_features=rendered.input_features.to(device, model.dtype),
                      input_features_mask=rendered.input_features_mask.to(device).bool())
    return kwargs


def transformers_greedy(model, rendered, max_new_tokens: int, device) -> list[int]:
    kwargs = model_inputs(model, rendered, device)
    out = model.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, kwargs["input_ids"].shape[1]:].tolist()


def tandem_greedy(engine, prompt_ids: list[int], max_new_tokens: int, stop_ids, media=()) -> list[int]:
    from gemma4_model.sampling import SamplingParams

    seq = engine.add_request(prompt_ids, SamplingParams(max_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids)),
                             media=media)
    while engine.scheduler.has_work():
        engine.step()
    return seq.output


def tandem_media(rendered, encoders: dict, special_tokens: dict, device) -> tuple:
    """The rendered prompt's image / audio as Tandem's encoders see them, as `MediaSpan`s."""
    from gemma4_model.media_span import MediaSpan

    items = []
    if rendered.pixel_values is not None:
        dtype = next(encoders["image"].parameters()).dtype
        [emb] = encoders["image"].encode(rendered.pixel_values.to(device, dtype),
                                         rendered.image_position_ids.to(device))
        items.append(("image", emb))
    if rendered.input_features is not None:
        dtype = next(encoders["audio"].parameters()).dtype
        [emb] = encoders["audio"].encode(rendered.input_features.to(device, dtype),
                                         rendered.input_features_mask.to(device).bool())
        items.append(("audio", emb))
    spans = []
    ids = list(rendered.prompt_ids)
    for kind, emb in items:
        start = ids.index(special_tokens[f"{kind}_token_id"])
        spans.append(MediaSpan(start, emb, kind, f"{kind}:{start}".encode()))
    return tuple(spans)


def evaluate(checkpoint: Path, per_kind: int, seed: int, device: str, max_new_tokens: int = 64,
             assistant_dir: Path | None = None, draft_steps: int = DRAFT_STEPS) -> dict:
    from transformers import AutoTokenizer, Gemma4ForConditionalGeneration

    from gemma4_model.audio import load_audio_encoder
    from gemma4_model.config import load_config
    from gemma4_model.engine import Engine
    from gemma4_model.kv_cache import PagedKVCache
    from gemma4_model.loader import load_text_decoder
    from gemma4_model.vision import load_image_encoder

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    image, audio = media_processors()
    renderer = Renderer(tok, image, audio)
    config, ours = load_text_decoder(checkpoint, device=device, dtype=torch.float32)
    encoders = {"image": load_image_encoder(checkpoint, device=device, dtype=torch.float32),
                "audio": load_audio_encoder(checkpoint, device=device, dtype=torch.float32)}
    special = dict(load_config(checkpoint).special_tokens)
    stop_ids = list(model.generation_config.eos_token_id)
    assistant = load_reference_assistant(assistant_dir).to(device) if assistant_dir else None
    rounds = defaultdict(list)
    instances = make_set(seed, per_kind * len(KINDS), heldout=True)
    right = defaultdict(int)
    total = defaultdict(int)
    same_as_tandem = compared = media_compared = media_same = 0
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
        if assistant is not None and len(tokens) > 1:
            kwargs = model_inputs(model, rendered, device, tokens)
            rounds[inst.kind] += accepted_drafts(model, assistant, kwargs, len(rendered.prompt_ids), draft_steps)
        if not ok and len(failures) < 20:
            failures.append({"kind": inst.kind, "expected": answer_text(inst), "got": text})
        with torch.no_grad():
            media = tandem_media(rendered, encoders, special, device)
        cache = PagedKVCache(config.text, page_size=16, num_pages=64, device=device)
        theirs = tandem_greedy(Engine(ours, cache), rendered.prompt_ids, max_new_tokens, stop_ids, media)
        compared += 1
        same_as_tandem += theirs == tokens
        media_compared += bool(media)
        media_same += bool(media) and theirs == tokens
    accuracy = {k: right[k] / total[k] for k in total}
    report = {
        "checkpoint": str(checkpoint), "seed": seed, "instances": len(instances), "device": device,
        "accuracy_overall": sum(right.values()) / len(instances), "accuracy_per_kind": accuracy,
        "tandem_matches_transformers": {"compared": compared, "identical": same_as_tandem,
                                        "multimodal_compared": media_compared, "multimodal_identical": media_same},
        "failures": failures,
    }
    if assistant is not None:
        report["draft_acceptance"] = acceptance_summary(rounds, draft_steps, str(assistant_dir))
    report["seconds"] = round(time.time() - start, 1)
    return report


def acceptance_summary(rounds: dict[str, list[int]], draft_steps: int, assistant_dir: str) -> dict:
    """Mean acceptance length = tokens per target verify step (accepted drafts + the target's own)."""
    every = [n for per_kind in rounds.values() for n in per_kind]

    def length(values):
        return round(sum(n + 1 for n in values) / len(values), 3) if values else None

    return {
        "assistant": assistant_dir, "draft_tokens": draft_steps, "greedy": True, "rounds": len(every),
        "mean_acceptance_length": length(every),
        "mean_accepted_drafts": round(sum(every) / len(every), 3) if every else None,
        "acceptance_rate": round(sum(every) / (draft_steps * len(every)), 3) if every else None,
        "mean_acceptance_length_per_kind": {k: length(v) for k, v in rounds.items()},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Held-out accuracy of the default model.")
    ap.add_argument("--checkpoint", type=Path, default=Path("default_model/checkpoint"))
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--assistant", type=Path, help="also measure this assistant's greedy draft acceptance")
    ap.add_argument("--draft-steps", type=int, default=DRAFT_STEPS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    report = evaluate(args.checkpoint, args.per_kind, args.seed, args.device,
                      assistant_dir=args.assistant, draft_steps=args.draft_steps)
    report["command"] = "python -m default_model.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    keys = ("accuracy_overall", "accuracy_per_kind", "tandem_matches_transformers", "draft_acceptance")
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))


if __name__ == "__main__":
    main()

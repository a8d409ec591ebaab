"""Train Tandem's embedded default model: a small Gemma 4 with the real architecture.

    python -m default_model.train --out default_model/checkpoint --assistant-out default_model/assistant \
        [--seed 0] [--stage all|target|assistant]

Seeded end to end: the task instances, the tokenizer (trained on their text), the initial
weights and the batch order all follow `--seed`. Writes a Hugging Face checkpoint
(config.json, model.safetensors in bfloat16, tokenizer files with the Gemma 4 special tokens
and chat template, processor_config.json, generation_config.json) and `training_log.json`, then
the paired assistant (MTP drafter, `default_model.assistant`) trained against the saved target,
in the Gemma 4 assistant format. The stages can run apart (`--stage`); `all` equals `target`
then `assistant`. Runs on a GPU in minutes (device tool) or, slowly, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .formatting import Renderer, answer_text, build_tokenizer
from .tasks import KINDS, make_set

TRAIN_SEED_OFFSET = 1_000  # instance seeds for training; evaluation uses other seeds and pools


def model_config(tokenizer):
    """The default model's Gemma 4 config: PLE, sliding + full layers, KV sharing, both towers."""
    from transformers import Gemma4Config

    tok = tokenizer
    vocab = len(tok)
    text = dict(
        vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=256, intermediate_size=640,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
        global_head_dim=128, hidden_size_per_layer_input=32, num_kv_shared_layers=2,
        use_double_wide_mlp=True, sliding_window=128, max_position_embeddings=4096,
        final_logit_softcapping=30.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
        layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>")],
    )
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, patch_size=16, pooling_kernel_size=3,
                  position_embedding_size=1024)
    audio = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=64,
                 subsampling_conv_channels=[128, 32])
    return Gemma4Config(
        text_config=text, vision_config=vision, audio_config=audio,
        image_token_id=tok.image_token_id, boi_token_id=tok.convert_tokens_to_ids(tok.boi_token),
        eoi_token_id=tok.convert_tokens_to_ids(tok.eoi_token), video_token_id=tok.convert_tokens_to_ids("<|video|>"),
        audio_token_id=tok.audio_token_id, boa_token_id=tok.convert_tokens_to_ids(tok.boa_token),
        eoa_token_index=tok.convert_tokens_to_ids(tok.eoa_token),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=text["eos_token_id"],
    )


def media_processors():
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(max_soft_tokens=70, image_seq_length=70), Gemma4AudioFeatureExtractor()


def corpus_text(insts) -> list[str]:
    """Text the tokenizer is trained on: every instance's messages, tools and answer."""
    out = []
    for inst in insts:
        out.append(json.dumps([m.get("content") for m in inst.messages], ensure_ascii=False))
        out.append(json.dumps(list(inst.tools)) if inst.tools else "")
        out.append(answer_text(inst) + (inst.thinking or ""))
    return out


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)  # one core per worker; many threads per worker oversubscribe the host
    image, audio = media_processors()
    _WORKER["renderer"] = Renderer(AutoTokenizer.from_pretrained(tokenizer_dir), image, audio)


def _render(args):
    kind_seed, heldout = args
    kind, seed = kind_seed
    inst = make_set(seed, 1, heldout, kinds=(kind,))[0]
    rendered = _WORKER["renderer"].render(inst)
    # Tensors go back as numpy: torch's shared-memory hand-off runs out of file descriptors here.
    for name in ("pixel_values", "image_position_ids", "input_features", "input_features_mask"):
        value = getattr(rendered, name)
        if value is not None:
            setattr(rendered, name, value.numpy())
    return rendered


def render_all(tokenizer_dir: Path, count: int, seed: int, workers: int) -> list:
    jobs = [((KINDS[i % len(KINDS)], seed * 10_000_000 + i), False) for i in range(count)]
    spawn = multiprocessing.get_context("spawn")  # forking a process with threads can deadlock
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
        rendered = list(pool.map(_render, jobs, chunksize=256))
    for r in rendered:
        for name in ("pixel_values", "image_position_ids", "input_features", "input_features_mask"):
            value = getattr(r, name)
            if value is not None:
                setattr(r, name, torch.from_numpy(value))
    return rendered


def collate(examples, pad_id: int, device):
    """Pad a batch; labels cover only the answer tokens."""
    length = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for b, e in enumerate(examples):
        seq = e.prompt_ids + e.answer_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        labels[b, len(e.prompt_ids): len(seq)] = torch.tensor(e.answer_ids)
        mask[b, : len(seq)] = 1
        types[b, : len(seq)] = torch.tensor(e.mm_token_type_ids)
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask, mm_token_type_ids=types)
    images = [e for e in examples if e.pixel_values is not None]
    if images:
        batch["pixel_values"] = torch.cat([e.pixel_values for e in images])
        batch["image_position_ids"] = torch.cat([e.image_position_ids for e in images])
    clips = [e for e in examples if e.input_features is not None]
    if clips:
        frames = max(e.input_features.shape[1] for e in clips)
        feats = torch.zeros(len(clips), frames, clips[0].input_features.shape[2])
        fmask = torch.zeros(len(clips), frames, dtype=torch.bool)
        for i, e in enumerate(clips):
            feats[i, : e.input_features.shape[1]] = e.input_features[0]
            fmask[i, : e.input_features.shape[1]] = e.input_features_mask[0].bool()
        batch["input_features"], batch["input_features_mask"] = feats, fmask
    return {k: v.to(device) for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    import os

    # Bit-for-bit reruns on one GPU kind: deterministic kernels, strictly (a kernel without a
    # deterministic version is an error, not a warning: cuDNN attention's backward, for one,
    # silently differed between runs when only warned about). cuBLAS needs its workspace fixed.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Prefetcher:
    """Collates the next batch on a CPU thread while the GPU runs the current one (same order)."""

    def __init__(self, examples, picks_iter, pad_id: int, device):
        from concurrent.futures import ThreadPoolExecutor

        self.examples, self.picks, self.pad_id, self.device = examples, picks_iter, pad_id, device
        self.pool = ThreadPoolExecutor(1)
        self.pending = self.pool.submit(self._make)

    def _make(self):
        return collate([self.examples[i] for i in next(self.picks)], self.pad_id, torch.device("cpu"))

    def next(self) -> dict:
        batch = self.pending.result()
        self.pending = self.pool.submit(self._make)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def batch_order(seed: int, count: int, batch: int):
    rng = np.random.default_rng(seed)
    while True:
        yield rng.choice(count, batch, replace=False)


def train_target(args, tokenizer, examples, device) -> dict:
    from transformers import Gemma4ForConditionalGeneration

    seed_everything(args.seed)
    out = Path(args.out)
    t0 = time.time()
    config = model_config(tokenizer)
    model = Gemma4ForConditionalGeneration(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    batches = Prefetcher(examples, batch_order(args.seed, len(examples), args.batch), tokenizer.pad_token_id, device)
    log = []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batches.next()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(float(loss.detach()), 4), "lr": lr, "elapsed_s": round(time.time() - t0, 1)})
            print(log[-1], flush=True)
    batches.close()
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = config.text_config.eos_token_id + [tokenizer.convert_tokens_to_ids("<|tool_response>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    save_processor_config(out, tokenizer)
    result = {"args": vars(args), "log": log, "train_seconds": round(time.time() - t0, 1), "device": str(device),
              "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def train_draft(args, tokenizer, examples, device) -> dict:
    """The assistant against the committed-format target in `args.out` (loaded as saved, bf16)."""
    from transformers import Gemma4ForConditionalGeneration

    from .assistant import ASSISTANT_SEED_OFFSET, train_assistant

    seed_everything(args.seed)
    t0 = time.time()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = Gemma4ForConditionalGeneration.from_pretrained(args.out, dtype=dtype).to(device)
    log: list = []
    order = batch_order(args.seed + ASSISTANT_SEED_OFFSET, len(examples), args.assistant_batch)
    batches = Prefetcher(examples, order, tokenizer.pad_token_id, device)
    assistant = train_assistant(target, batches.next, args, device, log)
    batches.close()
    assistant = assistant.to(torch.bfloat16)
    out = Path(args.assistant_out)
    assistant.save_pretrained(out)
    result = {"args": vars(args), "log": log, "train_seconds": round(time.time() - t0, 1), "device": str(device),
              "parameters": sum(p.numel() for p in assistant.parameters())}
    (out / "training_log.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def train(args) -> dict:
    """Stages: `target` (tokenizer + model), `assistant` (needs the target in --out), or `all`."""
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    if args.stage in ("all", "target"):
        tokenizer = build_tokenizer(corpus_text(make_set(args.seed + TRAIN_SEED_OFFSET, 4000, False)), args.vocab)
        tokenizer.save_pretrained(out)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out)
    examples = render_all(out, args.examples, args.seed + TRAIN_SEED_OFFSET, args.workers)
    print(f"tokenizer {len(tokenizer)} tokens; {len(examples)} examples rendered in {time.time() - t0:.0f} s", flush=True)
    results = {}
    if args.stage in ("all", "target"):
        results["target"] = train_target(args, tokenizer, examples, device)
    if args.stage in ("all", "assistant"):
        results["assistant"] = train_draft(args, tokenizer, examples, device)
    return results


def save_processor_config(out: Path, tokenizer) -> None:
    """processor_config.json in the published layout (image, audio and video sections)."""
    image, audio = media_processors()
    image_cfg = image.to_dict()
    image_cfg["image_processor_type"] = "Gemma4ImageProcessor"
    video_cfg = {k: image_cfg[k] for k in ("do_convert_rgb", "do_rescale", "rescale_factor", "patch_size",
                                            "pooling_kernel_size", "image_mean", "image_std") if k in image_cfg}
    video_cfg.update({"video_processor_type": "Gemma4VideoProcessor", "max_soft_tokens": 70, "num_frames": 32,
                      "do_sample_frames": True})
    doc = {
        "processor_class": "Gemma4Processor", "image_seq_length": 70, "audio_seq_length": 750,
        "audio_ms_per_token": 40, "image_processor": image_cfg, "feature_extractor": audio.to_dict(),
        "video_processor": video_cfg,
    }
    (out / "processor_config.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the embedded default Gemma 4 model.")
    ap.add_argument("--out", default="default_model/checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--stage", choices=("all", "target", "assistant"), default="all")
    ap.add_argument("--assistant-out", default="default_model/assistant")
    ap.add_argument("--assistant-steps", type=int, default=800)
    ap.add_argument("--assistant-batch", type=int, default=128)
    ap.add_argument("--assistant-lr", type=float, default=2e-3)
    train(ap.parse_args(argv))


if __name__ == "__main__":
    main()

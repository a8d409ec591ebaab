"""MTP speculative decoding speed: the verify-step cost curve, the default model with its trained
assistant, and an oracle drafter at the E4B shape. One JSON file of records.

GPU (all parts, estimated 5-7 minutes on an H100; the JSON is rewritten after every record, so a
run cut short keeps what it measured):

    PYTHONPATH=. python bench/mtp_speed.py --commit <sha> --out bench/results/mtp_speed_h100.json

or split over 10-minute commands, each into its own file:

    PYTHONPATH=. python bench/mtp_speed.py --commit <sha> --parts verify --models e4b,26b_a4b --out A.json
    PYTHONPATH=. python bench/mtp_speed.py --commit <sha> --parts verify --models 31b --out B.json
    PYTHONPATH=. python bench/mtp_speed.py --commit <sha> --parts default,oracle --out C.json

CPU smoke (tiny configs, float32, seconds): `PYTHONPATH=. python bench/mtp_speed.py --smoke --out /tmp/mtp.json`

Parts:
  verify   For the E4B, 26B-A4B and 31B text-decoder shapes with random bf16 weights built on the
           device (`gemma4_model.random_weights`), the median time of one target forward over 1
           query token per sequence (a plain decode step) and over k+1 (a verify run, logits at
           every position as `Engine._add_drafts` asks) for k = 1..7, at batch 1 and 8, after a
           prompt of `--context` tokens was prefilled; the implied speedup at acceptance a is
           E = (1 - a^(k+1)) / (1 - a) tokens per step over the step-cost ratio (draft cost
           excluded; a second figure adds the measured `Drafter.draft` time of the real
           assistant shape with random weights).
  default  The embedded default model and its trained assistant (`AssistantDrafter`) through the
           Engine: greedy, held-out prompts, batch 1 and 8, with and without drafts.
  oracle   Random weights at the E4B shape; the oracle drafter proposes the target's own greedy
           tokens (computed beforehand by plain greedy decoding): the speedup at acceptance ~1.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gemma4_model.batch import ForwardBatch, SequenceChunk  # noqa: E402
from gemma4_model.config import FULL, SLIDING, ModelConfig, TextConfig, parse_config  # noqa: E402
from gemma4_model.engine import Engine, SchedulerLimits  # noqa: E402
from gemma4_model.kv_cache import PagedKVCache  # noqa: E402
from gemma4_model.random_weights import random_drafter, random_text_decoder  # noqa: E402
from gemma4_model.sampling import SamplingParams  # noqa: E402
from gemma4_model.speculative import AssistantDrafter, OracleDrafter  # noqa: E402

CONFIGS = ROOT / "tests" / "fixtures" / "hf_configs"
MODELS = {"e4b": "gemma-4-E4B-it", "26b_a4b": "gemma-4-26B-A4B-it", "31b": "gemma-4-31B-it"}
PARTS = ("verify", "default", "oracle")
ACCEPTANCE = (0.6, 0.8, 0.9)
ORACLE_LABEL = "oracle drafter: proposes the target's own greedy tokens"
# The oracle's random target: post-layer norms at 0.01 let the token embedding dominate the
# residual, so the tied head's greedy choice wins by a wide margin and no bf16 difference between
# a 1-token step and a verify run flips it (the oracle's futures stay the target's own tokens).
ORACLE_POST_NORM_SCALE = 0.01
RUN_NOTE = ("engine runs: Engine.step to completion, a device sync after every step before the clock is read; "
            "TPOT per sequence = (time of its last token - time of its first) / (tokens - 1), mean over sequences "
            "(tpot_ms_token_weighted: weighted by tokens - 1); "
            "output_tokens_per_s = all output tokens / wall time (prefill included); speedups = plain / speculative; "
            "batch 1 decodes its prompts one after another, batch B runs B at once (all prefilled in the first step); "
            "draft time is inside the speculative figures")
PUBLISHED = (
    {"model": "gemma-4-12B-it", "gpu": "H200", "engine": "SGLang", "speedup": 1.35,
     "what": "single-stream decode, MTP 5 steps / 6 draft tokens, top-k 1"},
    {"model": "gemma-4-26B-A4B-it", "gpu": "B300", "speedup_mean": 1.63, "speedup_range": [1.40, 1.87],
     "what": "context 0-32k, concurrency 1-8, draft acceptance 0.84-1.00"},
)


@dataclass(frozen=True)
class Settings:
    """What one invocation measures and how (from the command line)."""

    device: torch.device
    dtype: torch.dtype
    smoke: bool
    context: int  # prompt tokens in the cache before a timed verify step; oracle prompt length
    page_size: int
    reps: int
    warmup: int
    max_k: int
    batches: tuple[int, ...]
    default_dtypes: tuple[torch.dtype, ...]
    default_ks: tuple[int, ...]
    default_prompts: int
    oracle_ks: tuple[int, ...]
    oracle_tokens: int
    oracle_single_prompts: int  # batch 1: this many prompts decoded one after another


class Clock:
    """Median-of-repetitions timing: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def times_ms(self, fn: Callable[[], object], reps: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return times


class Report:
    """The JSON file: a header and a list of records, rewritten after every record so a run
    cut short keeps what it measured."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.records = path, header, []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, record: dict) -> None:
        self.records.append({**self.header, **record})
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"benchmark": "mtp_speed", "header": self.header, "records": self.records},
                                  indent=1) + "\n")
        tmp.replace(self.path)


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def expected_tokens(a: float, k: int) -> float:
    """Tokens emitted per verify step when each draft is accepted with probability a."""
    return (1 - a ** (k + 1)) / (1 - a)


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- shapes and floors ---------------------------------------------------------------------------


def model_configs(name: str, smoke: bool) -> tuple[ModelConfig, ModelConfig, str]:
    """(target config, assistant config, where they came from) for a model key."""
    if not smoke:
        stem = MODELS[name]
        target = parse_config(json.loads((CONFIGS / f"{stem}.json").read_text()))
        assistant = parse_config(json.loads((CONFIGS / f"{stem}-assistant.json").read_text()))
        return target, assistant, f"tests/fixtures/hf_configs/{stem}.json (+ -assistant.json)"
    from gemma4_model.random_checkpoint import tiny_config

    raw = tiny_config(name).to_dict()
    target = parse_config(raw)
    return target, parse_config(tiny_assistant_raw(target.text, raw["text_config"])), f"random_checkpoint.tiny_config({name!r})"


def tiny_assistant_raw(target: TextConfig, target_text_raw: dict) -> dict:
    """A 4-layer assistant config.json (3 sliding, 1 full) that reads a tiny target's KV."""
    sliding = target.layers[target.last_kv_owner(SLIDING)]
    full = target.layers[target.last_kv_owner(FULL)]
    text = dict(vocab_size=target.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=target.num_heads, num_key_value_heads=sliding.num_kv_heads,
                head_dim=sliding.head_dim, layer_types=[SLIDING] * 3 + [FULL], sliding_window=target.sliding_window,
                per_layer_config={"3": {"head_dim": full.head_dim, "num_key_value_heads": full.num_kv_heads}},
                rope_parameters=target_text_raw["rope_parameters"], num_kv_shared_layers=4, eos_token_id=1)
    return dict(model_type="gemma4_assistant", text_config=text, backbone_hidden_size=target.hidden_size,
                use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4)


def shape_of(cfg: TextConfig) -> dict:
    return {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "heads": cfg.num_heads, "vocab": cfg.vocab_size,
            "sliding_window": cfg.sliding_window, "kv_owning_layers": len(cfg.kv_layers), "ple_dim": cfg.ple_dim,
            "moe": None if cfg.moe is None else {"experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k}}


def step_bytes(model: torch.nn.Module, cfg: TextConfig, batch: int, tokens_per_seq: int, context: int,
               element: int, kv_element: int | None = None) -> int:
    """Bytes one step must read at least: every weight it touches once (the tied head once; PLE and
    embedding rows are gathered, not streamed; MoE experts expected to be hit under uniform
    routing of all query tokens) plus each layer's visible KV (`kv_element` bytes a value; default
    the weights' `element`)."""
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    gathered = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embed_tokens_per_layer"))
    dense = sum(p.numel() for p in model.parameters()) - experts - gathered
    if cfg.moe is not None:
        hit = 1 - (1 - cfg.moe.top_k / cfg.moe.num_experts) ** (batch * tokens_per_seq)
        dense += int(experts * hit)
    kv = 0
    for layer in cfg.layers:
        owner = cfg.layers[layer.kv_owner]
        seen = context + tokens_per_seq if layer.sliding_window is None else min(context + tokens_per_seq,
                                                                                  layer.sliding_window)
        kv += 2 * owner.num_kv_heads * owner.head_dim * seen
    return dense * element + kv * (kv_element or element) * batch


def copy_bandwidth(device: torch.device, clock: Clock, smoke: bool) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus written (median of 10)."""
    n = (1 << 22) if smoke else (1 << 29)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(clock.times_ms(lambda: dst.copy_(src), 10, 2))
    del src, dst
    free_device(device)
    return 2 * n / (ms * 1e-3) / 1e9


# ---- part 1: the verify-step cost curve ----------------------------------------------------------


def verify_part(name: str, s: Settings, clock: Clock, bandwidth: float, report: Report) -> None:
    config, assistant_cfg, source = model_configs(name, s.smoke)
    cfg = config.text
    free_device(s.device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = random_text_decoder(cfg, s.device, s.dtype, seed=0)
    drafter = random_drafter(assistant_cfg, cfg, model.embed, s.device, s.dtype, seed=1)
    clock.sync()
    build_s = time.perf_counter() - t0
    say(f"verify {name}: built target + assistant in {build_s:.1f} s")
    top = max(s.batches)
    per_seq = math.ceil((s.context + s.max_k + 1) / s.page_size)
    cache = PagedKVCache(cfg, page_size=s.page_size, num_pages=top * per_seq + 1, device=s.device, dtype=s.dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (s.context,), generator=g).tolist() for _ in range(top)]
    element = torch.finfo(s.dtype).bits // 8
    try:
        with torch.inference_mode():
            for i, prompt in enumerate(prompts):  # each prompt prefilled in one forward
                cache.add_sequence(i, prompt)
                cache.extend(i, s.context + s.max_k + 1)  # room for the longest verify run, reused by every rep
                model(ForwardBatch.build([SequenceChunk(i, prompt, 0)], cache, s.device), cache)
                cache.commit(i, prompt, s.context)
            clock.sync()
            for batch in s.batches:
                record = verify_curve(model, drafter, cache, cfg, prompts[:batch], s, clock, bandwidth, element)
                record.update(part="verify", model=name, config=source, build_s=round(build_s, 2),
                              shapes={**shape_of(cfg), "batch": batch, "context": s.context, "page_size": s.page_size,
                                      "assistant_layers": assistant_cfg.text.num_layers,
                                      "assistant_hidden": assistant_cfg.text.hidden_size})
                if clock.cuda:
                    record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                report.add(record)
                say(f"verify {name} batch {batch}: plain {record['plain_ms']:.2f} ms; "
                    + ", ".join(f"k={c['k']} x{c['ratio']:.2f}" for c in record["curve"]))
    finally:
        for i in range(top):
            if cache.has_sequence(i):
                cache.free_sequence(i)
        del model, drafter, cache
        free_device(s.device)


def verify_curve(model, drafter, cache, cfg: TextConfig, prompts: Sequence[list[int]], s: Settings, clock: Clock,
                 bandwidth: float, element: int) -> dict:
    """Times the plain step and the verify runs of k = 1..max_k for len(prompts) sequences."""
    batch, q = len(prompts), s.context
    g = torch.Generator().manual_seed(batch)
    newest = [int(t) for t in torch.randint(3, cfg.vocab_size, (batch,), generator=g)]
    drafts = [torch.randint(3, cfg.vocab_size, (s.max_k,), generator=g).tolist() for _ in range(batch)]

    def timed(k: int) -> tuple[float, float]:
        chunks = [SequenceChunk(i, [newest[i]] + drafts[i][:k], q, logits_rows=tuple(range(k + 1)))
                  for i in range(batch)]
        t0 = time.perf_counter()
        fb = ForwardBatch.build(chunks, cache, s.device)
        build_ms = (time.perf_counter() - t0) * 1e3
        return statistics.median(clock.times_ms(lambda: model(fb, cache), s.reps, s.warmup)), build_ms

    def floor_ms(tokens: int) -> float:
        return step_bytes(model, cfg, batch, tokens, q, element) / (bandwidth * 1e9) * 1e3

    plain_ms, plain_build = timed(0)
    ids = list(range(batch))
    last = torch.tensor(newest, device=s.device)
    positions = torch.full((batch,), q, dtype=torch.long, device=s.device)
    hidden = torch.randn(batch, cfg.hidden_size, generator=g).to(s.device, s.dtype)
    curve = []
    for k in range(1, s.max_k + 1):
        verify_ms, build_ms = timed(k)
        draft_ms = statistics.median(clock.times_ms(
            lambda: drafter.draft(cache, ids, last, hidden, positions, k), s.reps, s.warmup))
        ratio = verify_ms / plain_ms
        with_draft = ratio + draft_ms / plain_ms
        curve.append({
            "k": k, "verify_ms": round(verify_ms, 3), "ratio": round(ratio, 4), "draft_ms": round(draft_ms, 3),
            "build_ms": round(build_ms, 3), "floor_ms": round(floor_ms(k + 1), 3),
            "implied_speedup": {str(a): round(expected_tokens(a, k) / ratio, 3) for a in ACCEPTANCE},
            "implied_speedup_with_draft": {str(a): round(expected_tokens(a, k) / with_draft, 3) for a in ACCEPTANCE},
        })
    plain_floor = floor_ms(1)
    return {
        "plain_ms": round(plain_ms, 3), "plain_build_ms": round(plain_build, 3), "plain_floor_ms": round(plain_floor, 3),
        "plain_over_floor": round(plain_ms / plain_floor, 2), "copy_bandwidth_gbps": round(bandwidth, 1),
        "reps": s.reps, "warmup": s.warmup, "statistic": "median", "curve": curve,
        "note": ("verify_ms / plain_ms: one target forward (ForwardBatch prebuilt; build_ms is its host time) over "
                 "k+1 query tokens per sequence with logits at every position vs 1 token; implied_speedup = "
                 "E / ratio with E = (1 - a^(k+1)) / (1 - a), draft cost EXCLUDED; implied_speedup_with_draft adds "
                 "draft_ms (Drafter.draft of k tokens, the real assistant shape, random weights) to the step; "
                 "sampling and acceptance (host) excluded from both; floor_ms: step_bytes / copy bandwidth"),
    }


# ---- engine runs (parts 2 and 3) ------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    outputs: list[list[int]]
    wall_s: float
    tpot_ms: list[float]  # per sequence: (last token time - first token time) / (tokens - 1)
    decode_tokens: list[int]  # per sequence: tokens - 1 (the weights of a token-weighted TPOT)
    steps: int
    stats: dict


def run_engine(model, prompts: Sequence[list[int]], params: SamplingParams, clock: Clock, page_size: int,
               max_running: int, drafter=None, k: int = 0) -> RunResult:
    """Generate for every prompt, at most `max_running` at a time; times each sequence's tokens."""
    cfg = model.cfg
    longest = max(len(p) for p in prompts)
    per_seq = math.ceil((longest + params.max_tokens + k + 2) / page_size)
    dtype = next(model.parameters()).dtype
    cache = PagedKVCache(cfg, page_size=page_size, num_pages=max_running * per_seq + 2, device=next(model.parameters()).device,
                         dtype=dtype)
    limits = SchedulerLimits(max_batch_tokens=max(512, max_running * (longest + k + 1)), max_running=max_running,
                             chunk_size=longest)
    engine = Engine(model, cache, limits, drafter=drafter, num_speculative_tokens=k)
    seqs = [engine.add_request(p, params) for p in prompts]
    first, last = {}, {}
    clock.sync()
    t0 = now = time.perf_counter()
    while engine.scheduler.has_work():
        advanced = engine.step()
        clock.sync()
        now = time.perf_counter()
        for seq in advanced:
            first.setdefault(seq.seq_id, now)
            last[seq.seq_id] = now
    timed = [s for s in seqs if len(s.output) > 1]
    tpot = [(last[s.seq_id] - first[s.seq_id]) * 1e3 / (len(s.output) - 1) for s in timed]
    st = engine.stats
    stats = {"drafted_tokens": st.drafted_tokens, "accepted_tokens": st.accepted_tokens, "verify_runs": st.verify_runs,
             "acceptance_rate": round(st.acceptance_rate, 4), "mean_accept_length": round(st.mean_accept_length, 3)}
    return RunResult([s.output for s in seqs], now - t0, tpot, [len(s.output) - 1 for s in timed], st.steps, stats)


def summary(run: RunResult) -> dict:
    tokens = sum(len(o) for o in run.outputs)
    return {"output_tokens": tokens, "wall_s": round(run.wall_s, 4), "output_tokens_per_s": round(tokens / run.wall_s, 2),
            "tpot_ms_mean": round(statistics.mean(run.tpot_ms), 3), "tpot_ms_median": round(statistics.median(run.tpot_ms), 3),
            "tpot_ms_token_weighted": round(sum(t * n for t, n in zip(run.tpot_ms, run.decode_tokens))
                                            / sum(run.decode_tokens), 3),
            "steps": run.steps, "distinct_tokens_per_output": round(statistics.mean(len(set(o)) for o in run.outputs), 2),
            **run.stats}


def compare(plain: RunResult, spec: RunResult) -> dict:
    same = [a == b for a, b in zip(plain.outputs, spec.outputs)]
    return {"tpot_speedup": round(statistics.mean(plain.tpot_ms) / statistics.mean(spec.tpot_ms), 3),
            "throughput_speedup": round(plain.wall_s / spec.wall_s, 3),
            "identical_to_plain": all(same), "identical_sequences": sum(same), "sequences": len(same)}


def speculative_records(model, prompts, params, s: Settings, clock: Clock, ks, make_drafter, single_prompts: int):
    """For each batch size: plain greedy, then each k with the drafter; yields record bodies."""
    for batch in s.batches:
        chosen = prompts[:single_prompts] if batch == 1 else prompts[:batch]
        plain = run_engine(model, chosen, params, clock, s.page_size, batch)
        say(f"  batch {batch}: plain TPOT {statistics.mean(plain.tpot_ms):.2f} ms, {len(chosen)} prompts")
        for k in ks:
            spec = run_engine(model, chosen, params, clock, s.page_size, batch, make_drafter(plain, chosen), k)
            body = {"batch": batch, "k": k, "prompts": len(chosen), "plain": summary(plain), "speculative": summary(spec),
                    **compare(plain, spec), "note": RUN_NOTE}
            say(f"  batch {batch} k={k}: TPOT {statistics.mean(spec.tpot_ms):.2f} ms, x{body['tpot_speedup']:.2f}, "
                f"acceptance {spec.stats['acceptance_rate']:.2f}, identical {body['identical_to_plain']}")
            yield body


# ---- part 2: the default model with its trained assistant -----------------------------------------


def heldout_prompts(tokenizer, count: int, seed: int = 9) -> list[list[int]]:
    """The default model's held-out text prompts, every text kind in turn (as tests/test_speculative.py)."""
    from default_model.formatting import Renderer
    from default_model.tasks import make_set

    kinds = ("add", "think", "copy", "reverse", "tool_call", "tool_answer", "json")
    renderer = Renderer(tokenizer, None, None)
    return [renderer.render(inst, with_answer=False).prompt_ids for inst in make_set(seed, count, heldout=True, kinds=kinds)]


def default_part(s: Settings, clock: Clock, report: Report) -> None:
    from transformers import AutoTokenizer

    from actors.main import stop_token_ids
    from default_model import ASSISTANT, CHECKPOINT
    from gemma4_model.drafter import load_drafter
    from gemma4_model.loader import load_text_decoder

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    prompts = heldout_prompts(tokenizer, s.default_prompts)
    params = SamplingParams(max_tokens=64, stop_token_ids=tuple(stop_token_ids(CHECKPOINT)))
    for dtype in s.default_dtypes:
        config, model = load_text_decoder(CHECKPOINT, device=s.device, dtype=dtype)
        drafter = AssistantDrafter(load_drafter(ASSISTANT, config.text, s.device, dtype, target_embed=model.embed))
        say(f"default model {dtype}: warm-up")
        for d, k in ((None, 0), (drafter, max(s.default_ks))):
            run_engine(model, prompts[:2], params, clock, s.page_size, 2, d, k)
        for body in speculative_records(model, prompts, params, s, clock, s.default_ks, lambda *_: drafter, len(prompts)):
            report.add({"part": "default", "model": "default_model (embedded) + its trained assistant",
                        "dtype": str(dtype).removeprefix("torch."), "drafter": "AssistantDrafter (trained, greedy)",
                        "shapes": {**shape_of(config.text), "max_tokens": params.max_tokens,
                                   "prompt_tokens_mean": round(statistics.mean(len(p) for p in prompts), 1)},
                        "workload": "held-out text prompts (default_model.tasks.make_set(9, n, heldout=True)), greedy, "
                                    "stop at end of turn, max_tokens 64", **body})
        del model, drafter
        free_device(s.device)


# ---- part 3: the oracle drafter at the E4B shape ------------------------------------------------


def oracle_part(s: Settings, clock: Clock, report: Report) -> None:
    config, _, source = model_configs("e4b", s.smoke)
    cfg = config.text
    model = random_text_decoder(cfg, s.device, s.dtype, seed=0, post_norm_scale=ORACLE_POST_NORM_SCALE)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, cfg.vocab_size, (s.context,), generator=g).tolist() for _ in range(max(s.batches))]
    params = SamplingParams(max_tokens=s.oracle_tokens, ignore_eos=True)

    def oracle(plain: RunResult, chosen) -> OracleDrafter:
        return OracleDrafter({tuple(p): out for p, out in zip(chosen, plain.outputs)}, cfg.vocab_size)

    say("oracle e4b: warm-up")
    warm = run_engine(model, prompts[:2], replace(params, max_tokens=8), clock, s.page_size, 2)
    run_engine(model, prompts[:2], replace(params, max_tokens=8), clock, s.page_size, 2, oracle(warm, prompts[:2]),
               max(s.oracle_ks))
    for body in speculative_records(model, prompts, params, s, clock, s.oracle_ks, oracle, s.oracle_single_prompts):
        report.add({"part": "oracle", "model": "e4b", "config": source, "drafter": ORACLE_LABEL,
                    "target_weights": f"random, post-layer norms {ORACLE_POST_NORM_SCALE} (greedy then repeats a token "
                                      "by a wide logit margin; speed does not depend on values)",
                    "shapes": {**shape_of(cfg), "prompt_tokens": s.context, "max_tokens": s.oracle_tokens,
                               "page_size": s.page_size},
                    "workload": f"random prompts of {s.context} tokens, greedy, ignore_eos, {s.oracle_tokens} tokens; "
                                "the oracle's futures are the plain run's outputs",
                    "published": list(PUBLISHED), **body})
    say(f"  published beside it: {PUBLISHED[0]['speedup']}x ({PUBLISHED[0]['model']}, {PUBLISHED[0]['gpu']}), "
        f"{PUBLISHED[1]['speedup_mean']}x mean ({PUBLISHED[1]['model']}, {PUBLISHED[1]['gpu']})")
    del model
    free_device(s.device)


# ---- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown", help="git commit of the code (the device copy's git metadata is stale)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--models", default=",".join(MODELS), help="verify part: which shapes")
    ap.add_argument("--smoke", action="store_true", help="CPU, float32, tiny configs, few repetitions")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                    help="verify and oracle parts (default bfloat16; smoke float32)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--max-k", type=int, default=7)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--default-dtypes", default=None)
    ap.add_argument("--default-ks", default="5,3")
    ap.add_argument("--oracle-ks", default="4,5")
    ap.add_argument("--oracle-tokens", type=int, default=None)
    args = ap.parse_args(argv)
    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda"))
    dtype = getattr(torch, args.dtype or ("float32" if smoke else "bfloat16"))
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    settings = Settings(
        device=device, dtype=dtype, smoke=smoke,
        context=args.context or (24 if smoke else 512), page_size=4 if smoke else 16,
        reps=args.reps or (3 if smoke else 20), warmup=args.warmup or (1 if smoke else 3), max_k=args.max_k,
        batches=ints(args.batches or ("1,2" if smoke else "1,8")),
        default_dtypes=tuple(getattr(torch, d) for d in (args.default_dtypes or
                                                         ("float32" if smoke else "bfloat16,float32")).split(",")),
        default_ks=ints(args.default_ks), default_prompts=3 if smoke else 16,
        oracle_ks=ints(args.oracle_ks), oracle_tokens=args.oracle_tokens or (12 if smoke else 128),
        oracle_single_prompts=1 if smoke else 2)
    for part in args.parts.split(","):
        if part not in PARTS:
            ap.error(f"unknown part {part!r}; expected some of {PARTS}")
    for model in args.models.split(","):
        if model not in MODELS:
            ap.error(f"unknown model {model!r}; expected some of {tuple(MODELS)}")
    return args, settings


def main(argv: Sequence[str] | None = None) -> dict:
    args, s = parse_args(argv)
    clock = Clock(s.device)
    command = "python bench/mtp_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = {"command": command, "commit": args.commit, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu",
              "dtype": str(s.dtype).removeprefix("torch."), "smoke": s.smoke,
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "engine": "eager PyTorch: paged attention in plain torch (gemma4_model/attention.py), MoE expert by "
                        "expert, no CUDA graphs, no fused kernels"}
    report = Report(args.out, header)
    say(f"mtp_speed on {header['device']} ({header['dtype']}), parts {args.parts}, out {args.out}")
    threads = torch.get_num_threads()
    if s.smoke:
        torch.set_num_threads(1)  # tiny ops: intra-op threads only wait on each other
    try:
        run_parts(args, s, clock, report)
    finally:
        torch.set_num_threads(threads)
    return {"header": header, "records": report.records}


def run_parts(args: argparse.Namespace, s: Settings, clock: Clock, report: Report) -> None:
    parts = args.parts.split(",")
    t0 = time.perf_counter()
    if "verify" in parts:
        bandwidth = copy_bandwidth(s.device, clock, s.smoke)
        say(f"copy bandwidth {bandwidth:.0f} GB/s (read + write)")
        for name in args.models.split(","):
            verify_part(name, s, clock, bandwidth, report)
    if "default" in parts:
        default_part(s, clock, report)
    if "oracle" in parts:
        oracle_part(s, clock, report)
    say(f"done in {time.perf_counter() - t0:.1f} s: {len(report.records)} records in {args.out}")


if __name__ == "__main__":
    main()

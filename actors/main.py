"""One actor process: `python -m actors.main --topology FILE --actor KIND --replica N --run-dir DIR`.

The launcher starts one of these per actor replica. It computes the run's wiring from the
topology (the same on every node), builds its actor (loading the tokenizer or the model as the
kind needs), binds its inbox, connects its outputs, tells its node's launcher it is ready with
an `ActorReady`, and runs until SIGTERM or SIGINT. Its trace goes to `--trace-dir` at exit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import zmq

from topology.config import (KV_CACHE_DTYPES, Topology, load_topology, with_api_overrides, with_model_overrides,
                             with_speculative)
from topology.wiring import API, ActorId, Wiring, plan_wiring

from .messages import ActorReady
from .security import topology_context
from .tracing import Tracer
from .transport import pull, push

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ActorContext:
    """What every actor process knows about its run."""

    topology: Topology
    wiring: Wiring
    actor: ActorId
    run_id: str
    trace_dir: Path | None
    api_key: str | None  # api: from the launcher's environment (TANDEM_API_KEY), never argv
    host: str | None = None
    port: int | None = None

    @property
    def device(self) -> str:
        spec = self.topology.actor(self.actor.kind)
        return spec.device_of(self.actor.replica) if spec else "cpu"


def checkpoint_dir(topology: Topology) -> Path:
    if topology.model.path == "default":
        from default_model import CHECKPOINT

        return CHECKPOINT
    return Path(topology.model.path)


def stop_token_ids(checkpoint: Path) -> list[int]:
    """End-of-turn ids from the checkpoint's generation config (as `generate` would stop)."""
    path = checkpoint / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id", []) if path.exists() else []
    return [eos] if isinstance(eos, int) else list(eos)


def announce_ready(zctx: zmq.Context, ctx: ActorContext) -> None:
    # What is alive now (modules, the model, tokenizer, captured graphs) lives as long as the
    # process: frozen out of the collector's sight, a full collection scans only what serving
    # allocates (one over a start-up heap of ~365k objects took 180 ms on a 2-core CPU: a pause
    # between two steps).
    gc.collect()
    gc.freeze()
    control = push(zctx, ctx.wiring.controls[ctx.wiring.nodes[ctx.actor]])
    control.send(ActorReady(ctx.actor.kind, ctx.actor.replica, os.getpid()))
    control.socket.close(linger=2000)  # let the notice leave first (Channel.close would drop it: linger 0)


def run_preprocess(zctx: zmq.Context, ctx: ActorContext, stop: threading.Event, tracer: Tracer) -> None:
    from transformers import AutoTokenizer

    from .preprocess import Preprocessor, PreprocessActor

    checkpoint = checkpoint_dir(ctx.topology)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    media = media_prompt(ctx.topology, checkpoint, tokenizer) if ctx.topology.media_kinds else None
    preprocessor = Preprocessor(tokenizer, stop_token_ids(checkpoint), media)
    inbox = pull(zctx, ctx.wiring.inboxes[ctx.actor], drop_malformed=True)
    downstream = [push(zctx, endpoint) for endpoint in ctx.wiring.of_kind(engine_kind(ctx.topology))]
    encoders = {kind: [push(zctx, endpoint) for endpoint in ctx.wiring.of_kind(kind)]
                for kind in ("vision_encoder", "audio_encoder")}
    errors = push(zctx, ctx.wiring.results)
    announce_ready(zctx, ctx)
    PreprocessActor(preprocessor, inbox, downstream, errors, tracer=tracer, encoders=encoders).run(stop)


def engine_kind(topology: Topology) -> str:
    """The actor kind that prefills: the colocated engine, or prefill."""
    return "engine" if topology.colocated else "prefill"


def media_prompt(topology: Topology, checkpoint: Path, tokenizer):
    from gemma4_model.config import load_config

    from .media_inputs import MediaLimits, MediaProcessor
    from .media_prompt import FetchPolicy, MediaPrompt, Placeholders

    api = topology.api
    counts = {f"max_{kind}s": n for kind, n in api.limit_mm_per_prompt}  # image -> max_images, ...
    budget = dict(api.mm_processor_kwargs).get("max_soft_tokens")
    limits = MediaLimits(**counts, max_item_bytes=api.max_media_bytes)
    # a large image's resize in strips on up to 8 threads (two 720p images: each resize ~12 ms on one core)
    processor = MediaProcessor(checkpoint, limits, default_image_budget=budget,
                               resize_threads=min(8, os.cpu_count() or 1))
    placeholders = Placeholders.from_tokenizer(tokenizer, load_config(checkpoint).special_tokens)
    return MediaPrompt(processor, FetchPolicy(api.allowed_media_hosts, api.media_fetch_timeout_s), placeholders)


def run_encoder(zctx: zmq.Context, ctx: ActorContext, stop: threading.Event, tracer: Tracer) -> None:
    import torch

    from gemma4_model.audio import load_audio_encoder
    from gemma4_model.random_weights import random_media_encoder
    from gemma4_model.vision import load_image_encoder

    from .encoder_actor import EncoderActor, make_batch_encoder

    dtype = getattr(torch, DTYPES[ctx.topology.model.dtype])
    kind = "vision" if ctx.actor.kind == "vision_encoder" else "audio"
    if ctx.topology.model.load_format == "dummy":  # speed runs: the checkpoint's shape, random weights
        encoder = random_media_encoder(checkpoint_dir(ctx.topology), kind, ctx.device, dtype)
    else:
        load = load_image_encoder if kind == "vision" else load_audio_encoder
        encoder = load(checkpoint_dir(ctx.topology), device=ctx.device, dtype=dtype)
    if encoder is None:
        raise SystemExit(f"{ctx.actor.name}: the checkpoint has no {kind} section to encode with")
    inbox = pull(zctx, ctx.wiring.inboxes[ctx.actor], drop_malformed=True)
    replies = [push(zctx, endpoint) for endpoint in ctx.wiring.of_kind(engine_kind(ctx.topology))]
    announce_ready(zctx, ctx)
    encode = make_batch_encoder(encoder, ctx.device, dtype, compile_tower=ctx.topology.model.compile_vision_encoder)
    EncoderActor(ctx.actor.kind, encode, inbox, replies, tracer=tracer).run(stop)


def run_engine(zctx: zmq.Context, ctx: ActorContext, stop: threading.Event, tracer: Tracer) -> None:
    import torch

    from gemma4_model.cuda_graphs import can_capture
    from gemma4_model.engine import Engine, SchedulerLimits
    from gemma4_model.grammar import GrammarBook
    from gemma4_model.kernels.l2_prefetch import WeightPrefetch
    from gemma4_model.kv_cache import PagedKVCache
    from gemma4_model.loader import checkpoint_config, load_text_decoder
    from gemma4_model.memory import available_bytes, check_headroom, kv_pages_for_share
    from gemma4_model.random_weights import random_text_decoder

    from transfer.backend import make_receiver, make_sender

    from .engine_actor import EngineActor

    model_section = ctx.topology.model
    dtype = getattr(torch, DTYPES[model_section.dtype])
    if model_section.load_format == "dummy":  # speed runs: the checkpoint's shape, random weights
        config = checkpoint_config(checkpoint_dir(ctx.topology))
        model = random_text_decoder(config.text, ctx.device, dtype, seed=0)
    else:
        config, model = load_text_decoder(checkpoint_dir(ctx.topology), device=ctx.device, dtype=dtype)
    kv_dtype = KV_CACHE_DTYPES[model_section.kv_cache_dtype]
    kv_dtype = dtype if kv_dtype is None else getattr(torch, kv_dtype)
    kv_pages = model_section.kv_pages
    if model_section.mem_fraction_static is not None and torch.device(ctx.device).type == "cuda":
        free, total = torch.cuda.mem_get_info(ctx.device)  # the weights are loaded
        kv_pages = kv_pages_for_share(free, total, model_section.mem_fraction_static,
                                      PagedKVCache.page_bytes(config.text, model_section.page_size, kv_dtype))
    cache = PagedKVCache(config.text, page_size=model_section.page_size, num_pages=kv_pages, device=ctx.device,
                         dtype=kv_dtype)
    checkpoint = checkpoint_dir(ctx.topology)
    grammars = GrammarBook.from_checkpoint(checkpoint, config.text.vocab_size,
                                           sorted(set(stop_token_ids(checkpoint)) | set(config.text.eos_token_ids)))
    drafting = make_drafter(ctx, config, model, dtype) if ctx.actor.kind != "prefill" else {}
    # a prefill actor keeps the KV its decode actor's assistant will read, and hands on the hidden state
    limits = SchedulerLimits(model_section.max_num_batched_tokens, model_section.max_running_requests,
                             model_section.chunked_prefill_size, model_section.context_length)
    model.set_kernels(model_section.attention_backend == "triton" and model.embed_tokens.weight.is_cuda)
    if model.kernels and model.embed_tokens.weight.is_cuda and model_section.weight_prefetch_max_bs > 0:
        model.weight_prefetch = WeightPrefetch(model.embed_tokens.weight.device,
                                               max_rows=model_section.weight_prefetch_max_bs)
    engine = Engine(model, cache, limits, grammars=grammars, draft_context=ctx.topology.speculative is not None,
                    # a prefill actor hands each request over at its first token: nothing to overlap
                    overlap=not model_section.disable_overlap_schedule and ctx.actor.kind != "prefill", **drafting)
    graph_bs = model_section.cuda_graph_max_bs
    graph_bs = limits.max_running if graph_bs is None else min(graph_bs, limits.max_running)
    if not drafting and graph_bs > 0 and can_capture(model) is None:
        if ctx.actor.kind != "prefill":
            engine.capture_decode_graphs(graph_bs)
        if ctx.actor.kind != "decode":  # prompt chunks (a decode actor's only come after a preemption)
            engine.capture_chunk_graphs()
    if torch.device(ctx.device).type == "cuda":  # a too-large KV pool fails here, not at the first big batch
        check_headroom(available_bytes(ctx.device), limits.max_running, config.text.vocab_size,
                       f"{ctx.actor.kind} {ctx.actor.replica} on {ctx.device}")
    inbox = pull(zctx, ctx.wiring.inboxes[ctx.actor], drop_malformed=True)
    outbox = push(zctx, ctx.wiring.results)
    role, backend = ctx.actor.kind, ctx.topology.transfer
    sender = receiver = None
    wiring, replica = ctx.wiring, ctx.actor.replica
    if role == "prefill":  # the sender picks the decode replica itself, so data and control meet
        sender = make_sender(backend, zctx=zctx, decode_inboxes=wiring.of_kind("decode"),
                             kv_data_endpoints=[wiring.kv_data[r] for r in sorted(wiring.kv_data)],
                             run_id=ctx.run_id, replica=replica, device=ctx.device,
                             kv_store_endpoints=[wiring.kv_store[r] for r in sorted(wiring.kv_store)],
                             kv_release_endpoint=wiring.kv_release.get(replica))
    elif role == "decode":
        receiver = make_receiver(backend, zctx=zctx, kv_data_endpoint=wiring.kv_data[replica],
                                 run_id=ctx.run_id, replica=replica, device=ctx.device,
                                 kv_store_endpoint=wiring.kv_store.get(replica),
                                 prefill_replicas=len(wiring.kv_release),
                                 kv_release_endpoints=[wiring.kv_release[r] for r in sorted(wiring.kv_release)])
    actor = EngineActor(engine, inbox, outbox, role=role, sender=sender, receiver=receiver, tracer=tracer,
                        replica=ctx.actor.replica)
    announce_ready(zctx, ctx)
    try:
        actor.run(stop)
    finally:  # the GPU data plane: held pages, process groups
        for part in (sender, receiver):
            if part is not None:
                part.close()


def draft_model_dir(topology: Topology) -> Path:
    """The assistant checkpoint (the launcher has checked it: `launcher.with_draft_model`)."""
    path = topology.speculative.draft_model_path
    if path == "default":
        from default_model import ASSISTANT

        return ASSISTANT
    return Path(path)


def make_drafter(ctx: ActorContext, config, model, dtype) -> dict:
    """The `Engine` arguments for MTP decoding with the topology's assistant (none without [speculative])."""
    spec = ctx.topology.speculative
    if spec is None:
        return {}
    from gemma4_model.drafter import load_drafter
    from gemma4_model.speculative import AssistantDrafter, recommended_num_speculative_tokens

    assistant = load_drafter(draft_model_dir(ctx.topology), config, device=ctx.device, dtype=dtype,
                             target_embed=model.embed)
    k = spec.num_speculative_tokens or recommended_num_speculative_tokens(config.text.hidden_size,
                                                                          config.text.num_layers)
    return {"drafter": AssistantDrafter(assistant), "num_speculative_tokens": k}


RUNNERS = {"preprocess": run_preprocess, "engine": run_engine, "prefill": run_engine, "decode": run_engine,
           "vision_encoder": run_encoder, "audio_encoder": run_encoder}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Run one Tandem actor (the launcher starts these).")
    ap.add_argument("--topology", required=True)
    ap.add_argument("--actor", required=True)
    ap.add_argument("--replica", type=int, default=0)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--trace-dir")
    ap.add_argument("--model", help="checkpoint directory replacing the topology's model.path")
    ap.add_argument("--api-overrides", help="api: JSON object of [api] fields replacing the topology's")
    ap.add_argument("--speculative", help="JSON object of [speculative] fields replacing the topology's")
    ap.add_argument("--model-overrides", help="JSON object of [model] fields replacing the topology's")
    ap.add_argument("--host", help="api: listen address (default: the topology's)")
    ap.add_argument("--port", type=int, help="api: listen port (default: the topology's)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    topology = load_topology(args.topology)
    if args.model:
        topology = replace(topology, model=replace(topology.model, path=args.model))
    if args.api_overrides:
        topology = with_api_overrides(topology, json.loads(args.api_overrides))
    if args.speculative:
        topology = with_speculative(topology, json.loads(args.speculative))
    if args.model_overrides:
        topology = with_model_overrides(topology, json.loads(args.model_overrides))
    ctx = ActorContext(topology, plan_wiring(topology, args.run_dir), ActorId(args.actor, args.replica),
                       args.run_id, Path(args.trace_dir) if args.trace_dir else None,
                       os.environ.get("TANDEM_API_KEY") or None, args.host, args.port)
    if args.actor == API:
        from api.actor import run_api

        return run_api(ctx)
    runner = RUNNERS.get(args.actor)
    if runner is None:
        print(f"actor kind {args.actor!r} has no runner in this build", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    zctx = topology_context(topology.curve_keys)  # CURVE on TCP links when the topology has keys
    tracer = Tracer(ctx.actor.name, ctx.trace_dir)  # off (and free) without --trace-dir
    tracer.watch_gc()
    try:
        spec = topology.actor(args.actor)
        if spec is not None and spec.threads:  # e.g. CPU replicas that share a machine without oversubscribing it
            import torch

            torch.set_num_threads(spec.threads)
        runner(zctx, ctx, stop, tracer)
    finally:
        tracer.flush()
        zctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

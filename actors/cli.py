"""`tandem`: the command line.

    tandem serve [--model PATH] [--topology cpu_colocated|FILE] [--host H] [--port P]
                 [--api-key KEY] [--trace-dir DIR] [--speculative-draft-model-path PATH
                 [--speculative-num-steps K]]
    tandem node --topology FILE --node NAME [...]
    tandem trace DIR [--chrome OUT.json] [--steps OUT.json]
    tandem keys DIR

`serve` runs the launcher for a topology (by default the CPU colocated example with the embedded
default model) until SIGINT / SIGTERM; `node` runs one node's share of a multi-node topology
(start one per node, each with the same file); `trace` prints the per-request, per-stage time
breakdown of the spans a `--trace-dir` run wrote (and can merge them into a Chrome trace, and
summarise each engine actor's step timeline: step times, host gaps between steps); `keys`
writes the ZeroMQ CURVE certificates a topology's `[security] curve_keys` names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from topology.config import EXAMPLES, TopologyError

from .launcher import LaunchError, LaunchOptions, Launcher


def topology_path(value: str) -> Path:
    """A checked-in example by name (`cpu_colocated`) or a TOML file path."""
    path = Path(value)
    if path.suffix == ".toml" or path.exists():
        return path
    example = EXAMPLES / f"{value}.toml"
    if not example.exists():
        names = sorted(p.stem for p in EXAMPLES.glob("*.toml"))
        raise SystemExit(f"tandem: no topology file {value!r} and no example of that name; examples: {names}")
    return example


def add_common_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", help="a Gemma 4 checkpoint directory (default: the topology's model)")
    command.add_argument("--host", help="api listen address (default from the topology: 127.0.0.1)")
    command.add_argument("--port", type=int, help="api listen port (default from the topology)")
    command.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                         help="require 'Authorization: Bearer KEY' (or set TANDEM_API_KEY)")
    command.add_argument("--trace-dir", type=Path, help="write per-actor spans and a merged Chrome trace here")
    command.add_argument("--cors-origin", action="append", dest="cors_origins", metavar="ORIGIN",
                         help="allow this browser origin (repeatable; default: CORS off)")
    command.add_argument("--allowed-media-host", action="append", dest="allowed_media_hosts", metavar="HOST",
                         help="allow fetching image/audio URLs from this host (repeatable; default: none)")
    command.add_argument("--request-timeout", type=float, dest="request_timeout_s", metavar="SECONDS",
                         help="end a request still running after this long with a 504 (default 600)")
    command.add_argument("--max-body-bytes", type=int, help="larger request bodies get a 413 (default 32 MiB)")
    command.add_argument("--limit-mm-per-prompt", type=json.loads, metavar="JSON",
                         help='most media items of each kind per prompt, e.g. \'{"image": 4, "audio": 1}\'')
    command.add_argument("--mm-processor-kwargs", type=json.loads, metavar="JSON",
                         help='default vision token budget, e.g. \'{"max_soft_tokens": 560}\' (70, 140, 280, 560 or '
                              "1120; default: the checkpoint's; a request's own mm_processor_kwargs win)")
    command.add_argument("--max-media-bytes", type=int, help="one media item's largest encoded size (default 20 MiB)")
    command.add_argument("--max-queued-requests", type=int, metavar="N",
                         help="requests admitted beyond what the engines run at once; more get a 429 with "
                              "Retry-After (default: as many as they run)")
    command.add_argument("--default-chat-template-kwargs", type=json.loads, metavar="JSON",
                         help='chat template arguments for every chat request, e.g. \'{"enable_thinking": true}\' '
                              "(a request's own chat_template_kwargs win)")


def add_scheduler_options(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("the engines' scheduler (the topology's [model] fields)")
    group.add_argument("--max-num-batched-tokens", type=int, metavar="N",
                       help="query tokens one engine step runs, prefill chunks and decodes together (default 512)")
    group.add_argument("--chunked-prefill-size", type=int, metavar="N",
                       help="the longest prefill chunk of one request in a step (default 256)")
    group.add_argument("--max-running-requests", "--max-num-seqs", type=int, metavar="N",
                       dest="max_running_requests", help="requests an engine runs at once (default 64)")
    group.add_argument("--attention-backend", choices=("torch_native", "triton"),
                       help="the engines' layers on CUDA: the Triton kernels (default) or the PyTorch path "
                            "(CPU engines always take the PyTorch path)")
    group.add_argument("--kv-cache-dtype", choices=("auto", "fp8", "fp8_e4m3"),
                       help="KV cache storage: the model's dtype (auto, default) or FP8 e4m3 (twice the tokens)")
    group.add_argument("--cuda-graph-max-bs", type=int, metavar="N",
                       help="with --attention-backend triton, CUDA engines replay decode steps of up to N "
                            "sequences as CUDA graphs (default: --max-running-requests)")
    group.add_argument("--disable-cuda-graph", action="store_const", const=0, dest="cuda_graph_max_bs",
                       help="run every step eagerly")
    group.add_argument("--disable-overlap-schedule", action="store_const", const=True,
                       help="wait for each decode step's tokens before launching the next (default: the "
                            "next step is launched first, the host's work hidden under the device's)")
    group.add_argument("--weight-prefetch-max-bs", type=int, metavar="N",
                       help="with --attention-backend triton, CUDA decode steps of up to N sequences read each "
                            "layer's next weights into L2 on a side stream (default 0: off)")
    group.add_argument("--mem-fraction-static", "--gpu-memory-utilization", type=float, metavar="F",
                       dest="mem_fraction_static",
                       help="CUDA engines size their KV pool to fill this share of their GPU's memory with the "
                            "weights and KV pages (default: the topology's kv_pages)")
    group.add_argument("--max-total-tokens", type=int, metavar="N",
                       help="the KV pool in tokens (kv_pages = N / page_size, rounded up)")
    group.add_argument("--context-length", "--max-model-len", type=int, metavar="N", dest="context_length",
                       help="the longest request, prompt and output (default and at most: the model's)")
    group.add_argument("--load-format", choices=("auto", "dummy"),
                       help="auto: the checkpoint's weights (default); dummy: seeded random weights at the "
                            "checkpoint's shape for the text decoder and the encoders (speed measurements)")


def scheduler_overrides(args: argparse.Namespace) -> tuple[tuple[str, int | float | str | bool], ...]:
    names = ("max_num_batched_tokens", "chunked_prefill_size", "max_running_requests", "attention_backend",
             "cuda_graph_max_bs", "kv_cache_dtype", "disable_overlap_schedule", "load_format", "weight_prefetch_max_bs",
             "mem_fraction_static", "max_total_tokens", "context_length")
    return tuple((name, getattr(args, name)) for name in names if getattr(args, name) is not None)


SPECULATIVE_ALGORITHMS = ("NEXTN", "MTP", "FROZEN_KV_MTP")  # names other servers give Gemma 4's assistant drafting
SPECULATIVE_CONFIG_KEYS = {"model", "num_speculative_tokens", "method"}


def add_speculative_options(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("MTP speculative decoding (a Gemma 4 assistant drafts, the model verifies)")
    group.add_argument("--speculative-draft-model-path", metavar="PATH",
                       help="the assistant checkpoint (e.g. gemma-4-E4B-it-assistant; 'default': the embedded "
                            "model's); turns MTP on")
    group.add_argument("--speculative-num-steps", "--num-speculative-tokens", type=int, metavar="K",
                       dest="speculative_num_steps",
                       help="draft tokens verified per step (default: the recipe's for the model, 2 for E2B, else 4)")
    group.add_argument("--speculative-num-draft-tokens", type=int, metavar="N",
                       help="tokens per verify run: the newest plus its drafts, so K + 1 (SGLang's flag)")
    group.add_argument("--speculative-algorithm", type=str.upper, choices=SPECULATIVE_ALGORITHMS,
                       help="accepted for compatibility: every one means assistant (frozen-KV MTP) drafting")
    group.add_argument("--speculative-eagle-topk", type=int, metavar="1",
                       help="accepted for compatibility: drafts form one chain, so only 1")
    group.add_argument("--speculative-config", type=json.loads, metavar="JSON",
                       help='vLLM\'s form: \'{"model": PATH, "num_speculative_tokens": K}\'')


def speculative_overrides(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    """The [speculative] fields the flags set; SystemExit (status 2) naming the flag when they conflict."""
    fields: dict[str, object] = {}
    config = args.speculative_config
    if config is not None:
        if not isinstance(config, dict) or not set(config) <= SPECULATIVE_CONFIG_KEYS:
            raise SystemExit(f"tandem: --speculative-config: expected a JSON object with keys from "
                             f"{sorted(SPECULATIVE_CONFIG_KEYS)}, got {config!r}")
        if config.get("method", "mtp") not in ("mtp", "draft_model"):
            raise SystemExit(f"tandem: --speculative-config: method {config['method']!r} is not served here; "
                             "Gemma 4 drafts with its assistant ('mtp')")
        fields.update({"draft_model_path": config.get("model"), "num_speculative_tokens": config.get("num_speculative_tokens")})
    for name, value in (("draft_model_path", args.speculative_draft_model_path),
                        ("num_speculative_tokens", args.speculative_num_steps)):
        if value is not None:
            if fields.get(name) not in (None, value):
                raise SystemExit(f"tandem: --speculative-config and the --speculative-* flags disagree on {name}")
            fields[name] = value
    if args.speculative_num_draft_tokens is not None:
        k = args.speculative_num_draft_tokens - 1
        if fields.get("num_speculative_tokens") not in (None, k):
            raise SystemExit("tandem: --speculative-num-draft-tokens must be --speculative-num-steps + 1 "
                             "(drafts form one chain)")
        fields["num_speculative_tokens"] = k
    if args.speculative_eagle_topk not in (None, 1):
        raise SystemExit("tandem: --speculative-eagle-topk: only 1 (one chain of drafts) is served")
    fields = {k: v for k, v in fields.items() if v is not None}
    if args.speculative_algorithm and not fields:
        raise SystemExit("tandem: --speculative-algorithm needs --speculative-draft-model-path (the assistant)")
    return tuple(sorted(fields.items()))


def api_overrides(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    names = ("cors_origins", "allowed_media_hosts", "request_timeout_s", "max_body_bytes", "default_chat_template_kwargs",
             "limit_mm_per_prompt", "mm_processor_kwargs", "max_media_bytes", "max_queued_requests")
    return tuple((name, getattr(args, name)) for name in names if getattr(args, name) is not None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tandem", description="Tandem: a disaggregated Gemma 4 server.")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start a topology and serve the API")
    node = sub.add_parser("node", help="start one node's share of a multi-node topology")
    serve.add_argument("--topology", default="cpu_colocated", help="example name or TOML file")
    serve.add_argument("--node", help="which node of a multi-node topology this launcher runs")
    node.add_argument("--topology", required=True, help="example name or TOML file")
    node.add_argument("--node", required=True, help="this machine's node name in the topology")
    for command in (serve, node):
        add_common_options(command)
        add_speculative_options(command)
        add_scheduler_options(command)
    keys = sub.add_parser("keys", help="write the ZeroMQ CURVE certificates a topology's [security] names")
    keys.add_argument("dir", type=Path, help="where to write server.key(_secret) and client.key(_secret)")
    trace = sub.add_parser("trace", help="print the per-request stage times of a --trace-dir run")
    trace.add_argument("dir", type=Path, help="the run's trace directory (the actors' *.jsonl files)")
    trace.add_argument("--chrome", type=Path, help="also write the merged Chrome-trace JSON here")
    trace.add_argument("--steps", type=Path, help="also write each engine actor's step timeline summary (JSON) here")
    args = ap.parse_args(argv)
    if args.command == "trace":
        return print_trace(args.dir, args.chrome, args.steps)
    if args.command == "keys":
        from .security import make_keys

        print(f"CURVE certificates in {make_keys(args.dir)}: copy the directory to every node and set "
              f"[security] curve_keys = \"{args.dir}\" in the topology")
        return 0
    try:
        if args.trace_dir:
            args.trace_dir.mkdir(parents=True, exist_ok=True)
        launcher = Launcher(topology_path(args.topology), LaunchOptions(
            node=args.node, model=args.model, api_overrides=api_overrides(args),
            speculative=speculative_overrides(args), scheduler=scheduler_overrides(args), trace_dir=args.trace_dir,
            api_key=args.api_key, host=args.host, port=args.port))
    except (TopologyError, LaunchError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
    return launcher.run_until_signalled()


def print_trace(trace_dir: Path, chrome: Path | None, steps: Path | None = None) -> int:
    from .tracing import draft_summary, format_breakdown, merge_chrome_trace, read_spans, stage_breakdown, step_summary

    spans = read_spans(trace_dir) if trace_dir.is_dir() else []
    if not spans:
        print(f"tandem: no spans in {trace_dir} (a run with --trace-dir writes <actor>.jsonl there)", file=sys.stderr)
        return 1
    print(format_breakdown(stage_breakdown(spans)))
    drafts = draft_summary(spans)
    if drafts:
        print(drafts)
    if chrome is not None:
        merge_chrome_trace(trace_dir, chrome)
        print(f"Chrome trace: {chrome}")
    if steps is not None:
        steps.write_text(json.dumps(step_summary(spans), indent=1), encoding="utf-8")
        print(f"step timeline: {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

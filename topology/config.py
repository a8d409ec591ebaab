"""Topology files: which actors run, how many, on which node and device, and how KV moves.

A topology is a TOML file (stdlib `tomllib`) read once into frozen dataclasses and validated
whole: every error names the field and what was expected. Either one `engine` actor (prefill
and decode colocated in one process, the baseline) or separate `prefill` and `decode` actors
joined by a transfer backend. An optional `[speculative]` table turns on MTP decoding with a
Gemma 4 assistant.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

ACTOR_KINDS = ("preprocess", "vision_encoder", "audio_encoder", "prefill", "decode", "engine")
BACKENDS = ("shm", "tcp", "cuda_ipc", "nccl")
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|cuda:\d+)$")
_HOST = re.compile(r"^[A-Za-z0-9.\-:]+$")
EXAMPLES = Path(__file__).resolve().parent / "examples"


class TopologyError(ValueError):
    """A topology file that is malformed or inconsistent; names the field."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"topology field '{field_name}': {problem}")
        self.field = field_name


@dataclass(frozen=True)
class ModelSection:
    path: str  # "default" is the embedded model
    dtype: str
    page_size: int
    kv_pages: int
    # the engines' scheduler (gemma4_model.engine.SchedulerLimits): query tokens per step (vLLM's
    # max_num_batched_tokens), the longest prefill chunk of one request (SGLang's
    # chunked_prefill_size), requests decoding at once (SGLang's max_running_requests, vLLM's max_num_seqs)
    max_num_batched_tokens: int = 512
    chunked_prefill_size: int = 256
    max_running_requests: int = 64
    # the engines' layers: "triton" (the Triton kernels: fused norms, RoPE, activations and paged
    # attention, on CUDA devices; CPU engines take the PyTorch path whatever this says) or
    # "torch_native" (the PyTorch path everywhere); SGLang's attention_backend names
    attention_backend: str = "triton"
    # the KV cache's storage: "auto" (the model's dtype) or "fp8_e4m3" (half of bf16's bytes,
    # twice the tokens; vLLM's and SGLang's kv_cache_dtype names, "fp8" too)
    kv_cache_dtype: str = "auto"
    # with the triton backend, CUDA engines replay decode steps of up to this many sequences as
    # CUDA graphs (SGLang's cuda_graph_max_bs; 0 turns them off, as --disable-cuda-graph);
    # None: max_running_requests
    cuda_graph_max_bs: int | None = None
    # overlap scheduling: a decode step launches before the previous one's tokens reach the host
    # (gemma4_model.engine.Engine.step); SGLang's disable_overlap_schedule turns it off
    disable_overlap_schedule: bool = False
    # "auto": the checkpoint's weights; "dummy": seeded random weights at the checkpoint's shape
    # for the text decoder and the encoders (speed measurements without weights; vLLM's name)
    load_format: str = "auto"
    # a CUDA vision encoder replays its tower as torch.compile'd CUDA graphs (element-wise chains
    # fused; compiled once at start-up, about 20 s; H100, E4B, one 720p image: 6.4 ms against the
    # plain pass's 14.8, bench/results/vision_encoder_h100.json); false: the plain pass's graphs
    compile_vision_encoder: bool = True
    # with the triton backend, CUDA decode steps of up to this many sequences read each layer's next
    # weights into L2 on a side stream while attention and the layer's tail run
    # (gemma4_model/kernels/l2_prefetch.py); 0: off
    weight_prefetch_max_bs: int = 0
    # the share of its GPU's memory a CUDA engine takes for its weights and KV pages (SGLang's
    # mem_fraction_static, vLLM's gpu_memory_utilization): its KV pages are what the free memory left
    # after the weights holds past the rest of the device, in place of kv_pages; None: kv_pages
    mem_fraction_static: float | None = None
    # the KV pool in tokens (SGLang's max_total_tokens): kv_pages is this over page_size, rounded up
    max_total_tokens: int | None = None
    # the longest a request (prompt + output) may grow, at most the model's max_position_embeddings
    # (SGLang's context_length, vLLM's max_model_len); longer requests are refused. None: the model's
    context_length: int | None = None


@dataclass(frozen=True)
class ApiSection:
    host: str
    port: int
    node: str | None  # the node the api actor runs on; None: the first declared node
    cors_origins: tuple[str, ...] = ()  # browser origins allowed by CORS; none: CORS off
    allowed_media_hosts: tuple[str, ...] = ()  # hosts image/audio URLs may be fetched from; none: no fetching
    request_timeout_s: float = 600.0  # a request still running after this ends with a 504
    max_body_bytes: int = 32 << 20  # larger request bodies get a 413
    default_chat_template_kwargs: tuple[tuple[str, Any], ...] = ()  # e.g. enable_thinking for every chat
    limit_mm_per_prompt: tuple[tuple[str, int], ...] = ()  # e.g. (("image", 4),): most items of a kind per prompt
    mm_processor_kwargs: tuple[tuple[str, Any], ...] = ()  # (("max_soft_tokens", 280),): the default vision budget
    max_media_bytes: int = 20 << 20  # one media item's encoded bytes (base64 decoded or fetched)
    media_fetch_timeout_s: float = 10.0  # fetching one media URL from an allowed host
    # requests admitted beyond what the decoding engines run at once (their max_running_requests,
    # summed over replicas); more get a 429 with Retry-After at once (SGLang's max_queued_requests).
    # None: as many as they run.
    max_queued_requests: int | None = None


SCHEDULER_FIELDS = ("max_num_batched_tokens", "chunked_prefill_size", "max_running_requests", "attention_backend",
                    "cuda_graph_max_bs", "kv_cache_dtype", "disable_overlap_schedule", "load_format",
                    "compile_vision_encoder", "weight_prefetch_max_bs", "mem_fraction_static", "max_total_tokens",
                    "context_length")
LOAD_FORMATS = ("auto", "dummy")
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn"}
ATTENTION_BACKENDS = ("torch_native", "triton")
API_FIELDS = {"host", "port", "node", "cors_origins", "allowed_media_hosts", "request_timeout_s", "max_body_bytes",
              "default_chat_template_kwargs", "limit_mm_per_prompt", "mm_processor_kwargs", "max_media_bytes",
              "media_fetch_timeout_s", "max_queued_requests"}
MEDIA_KINDS = ("image", "audio", "video")
VISION_BUDGETS = (70, 140, 280, 560, 1120)


@dataclass(frozen=True)
class SpeculativeSection:
    """MTP speculative decoding in the actors that decode (`engine`, `decode`)."""

    draft_model_path: str  # a Gemma 4 assistant checkpoint; "default": the embedded model's assistant
    num_speculative_tokens: int | None = None  # drafts verified per step; None: the target model's default


SPECULATIVE_FIELDS = {"draft_model_path", "num_speculative_tokens"}
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    base_port: int  # actors on this node bind consecutive ports from here


@dataclass(frozen=True)
class ActorSpec:
    kind: str
    node: str
    device: str  # every replica's device, or the first replica's where `devices` lists one per replica
    replicas: int
    threads: int | None = None  # CPU threads of each replica's torch ops; None: torch's default (all cores)
    devices: tuple[str, ...] = ()  # one device per replica (e.g. two colocated engines on two GPUs); () : `device`

    def device_of(self, replica: int) -> str:
        """The device replica `replica` runs on."""
        return self.devices[replica] if self.devices else self.device

    @property
    def all_devices(self) -> tuple[str, ...]:
        return self.devices or (self.device,)


@dataclass(frozen=True)
class Topology:
    name: str
    model: ModelSection
    api: ApiSection
    nodes: Mapping[str, Node]
    actors: tuple[ActorSpec, ...]
    transfer: str | None  # None when colocated
    speculative: SpeculativeSection | None = None  # None: decode one token per step
    # [security] curve_keys: a directory holding the ZeroMQ `server` and `client` certificates
    # (`tandem keys DIR`); every TCP link is then CURVE-authenticated and encrypted
    curve_keys: str | None = None

    @property
    def colocated(self) -> bool:
        return any(a.kind == "engine" for a in self.actors)

    def actor(self, kind: str) -> ActorSpec | None:
        return next((a for a in self.actors if a.kind == kind), None)

    def admission_limit(self) -> int:
        """Requests the api admits at once: what the decoding engines run at once (colocated
        engines or decode actors, `max_running_requests` each replica) plus the queue allowance
        (`[api] max_queued_requests`, by default as many again)."""
        running = sum(a.replicas for a in self.actors if a.kind in ("engine", "decode")) * self.model.max_running_requests
        queued = running if self.api.max_queued_requests is None else self.api.max_queued_requests
        return running + queued

    @property
    def media_kinds(self) -> frozenset[str]:
        """The media this topology has an encoder actor for."""
        kinds = set()
        if self.actor("vision_encoder"):
            kinds |= {"image", "video"}
        if self.actor("audio_encoder"):
            kinds.add("audio")
        return frozenset(kinds)

    @property
    def api_node(self) -> str:
        return self.api.node or next(iter(self.nodes))


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TopologyError("file", f"{path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TopologyError("file", f"not valid TOML ({exc})") from None
    except OSError as exc:  # a directory, no permission, ...
        raise TopologyError("file", f"{path} cannot be read ({exc.strerror or exc})") from None
    return parse_topology(raw)


def parse_topology(raw: Mapping[str, Any]) -> Topology:
    """Validate a parsed TOML mapping into a `Topology`."""
    _only(raw, "", {"name", "model", "api", "nodes", "actors", "transfer", "speculative", "security"})
    nodes = _nodes(_table(raw, "nodes", required=True))
    actors = tuple(_actor(i, a, nodes) for i, a in enumerate(_list(raw, "actors")))
    kinds = [a.kind for a in actors]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            raise TopologyError("actors", f"kind {kind!r} listed twice; use its replicas field")
    if "preprocess" not in kinds:
        raise TopologyError("actors", "a 'preprocess' actor is required")
    if "engine" in kinds and ({"prefill", "decode"} & set(kinds)):
        raise TopologyError("actors", "either one 'engine' (colocated) or 'prefill' + 'decode', not both")
    if "engine" not in kinds and not {"prefill", "decode"} <= set(kinds):
        raise TopologyError("actors", "expected an 'engine' actor, or both 'prefill' and 'decode'")
    transfer = _transfer(_table(raw, "transfer"), actors, nodes)
    name = raw.get("name", "unnamed")
    if not isinstance(name, str):
        raise TopologyError("name", f"expected a string, got {name!r}")
    model = _model(_table(raw, "model"))
    _check_memory_shares(model, actors)
    return Topology(name, model, _api(_table(raw, "api"), nodes), nodes, actors, transfer,
                    _speculative(_table(raw, "speculative")), _security(_table(raw, "security")))


def _security(t: Mapping[str, Any]) -> str | None:
    _only(t, "security.", {"curve_keys"})
    keys = t.get("curve_keys")
    if keys is None:
        return None
    if not isinstance(keys, str) or not keys:
        raise TopologyError("security.curve_keys", f"expected a directory path, got {keys!r}")
    missing = [n for n in ("server.key_secret", "client.key_secret") if not (Path(keys) / n).is_file()]
    if missing:
        raise TopologyError("security.curve_keys", f"{keys!r} lacks {missing} (make them with `tandem keys DIR`)")
    return keys


def _table(raw: Mapping[str, Any], name: str, required: bool = False) -> Mapping[str, Any]:
    value = raw.get(name)
    if value is None:
        if required:
            raise TopologyError(name, "missing table")
        return {}
    if not isinstance(value, Mapping):
        raise TopologyError(name, "expected a table")
    return value


def _list(raw: Mapping[str, Any], name: str) -> list:
    value = raw.get(name)
    if not isinstance(value, list) or not value:
        raise TopologyError(name, "expected a non-empty array of tables ([[actors]])")
    return value


def _only(table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise TopologyError(f"{where}{sorted(unknown)[0]}", f"unknown field; expected one of {sorted(allowed)}")


def _int(table: Mapping[str, Any], where: str, name: str, default: int, lo: int, hi: int) -> int:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TopologyError(where + name, f"expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def _bool(table: Mapping[str, Any], where: str, name: str, default: bool) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise TopologyError(where + name, f"expected true or false, got {value!r}")
    return value


def _host(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HOST.match(value):
        raise TopologyError(where, f"expected a host name or IP address, got {value!r}")
    return value


def _model(t: Mapping[str, Any]) -> ModelSection:
    _only(t, "model.", {"path", "dtype", "page_size", "kv_pages", *SCHEDULER_FIELDS})
    path = t.get("path", "default")
    if not isinstance(path, str) or not path:
        raise TopologyError("model.path", f"expected 'default' or a checkpoint directory, got {path!r}")
    dtype = t.get("dtype", "float32")
    if dtype not in DTYPES:
        raise TopologyError("model.dtype", f"expected one of {list(DTYPES)}, got {dtype!r}")
    backend = t.get("attention_backend", "triton")
    if backend not in ATTENTION_BACKENDS:
        raise TopologyError("model.attention_backend", f"expected one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
    load_format = t.get("load_format", "auto")
    if load_format not in LOAD_FORMATS:
        raise TopologyError("model.load_format", f"expected one of {list(LOAD_FORMATS)}, got {load_format!r}")
    kv_dtype = t.get("kv_cache_dtype", "auto")
    if kv_dtype not in KV_CACHE_DTYPES:
        raise TopologyError("model.kv_cache_dtype", f"expected one of {list(KV_CACHE_DTYPES)}, got {kv_dtype!r}")
    page_size = _int(t, "model.", "page_size", 16, 1, 1024)
    max_total = None if t.get("max_total_tokens") is None else _int(t, "model.", "max_total_tokens", 1, 1, 1 << 34)
    kv_pages = -(-max_total // page_size) if max_total else _int(t, "model.", "kv_pages", 2048, 1, 1 << 24)
    fraction = t.get("mem_fraction_static")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction < 1):
        raise TopologyError("model.mem_fraction_static", f"expected a share of GPU memory in (0, 1), got {fraction!r}")
    batched = _int(t, "model.", "max_num_batched_tokens", 512, 1, 1 << 20)
    chunk = _int(t, "model.", "chunked_prefill_size", min(256, batched), 1, 1 << 20)
    if chunk > batched:
        raise TopologyError("model.chunked_prefill_size", f"{chunk} is more than max_num_batched_tokens ({batched})")
    return ModelSection(path, dtype, page_size, kv_pages, batched, chunk,
                        _int(t, "model.", "max_running_requests", 64, 1, 1 << 16), attention_backend=backend,
                        kv_cache_dtype=kv_dtype, cuda_graph_max_bs=None if t.get("cuda_graph_max_bs") is None
                        else _int(t, "model.", "cuda_graph_max_bs", 0, 0, 4096),
                        disable_overlap_schedule=_bool(t, "model.", "disable_overlap_schedule", False),
                        load_format=load_format,
                        compile_vision_encoder=_bool(t, "model.", "compile_vision_encoder", True),
                        weight_prefetch_max_bs=_int(t, "model.", "weight_prefetch_max_bs", 0, 0, 4096),
                        mem_fraction_static=None if fraction is None else float(fraction), max_total_tokens=max_total,
                        context_length=None if t.get("context_length") is None
                        else _int(t, "model.", "context_length", 1, 1, 1 << 24))


def _check_memory_shares(model: ModelSection, actors: tuple[ActorSpec, ...]) -> None:
    """mem_fraction_static is each engine's share of its GPU: two engines on one GPU would take it twice."""
    if model.mem_fraction_static is None:
        return
    engines = [(a.node, a.device_of(r)) for a in actors if a.kind in ("engine", "prefill", "decode")
               for r in range(a.replicas)]
    shared = sorted({f"{node}:{d}" for node, d in engines if d.startswith("cuda") and engines.count((node, d)) > 1})
    if shared:
        raise TopologyError("model.mem_fraction_static", f"engines share {shared}: each would take that share of the "
                                                         "whole GPU; size their KV with kv_pages or max_total_tokens")


def _api(t: Mapping[str, Any], nodes: Mapping[str, Node]) -> ApiSection:
    _only(t, "api.", API_FIELDS)
    node = t.get("node")
    if node is not None and (not isinstance(node, str) or node not in nodes):
        raise TopologyError("api.node", f"{node!r} is not declared under [nodes]; declared: {sorted(nodes)}")
    return ApiSection(_host(t.get("host", "127.0.0.1"), "api.host"), _int(t, "api.", "port", 8000, 1, 65535), node,
                      _strings(t, "api.", "cors_origins"), _strings(t, "api.", "allowed_media_hosts"),
                      _seconds(t, "api.", "request_timeout_s", 600.0),
                      _int(t, "api.", "max_body_bytes", 32 << 20, 1024, 96 << 20),
                      _kwargs(t, "api.default_chat_template_kwargs"), _media_limits(t), _processor_kwargs(t),
                      _int(t, "api.", "max_media_bytes", 20 << 20, 1024, 1 << 31),
                      _seconds(t, "api.", "media_fetch_timeout_s", 10.0),
                      None if t.get("max_queued_requests") is None else _int(t, "api.", "max_queued_requests", 0, 0,
                                                                               1 << 20))


def _speculative(t: Mapping[str, Any]) -> SpeculativeSection | None:
    if not t:
        return None
    _only(t, "speculative.", SPECULATIVE_FIELDS)
    path = t.get("draft_model_path")
    if not isinstance(path, str) or not path:
        raise TopologyError("speculative.draft_model_path",
                            f"expected 'default' or a Gemma 4 assistant checkpoint directory, got {path!r}")
    k = t.get("num_speculative_tokens")
    if k is not None:
        k = _int(t, "speculative.", "num_speculative_tokens", 0, 1, MAX_SPECULATIVE_TOKENS)
    return SpeculativeSection(path, k)


def with_speculative(topology: Topology, overrides: Mapping[str, Any]) -> Topology:
    """The topology with [speculative] fields replaced (command-line flags), validated as in a file."""
    if not overrides:
        return topology
    current = {k: v for k, v in vars(topology.speculative).items() if v is not None} if topology.speculative else {}
    return replace(topology, speculative=_speculative({**current, **overrides}))


def _seconds(t: Mapping[str, Any], where: str, name: str, default: float) -> float:
    value = t.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise TopologyError(where + name, f"expected seconds in (0, 86400], got {value!r}")
    return float(value)


def _media_limits(t: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    limits = _kwargs(t, "api.limit_mm_per_prompt")
    for kind, n in limits:
        if kind not in MEDIA_KINDS or isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1024:
            raise TopologyError("api.limit_mm_per_prompt", f"expected counts in [0, 1024] for {list(MEDIA_KINDS)}, "
                                                           f"got {kind!r} = {n!r}")
    return limits


def _processor_kwargs(t: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    kwargs = _kwargs(t, "api.mm_processor_kwargs")
    for key, value in kwargs:
        if key != "max_soft_tokens" or value not in VISION_BUDGETS or isinstance(value, bool):
            raise TopologyError("api.mm_processor_kwargs", f"expected max_soft_tokens in {list(VISION_BUDGETS)}, "
                                                           f"got {key!r} = {value!r}")
    return kwargs


def _kwargs(table: Mapping[str, Any], where: str) -> tuple[tuple[str, Any], ...]:
    value = table.get(where.rpartition(".")[2], {})
    if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
                                                for p in value):
        value = dict(value)  # pairs, as stored in an ApiSection (overrides re-validate it)
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TopologyError(where, f"expected a table of template arguments, got {value!r}")
    return tuple(sorted(value.items()))


def _strings(table: Mapping[str, Any], where: str, name: str) -> tuple[str, ...]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TopologyError(where + name, f"expected an array of non-empty strings, got {value!r}")
    return tuple(value)


_TABLES = ("default_chat_template_kwargs", "limit_mm_per_prompt", "mm_processor_kwargs")


def with_model_overrides(topology: Topology, overrides: Mapping[str, Any]) -> Topology:
    """The topology with [model] fields replaced (command-line flags), validated as in a file."""
    if not overrides:
        return topology
    model = _model({k: v for k, v in {**vars(topology.model), **overrides}.items() if v is not None})
    _check_memory_shares(model, topology.actors)
    return replace(topology, model=model)


def with_api_overrides(topology: Topology, overrides: Mapping[str, Any]) -> Topology:
    """The topology with [api] fields replaced (command-line flags), validated as in a file."""
    if not overrides:
        return topology
    raw = {**{k: (dict(v) if k in _TABLES else list(v)) if isinstance(v, tuple) else v
              for k, v in vars(topology.api).items() if v is not None},
           **overrides}
    return replace(topology, api=_api(raw, topology.nodes))


def _nodes(t: Mapping[str, Any]) -> dict[str, Node]:
    if not t:
        raise TopologyError("nodes", "declare at least one node, e.g. [nodes.local]")
    nodes = {}
    for name, node in t.items():
        where = f"nodes.{name}."
        if not isinstance(node, Mapping):
            raise TopologyError(f"nodes.{name}", "expected a table")
        _only(node, where, {"host", "base_port"})
        nodes[name] = Node(name, _host(node.get("host", "127.0.0.1"), where + "host"),
                           _int(node, where, "base_port", 5600, 1024, 65000))
    return nodes


def _actor(i: int, a: Any, nodes: Mapping[str, Node]) -> ActorSpec:
    where = f"actors[{i}]."
    if not isinstance(a, Mapping):
        raise TopologyError(f"actors[{i}]", "expected a table")
    _only(a, where, {"kind", "node", "device", "replicas", "threads"})
    kind = a.get("kind")
    if kind not in ACTOR_KINDS:
        raise TopologyError(where + "kind", f"expected one of {list(ACTOR_KINDS)}, got {kind!r}")
    node = a.get("node", next(iter(nodes)))
    if not isinstance(node, str) or node not in nodes:
        raise TopologyError(where + "node", f"{node!r} is not declared under [nodes]; declared: {sorted(nodes)}")
    replicas = _int(a, where, "replicas", 1, 1, 64)
    device = a.get("device", "cpu")
    listed = isinstance(device, list)  # one device per replica
    for d in device if listed else [device]:
        if not isinstance(d, str) or not _DEVICE.match(d):
            raise TopologyError(where + "device", f"expected 'cpu' or 'cuda:N' (or a list of them, one per replica), "
                                                  f"got {device!r}")
    if listed and len(device) != replicas:
        raise TopologyError(where + "device", f"lists {len(device)} devices for {replicas} replicas; list one per "
                                              "replica")
    devices = tuple(device) if listed else ()
    if kind == "preprocess" and set(devices or [device]) != {"cpu"}:
        raise TopologyError(where + "device", "preprocess runs on the CPU")
    threads = _int(a, where, "threads", 0, 0, 1024) or None  # 0 / absent: torch's default
    return ActorSpec(kind, node, devices[0] if listed else device, replicas, threads, devices)


def _transfer(t: Mapping[str, Any], actors: tuple[ActorSpec, ...], nodes: Mapping[str, Node]) -> str | None:
    _only(t, "transfer.", {"backend"})
    by_kind = {a.kind: a for a in actors}
    if "engine" in by_kind:
        if t.get("backend") is not None:
            raise TopologyError("transfer.backend", "a colocated engine hands no KV over; remove [transfer]")
        return None
    backend = t.get("backend")
    if backend not in BACKENDS:
        raise TopologyError("transfer.backend", f"expected one of {list(BACKENDS)}, got {backend!r}")
    prefill, decode = by_kind["prefill"], by_kind["decode"]
    same_node = prefill.node == decode.node
    on_gpu = all(d.startswith("cuda") for d in prefill.all_devices + decode.all_devices)
    if backend == "shm" and not same_node:
        raise TopologyError("transfer.backend", "'shm' needs prefill and decode on one node; use 'tcp'")
    if backend in ("cuda_ipc", "nccl") and not on_gpu:
        raise TopologyError("transfer.backend", f"{backend!r} needs prefill and decode on cuda devices")
    if backend == "cuda_ipc" and not same_node:
        raise TopologyError("transfer.backend", "'cuda_ipc' needs prefill and decode on one node; use 'nccl'")
    shared = sorted(set(prefill.all_devices) & set(decode.all_devices))
    if backend == "nccl" and same_node and shared:
        raise TopologyError("transfer.backend", f"'nccl' cannot join two processes on one GPU ({shared[0]}); "
                                                "use 'cuda_ipc'")
    if backend in ("shm", "tcp") and on_gpu:
        raise TopologyError("transfer.backend", f"{backend!r} is a CPU backend; GPU actors use 'cuda_ipc' or 'nccl'")
    return backend

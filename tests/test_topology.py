"""Topology files: every checked-in example loads; bad files name the field at fault."""

import copy
import tomllib

import pytest

from topology.config import EXAMPLES, TopologyError, load_topology, parse_topology


def test_every_example_loads():
    loaded = {p.stem: load_topology(p) for p in sorted(EXAMPLES.glob("*.toml"))}
    assert set(loaded) == {"cpu_colocated", "cpu_disaggregated", "cpu_two_node", "gpu_colocated",
                           "gpu_split", "gpu_two", "gpu_two_node", "gpu_two_replicas"}
    assert loaded["cpu_colocated"].colocated and loaded["cpu_colocated"].transfer is None
    assert loaded["cpu_colocated"].api.host == "127.0.0.1"
    assert loaded["cpu_disaggregated"].transfer == "shm"
    assert loaded["cpu_two_node"].transfer == "tcp" and loaded["cpu_two_node"].actor("decode").node == "back"
    assert loaded["gpu_two"].actor("decode").device == "cuda:1" and loaded["gpu_two"].transfer == "cuda_ipc"
    assert loaded["gpu_two_node"].transfer == "nccl"
    replicas = loaded["gpu_two_replicas"]
    assert replicas.colocated and replicas.transfer is None
    for kind in ("engine", "vision_encoder"):
        spec = replicas.actor(kind)
        assert spec.replicas == 2 and [spec.device_of(r) for r in range(2)] == ["cuda:0", "cuda:1"]


def test_a_device_per_replica(tmp_path):
    from actors.main import ActorContext
    from topology.wiring import ActorId, plan_wiring

    raw = copy.deepcopy(BASE)
    raw["actors"][2].update(replicas=3, device=["cpu", "cpu", "cpu"])
    topology = parse_topology(raw)
    decode = topology.actor("decode")
    assert decode.all_devices == ("cpu",) * 3 and decode.device == "cpu"
    assert topology.actor("prefill").all_devices == ("cpu",) and topology.actor("prefill").device_of(0) == "cpu"
    gpus = load_topology(EXAMPLES / "gpu_two_replicas.toml")
    wiring = plan_wiring(gpus, tmp_path)
    assert [ActorContext(gpus, wiring, ActorId("engine", r), "run", None, None).device for r in range(2)] == [
        "cuda:0", "cuda:1"]
    with pytest.raises(TopologyError, match="one per replica") as err:
        parse_topology(edited(lambda r: r["actors"][2].update(replicas=2, device=["cpu"])))
    assert err.value.field == "actors[2].device"
    with pytest.raises(TopologyError, match="or a list of them"):
        parse_topology(edited(lambda r: r["actors"][2].update(replicas=2, device=["cpu", "gpu"])))
    with pytest.raises(TopologyError, match="preprocess runs on the CPU"):
        parse_topology(edited(lambda r: r["actors"][0].update(device=["cuda:0"])))
    # nccl joins processes on different GPUs only: a decode replica on the prefill's GPU is refused
    two_gpus = edited(lambda r: (r["actors"][1].update(device="cuda:0"),
                                 r["actors"][2].update(replicas=2, device=["cuda:1", "cuda:0"]),
                                 r["transfer"].update(backend="nccl")))
    with pytest.raises(TopologyError, match="cannot join two processes on one GPU"):
        parse_topology(two_gpus)


BASE = tomllib.loads((EXAMPLES / "cpu_disaggregated.toml").read_text())
BASE["actors"] = [a for a in BASE["actors"] if not a["kind"].endswith("_encoder")]  # preprocess, prefill, decode


def test_actor_threads_are_optional():
    raw = copy.deepcopy(BASE)
    raw["actors"][1]["threads"] = 4
    topology = parse_topology(raw)
    assert topology.actor("prefill").threads == 4 and topology.actor("decode").threads is None


def test_media_kinds_follow_the_encoder_actors():
    assert load_topology(EXAMPLES / "cpu_colocated.toml").media_kinds == {"image", "video", "audio"}
    assert parse_topology(BASE).media_kinds == frozenset()
    assert load_topology(EXAMPLES / "gpu_split.toml").media_kinds == {"image", "video"}


def test_speculative_section_and_its_overrides():
    from topology.config import SpeculativeSection, with_speculative

    assert parse_topology(BASE).speculative is None
    topology = parse_topology(edited(lambda r: r.update(speculative={"draft_model_path": "/m/assistant"})))
    assert topology.speculative == SpeculativeSection("/m/assistant", None)
    assert with_speculative(topology, {"num_speculative_tokens": 6}).speculative == SpeculativeSection("/m/assistant", 6)


def test_scheduler_fields_their_flags_and_the_engine_they_reach():
    from actors.cli import add_scheduler_options, scheduler_overrides
    from topology.config import with_model_overrides
    import argparse

    model = parse_topology(BASE).model
    assert (model.max_num_batched_tokens, model.chunked_prefill_size, model.max_running_requests) == (512, 256, 64)
    gpu = load_topology(EXAMPLES / "gpu_two.toml").model
    assert (gpu.max_num_batched_tokens, gpu.chunked_prefill_size, gpu.max_running_requests) == (8192, 4096, 256)
    ap = argparse.ArgumentParser()
    add_scheduler_options(ap)
    args = ap.parse_args(["--max-num-batched-tokens", "4096", "--chunked-prefill-size", "2048", "--max-num-seqs", "8"])
    overrides = dict(scheduler_overrides(args))
    assert overrides == {"max_num_batched_tokens": 4096, "chunked_prefill_size": 2048, "max_running_requests": 8}
    assert dict(scheduler_overrides(ap.parse_args(["--disable-cuda-graph"]))) == {"cuda_graph_max_bs": 0}
    off = dict(scheduler_overrides(ap.parse_args(["--disable-overlap-schedule"])))
    assert off == {"disable_overlap_schedule": True} and not model.disable_overlap_schedule
    assert with_model_overrides(parse_topology(BASE), off).model.disable_overlap_schedule
    dummy = dict(scheduler_overrides(ap.parse_args(["--load-format", "dummy"])))
    assert with_model_overrides(parse_topology(BASE), dummy).model.load_format == "dummy"
    assert model.load_format == "auto"
    with pytest.raises(TopologyError, match="load_format"):
        with_model_overrides(parse_topology(BASE), {"load_format": "npz"})
    assert model.cuda_graph_max_bs is None and model.attention_backend == "triton"
    assert model.weight_prefetch_max_bs == 0
    prefetch = dict(scheduler_overrides(ap.parse_args(["--weight-prefetch-max-bs", "8"])))
    assert with_model_overrides(parse_topology(BASE), prefetch).model.weight_prefetch_max_bs == 8
    with pytest.raises(TopologyError, match="weight_prefetch_max_bs"):
        with_model_overrides(parse_topology(BASE), {"weight_prefetch_max_bs": -1})
    native = dict(scheduler_overrides(ap.parse_args(["--attention-backend", "torch_native", "--cuda-graph-max-bs", "32"])))
    changed = with_model_overrides(parse_topology(BASE), native).model
    assert (changed.attention_backend, changed.cuda_graph_max_bs) == ("torch_native", 32)
    changed = with_model_overrides(parse_topology(BASE), overrides).model
    assert (changed.max_num_batched_tokens, changed.chunked_prefill_size, changed.max_running_requests) == (4096, 2048, 8)
    with pytest.raises(TopologyError) as err:
        with_model_overrides(parse_topology(BASE), {"chunked_prefill_size": 1024})  # more than 512 per step
    assert err.value.field == "model.chunked_prefill_size"


def test_kv_pool_by_share_of_the_gpu_or_by_tokens():
    from actors.cli import add_scheduler_options, scheduler_overrides
    from topology.config import with_model_overrides
    import argparse

    ap = argparse.ArgumentParser()
    add_scheduler_options(ap)
    for flag in ("--mem-fraction-static", "--gpu-memory-utilization"):  # SGLang's and vLLM's names
        assert dict(scheduler_overrides(ap.parse_args([flag, "0.85"]))) == {"mem_fraction_static": 0.85}
    two = load_topology(EXAMPLES / "gpu_two.toml")  # prefill on cuda:0, decode on cuda:1
    assert two.model.mem_fraction_static is None
    assert with_model_overrides(two, {"mem_fraction_static": 0.85}).model.mem_fraction_static == 0.85
    with pytest.raises(TopologyError, match=r"engines share \['local:cuda:0'\]"):  # prefill and decode on one GPU
        with_model_overrides(load_topology(EXAMPLES / "gpu_split.toml"), {"mem_fraction_static": 0.85})
    for bad in (0, 1, 1.5, "0.8", True):
        with pytest.raises(TopologyError, match="mem_fraction_static"):
            with_model_overrides(two, {"mem_fraction_static": bad})
    two_nodes = load_topology(EXAMPLES / "gpu_two_node.toml")  # cuda:0 of two machines: no GPU shared
    assert with_model_overrides(two_nodes, {"mem_fraction_static": 0.9}).model.mem_fraction_static == 0.9
    tokens = dict(scheduler_overrides(ap.parse_args(["--max-total-tokens", "100001"])))
    model = with_model_overrides(two, tokens).model
    assert model.max_total_tokens == 100001 and model.kv_pages == -(-100001 // model.page_size)
    for flag in ("--context-length", "--max-model-len"):  # SGLang's and vLLM's names
        flags = dict(scheduler_overrides(ap.parse_args([flag, "8192"])))
        assert flags == {"context_length": 8192} and with_model_overrides(two, flags).model.context_length == 8192
    with pytest.raises(TopologyError, match="context_length"):
        with_model_overrides(two, {"context_length": 0})
    raw = copy.deepcopy(BASE)
    raw["model"]["max_total_tokens"] = 1000
    assert parse_topology(raw).model.kv_pages == -(-1000 // parse_topology(BASE).model.page_size)


def edited(edit):
    raw = copy.deepcopy(BASE)
    edit(raw)
    return raw


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda r: r.update(colour="blue"), "colour"),
        (lambda r: r.pop("nodes"), "nodes"),
        (lambda r: r["actors"][1].update(kind="prefiller"), "actors[1].kind"),
        (lambda r: r["actors"][1].update(device="gpu"), "actors[1].device"),
        (lambda r: r["actors"][1].update(node="elsewhere"), "actors[1].node"),
        (lambda r: r["actors"][1].update(replicas=0), "actors[1].replicas"),
        (lambda r: r["actors"][0].update(device="cuda:0"), "actors[0].device"),
        (lambda r: r["actors"].pop(2), "actors"),
        (lambda r: r["actors"].append({"kind": "engine"}), "actors"),
        (lambda r: r["actors"].append({"kind": "prefill"}), "actors"),
        (lambda r: r["transfer"].update(backend="carrier-pigeon"), "transfer.backend"),
        (lambda r: r["transfer"].update(backend="cuda_ipc"), "transfer.backend"),
        (lambda r: r["api"].update(port=70000), "api.port"),
        (lambda r: r["api"].update(host="local host; rm"), "api.host"),
        (lambda r: r.update(model={"dtype": "float8"}), "model.dtype"),
        (lambda r: r.update(model={"max_running_requests": 0}), "model.max_running_requests"),
        (lambda r: r.update(model={"attention_backend": "flashinfer"}), "model.attention_backend"),
        (lambda r: r["api"].update(limit_mm_per_prompt={"picture": 2}), "api.limit_mm_per_prompt"),
        (lambda r: r["api"].update(limit_mm_per_prompt={"image": -1}), "api.limit_mm_per_prompt"),
        (lambda r: r["api"].update(mm_processor_kwargs={"max_soft_tokens": 300}), "api.mm_processor_kwargs"),
        (lambda r: r["api"].update(mm_processor_kwargs={"do_resize": False}), "api.mm_processor_kwargs"),
        (lambda r: r["api"].update(media_fetch_timeout_s=0), "api.media_fetch_timeout_s"),
        (lambda r: r["actors"][1].update(threads=-2), "actors[1].threads"),
        (lambda r: r.update(speculative={"num_speculative_tokens": 4}), "speculative.draft_model_path"),
        (lambda r: r.update(speculative={"draft_model_path": "a", "num_speculative_tokens": 17}),
         "speculative.num_speculative_tokens"),
        (lambda r: r.update(speculative={"draft_model_path": "a", "topk": 2}), "speculative.topk"),
    ],
)
def test_bad_topologies_name_the_field(edit, field):
    with pytest.raises(TopologyError) as err:
        parse_topology(edited(edit))
    assert err.value.field == field and field in str(err.value)


def test_shm_needs_one_node_and_gpu_backends_need_gpus():
    two_nodes = edited(lambda r: (r["nodes"].update(back={"host": "127.0.0.1", "base_port": 5700}),
                                  r["actors"][2].update(node="back")))
    with pytest.raises(TopologyError, match="'shm' needs prefill and decode on one node"):
        parse_topology(two_nodes)
    gpus = edited(lambda r: (r["actors"][1].update(device="cuda:0"), r["actors"][2].update(device="cuda:1")))
    with pytest.raises(TopologyError, match="CPU backend"):
        parse_topology(gpus)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(TopologyError, match="does not exist"):
        load_topology(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\npath=")
    with pytest.raises(TopologyError, match="not valid TOML"):
        load_topology(bad)


def test_admission_limit_follows_the_decoding_engines():
    from topology.config import with_api_overrides, with_model_overrides

    colocated = load_topology(EXAMPLES / "cpu_colocated.toml")
    assert colocated.admission_limit() == 64 + 64  # what the engine runs, and as many queued
    two_decoders = parse_topology(edited(lambda r: r["actors"][2].update(replicas=2)))
    assert two_decoders.actor("decode").replicas == 2 and two_decoders.admission_limit() == 2 * 64 * 2
    tight = with_api_overrides(with_model_overrides(colocated, {"max_running_requests": 2}), {"max_queued_requests": 0})
    assert tight.admission_limit() == 2

"""bench/random_weights_topology.py: the topologies of bench/serve_random_weights.sh, one GPU or two,
colocated or split, load and put every actor where the script says."""

import pytest

from tests.bench_scripts import load_bench
from topology.config import TopologyError, load_topology


@pytest.mark.parametrize("gpus, split, vision, want", [
    (1, False, False, {"preprocess": ("cpu",), "engine": ("cuda:0",)}),
    (1, False, True, {"preprocess": ("cpu",), "vision_encoder": ("cuda:0",), "engine": ("cuda:0",)}),
    (1, True, False, {"preprocess": ("cpu",), "prefill": ("cuda:0",), "decode": ("cuda:0",)}),
    (2, True, True, {"preprocess": ("cpu",), "vision_encoder": ("cuda:0",), "prefill": ("cuda:0",),
                     "decode": ("cuda:1",)}),
    (2, False, True, {"preprocess": ("cpu",), "vision_encoder": ("cuda:0", "cuda:1"),
                      "engine": ("cuda:0", "cuda:1")}),
])
def test_each_topology_loads_with_its_devices(tmp_path, gpus, split, vision, want):
    bench = load_bench("random_weights_topology")
    out = tmp_path / "topology.toml"
    args = [str(out), str(tmp_path), "--gpus", str(gpus), "--kv-pages", "1000", "--kv-dtype", "fp8_e4m3",
            "--page-size", "64"]
    bench.main(args + (["--split"] if split else []) + (["--vision"] if vision else []))
    topology = load_topology(out)
    assert {a.kind: tuple(a.device_of(r) for r in range(a.replicas)) for a in topology.actors} == want
    assert topology.transfer == ("cuda_ipc" if split else None)
    assert topology.model.kv_pages == 1000 and topology.model.kv_cache_dtype == "fp8_e4m3"
    assert topology.model.page_size == 64
    assert topology.model.load_format == "dummy"
    bench.main(args + ["--gpus", str(gpus), "--preprocess", "4"])
    assert next(a for a in load_topology(out).actors if a.kind == "preprocess").replicas == 4


def test_bad_settings_are_refused(tmp_path):
    bench = load_bench("random_weights_topology")
    with pytest.raises(ValueError, match="gpus is 1 or 2"):
        bench.topology_text(str(tmp_path), gpus=3)
    with pytest.raises(ValueError, match="preprocess replicas"):
        bench.topology_text(str(tmp_path), preprocess=0)
    for gpus, split, vision_gpu in ((1, True, 1), (2, False, 1), (2, True, 2)):
        with pytest.raises(ValueError, match="vision_gpu"):
            bench.topology_text(str(tmp_path), gpus=gpus, split=split, vision=True, vision_gpu=vision_gpu)


def test_the_split_topology_may_put_the_vision_encoder_beside_decode(tmp_path):
    bench = load_bench("random_weights_topology")
    out = tmp_path / "topology.toml"
    bench.main([str(out), str(tmp_path), "--gpus", "2", "--split", "--vision", "--vision-gpu", "1"])
    devices = {a.kind: a.device_of(0) for a in load_topology(out).actors}
    assert devices == {"preprocess": "cpu", "vision_encoder": "cuda:1", "prefill": "cuda:0", "decode": "cuda:1"}
    with pytest.raises(TopologyError):
        bench.main([str(tmp_path / "t.toml"), str(tmp_path), "--kv-dtype", "int4"])

"""The vision tower's CUDA graphs (`gemma4_model.vision_graphs`): bucketed inputs give the same
soft tokens (on the CPU, eagerly), and replayed graphs give the eager pass's (on the device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from gemma4_model.vision import load_image_encoder
from gemma4_model.vision_graphs import TowerGraphs


def inputs(encoder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    cfg = encoder.cfg
    batch = Gemma4ImageProcessorPil(patch_size=cfg.patch_size, pooling_kernel_size=cfg.pooling_kernel_size,
                                    max_soft_tokens=70)(images, return_tensors="pt")
    return batch["pixel_values"], batch["image_position_ids"]


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return load_image_encoder(tiny_checkpoint("e2b"))


def test_buckets_round_images_to_powers_of_two_and_patches_to_pooled_blocks():
    graphs = TowerGraphs(lambda p, q: p, pooling_kernel_size=3)
    assert graphs.bucketed_shape(1, 630) == (1, 720)
    assert graphs.bucketed_shape(3, 576) == (4, 576)
    assert graphs.bucketed_shape(5, 577) == (8, 720)
    with pytest.raises(ValueError, match="max_graphs"):
        TowerGraphs(lambda p, q: p, 3, max_graphs=0)


def test_bucketed_inputs_give_the_same_soft_tokens(encoder):
    pixels, positions = inputs(encoder, [(100, 160), (64, 64), (40, 200)])
    graphs = TowerGraphs(encoder.vision_tower.transformer, encoder.cfg.pooling_kernel_size)
    padded_pixels, padded_positions = graphs.bucketed(pixels, positions)
    assert pixels.shape[1] == 630 and padded_pixels.shape[:2] == (4, 720) and (padded_positions[:3, pixels.shape[1]:] == -1).all()
    assert torch.equal(padded_pixels[3, :pixels.shape[1]], pixels[0])  # the extra image: the first again
    want = encoder.encode(pixels, positions)
    got = encoder.encode(padded_pixels, padded_positions)[:3]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_compiled_layer_is_one_graph_for_every_layer_and_gives_the_plain_pass():
    """`compile_vision_encoder`'s layer, compiled here for the CPU (float32): no graph breaks
    (fullgraph), one compile for all layers and for four images then two (symbolic sizes, none
    tied to another dimension), the plain pass's values."""
    from torch._dynamo.utils import counters

    from pathlib import Path

    from gemma4_model.vision import run_layer

    encoder = load_image_encoder(Path(__file__).resolve().parents[1] / "default_model" / "checkpoint")  # two layers
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(run_layer, dynamic=True, fullgraph=True)
    tower = encoder.vision_tower
    assert len(tower.encoder.layers) > 1
    for sizes in ([(100, 160), (64, 64), (40, 200), (90, 90)], [(100, 160), (64, 64)]):
        pixels, positions = inputs(encoder, sizes)
        with torch.inference_mode():
            torch.testing.assert_close(tower.transformer(pixels, positions, layer_fn=compiled),
                                       tower.transformer(pixels, positions), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
def test_gpu_replayed_tower_matches_the_eager_pass(encoder):
    eager = encoder.to("cuda")
    cases = [[(100, 160)], [(100, 160), (64, 64), (40, 200)], [(300, 90)], [(100, 160)]]
    want = []
    for sizes in cases:
        pixels, positions = inputs(eager, sizes, seed=len(sizes))
        want.append(eager.encode(pixels.cuda(), positions.cuda()))
    eager.enable_graphs(max_graphs=2)
    graphs = eager.vision_tower.graphs
    for sizes, expected in zip(cases, want):
        pixels, positions = inputs(eager, sizes, seed=len(sizes))
        got = eager.encode(pixels.cuda(), positions.cuda())
        assert len(got) == len(expected)
        for g, w in zip(got, expected):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # (1, 720) captured, (4, 720) captured, then (1, 720) replayed twice (the processor pads every
    # image to 630 patches)
    assert graphs.captures == 2 and len(graphs._graphs) == 2
    eager.vision_tower.graphs = None


@pytest.mark.gpu
def test_gpu_compiled_tower_matches_the_eager_pass_in_bf16():
    """The torch.compile'd tower (CUDA graphs of it) against the plain pass at E4B's real shape, in
    bf16, over one and two 720p-sized images; both passes warm up first."""
    import shutil
    import tempfile
    from pathlib import Path

    from actors.encoder_actor import warm_up_tower
    from gemma4_model.random_weights import random_media_encoder

    ckpt = tempfile.mkdtemp()
    shutil.copy(Path(__file__).parent / "fixtures/hf_configs/gemma-4-E4B-it.json", f"{ckpt}/config.json")
    plain = random_media_encoder(ckpt, "vision", "cuda", torch.bfloat16)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.random((2, 2520, plain.cfg.patch_dim), dtype=np.float32)).cuda().bfloat16()
    ys, xs = torch.meshgrid(torch.arange(42), torch.arange(60), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).cuda().expand(2, -1, -1).contiguous()
    want = [plain.encode(pixels[:1], positions[:1])[0], *plain.encode(pixels, positions)]
    plain.enable_graphs(compile=True)
    assert warm_up_tower(plain, "cuda", torch.bfloat16) > 0
    graphs = plain.vision_tower.graphs
    got = [plain.encode(pixels[:1], positions[:1])[0], *plain.encode(pixels, positions)]
    assert graphs.fn is not graphs.fallback  # the compiled pass, not the fallback
    for g, w in zip(got, want):
        err = ((g.float() - w.float()).norm() / w.float().norm()).item()
        assert err < 2e-2, err
    shutil.rmtree(ckpt)


@pytest.mark.gpu
def test_gpu_a_failing_compiled_pass_falls_back_to_the_plain_one(encoder):
    eager = encoder.to("cuda")
    pixels, positions = inputs(eager, [(100, 160)])
    want = eager.encode(pixels.cuda(), positions.cuda())

    def broken(p, q):
        raise RuntimeError("no compiler")

    eager.vision_tower.graphs = TowerGraphs(broken, eager.cfg.pooling_kernel_size, fallback=eager.vision_tower.transformer)
    got = eager.encode(pixels.cuda(), positions.cuda())
    assert eager.vision_tower.graphs.fn is eager.vision_tower.transformer
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    eager.vision_tower.graphs = None

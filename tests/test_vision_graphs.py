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
    """`compile_vision_encoder`'s layer, traced here on the CPU (float32; dynamo and AOTAutograd
    without inductor's code generation, which the GPU tests run): no graph breaks (fullgraph), one
    graph for all layers and for four images then two (symbolic sizes, none tied to another
    dimension), the plain pass's values."""
    from torch._dynamo.utils import counters

    from pathlib import Path

    from gemma4_model.vision import run_layer

    encoder = load_image_encoder(Path(__file__).resolve().parents[1] / "default_model" / "checkpoint")  # two layers
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(run_layer, dynamic=True, fullgraph=True, backend="aot_eager")
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
def test_gpu_compiled_layers_are_as_close_to_float32_as_the_plain_bf16_ones():
    """E4B's real tower shape, random weights, one 720p-sized image (bucketed, so with padding
    patches): each compiled bf16 layer, given the float32 pass's input to it, is as close to the
    float32 layer's output as the plain bf16 layer is. (Whole passes are not compared: a random
    tower is chaotic, a bf16 rounding difference grows about 2.5x a layer over its 16 layers, as
    float32's does on the CPU.)"""
    import copy
    import shutil
    import tempfile
    from pathlib import Path

    from gemma4_model.random_weights import random_media_encoder
    from gemma4_model.vision import _padding_mask, run_layer

    ckpt = tempfile.mkdtemp()
    shutil.copy(Path(__file__).parent / "fixtures/hf_configs/gemma-4-E4B-it.json", f"{ckpt}/config.json")
    bf16 = random_media_encoder(ckpt, "vision", "cuda", torch.bfloat16)
    shutil.rmtree(ckpt)
    fp32 = copy.deepcopy(bf16).float()
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.random((1, 2520, bf16.cfg.patch_dim), dtype=np.float32)).cuda()
    ys, xs = torch.meshgrid(torch.arange(42), torch.arange(60), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).cuda()[None].contiguous()
    pixels, positions = TowerGraphs(None, bf16.cfg.pooling_kernel_size).bucketed(pixels, positions)
    key_ok = ~_padding_mask(positions)
    assert not key_ok.all()
    compiled = torch.compile(run_layer, dynamic=True, fullgraph=True)
    with torch.inference_mode():
        tower32 = fp32.vision_tower
        h = tower32.patch_embedder(pixels, positions)
        cos, sin = tower32._rope(positions, h.dtype)
        cos16, sin16 = cos.bfloat16(), sin.bfloat16()
        for i, (layer32, layer16) in enumerate(zip(tower32.encoder.layers, bf16.vision_tower.encoder.layers)):
            want = layer32(h, cos, sin, key_ok)
            plain = layer16(h.bfloat16(), cos16, sin16, key_ok)
            got = compiled(layer16, h.bfloat16(), cos16, sin16, key_ok)

            def err(x):
                return ((x[key_ok].float() - want[key_ok]).norm() / want[key_ok].norm()).item()

            assert err(got) <= 1.5 * err(plain) + 1e-3, (i, err(got), err(plain))
            h = want


@pytest.mark.gpu
def test_gpu_replayed_compiled_tower_is_the_compiled_pass():
    """The compiled tower as `enable_graphs(compile=True)` replays it (warmed up at one and four
    images, then one and two 720p-sized images bucketed) gives what calling the compiled pass
    directly on the bucketed inputs gives (up to the order of the GEMMs' sums)."""
    import shutil
    import tempfile
    from pathlib import Path

    from actors.encoder_actor import warm_up_tower
    from gemma4_model.random_weights import random_media_encoder

    ckpt = tempfile.mkdtemp()
    shutil.copy(Path(__file__).parent / "fixtures/hf_configs/gemma-4-E4B-it.json", f"{ckpt}/config.json")
    encoder = random_media_encoder(ckpt, "vision", "cuda", torch.bfloat16)
    shutil.rmtree(ckpt)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.random((2, 2520, encoder.cfg.patch_dim), dtype=np.float32)).cuda().bfloat16()
    ys, xs = torch.meshgrid(torch.arange(42), torch.arange(60), indexing="ij")
    positions = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).cuda().expand(2, -1, -1).contiguous()
    encoder.enable_graphs(compile=True)
    assert warm_up_tower(encoder, "cuda", torch.bfloat16) > 0
    graphs = encoder.vision_tower.graphs
    with torch.inference_mode():
        for n in (1, 2):
            bucketed = graphs.bucketed(pixels[:n], positions[:n])
            want = graphs.fn(*bucketed).clone()
            got = graphs(*bucketed)
            assert graphs.fn is not graphs.fallback  # the compiled pass, not the fallback
            assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
            assert len(encoder.encode(pixels[:n], positions[:n])) == n


@pytest.mark.gpu
def test_gpu_a_failing_compiled_pass_falls_back_to_the_plain_one(encoder):
    eager = encoder.to("cuda")
    pixels, positions = inputs(eager, [(100, 160)])
    want = eager.encode(pixels.cuda(), positions.cuda())

    def broken(p, q):
        raise RuntimeError("no compiler")

    eager.vision_tower.graphs = TowerGraphs(broken, eager.cfg.pooling_kernel_size, fallback=eager.vision_tower.transformer)
    got = eager.encode(pixels.cuda(), positions.cuda())
    assert eager.vision_tower.graphs.fn == eager.vision_tower.transformer  # bound methods: equal, not identical
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    eager.vision_tower.graphs = None

"""The fused per-layer-embedding tail (`kernels.ple_tail`) against its twin, the layer's own chain:
in Triton's interpreter on CPU, and on the device in the `gpu` tests (bf16 at E2B's and E4B's
widths, eager and replayed from a CUDA graph)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma4_model.kernels.fused import gelu_mul_torch, residual_norm_torch
from gemma4_model.kernels.ple_tail import MAX_ROWS, PleTail, ple_tail_torch

EPS = 1e-6


def rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def case(rows, hidden, ple_dim, dtype=torch.float32, device="cpu", layers=3):
    """The tail's inputs; ple_input is one layer's strided slice of a [rows, layers, ple_dim]
    tensor, as the decoder passes it."""
    ple_all = rand(rows, layers, ple_dim, dtype=dtype, device=device, seed=6)
    return dict(m=rand(rows, hidden, dtype=dtype, device=device, seed=1),
                h=rand(rows, hidden, dtype=dtype, device=device, seed=2),
                ff_norm=rand(hidden, dtype=dtype, device=device, seed=3),
                gate_w=rand(ple_dim, hidden, dtype=dtype, device=device, seed=4, scale=hidden ** -0.5),
                ple_input=ple_all[:, 1],
                proj_w=rand(hidden, ple_dim, dtype=dtype, device=device, seed=5, scale=ple_dim ** -0.5),
                ple_norm=rand(hidden, dtype=dtype, device=device, seed=7),
                eps=EPS)


def check(got, want, dtype):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is None:
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, atol=3e-5, rtol=3e-5)
        else:  # bf16: a rounding flip in a product or a norm moves a value a few last-bit steps
            torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("rows,hidden,ple_dim", [(1, 64, 16), (3, 40, 24), (MAX_ROWS, 48, 8)])
@pytest.mark.parametrize("with_scalar_and_next", [False, True])
def test_matches_the_twin(rows, hidden, ple_dim, with_scalar_and_next):
    args = case(rows, hidden, ple_dim)
    extra = dict(scalar=torch.tensor([0.6]), next_weight=rand(hidden, seed=8)) if with_scalar_and_next else {}
    tail = PleTail()
    check(tail(**args, **extra), ple_tail_torch(**args, **extra), torch.float32)
    assert not tail.counter(torch.device("cpu")).any(), "every launch leaves its counters at zero"
    check(tail(**args, **extra), ple_tail_torch(**args, **extra), torch.float32)  # again, from those zeros


def test_the_down_products_splits_added_by_the_gate_launch(monkeypatch):
    """m as `SplitSums` (the down product's K splits left unadded, TANDEM_SPLITS_IN_NORM_ROWS): the gate
    launch adds them; the tail's results equal those from the reduced product exactly, and no
    reduction launch runs."""
    from gemma4_model.kernels import gemv
    from gemma4_model.kernels.fused import SplitSums
    from gemma4_model.kernels.gemv import GemvTiles, small_m_linear

    args = case(3, 40, 24)
    act, down = rand(3, 72, seed=9), rand(40, 72, seed=10, scale=72 ** -0.5)
    tiles = GemvTiles(8, 16, 3)
    extra = dict(scalar=torch.tensor([0.6]), next_weight=rand(40, seed=8))
    tail = PleTail()
    want = tail(**{**args, "m": small_m_linear(act, down, tiles)}, **extra)
    monkeypatch.setattr(gemv, "_split_reduce_kernel", None)
    sums = small_m_linear(act, down, tiles, keep_splits=True)
    assert isinstance(sums, SplitSums) and sums.parts.shape == (3, 3, 40) and PleTail.fits(sums)
    got = tail(**{**args, "m": sums}, **extra)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_twin_is_the_decoder_layer_chain():
    """The twin computes what DecoderLayer.forward does after the feed-forward block."""
    from gemma4_model.layers import RMSNorm, gelu_tanh

    args = case(2, 32, 8)
    ff, post = RMSNorm(32, EPS), RMSNorm(32, EPS)
    ff.weight.data, post.weight.data = args["ff_norm"], args["ple_norm"]
    scalar = torch.tensor([0.5])
    x = args["h"] + ff(args["m"])
    gated = gelu_tanh(F.linear(x, args["gate_w"])) * args["ple_input"]
    want = (x + post(F.linear(gated, args["proj_w"]))) * scalar
    out, y = ple_tail_torch(**args, scalar=scalar)
    torch.testing.assert_close(out, want)
    assert y is None
    # and through the fused-kernel twins it is built from
    x2, _ = residual_norm_torch(args["m"], args["h"], args["ff_norm"], EPS)
    torch.testing.assert_close(gelu_mul_torch(F.linear(x2, args["gate_w"]), args["ple_input"]), gated)


def test_rows_it_does_not_take_and_clear_errors(monkeypatch):
    tail = PleTail()
    args = case(MAX_ROWS + 1, 32, 8)
    assert not PleTail.fits(args["m"])
    with pytest.raises(ValueError, match=f"1 to {MAX_ROWS} rows"):
        tail(**args)
    args = case(2, 32, 8)
    args["proj_w"] = args["proj_w"][:, :4]
    with pytest.raises(ValueError, match="shapes disagree"):
        tail(**args)
    args = case(2, 32, 8)
    args["h"] = args["h"].double()
    with pytest.raises(ValueError, match="one dtype"):
        tail(**args)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor without the interpreter: the caller's chain
    assert not PleTail.fits(case(1, 32, 8)["m"])


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hidden", [1536, 2560])  # E2B, E4B
@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS])
def test_gpu_bf16_at_real_widths(hidden, rows):
    args = case(rows, hidden, 256, dtype=torch.bfloat16, device="cuda")
    extra = dict(scalar=torch.tensor([0.8], dtype=torch.bfloat16, device="cuda"),
                 next_weight=rand(hidden, dtype=torch.bfloat16, device="cuda", seed=9))
    tail = PleTail()
    for _ in range(3):  # the counters come back to zero after each launch
        check(tail(**args, **extra), ple_tail_torch(**args, **extra), torch.bfloat16)
    assert not tail.counter(torch.device("cuda", torch.cuda.current_device())).any()


@pytest.mark.gpu
@gpu
def test_gpu_replayed_in_a_graph():
    args = case(4, 2560, 256, dtype=torch.bfloat16, device="cuda")
    nxt = rand(2560, dtype=torch.bfloat16, device="cuda", seed=9)
    tail = PleTail()
    tail(**args, next_weight=nxt)  # warm-up: compiled, counters allocated
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, y = tail(**args, next_weight=nxt)
    for seed in (11, 12, 13):
        args["m"].copy_(rand(4, 2560, dtype=torch.bfloat16, device="cuda", seed=seed))
        graph.replay()
        check((out, y), ple_tail_torch(**args, next_weight=nxt), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a device")
def test_the_benchmark_needs_a_device(tmp_path):
    from bench.ple_tail import main

    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["--out", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()

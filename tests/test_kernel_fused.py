"""The fused layer kernels (`kernels.fused`) against their PyTorch twins: in Triton's interpreter on
CPU, on the device in the `gpu` tests (bf16 at Gemma 4's real widths); and the decoder of every
variant with the kernels on against the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from gemma4_model.kernels.fused import (
    KVWrite, gelu_mul, gelu_mul_torch, head_norm_rope, head_norm_rope_torch, ple_combine, ple_combine_torch,
    residual_norm, residual_norm_torch,
)
from gemma4_model.layers import RotaryEmbedding, is_packed, pack_rows
from gemma4_model.config import RopeSpec

EPS = 1e-6


def rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def assert_matches(got, want, dtype):
    """float32: equal but for summation order. bf16 (on the device; Triton's interpreter truncates
    where the GPU rounds to nearest): within a few last-bit steps, which a rounding flip in a
    norm becomes after RoPE's cancellations."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1.6e-2)


def residual_norm_cases(device, dtype, width):
    x, res = rand(5, width, dtype=dtype, device=device, seed=1), rand(5, width, dtype=dtype, device=device, seed=2)
    w, nxt = rand(width, dtype=dtype, device=device, seed=3), rand(width, dtype=dtype, device=device, seed=4)
    scalar = torch.tensor([0.7], dtype=dtype, device=device)
    for residual, weight, sc, next_w in [(None, w, None, None), (res, w, None, nxt), (res, w, scalar, nxt),
                                         (res, None, scalar, None), (None, w, scalar, nxt)]:
        got = residual_norm(x, residual, weight, EPS, sc, next_w)
        want = residual_norm_torch(x, residual, weight, EPS, sc, next_w)
        assert_matches(got[0], want[0], dtype)
        assert (got[1] is None) == (next_w is None)
        if next_w is not None:
            assert_matches(got[1], want[1], dtype)


@pytest.mark.parametrize("width", [32, 40])  # a power of two and not
def test_residual_norm(width):
    residual_norm_cases("cpu", torch.float32, width)


def test_residual_norm_twin_is_the_layer_chain():
    """The twin is what DecoderLayer.forward computes: residual + norm(x) * w, times the scalar."""
    from gemma4_model.layers import RMSNorm

    x, res = rand(3, 16, seed=1), rand(3, 16, seed=2)
    norm = RMSNorm(16, EPS)
    norm.weight.data = rand(16, seed=3)
    scalar = torch.tensor([0.5])
    h, _ = residual_norm_torch(x, res, norm.weight, EPS, scalar)
    torch.testing.assert_close(h, (res + norm(x)) * scalar)


def rope_tables(positions, head_dim, dtype, device):
    rotary = RotaryEmbedding(RopeSpec("default", theta=10_000.0, head_dim=head_dim)).to(device)
    return rotary(positions, dtype)


def head_norm_rope_case(device, dtype, heads, kv_heads, head_dim, k_eq_v, with_kv, cache_dtype=None):
    T, cache_slots = 6, 40
    width = (heads + (kv_heads * (1 if k_eq_v else 2) if with_kv else 0)) * head_dim
    src = rand(T, width, dtype=dtype, device=device, seed=5, scale=3.0)
    cos, sin = rope_tables(torch.tensor([0, 3, 7, 100, 101, 2000], device=device), head_dim, dtype, device)
    wq, wk = rand(head_dim, dtype=dtype, device=device, seed=6), rand(head_dim, dtype=dtype, device=device, seed=7)
    slots = torch.tensor([4, 9, 0, 33, 12, 39], device=device)
    outs = []
    for fn in (head_norm_rope, head_norm_rope_torch):
        kv = None
        if with_kv:
            caches = [torch.zeros(cache_slots, kv_heads, head_dim, dtype=cache_dtype or dtype, device=device)
                      for _ in range(2)]
            kv = KVWrite(wk, kv_heads, k_eq_v, caches[0], caches[1], slots)
        q = fn(src, heads, head_dim, wq, cos, sin, EPS, kv)
        outs.append((q, None if kv is None else (kv.k_cache, kv.v_cache)))
    (q, caches), (want_q, want_caches) = outs
    assert_matches(q, want_q, dtype)
    if with_kv:
        for got, want in zip(caches, want_caches):
            if got.dtype == torch.float8_e4m3fn:  # a bf16 last-bit flip may move a value one e4m3 step
                torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0.13)
                assert (got.view(torch.uint8) != want.view(torch.uint8)).float().mean() < 0.05
            else:
                assert_matches(got, want, dtype)
        untouched = torch.ones(cache_slots, dtype=torch.bool, device=device)
        untouched[slots] = False
        assert not caches[0][untouched].float().any()  # only the write slots written


@pytest.mark.parametrize("k_eq_v", [False, True])
@pytest.mark.parametrize("with_kv", [False, True])
def test_head_norm_rope(k_eq_v, with_kv):
    head_norm_rope_case("cpu", torch.float32, heads=4, kv_heads=2, head_dim=16, k_eq_v=k_eq_v, with_kv=with_kv)


def test_gelu_mul_on_the_halves_of_one_projection():
    gate_up = rand(5, 2 * 48, scale=2.0)
    a, b = gate_up[:, :48], gate_up[:, 48:]
    assert_matches(gelu_mul(a, b), gelu_mul_torch(a, b), torch.float32)
    big = torch.tensor([[-30.0, -5.0, 0.0, 5.0, 30.0]])
    torch.testing.assert_close(gelu_mul(big, torch.ones_like(big)), gelu_mul_torch(big, torch.ones_like(big)))


def ple_case(device, dtype, T=5, layers=3, P=8, hidden=24, vocab=50):
    proj = rand(T, layers * P, dtype=dtype, device=device, seed=8, scale=4.0)
    table = rand(vocab, layers * P, dtype=dtype, device=device, seed=9)
    w = rand(P, dtype=dtype, device=device, seed=10)
    ids = (torch.arange(T, device=device) * 7) % vocab
    assert_matches(ple_combine(proj, ids, table, w, layers, hidden, EPS),
                   ple_combine_torch(proj, ids, table, w, layers, hidden, EPS), dtype)


def test_ple_combine():
    ple_case("cpu", torch.float32)


def test_packed_projections_stay_views_and_repack_after_a_move():
    lins = [torch.nn.Linear(8, n, bias=False) for n in (4, 2, 2)]
    want = torch.cat([lin.weight.detach().clone() for lin in lins])
    packed = pack_rows(*lins)
    assert torch.equal(packed, want) and is_packed(packed, lins)
    lins[1].weight.data.fill_(3.0)  # a write through the view (load_state_dict's copy_)
    assert (packed[4:6] == 3.0).all()
    lins[2].weight.data = lins[2].weight.data.clone()  # what a move to another device does
    assert not is_packed(packed, lins)
    assert not is_packed(None, lins)


@pytest.mark.parametrize("variant", ["31b", "26b_a4b", "12b_unified"])  # e4b-like: test_kernel_paged_attention
def test_decoder_with_kernels_matches_without(variant):
    """Every variant's decoder through the fused kernels (k_eq_v, MoE, PLE, KV sharing, double-wide
    MLPs) against the PyTorch path, through the engine: same greedy tokens, close logits."""
    from gemma4_model.random_checkpoint import tiny_config
    from test_kernel_paged_attention import decoders_agree

    # three layers (two sliding, then a full one): every layer kind and feature, half the interpreter's time
    decoders_agree(tiny_config(variant, sliding_window=8, num_hidden_layers=3).to_dict(), "cpu", (11, 5), chunk=8)


# --- GPU: bf16 at Gemma 4's widths -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("width", [2560, 5376, 1536])
def test_gpu_residual_norm(width):
    residual_norm_cases("cuda", torch.bfloat16, width)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim,k_eq_v", [(8, 2, 256, False), (8, 2, 512, False),
                                                            (32, 4, 512, True), (32, 16, 256, False)])
@pytest.mark.parametrize("cache_dtype", [None, torch.float8_e4m3fn])
def test_gpu_head_norm_rope(heads, kv_heads, head_dim, k_eq_v, cache_dtype):
    head_norm_rope_case("cuda", torch.bfloat16, heads, kv_heads, head_dim, k_eq_v, True, cache_dtype)
    head_norm_rope_case("cuda", torch.bfloat16, heads, kv_heads, head_dim, k_eq_v, False)


@pytest.mark.gpu
def test_gpu_gelu_mul_and_ple_combine():
    gate_up = rand(7, 2 * 10240, dtype=torch.bfloat16, device="cuda", scale=2.0)
    a, b = gate_up[:, :10240], gate_up[:, 10240:]
    assert_matches(gelu_mul(a, b), gelu_mul_torch(a, b), torch.bfloat16)
    ple_case("cuda", torch.bfloat16, T=7, layers=42, P=256, hidden=2560, vocab=1000)


def test_tensor_descriptor_loads_only_on_hopper(monkeypatch):
    """`tma_capable`: CPU tensors (Triton's interpreter emulates TMA) and Hopper GPUs take the TMA
    kernels; an older GPU (no tensor memory accelerator) keeps the gathering ones, whatever the
    switches say."""
    from types import SimpleNamespace

    from gemma4_model.kernels import fused

    assert fused.tma_capable(torch.zeros(1))
    cuda = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    for capable in (True, False):
        monkeypatch.setattr(fused, "_hopper", lambda index, capable=capable: capable)
        assert fused.tma_capable(cuda) is capable

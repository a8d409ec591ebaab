"""The MoE block's kernels (`kernels.moe`) against their twins: `layers.Router.forward` and the
experts' input norm (`moe_route`), `align_pairs_torch`, `layers.Experts.forward` and the block's
post-feed-forward norms (`moe_combine`)."""

from __future__ import annotations

import pytest
import torch

from gemma4_model.config import MoESpec
from gemma4_model.kernels.fused import residual_norm
from gemma4_model.kernels.moe import (align_pairs, align_pairs_torch, moe_combine, moe_combine_tail,
                                      moe_combine_tail_torch, moe_combine_torch, moe_experts, moe_route,
                                      moe_route_torch)
from gemma4_model.layers import Experts, RMSNorm, Router


def routed(tokens: int, hidden: int, spec: MoESpec, dtype=torch.float32, device="cpu", seed=0):
    """Random experts, input and a real router's top-k choice over them."""
    g = torch.Generator().manual_seed(seed)
    experts = Experts(hidden, spec)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * hidden**-0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * spec.intermediate_size**-0.5)
    router = Router(hidden, spec, 1e-6)
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=g))
        router.per_expert_scale.copy_(torch.rand(spec.num_experts, generator=g) + 0.5)
    experts, router = experts.to(device, dtype), router.to(device, dtype)
    x = torch.randn((tokens, hidden), generator=g).to(device, dtype)
    with torch.no_grad():
        weights, chosen = router(x)
    return experts, x, weights, chosen


@pytest.mark.parametrize("align", [align_pairs_torch, align_pairs])
@pytest.mark.parametrize("tokens,block_m", [(1, 16), (13, 4), (40, 16)])
def test_pairs_are_sorted_by_expert_in_whole_blocks(align, tokens, block_m):
    chosen = torch.randint(0, 6, (tokens, 3), generator=torch.Generator().manual_seed(tokens))
    slot_pairs, block_experts = align(chosen, 6, block_m)
    assert slot_pairs.numel() % block_m == 0 and slot_pairs.numel() // block_m == block_experts.numel()
    used = slot_pairs[slot_pairs >= 0].long()
    assert sorted(used.tolist()) == list(range(tokens * 3))  # every pair once
    flat = chosen.reshape(-1)
    for b, e in enumerate(block_experts.tolist()):
        block = slot_pairs[b * block_m:(b + 1) * block_m]
        pairs = block[block >= 0].long()
        if e < 0:
            assert pairs.numel() == 0
            continue
        assert (flat[pairs] == e).all() and pairs.numel() > 0
        assert pairs.tolist() == sorted(pairs.tolist()) and (block >= 0).tolist() == sorted((block >= 0).tolist(),
                                                                                               reverse=True)
    assert sorted(e for e in block_experts.tolist() if e >= 0) == block_experts[block_experts >= 0].tolist()


@pytest.mark.parametrize("tokens,experts,block_m,skew", [(1, 6, 16, False), (13, 6, 4, False), (70, 5, 4, True),
                                                         (200, 128, 16, False), (3, 128, 64, True)])
def test_the_align_kernel_gives_its_twin_exactly(tokens, experts, block_m, skew):
    """Counts that cross the kernel's 128-pair chunks, experts left unused, all pairs on one expert."""
    g = torch.Generator().manual_seed(tokens)
    chosen = torch.randint(0, experts, (tokens, 3), generator=g)
    if skew:
        chosen[:, 0] = experts - 1
    for got, want in zip(align_pairs(chosen.to(torch.int32), experts, block_m), align_pairs_torch(chosen, experts, block_m)):
        assert got.dtype == want.dtype == torch.int32
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("tokens", [1, 7, 40])  # up to FUSED_ROUTER_MAX_ROWS: the router's product in the norms' launch
def test_the_route_kernels_match_the_router_and_norm(tokens):
    spec = MoESpec(num_experts=12, top_k=3, intermediate_size=8)
    _, x, _, _ = routed(tokens, 40, spec, seed=tokens)
    g = torch.Generator().manual_seed(99)
    router = Router(40, spec, 1e-6)
    norm = RMSNorm(40, 1e-6)
    with torch.no_grad():
        for t in (router.proj.weight, router.scale, router.per_expert_scale, norm.weight):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        got = moe_route(x, router, norm)
        want = moe_route_torch(x, router, norm)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    assert got[2].dtype == torch.int32 and got[2].tolist() == want[2].tolist()


def test_combine_sums_the_rows_and_adds_both_norms():
    g = torch.Generator().manual_seed(5)
    mlp, rows = torch.randn(4, 24, generator=g), torch.randn(4, 3, 24, generator=g)
    w1, w2 = torch.rand(24, generator=g), torch.rand(24, generator=g)
    want = moe_combine_torch(mlp, rows, w1, w2, 1e-6)
    torch.testing.assert_close(moe_combine(mlp, rows, w1, w2, 1e-6), want, atol=1e-5, rtol=1e-5)
    rows_total = rows.sum(dim=1)
    assert torch.allclose(want, mlp * torch.rsqrt(mlp.pow(2).mean(-1, keepdim=True) + 1e-6) * w1
                          + rows_total * torch.rsqrt(rows_total.pow(2).mean(-1, keepdim=True) + 1e-6) * w2, atol=1e-5)
    with pytest.raises(ValueError, match="contiguous rows"):
        moe_combine(mlp, rows.transpose(0, 1), w1, w2, 1e-6)


def test_combine_tail_is_the_combination_then_the_residual_norm():
    """One launch for a MoE layer's end: the same bits as `moe_combine` then `residual_norm`."""
    g = torch.Generator().manual_seed(6)
    mlp, rows, h = torch.randn(4, 24, generator=g), torch.randn(4, 3, 24, generator=g), torch.randn(4, 24, generator=g)
    w1, w2, w, nxt = (torch.rand(24, generator=g) + 0.5 for _ in range(4))
    scalar = torch.tensor([0.7])
    got = moe_combine_tail(mlp, rows, w1, w2, 1e-6, h, w, scalar, nxt)
    want = residual_norm(moe_combine(mlp, rows, w1, w2, 1e-6), h, w, 1e-6, scalar, nxt)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    twin = moe_combine_tail_torch(mlp, rows, w1, w2, 1e-6, h, w, scalar, nxt)
    for a, b in zip(got, twin):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        moe_combine_tail(mlp, rows, w1, w2, 1e-6, h[:2], w, scalar, nxt)


@pytest.mark.parametrize("tokens", [1, 5, 23])
def test_interpreted_kernels_match_the_twin(tokens):
    spec = MoESpec(num_experts=8, top_k=3, intermediate_size=24)
    experts, x, weights, chosen = routed(tokens, 40, spec, seed=tokens)
    with torch.no_grad():
        want = experts(x, weights, chosen)
        got = moe_experts(x, weights, chosen, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_no_tokens_and_a_clear_error_off_the_kernel_path(monkeypatch):
    spec = MoESpec(num_experts=4, top_k=2, intermediate_size=8)
    experts, x, weights, chosen = routed(3, 16, spec)
    empty = moe_experts(x[:0], weights[:0], chosen[:0], experts.gate_up_proj, experts.down_proj)
    assert empty.shape == (0, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        moe_experts(x, weights, chosen, experts.gate_up_proj, experts.down_proj)
    with pytest.raises(ValueError, match="CUDA"):
        align_pairs(chosen, 4, 16)


A4B = MoESpec(num_experts=128, top_k=8, intermediate_size=704)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 64, 300])
def test_gpu_26b_a4b_shape_against_the_float32_twin(tokens):
    experts, x, weights, chosen = routed(tokens, 2816, A4B, dtype=torch.bfloat16, device="cuda", seed=tokens)
    with torch.no_grad():
        got = moe_experts(x, weights, chosen, experts.gate_up_proj, experts.down_proj)
        want = experts.float()(x.float(), weights, chosen)
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 8, 32])
def test_gpu_fused_router_product_routes_as_the_cublas_product(tokens, monkeypatch):
    """bf16 at the 26B-A4B shape: the router's product inside the norms' launch (float32 sums
    rounded to bf16) picks the experts the separate product picks, with the same weights; logits
    a rounding apart may swap a near tie, in at most one row here."""
    from gemma4_model.kernels import moe

    spec = A4B
    _, x, _, _ = routed(tokens, 2816, spec, dtype=torch.bfloat16, device="cuda", seed=tokens)
    g = torch.Generator().manual_seed(7)
    router, norm = Router(2816, spec, 1e-6), RMSNorm(2816, 1e-6)
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(router.proj.weight.shape, generator=g) * 2816**-0.5)
        for t in (router.scale, router.per_expert_scale, norm.weight):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    router, norm = router.to("cuda", torch.bfloat16), norm.to("cuda", torch.bfloat16)
    with torch.no_grad():
        fused = moe_route(x, router, norm)
        monkeypatch.setattr(moe, "FUSED_ROUTER_MAX_ROWS", 0)
        separate = moe_route(x, router, norm)
    assert torch.equal(fused[0], separate[0])
    same = (fused[2] == separate[2]).all(dim=1)
    assert int((~same).sum()) <= 1, (fused[2], separate[2])
    torch.testing.assert_close(fused[1][same], separate[1][same], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_replayed_in_a_graph_for_any_routing():
    """A fixed token count, new routing at each replay: the captured launches give the eager result."""
    experts, x, weights, chosen = routed(16, 2816, A4B, dtype=torch.bfloat16, device="cuda")
    static = [t.clone() for t in (x, weights, chosen)]
    with torch.no_grad():
        moe_experts(*static, experts.gate_up_proj, experts.down_proj)  # compile first
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe_experts(*static, experts.gate_up_proj, experts.down_proj)
        for seed in (1, 2):
            _, x2, w2, c2 = routed(16, 2816, A4B, dtype=torch.bfloat16, device="cuda", seed=seed)
            for buf, value in zip(static, (x2, w2, c2)):
                buf.copy_(value)
            graph.replay()
            torch.testing.assert_close(out, moe_experts(x2, w2, c2, experts.gate_up_proj, experts.down_proj))

"""The grouped-GEMM experts (`kernels.moe`) against their twin, `layers.Experts.forward`."""

from __future__ import annotations

import pytest
import torch

from gemma4_model.config import MoESpec
from gemma4_model.kernels.moe import align_pairs, moe_experts
from gemma4_model.layers import Experts, Router


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


@pytest.mark.parametrize("tokens,block_m", [(1, 16), (13, 4), (40, 16)])
def test_pairs_are_sorted_by_expert_in_whole_blocks(tokens, block_m):
    chosen = torch.randint(0, 6, (tokens, 3), generator=torch.Generator().manual_seed(tokens))
    slot_pairs, block_experts = align_pairs(chosen, 6, block_m)
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

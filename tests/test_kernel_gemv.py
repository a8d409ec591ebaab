"""The small-M matrix-product kernels (`kernels.gemv`) against their twins: in Triton's interpreter
on CPU (float32, small ragged shapes, split and unsplit K), on the device in the `gpu` tests
(bf16 at the E4B and 26B-A4B decode shapes, a captured graph's replays, one compiled variant for
every batch size); and a CPU smoke test of bench/gemv_sweep.py's shapes and tile pruning."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.bench_scripts import load_bench
from gemma4_model.kernels import fused, gemv
from gemma4_model.kernels.gemv import (
    DEFAULT_TILES, GemvTiles, default_tiles, heuristic_tiles, small_m_gate_up_gelu, small_m_gate_up_gelu_torch,
    small_m_linear, small_m_linear_torch, tiles_bucket,
)
from gemma4_model.kernels.fused import (KVWrite, SplitSums, head_norm_rope, head_norm_rope_torch, residual_norm,
                                        residual_norm_torch)
from gemma4_model.layers import MLP
from test_kernel_moe_compile import _ptxas, compile_in_subprocess


def rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def case(m, n, k, dtype=torch.float32, device="cpu", seed=0):
    """x [m, k] and a weight [n, k] scaled so that the products are about unit size."""
    return rand(m, k, dtype=dtype, device=device, seed=seed), rand(n, k, dtype=dtype, device=device, seed=seed + 1,
                                                                 scale=k**-0.5)


# N not a multiple of block_n, K not a multiple of block_k (or of the split), splits of 1, 2, 3
INTERPRETED = [
    (40, 72, GemvTiles(16, 32, 1)),
    (40, 72, GemvTiles(8, 16, 3)),  # 5 chunks in splits of 2, 2 and 1, the last ragged
    (33, 64, GemvTiles(16, 32, 2)),  # K whole chunks, split in two
    (24, 48, None),  # the defaults (the heuristic, for float32)
    (40, 72, GemvTiles(8, 16, 3, tma=True)),  # tensor-descriptor loads: zeros past K, rows and N
    (33, 64, GemvTiles(16, 32, 2, tma=True)),
    (40, 70, GemvTiles(16, 32, 1, tma=True)),  # rows of 280 bytes, not 16-byte aligned: the gathering loads
    # the first weight chunks loaded ahead (of the wait, where launches are dependent), then the loop: a
    # split of one chunk (the last of 8-16-3's; a second early chunk past it), K ragged, by either kernel
    (40, 72, GemvTiles(8, 16, 3, early_chunks=1)),
    (40, 72, GemvTiles(8, 16, 3, tma=True, early_chunks=1)),
    (40, 70, GemvTiles(16, 32, 1, early_chunks=1)),
    (40, 72, GemvTiles(8, 16, 3, early_chunks=2)),
    (40, 72, GemvTiles(8, 16, 3, tma=True, early_chunks=2)),
    (33, 64, GemvTiles(16, 16, 2, tma=True, early_chunks=2)),  # two chunks a split: the loop runs none
    (40, 70, GemvTiles(16, 16, 1, early_chunks=2)),
]


@pytest.mark.parametrize("n,k,tiles", INTERPRETED)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_linear_matches_the_twin(m, n, k, tiles):
    x, w = case(m, n, k, seed=m)
    got = small_m_linear(x, w, tiles)
    assert got.shape == (m, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, small_m_linear_torch(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,k,tiles", INTERPRETED)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gate_up_gelu_matches_the_twin(m, n, k, tiles):
    x, w = case(m, 2 * n, k, seed=m)
    got = small_m_gate_up_gelu(x, w, tiles)
    assert got.shape == (m, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, small_m_gate_up_gelu_torch(x, w), atol=1e-5, rtol=1e-5)


def test_the_gate_up_twin_is_the_mlp():
    """The twin on the MLP's packed weight, then down_proj, is MLP.forward; and so is the kernel."""
    mlp = MLP(24, 20)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(rand(*p.shape, seed=p.numel(), scale=p.shape[1]**-0.5))
    x = rand(3, 24, seed=9)
    with torch.no_grad():
        want = mlp(x)
        packed = mlp.packed_gate_up()
        torch.testing.assert_close(mlp.down_proj(small_m_gate_up_gelu_torch(x, packed)), want)
        torch.testing.assert_close(mlp.down_proj(small_m_gate_up_gelu(x, packed, GemvTiles(8, 16, 2))), want,
                                   atol=1e-5, rtol=1e-5)


def test_strided_rows_and_weight_views():
    """x rows with a longer stride (a slice of a wider buffer) and a weight that is a row block of
    a packed one (as q_proj's weight is of the packed qkv)."""
    wide = rand(4, 80, seed=3)
    x = wide[:, :56]
    packed = rand(50, 56, seed=4, scale=56**-0.5)
    w = packed[10:37]
    assert x.stride(0) == 80 and w.storage_offset() == 10 * 56
    torch.testing.assert_close(small_m_linear(x, w, GemvTiles(8, 16, 2)), small_m_linear_torch(x, w),
                               atol=1e-5, rtol=1e-5)


def test_splits_agree_and_repeat_exactly():
    x, w = case(6, 40, 136)
    outs = [small_m_linear(x, w, GemvTiles(16, 16, s)) for s in (1, 2, 4, 9)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(small_m_linear(x, w, GemvTiles(16, 16, 4)), outs[2])  # deterministic


@pytest.mark.parametrize("tiles", [GemvTiles(8, 16, 3), GemvTiles(16, 32, 2, tma=True), GemvTiles(8, 16, 1)],
                         ids=["three", "tma", "one"])
def test_splits_added_in_the_norms_launch(tiles, monkeypatch):
    """`keep_splits` (TANDEM_SPLITS_IN_NORM_ROWS): the product's K splits left as `SplitSums` and added
    by `residual_norm` / `head_norm_rope` in their launch, no reduction launch between: the chain's
    results exactly, through `decode_linear_norm` / `decode_qkv_norm_rope` too; the twins take
    `SplitSums` as their total."""
    x, w = case(5, 40, 72, seed=13)
    residual, weight, next_weight = rand(5, 40, seed=14), rand(40, seed=15), rand(40, seed=16)
    scalar = torch.tensor([0.75])
    product = small_m_linear(x, w, tiles)
    want = residual_norm(product, residual, weight, 1e-6, scalar, next_weight)
    heads, kv_heads, d = 1, 1, 16
    cos, sin, wq, wk = rand(5, d, seed=17), rand(5, d, seed=18), rand(d, seed=19), rand(d, seed=20)
    slots = torch.tensor([4, 9, 0, 33, 12])

    def qkv(fn):  # 32 columns: one q head and one K head (V is K)
        kv = KVWrite(wk, kv_heads, True, torch.zeros(40, kv_heads, d), torch.zeros(40, kv_heads, d), slots)
        return fn(x, w[:32], heads, d, wq, cos, sin, 1e-6, kv), kv.k_cache, kv.v_cache

    want_qkv = qkv(lambda x, w, *args: head_norm_rope(small_m_linear(x, w, tiles), *args))
    with monkeypatch.context() as patch:
        patch.setattr(gemv, "_split_reduce_kernel", None)  # no reduction launch
        for _ in range(2):
            kept = small_m_linear(x, w, tiles, keep_splits=True)
            assert isinstance(kept, SplitSums) == (tiles.split_k > 1)
            got = residual_norm(kept, residual, weight, 1e-6, scalar, next_weight)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            got = qkv(lambda x, w, *args: head_norm_rope(small_m_linear(x, w, tiles, keep_splits=True), *args))
            for a, b in zip(got, want_qkv):
                assert torch.equal(a, b)
        patch.setattr(gemv, "SPLITS_IN_NORM_ROWS", gemv.MAX_ROWS)
        patch.setattr(gemv, "_decode_kernels", lambda x: True)  # (else CUDA tensors only)
        patch.setattr(gemv, "_decode_tiles", lambda kind, w: tiles)
        kept = gemv.decode_linear(x, w, norm_next=True)  # for a norm that adds the splits
        assert isinstance(kept, SplitSums) == (tiles.split_k > 1)
        torch.testing.assert_close(fused._plain(kept), product, atol=1e-6, rtol=1e-6)
        got = gemv.decode_linear_norm(x, w, residual, weight, 1e-6, scalar, next_weight)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for a, b in zip(qkv(gemv.decode_qkv_norm_rope), want_qkv):
            assert torch.equal(a, b)
    parts = torch.stack([small_m_linear_torch(x[:, :40], w[:, :40]), small_m_linear_torch(x[:, 40:], w[:, 40:])])
    sums = SplitSums(parts, torch.float32)
    assert sums.shape == (5, 40) and torch.equal(sums.total(), parts[0] + parts[1])
    monkeypatch.setattr(fused, "_use_kernel", lambda t: False)  # the twins
    twin = residual_norm_torch(sums.total(), residual, weight, 1e-6, scalar, next_weight)
    got = residual_norm(sums, residual, weight, 1e-6, scalar, next_weight)
    assert torch.equal(got[0], twin[0]) and torch.equal(got[1], twin[1])
    assert torch.equal(head_norm_rope(SplitSums(parts[:, :, :32], torch.float32), 2, d, wq, cos, sin, 1e-6),
                       head_norm_rope_torch(parts[:, :, :32].sum(0), 2, d, wq, cos, sin, 1e-6))


def test_no_rows_no_k_and_clear_errors(monkeypatch):
    x, w = case(3, 24, 32)
    assert small_m_linear(x[:0], w).shape == (0, 24)
    assert small_m_gate_up_gelu(x[:0], w).shape == (0, 12)
    assert torch.equal(small_m_linear(x[:, :0], w[:, :0]), torch.zeros(3, 24))
    with pytest.raises(ValueError, match="at most 16 rows"):
        small_m_linear(rand(17, 32), w)
    with pytest.raises(ValueError, match="at most 16 rows"):
        small_m_gate_up_gelu(rand(17, 32), w)
    with pytest.raises(ValueError, match="one dtype"):
        small_m_linear(x, w.double())
    with pytest.raises(ValueError, match=r"x \[M, K\]"):
        small_m_linear(x, w[:, :16])
    with pytest.raises(ValueError, match="unit column stride"):
        small_m_linear(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="packed"):
        small_m_gate_up_gelu(x, w[:23])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        small_m_linear(x, w)
    with pytest.raises(ValueError, match="CUDA"):
        small_m_gate_up_gelu(x, w)


def test_tma_tiles_take_the_descriptor_kernel_where_the_strides_allow(monkeypatch):
    from gemma4_model.kernels import gemv

    class Refused:
        def __getitem__(self, grid):
            raise AssertionError("the gathering kernel ran")

    monkeypatch.setattr(gemv, "_gemv_kernel", Refused())
    tiles = GemvTiles(16, 32, 2, tma=True)
    x, w = case(3, 40, 64)
    torch.testing.assert_close(small_m_linear(x, w, tiles), small_m_linear_torch(x, w), atol=1e-5, rtol=1e-5)
    x, w = case(3, 40, 70)  # rows of 280 bytes
    with pytest.raises(AssertionError, match="gathering kernel ran"):
        small_m_linear(x, w, tiles)


def test_tiles_validation_and_defaults():
    for bad in (dict(block_n=12, block_k=64), dict(block_n=4, block_k=64), dict(block_n=16, block_k=8),
                dict(block_n=16, block_k=64, split_k=0), dict(block_n=16, block_k=64, num_warps=3),
                dict(block_n=16, block_k=64, prefetch_k=96), dict(block_n=16, block_k=64, prefetch_k=-64),
                dict(block_n=16, block_k=512, tma=True), dict(block_n=16, block_k=64, early_chunks=3)):
        with pytest.raises(ValueError, match="GemvTiles"):
            GemvTiles(**bad)
    for (kind, rows, k), tiles in DEFAULT_TILES.items():
        assert kind in ("linear", "gate_up") and tiles_bucket(rows, k) == (rows, k)
        assert default_tiles(kind, rows, k) is tiles
    assert default_tiles("linear", 262144, 2560) == DEFAULT_TILES[("linear", 262144, 4096)]
    assert default_tiles("gate_up", 20480, 2560) == DEFAULT_TILES[("gate_up", 32768, 4096)]
    assert default_tiles("linear", 100, 100) == heuristic_tiles("linear", 100, 100)
    assert default_tiles("linear", 262144, 2560, torch.float32) == heuristic_tiles("linear", 262144, 2560, 4)
    lm_head = heuristic_tiles("linear", 262144, 2560)
    assert lm_head.block_n == 64 and lm_head.split_k == 1
    small = heuristic_tiles("linear", 256, 2560)  # few columns: K split to fill the chip
    assert small.block_n == 16 and small.split_k == 4
    with pytest.raises(ValueError, match="unknown kernel"):
        default_tiles("down", 8, 8)


def _compiled(kernel) -> set:
    """The keys of the variants of a Triton kernel compiled in this process, on any device."""
    return {key for binder in kernel.device_caches.values() for key in binder[0]}


# ---- bench/gemv_sweep.py, without a device --------------------------------------------------------------


def test_sweep_shapes_and_pruned_tiles():
    sweep = load_bench("gemv_sweep")
    shapes = {(s.model, s.name): s for s in sweep.model_shapes(["e4b", "26b_a4b"])}
    want = {("e4b", "qkv_sliding"): (3072, 2560, 20), ("e4b", "q_sliding_kv_shared"): (2048, 2560, 15),
            ("e4b", "qkv_full"): (6144, 2560, 4), ("e4b", "o_proj_full"): (2560, 4096, 7),
            ("e4b", "mlp_gate_up"): (20480, 2560, 42), ("e4b", "mlp_down"): (2560, 10240, 42),
            ("e4b", "ple_gate"): (256, 2560, 42), ("e4b", "ple_projection"): (2560, 256, 42),
            ("e4b", "ple_model_projection"): (10752, 2560, 1), ("e4b", "lm_head"): (262144, 2560, 1),
            ("26b_a4b", "qkv_sliding"): (8192, 2816, 25), ("26b_a4b", "qkv_full"): (9216, 2816, 5),
            ("26b_a4b", "mlp_gate_up"): (4224, 2816, 30), ("26b_a4b", "mlp_down"): (2816, 2112, 30),
            ("26b_a4b", "router"): (128, 2816, 30), ("26b_a4b", "lm_head"): (262144, 2816, 1)}
    for key, (rows, k, per_step) in want.items():
        s = shapes[key]
        assert (s.rows, s.k, s.per_step) == (rows, k, per_step), key
    assert sum(s.per_step for s in shapes.values() if s.model == "e4b" and s.name.startswith("o_proj")) == 42
    assert shapes[("e4b", "mlp_gate_up")].kernels == ("linear", "gate_up")
    total = {False: 0, True: 0}
    for s in shapes.values():
        for kind in s.kernels:
            for quick in (False, True):
                tiles = sweep.candidate_tiles(kind, s.rows, s.k, quick)
                assert tiles, (s, kind, quick)
                total[quick] += len(tiles)
                for t in tiles:
                    assert sweep.effective_splits(s.k, t) == t.split_k
                    assert sweep.parse_tiles_name(sweep.tiles_name(t)) == t
                for t in sweep.with_tma(tiles, "1"):
                    assert t.tma and t.block_k <= 256 and sweep.parse_tiles_name(sweep.tiles_name(t)) == t
    assert total[True] < 300 and total[False] < 1300, total  # the sweep's time budget


def test_sweep_summaries():
    sweep = load_bench("gemv_sweep")

    def record(shape, kind, m, cublas, times, per_step=2, gate_up=False):
        names = {n: us for n, us in times.items()}
        best = min((us, n) for n, us in names.items() if n != "default")
        return {"model": "e4b", "shape": shape, "kernel": kind, "packed_gate_up": gate_up, "m": m,
                "per_step": per_step, "bucket": [4096, 4096], "cublas_us": cublas, "times_us": names,
                "best": {"us": best[0], "name": best[1]}}

    a, b = "n16_k256_s2_w4_st3", "n32_k128_s1_w4_st2"
    records = [record("o_proj", "linear", 1, 10.0, {a: 6.0, b: 7.0, "default": 6.5}),
               record("o_proj", "linear", 4, 12.0, {a: 9.0, b: 7.0}),
               record("mlp_gate_up", "linear", 1, 30.0, {a: 20.0}, gate_up=True),
               record("mlp_gate_up", "gate_up", 1, 40.0, {a: 25.0}, gate_up=True)]
    totals = sweep.step_totals(records)
    assert totals["e4b"]["1"] == {"cublas_us": 100.0, "kernels_us": 62.0, "faster_of_both_us": 62.0}
    table = {(row["kernel"], row["name"]) for row in sweep.suggested_table(records)}
    assert table == {("linear", a), ("gate_up", a)}  # a: 2*(6+9+20) = 70 beats b, timed on fewer shapes
    literal = sweep.table_literal(sweep.suggested_table(records[:2]))
    assert literal.strip().startswith("('linear', 4096, 4096): GemvTiles(32, 128, 1, 4, 2)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a device")
def test_sweep_needs_a_device(tmp_path):
    with pytest.raises(SystemExit, match="CUDA"):
        load_bench("gemv_sweep").main(["--out", str(tmp_path / "out.json"), "--quick"])


def test_chain_shapes_and_needing_a_device(tmp_path):
    """bench/gemv_chain.py's chain: each product reads the one before's output (its K no wider),
    four products a layer, the lm_head last; without CUDA it exits saying so."""
    chain = load_bench("gemv_chain")
    weights = chain.chain_weights("e4b", torch.device("meta"), lm_head=True, layers=6)
    assert [kind for kind, _ in weights[:4]] == ["linear", "linear", "gate_up", "linear"] and len(weights) == 25
    width = 2560
    for kind, w in weights:
        assert w.shape[1] <= width
        width = w.shape[0] // 2 if kind == "gate_up" else w.shape[0]
    assert weights[-1][1].shape == (262144, 2560)
    with pytest.raises(SystemExit, match="CUDA"):
        chain.main(["--out", str(tmp_path / "out.json")])


# ---- on the device ------------------------------------------------------------------------------------------

E4B_26B = [(6144, 2560), (2560, 10240), (256, 2560), (2560, 256), (128, 2816), (2816, 8192), (262144, 2560)]


def assert_bf16_close(got, want32, want_bf16=None):
    assert got.dtype == torch.bfloat16
    rel = ((got.float() - want32).norm() / want32.norm()).item()
    assert rel < 1e-2, rel
    if want_bf16 is not None:  # cuBLAS in bf16: the same sums but for their order
        assert ((got.float() - want_bf16.float()).norm() / want_bf16.float().norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", E4B_26B)
def test_gpu_linear_at_real_shapes_against_the_float32_twin(n, k):
    x, w = case(16, n, k, dtype=torch.bfloat16, device="cuda", seed=n)
    w32 = w.float()
    for m in (1, 3, 8, 16):
        for tiles in (None, GemvTiles(16, 256, 4), GemvTiles(32, 128, 1, num_stages=4)):
            got = small_m_linear(x[:m], w, tiles)
            assert_bf16_close(got, small_m_linear_torch(x[:m].float(), w32), small_m_linear_torch(x[:m], w))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,k", [(20480, 2560), (4224, 2816)])
def test_gpu_gate_up_at_real_shapes_against_the_float32_twin(rows, k):
    x, w = case(16, rows, k, dtype=torch.bfloat16, device="cuda", seed=rows)
    w32 = w.float()
    for m in (1, 5, 16):
        for tiles in (None, GemvTiles(16, 256, 2), GemvTiles(32, 256, 1, num_warps=8)):
            got = small_m_gate_up_gelu(x[:m], w, tiles)
            assert_bf16_close(got, small_m_gate_up_gelu_torch(x[:m].float(), w32),
                              small_m_gate_up_gelu_torch(x[:m], w))


@pytest.mark.gpu
def test_gpu_replayed_in_a_graph():
    """Both kernels, split and unsplit (and split with TMA loads), captured for 4 rows; new x at
    each replay gives the eager result exactly (the same kernels, deterministic sums)."""
    x = torch.zeros((4, 2560), dtype=torch.bfloat16, device="cuda")
    _, w = case(4, 2560, 2560, dtype=torch.bfloat16, device="cuda", seed=1)
    _, packed = case(4, 2048, 2560, dtype=torch.bfloat16, device="cuda", seed=2)
    calls = [lambda: small_m_linear(x, w, GemvTiles(16, 256, 4)), lambda: small_m_linear(x, w, GemvTiles(32, 256, 1)),
             lambda: small_m_gate_up_gelu(x, packed, GemvTiles(16, 256, 2)), lambda: small_m_gate_up_gelu(x, packed),
             lambda: small_m_gate_up_gelu(x, packed, GemvTiles(16, 256, 2, tma=True))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compile first
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [call() for call in calls]
    for seed in (5, 6):
        x.copy_(rand(4, 2560, dtype=torch.bfloat16, device="cuda", seed=seed))
        graph.replay()
        for out, call in zip(outs, calls):
            assert torch.equal(out, call())


@pytest.mark.gpu
def test_gpu_dependent_chain_in_a_graph_gives_the_plain_launches_results():
    """A chain of products each reading the one before (as a layer's are), launched
    programmatically dependent with and without the L2 prefetch or the first weight chunk's load
    ahead of the wait, split and unsplit, by either kernel (gathering loads, tensor descriptors),
    captured and replayed: the plain launches' results exactly (the dependent programs read x only
    after the launch before them has finished)."""
    x = torch.zeros((3, 2560), dtype=torch.bfloat16, device="cuda")
    _, w1 = case(3, 3072, 2560, dtype=torch.bfloat16, device="cuda", seed=1)
    _, w2 = case(3, 2560, 2048, dtype=torch.bfloat16, device="cuda", seed=2)
    _, packed = case(3, 20480, 2560, dtype=torch.bfloat16, device="cuda", seed=3)
    _, w3 = case(3, 2560, 10240, dtype=torch.bfloat16, device="cuda", seed=4)

    def chain(dependent, prefetch_k, tma=False, early=0):
        more = dict(prefetch_k=prefetch_k, tma=tma, early_chunks=early)
        h = small_m_linear(x, w1, GemvTiles(64, 256, 2, **more), dependent=dependent)
        h = small_m_linear(h[:, :2048], w2, GemvTiles(32, 256, 1, **more), dependent=dependent)
        h = small_m_gate_up_gelu(h, packed, GemvTiles(32, 256, 1, **more), dependent=dependent)
        return small_m_linear(h, w3, GemvTiles(64, 128, 4, **more), dependent=dependent)

    variants = [(False, 0), (True, 0), (True, 1024), (True, 16384), (True, 0, False, 1), (True, 0, False, 2)]
    if fused.tma_capable(x):
        variants += [(False, 0, True), (True, 0, True), (True, 512, True), (True, 16384, True), (True, 0, True, 1),
                     (True, 0, True, 2)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for v in variants:
            chain(*v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [chain(*v) for v in variants]
    for seed in (7, 8):
        x.copy_(rand(3, 2560, dtype=torch.bfloat16, device="cuda", seed=seed))
        graph.replay()
        want = chain(False, 0)
        assert want.abs().sum() > 0
        for out in outs:
            assert torch.equal(out, want)


@pytest.mark.gpu
def test_gpu_batches_of_any_size_reuse_the_compiled_kernels():
    """Every row count 1..16 runs the variants compiled for the first (each compile stalls a
    server's engine for about a second)."""
    kernels = (gemv._gemv_kernel, gemv._split_reduce_kernel)
    x, w = case(16, 2560, 2048, dtype=torch.bfloat16, device="cuda")
    _, packed = case(16, 4224, 2816, dtype=torch.bfloat16, device="cuda")
    x2 = rand(16, 2816, dtype=torch.bfloat16, device="cuda")

    def run(m):
        small_m_linear(x[:m], w, GemvTiles(16, 256, 2))
        small_m_linear(x[:m], w, GemvTiles(16, 256, 1))
        small_m_gate_up_gelu(x2[:m], packed, GemvTiles(16, 256, 2))

    run(1)
    before = [_compiled(k) for k in kernels]
    for m in range(2, 17):
        run(m)
    assert [_compiled(k) for k in kernels] == before


# ---- the tensor-descriptor kernel for Hopper, without a device --------------------------------------------

TMA_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench.attention_registers import ptxas_usage
from gemma4_model.kernels.gemv import _gemv_tma_kernel as kernel

def build(gate_up, partial, block_n=32, stages=4, prefetch=0, early=0):
    const = dict(BLOCK_N=block_n, BLOCK_K=256, GATE_UP=gate_up, PARTIAL=partial, IEEE=False,
                 PDL=prefetch > 0 or early > 0, PREFETCH_K=prefetch, LINE=64, EARLY=early)
    types = {a: "constexpr" if a in const else "tensordesc<bf16[16,256]>" if a == "x_desc"
             else f"tensordesc<bf16[{block_n},256]>" if a == "w_desc" else "*fp32" if a == "part_ptr"
             else "*bf16" if a.endswith("_ptr") else "i32" for a in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names) if a in ("out_ptr", "part_ptr")}
    compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=const, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    return {"tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), "mma": "mma" in ptx,
            "l2_prefetch_before_wait": ptx.find("prefetch.global.L2") in range(0, ptx.find("griddepcontrol.wait")),
            "copies_before_wait": len(re.findall(r"cp\.async\.bulk\.tensor", ptx[:max(0, ptx.find("griddepcontrol.wait"))])),
            **ptxas_usage(ptx)}

print(json.dumps({"linear": build(False, False), "split": build(False, True), "gate_up": build(True, False),
                  "prefetch": build(False, True, prefetch=512), "gate_up-prefetch": build(True, False, prefetch=512),
                  "early": build(False, True, early=1), "gate_up-early": build(True, False, early=1),
                  "early2": build(False, True, early=2), "gate_up-early2": build(True, False, early=2)}))
"""


@pytest.mark.skipif(not _ptxas(), reason="this Triton build ships no ptxas to compile for sm_90 with")
def test_tma_gemv_compiles_to_pipelined_tensor_loads():
    """`_gemv_tma_kernel` for sm_90 (bf16, 32 columns by 256-column chunks, four stages): its x and
    weight chunks are bulk tensor copies, pipelined (more copies than one chunk's), on the tensor
    cores, nothing spilled; gate|up issues more (the up rows' chunks)."""
    got = compile_in_subprocess(TMA_SCRIPT)
    for variant in got.values():
        assert variant["tma_loads"] > 2 and variant["mma"] and variant["spill_store_bytes"] == 0, got
    assert got["gate_up"]["tma_loads"] > got["linear"]["tma_loads"], got
    # dependent with TANDEM_GEMV_PREFETCH_K: the weight rows' L2 requests come before the wait
    assert got["prefetch"]["l2_prefetch_before_wait"] and got["gate_up-prefetch"]["l2_prefetch_before_wait"], got
    assert not got["linear"]["l2_prefetch_before_wait"], got
    # with TANDEM_GEMV_EARLY_CHUNKS the first weight chunks' copies (gate and up rows) are issued before the wait
    assert got["early"]["copies_before_wait"] >= 1 and got["gate_up-early"]["copies_before_wait"] >= 2, got
    assert got["early2"]["copies_before_wait"] >= 2 and got["gate_up-early2"]["copies_before_wait"] >= 4, got
    assert got["prefetch"]["copies_before_wait"] == 0 and got["gate_up-prefetch"]["copies_before_wait"] == 0, got


def test_early_chunks_switch_is_checked_at_import():
    """TANDEM_GEMV_EARLY_CHUNKS is read once, at import: 0 to 2 are taken, anything else stops the
    import with a message naming the switch (not a tiles error at the first decode step)."""
    import os
    import subprocess
    import sys

    def imported(value):
        env = {**os.environ, "TANDEM_GEMV_EARLY_CHUNKS": value}
        return subprocess.run([sys.executable, "-c", "import gemma4_model.kernels.gemv as g; print(g.EARLY_CHUNKS)"],
                              env=env, capture_output=True, text=True, timeout=120)

    assert imported("2").stdout.strip() == "2"
    bad = imported("3")
    assert bad.returncode != 0 and "TANDEM_GEMV_EARLY_CHUNKS takes 0, 1 or 2, got 3" in bad.stderr


def test_decode_tiles_load_through_descriptors_only_where_tma_is(monkeypatch):
    """TANDEM_GEMV_TMA picks the TMA kernel's tiles only on a device with TMA (`fused.tma_capable`);
    elsewhere the gathering kernel's, with the prefetch setting."""
    w = torch.zeros(2560, 2048, dtype=torch.bfloat16)
    monkeypatch.setattr(gemv, "TMA_ON", True)
    monkeypatch.setattr(gemv, "PREFETCH_K", 512)
    monkeypatch.setattr(gemv, "EARLY_CHUNKS", 2)
    assert gemv._decode_tiles("linear", w).tma and gemv._decode_tiles("linear", w).prefetch_k == 512
    assert gemv._decode_tiles("linear", w).early_chunks == 2
    monkeypatch.setattr(gemv, "tma_capable", lambda t: False)
    tiles = gemv._decode_tiles("linear", w)
    assert not tiles.tma and tiles == replace(gemv.default_tiles("linear", 2560, 2048, w.dtype),
                                              prefetch_k=gemv.PREFETCH_K, early_chunks=2)

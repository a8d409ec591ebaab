"""bench/mtp_speed.py in its CPU smoke mode (tiny configs, float32): every part runs and writes
sensible records; and the random-weight builders it uses (`gemma4_model/random_weights.py`)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from gemma4_model.config import parse_config
from gemma4_model.drafter import DrafterMismatchError
from gemma4_model.layers import RMSNorm, RotaryEmbedding
from gemma4_model.random_checkpoint import tiny_config
from gemma4_model.random_weights import random_drafter, random_text_decoder
from tests.bench_scripts import load_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_bench("mtp_speed")
    out = tmp_path_factory.mktemp("mtp") / "mtp.json"
    returned = bench.main(["--smoke", "--out", str(out), "--commit", "abc1234"])
    return bench, json.loads(out.read_text()), returned


def by_part(doc, part):
    return [r for r in doc["records"] if r["part"] == part]


def test_the_file_holds_every_record_with_its_header(smoke):
    _, doc, returned = smoke
    assert doc["records"] == returned["records"]
    for record in doc["records"]:
        assert record["command"].startswith("python bench/mtp_speed.py --smoke")
        assert record["commit"] == "abc1234" and record["device"] == "cpu" and record["dtype"] == "float32"
        assert record["torch"] == torch.__version__ and record["shapes"]["layers"] > 0
    assert {r["part"] for r in doc["records"]} == {"verify", "default", "oracle"}


def test_verify_curve_for_every_shape_and_batch(smoke):
    bench, doc, _ = smoke
    records = by_part(doc, "verify")
    assert sorted((r["model"], r["shapes"]["batch"]) for r in records) == sorted(
        (m, b) for m in ("e4b", "26b_a4b", "31b") for b in (1, 2))
    for r in records:
        assert r["plain_ms"] > 0 and r["plain_floor_ms"] > 0 and r["shapes"]["context"] == 24
        assert [c["k"] for c in r["curve"]] == list(range(1, 8))
        assert "EXCLUDED" in r["note"]
        for c in r["curve"]:
            assert c["verify_ms"] > 0 and c["draft_ms"] > 0
            assert c["ratio"] == pytest.approx(c["verify_ms"] / r["plain_ms"], rel=1e-3)
            for a in ("0.6", "0.8", "0.9"):
                e = bench.expected_tokens(float(a), c["k"])
                assert c["implied_speedup"][a] == pytest.approx(e / c["ratio"], rel=1e-2)
                assert c["implied_speedup_with_draft"][a] < c["implied_speedup"][a]
    moe = [r for r in records if r["model"] == "26b_a4b"]
    assert all(r["shapes"]["moe"] == {"experts": 8, "top_k": 2} for r in moe)


def test_default_model_with_its_assistant_is_identical_and_accepts_most_drafts(smoke):
    records = by_part(smoke[1], "default")
    assert sorted((r["batch"], r["k"]) for r in records) == [(1, 3), (1, 5), (2, 3), (2, 5)]
    for r in records:
        assert r["identical_to_plain"] is True and r["identical_sequences"] == r["sequences"] == r["prompts"]
        spec, plain = r["speculative"], r["plain"]
        assert spec["output_tokens"] == plain["output_tokens"]
        assert spec["acceptance_rate"] > 0.5 and spec["mean_accept_length"] > 1
        assert plain["drafted_tokens"] == 0 and spec["drafted_tokens"] > 0
        assert spec["steps"] < plain["steps"]
        assert spec["tpot_ms_mean"] > 0 and spec["tpot_ms_token_weighted"] > 0 and plain["output_tokens_per_s"] > 0
        assert r["tpot_speedup"] == pytest.approx(plain["tpot_ms_mean"] / spec["tpot_ms_mean"], rel=1e-2)


def test_oracle_accepts_every_draft_and_keeps_the_output(smoke):
    records = by_part(smoke[1], "oracle")
    assert sorted((r["batch"], r["k"]) for r in records) == [(1, 4), (1, 5), (2, 4), (2, 5)]
    for r in records:
        assert r["drafter"] == "oracle drafter: proposes the target's own greedy tokens"
        assert {p["model"] for p in r["published"]} == {"gemma-4-12B-it", "gemma-4-26B-A4B-it"}
        spec, plain = r["speculative"], r["plain"]
        assert r["identical_to_plain"] is True and spec["acceptance_rate"] == 1.0
        assert plain["output_tokens"] == r["prompts"] * 12
        # 12 tokens in steps of up to k+1: the prefill's token, then ceil(11 / (k+1)) verify steps
        assert plain["steps"] == 12 and spec["steps"] == 1 + -(-11 // (r["k"] + 1))


def test_parts_and_models_are_selectable(tmp_path):
    bench = load_bench("mtp_speed")
    out = tmp_path / "one.json"
    doc = bench.main(["--smoke", "--parts", "verify", "--models", "31b", "--batches", "1", "--max-k", "2",
                      "--out", str(out)])
    assert [(r["part"], r["model"], [c["k"] for c in r["curve"]]) for r in doc["records"]] == [("verify", "31b", [1, 2])]
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--parts", "nope", "--out", str(out)])


def test_random_decoder_is_seeded_in_dtype_with_unit_norms_and_real_rope():
    cfg = parse_config(tiny_config("e4b").to_dict()).text
    a = random_text_decoder(cfg, "cpu", torch.bfloat16, seed=3)
    b = random_text_decoder(cfg, "cpu", torch.bfloat16, seed=3)
    c = random_text_decoder(cfg, "cpu", torch.bfloat16, seed=4, post_norm_scale=0.5)
    residual = ("post_attention_layernorm", "post_feedforward_layernorm", "post_per_layer_input_norm")
    norms = {f"{name}.weight": name.rsplit(".", 1)[-1] in residual
             for name, m in a.named_modules() if isinstance(m, RMSNorm) and m.weight is not None}
    assert sum(norms.values()) == 3 * cfg.num_layers
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert pa.dtype == torch.bfloat16 and torch.equal(pa, pb), name
        if name in norms:
            assert bool((pa == 1).all()) and bool((pc == (0.5 if norms[name] else 1.0)).all()), name
        else:
            assert not torch.equal(pa, pc) and 0.015 < float(pa.detach().float().std()) < 0.025, name
    for name, spec in cfg.rope.items():
        torch.testing.assert_close(a.rotary[name].inv_freq, RotaryEmbedding(spec).inv_freq)
    assert all(bool((layer.layer_scalar == 1).all()) for layer in a.layers)


def test_random_drafter_permutes_its_centroid_ordering_and_refuses_a_misfit():
    bench = load_bench("mtp_speed")
    raw = tiny_config("e4b").to_dict()
    target = parse_config(raw).text
    assistant = parse_config(bench.tiny_assistant_raw(target, raw["text_config"]))
    model = random_text_decoder(target, "cpu", torch.float32)
    drafter = random_drafter(assistant, target, model.embed, "cpu", torch.float32, seed=1)
    ordering = drafter.masked_embedding.token_ordering
    assert sorted(ordering.tolist()) == list(range(target.vocab_size)) and ordering.tolist() != sorted(ordering.tolist())
    wide = parse_config({**bench.tiny_assistant_raw(target, raw["text_config"]), "backbone_hidden_size": 32})
    with pytest.raises(DrafterMismatchError):
        random_drafter(wide, target, model.embed, "cpu", torch.float32)

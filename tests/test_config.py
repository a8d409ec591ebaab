"""config.json of every variant into typed configs; bad configs name the offending field."""

import copy
import json
from pathlib import Path

import pytest

from gemma4_model.config import FULL, SLIDING, ConfigError, load_config, parse_config

BASE = {
    "model_type": "gemma4_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "global_head_dim": 16, "sliding_window": 8, "num_kv_shared_layers": 2,
    "layer_types": [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
}


def test_layer_facts_and_kv_owners():
    text = parse_config(BASE).text
    assert [l.layer_type for l in text.layers] == BASE["layer_types"]
    assert [l.head_dim for l in text.layers] == [8, 8, 16, 8, 8, 16]
    assert [l.kv_owner for l in text.layers] == [0, 1, 2, 3, 3, 2]
    assert [l.owns_kv for l in text.layers] == [True] * 4 + [False] * 2
    assert text.first_shared_layer == 4
    assert text.last_kv_owner(SLIDING) == 3 and text.last_kv_owner(FULL) == 2
    assert text.layers[0].sliding_window == 8 and text.layers[2].sliding_window is None
    assert text.kv_bytes_per_token(2) == {SLIDING: 3 * 2 * 2 * 8 * 2, FULL: 2 * 2 * 16 * 2}


def test_per_layer_config_spelling_matches_global_fields():
    written = dict(BASE)
    del written["global_head_dim"]
    written["per_layer_config"] = {"2": {"head_dim": 16}, "5": {"head_dim": 16}}
    assert parse_config(written).text.layers == parse_config(BASE).text.layers


def test_k_eq_v_global_kv_heads_and_double_wide_mlp():
    raw = dict(BASE, attention_k_eq_v=True, num_global_key_value_heads=1, use_double_wide_mlp=True)
    text = parse_config(raw).text
    assert [l.num_kv_heads for l in text.layers] == [2, 2, 1, 2, 2, 1]
    assert [l.k_eq_v for l in text.layers] == [False, False, True, False, False, True]
    assert [l.intermediate_size for l in text.layers] == [64] * 4 + [128] * 2


def test_rope_variants():
    text = parse_config(BASE).text
    full = text.rope[FULL].inverse_frequencies()
    assert len(full) == 8 and full[2:] == [0.0] * 6  # 0.25 of 16 dims rotate: 2 angle pairs
    assert len(text.rope[SLIDING].inverse_frequencies()) == 4


def test_conditional_config_nests_text_and_keeps_encoders():
    raw = {"model_type": "gemma4", "text_config": dict(BASE), "vision_config": {"hidden_size": 8},
           "audio_config": None, "image_token_id": 258880}
    cfg = parse_config(raw)
    assert cfg.text.num_layers == 6 and cfg.vision == {"hidden_size": 8} and cfg.audio is None
    assert cfg.special_tokens["image_token_id"] == 258880


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"layer_types": [SLIDING] * 5}, "layer_types"),
        ({"layer_types": ["local"] * 6}, "layer_types"),
        ({"num_kv_shared_layers": 6}, "num_kv_shared_layers"),
        ({"num_kv_shared_layers": 4}, "num_kv_shared_layers"),  # a full layer shares but none owns KV before
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
        ({"rope_parameters": {SLIDING: {"rope_type": "yarn"}, FULL: {}}}, "rope_parameters.sliding_attention.rope_type"),
        ({"enable_moe_block": True, "num_experts": 4}, "top_k_experts"),
        ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 8, "moe_intermediate_size": 8}, "top_k_experts"),
        ({"hidden_size": "big"}, "hidden_size"),
        ({"per_layer_config": {"9": {"head_dim": 4}}}, "per_layer_config"),
        ({"use_bidirectional_attention": "sometimes"}, "use_bidirectional_attention"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_bad_configs_name_the_field(change, field):
    raw = copy.deepcopy(BASE)
    raw.update(change)
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.field == field and field in str(err.value)


def test_missing_and_corrupt_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4"}))
    with pytest.raises(ConfigError, match="text_config"):
        load_config(tmp_path)


FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"


@pytest.mark.parametrize(
    "name, layers, owners, first_shared, kv_heads, ple, moe",
    [
        ("gemma-4-E2B-it", 35, 15, 15, (1, 1), 256, False),
        ("gemma-4-E4B-it", 42, 24, 24, (2, 2), 256, False),
        ("gemma-4-26B-A4B-it", 30, 30, 30, (8, 2), 0, True),
        ("gemma-4-31B-it", 60, 60, 60, (16, 4), 0, False),
        ("gemma-4-12B-it", 48, 48, 48, (8, 1), 0, False),
    ],
)
def test_published_configs(name, layers, owners, first_shared, kv_heads, ple, moe):
    cfg = load_config_file(FIXTURES / f"{name}.json")
    text = cfg.text
    assert text.num_layers == layers and len(text.kv_layers) == owners and text.first_shared_layer == first_shared
    sliding = next(l for l in text.layers if l.layer_type == SLIDING)
    full = next(l for l in text.layers if l.layer_type == FULL)
    assert (sliding.num_kv_heads, full.num_kv_heads) == kv_heads
    assert (sliding.head_dim, full.head_dim) == (256, 512)
    assert text.ple_dim == ple and (text.moe is not None) == moe
    assert text.vocab_size == 262144 and text.final_logit_softcapping == 30.0
    for layer in text.layers:  # every shared layer reads the last owner of its own type
        if not layer.owns_kv:
            assert layer.kv_owner == text.last_kv_owner(layer.layer_type)


@pytest.mark.parametrize("name", ["E2B", "E4B", "26B-A4B", "31B", "12B"])
def test_published_assistant_configs(name):
    cfg = load_config_file(FIXTURES / f"gemma-4-{name}-it-assistant.json")
    assert cfg.is_assistant and not cfg.text.kv_layers
    assert all(layer.kv_owner is None for layer in cfg.text.layers)


def load_config_file(path: Path):
    return parse_config(json.loads(path.read_text()))

"""Loading real-layout checkpoints: prefixes, sharding, dtype, and each bad-checkpoint error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4_model.batch import ForwardBatch, SequenceChunk
from gemma4_model.kv_cache import PagedKVCache
from gemma4_model.loader import load_text_decoder, text_tensor_name
from gemma4_model.random_checkpoint import load_reference, reference_logits, save_tiny_checkpoint
from gemma4_model.weights import (
    CorruptCheckpointError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    UnknownModelTypeError,
)


def test_names_map_text_tensors_and_leave_encoders_alone():
    assert text_tensor_name("model.language_model.layers.3.mlp.up_proj.weight") == "layers.3.mlp.up_proj.weight"
    assert text_tensor_name("model.layers.3.mlp.up_proj.weight") == "layers.3.mlp.up_proj.weight"
    assert text_tensor_name("model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight") is None
    assert text_tensor_name("model.embed_audio.embedding_projection.weight") is None
    assert text_tensor_name("lm_head.weight") == "lm_head.weight"


def test_sharded_checkpoint_loads_in_bfloat16(tmp_path):
    path = save_tiny_checkpoint("e2b", tmp_path / "e2b", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    config, model = load_text_decoder(path, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[0].layer_scalar.dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["12b_unified", "26b_a4b"])
def test_bidirectional_image_spans_match_reference(tiny_checkpoint, variant):
    # Unified: spans see each other on every layer, past the window; Gemma 4: on sliding layers, inside it.
    path = tiny_checkpoint(variant, use_bidirectional_attention="vision")
    config, model = load_text_decoder(path)
    ref = load_reference(path, variant)
    ids = torch.randint(3, 250, (44,), generator=torch.Generator().manual_seed(5)).tolist()
    spans = [0] * 44
    spans[4:11] = [1] * 7
    spans[15:37] = [2] * 22  # longer than the sliding window of 16
    kinds = torch.tensor([[int(s > 0) for s in spans]])
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), mm_token_type_ids=kinds).logits[0]
    causal = reference_logits(ref, ids)
    cache = PagedKVCache(config.text, page_size=4, num_pages=32)
    cache.add_sequence(0, ids)
    cache.extend(0, len(ids))
    batch = ForwardBatch.build([SequenceChunk(0, ids, 0, logits_rows=tuple(range(len(ids))), span_ids=spans)], cache)
    with torch.inference_mode():
        ours = model(batch, cache).logits
    cache.free_sequence(0)
    assert float((ours - expected).norm() / expected.norm()) < 1e-4
    assert float((causal - expected).norm() / expected.norm()) > 1e-2  # the spans really matter


@pytest.fixture()
def checkpoint_copy(tiny_checkpoint, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("31b"), dest)
    return dest


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor(checkpoint_copy):
    _edit_tensors(checkpoint_copy, lambda t: t.pop("model.language_model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match="layers.2.mlp.up_proj.weight"):
        load_text_decoder(checkpoint_copy)


def test_unexpected_tensor(checkpoint_copy):
    _edit_tensors(checkpoint_copy, lambda t: t.update({"model.language_model.layers.2.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(UnexpectedTensorError, match="layers.2.mlp.extra.weight"):
        load_text_decoder(checkpoint_copy)


def test_misshaped_tensor(checkpoint_copy):
    name = "model.language_model.layers.1.self_attn.o_proj.weight"
    _edit_tensors(checkpoint_copy, lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(TensorShapeError, match="o_proj") as err:
        load_text_decoder(checkpoint_copy)
    assert "(3, 3)" in str(err.value)


def test_corrupt_file(checkpoint_copy):
    file = checkpoint_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_text_decoder(checkpoint_copy)


def test_unknown_model_type(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["model_type"] = "gemma3"
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownModelTypeError, match="gemma3"):
        load_text_decoder(checkpoint_copy)

"""Checkpoint tensor loading: round trips, dtype policy, renaming, and one typed error per defect."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gemma4_model.weights import (
    CheckpointError,
    CheckpointFiles,
    CorruptCheckpointError,
    MissingTensorError,
    TensorShapeError,
    UnexpectedTensorError,
    UnknownModelTypeError,
    load_tensors,
    read_model_type,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 8, generator=gen),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen),
        "model.norm.weight": torch.randn(8, generator=gen),
        "model.layer_ids": torch.arange(5, dtype=torch.int64),
    }


def _write_config(directory: Path, model_type: str = "gemma4_text") -> None:
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 8}))


def _single(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    _write_config(directory)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Two shards plus index, the way Hugging Face writes them."""
    _write_config(directory)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(directory / shard))
        weight_map.update({n: shard for n in shard_names})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def _load(directory: Path, expected, **kwargs) -> dict[str, torch.Tensor]:
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("dtype", torch.float32)
    return load_tensors(CheckpointFiles(directory), expected, **kwargs)


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("layout", [_single, _sharded])
def test_round_trip_values_equal(tmp_path, layout):
    tensors = _tensors()
    files = CheckpointFiles(layout(tmp_path, tensors))
    assert files.names() == set(tensors)
    assert files.shape("model.embed_tokens.weight") == (16, 8)
    assert files.dtype("model.layer_ids") == torch.int64
    loaded = load_tensors(files, _shapes(tensors), device="cpu", dtype=torch.float32)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_sharded_index_assigns_files(tmp_path):
    files = CheckpointFiles(_sharded(tmp_path, _tensors()))
    assert [p.name for p in files.files()] == ["model-00001-of-00002.safetensors",
                                               "model-00002-of-00002.safetensors"]
    assert files.file_of("model.norm.weight").name == "model-00002-of-00002.safetensors"


def test_unindexed_shards_are_all_read(tmp_path):
    tensors = _tensors()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:2]}, str(tmp_path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[2:]}, str(tmp_path / "b.safetensors"))
    assert CheckpointFiles(tmp_path).names() == set(tensors)


def test_float_cast_to_bfloat16_int_keeps_dtype(tmp_path):
    tensors = _tensors()
    loaded = _load(_single(tmp_path, tensors), _shapes(tensors), dtype=torch.bfloat16)
    emb = loaded["model.embed_tokens.weight"]
    assert emb.dtype == torch.bfloat16
    assert torch.equal(emb, tensors["model.embed_tokens.weight"].to(torch.bfloat16))
    assert loaded["model.layer_ids"].dtype == torch.int64
    assert torch.equal(loaded["model.layer_ids"], tensors["model.layer_ids"])


def test_accepts_torch_device_object(tmp_path):
    tensors = _tensors()
    loaded = _load(_single(tmp_path, tensors), _shapes(tensors), device=torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_rename_strips_prefix_and_drops_names(tmp_path):
    tensors = _tensors()

    def rename(name):
        if name.startswith("model.layers.1."):
            return None  # "another component": skipped without complaint
        return name.removeprefix("model.")

    expected = {rename(n): s for n, s in _shapes(tensors).items() if rename(n) is not None}
    loaded = _load(_sharded(tmp_path, tensors), expected, rename=rename)
    assert set(loaded) == set(expected)
    assert "layers.1.self_attn.q_proj.weight" not in loaded
    assert torch.equal(loaded["norm.weight"], tensors["model.norm.weight"])


def test_ignore_skips_known_unused_tensor(tmp_path):
    tensors = _tensors()
    unused = "model.layers.0.self_attn.k_proj.weight"
    expected = {n: s for n, s in _shapes(tensors).items() if n != unused}
    loaded = _load(_single(tmp_path, tensors), expected, ignore=lambda n: n == unused)
    assert unused not in loaded and set(loaded) == set(expected)


def test_read_model_type(tmp_path):
    _write_config(tmp_path, "gemma4_unified")
    assert read_model_type(tmp_path) == "gemma4_unified"
    assert read_model_type(tmp_path, known={"gemma4_unified"}) == "gemma4_unified"


# --------------------------------------------------------------------------- errors


def test_missing_tensor(tmp_path):
    tensors = _tensors()
    expected = _shapes(tensors) | {"model.layers.2.mlp.down_proj.weight": (8, 16)}
    with pytest.raises(MissingTensorError, match=r"1 expected.*model\.layers\.2\.mlp\.down_proj\.weight"):
        _load(_single(tmp_path, tensors), expected)


def test_missing_many_lists_few_and_counts(tmp_path):
    tensors = _tensors()
    expected = _shapes(tensors) | {f"extra.{i:02d}": (1,) for i in range(20)}
    with pytest.raises(MissingTensorError) as info:
        _load(_single(tmp_path, tensors), expected)
    message = str(info.value)
    assert "20 expected" in message and "extra.00" in message and "+15 more" in message
    assert "extra.19" not in message


def test_unexpected_tensor(tmp_path):
    tensors = _tensors()
    expected = _shapes(tensors)
    del expected["model.norm.weight"]
    with pytest.raises(UnexpectedTensorError, match=r"1 unexpected.*model\.norm\.weight"):
        _load(_single(tmp_path, tensors), expected)


def test_two_names_renamed_to_one(tmp_path):
    tensors = _tensors()
    with pytest.raises(UnexpectedTensorError, match="model.layers.1.self_attn.q_proj.weight"):
        _load(_single(tmp_path, tensors), _shapes(tensors),
              rename=lambda n: "q" if n.endswith("q_proj.weight") else n)


def test_misshaped_tensor(tmp_path):
    tensors = _tensors()
    expected = _shapes(tensors) | {"model.norm.weight": (9,)}
    with pytest.raises(TensorShapeError) as info:
        _load(_sharded(tmp_path, tensors), expected)
    message = str(info.value)
    assert "model.norm.weight" in message and "(8,)" in message and "(9,)" in message


def test_shard_named_in_index_but_absent(tmp_path):
    _sharded(tmp_path, _tensors())
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00002.safetensors"):
        CheckpointFiles(tmp_path)


def _map_in_index(path, name: str, shard: str) -> None:
    """Point one tensor name of a sharded checkpoint's index at a given shard file."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][name] = shard
    index_path.write_text(json.dumps(index))


def test_index_names_tensor_its_shard_lacks(tmp_path):
    _sharded(tmp_path, _tensors())
    _map_in_index(tmp_path, "model.ghost.weight", "model-00001-of-00002.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.ghost.weight"):
        CheckpointFiles(tmp_path)


def test_index_shard_outside_checkpoint(tmp_path):
    _sharded(tmp_path, _tensors())
    _map_in_index(tmp_path, "model.norm.weight", "../elsewhere.safetensors")
    with pytest.raises(CorruptCheckpointError, match=r"\.\./elsewhere\.safetensors"):
        CheckpointFiles(tmp_path)


@pytest.mark.parametrize("cut", [20, 500])  # inside the header; inside the data
def test_truncated_safetensors(tmp_path, cut):
    _single(tmp_path, _tensors())
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut == 20 else data[:-cut])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        CheckpointFiles(tmp_path)


def test_random_bytes_file(tmp_path):
    _write_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                               generator=torch.Generator().manual_seed(1))
                                                 .numpy().tobytes())
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        CheckpointFiles(tmp_path)


def test_corrupt_index_json(tmp_path):
    _sharded(tmp_path, _tensors())
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors\.index\.json"):
        CheckpointFiles(tmp_path)


def test_index_without_weight_map(tmp_path):
    _sharded(tmp_path, _tensors())
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CorruptCheckpointError, match="weight_map"):
        CheckpointFiles(tmp_path)


def test_directory_without_weights(tmp_path):
    _write_config(tmp_path)
    with pytest.raises(CorruptCheckpointError, match=str(tmp_path.name)):
        CheckpointFiles(tmp_path)


def test_missing_config_json(tmp_path):
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        read_model_type(tmp_path)


def test_config_json_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="config.json"):
        read_model_type(tmp_path)


def test_unknown_model_type(tmp_path):
    _write_config(tmp_path, "llama")
    with pytest.raises(UnknownModelTypeError, match="'llama'"):
        read_model_type(tmp_path)
    _write_config(tmp_path, "gemma4_text")
    with pytest.raises(UnknownModelTypeError, match="'gemma4_text'"):
        read_model_type(tmp_path, known={"gemma4"})


def test_unknown_name_lookup_is_typed(tmp_path):
    files = CheckpointFiles(_single(tmp_path, _tensors()))
    with pytest.raises(MissingTensorError, match="nope"):
        files.shape("nope")


def test_all_errors_share_base():
    for cls in (MissingTensorError, UnexpectedTensorError, TensorShapeError,
                CorruptCheckpointError, UnknownModelTypeError):
        assert issubclass(cls, CheckpointError)

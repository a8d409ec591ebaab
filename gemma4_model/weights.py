"""Read Gemma 4 safetensors checkpoints: validate them up front, then load tensors one at a time.

Everything that can be checked from headers (which tensors exist, where, with what shape)
is checked before any tensor data is read, so a bad checkpoint fails in milliseconds with
an error that names the offending tensor or file instead of failing half-way through a
multi-gigabyte load.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError, safe_open

from . import config

__all__ = [
    "KNOWN_MODEL_TYPES",
    "CheckpointError",
    "MissingTensorError",
    "UnexpectedTensorError",
    "TensorShapeError",
    "CorruptCheckpointError",
    "UnknownModelTypeError",
    "read_model_type",
    "CheckpointFiles",
    "load_tensors",
]

KNOWN_MODEL_TYPES: frozenset[str] = frozenset(config.KNOWN_MODEL_TYPES)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Error messages list this many names, then a count, so a wholly wrong checkpoint
# (thousands of names) still gives a readable one-line error.
_MAX_NAMES_SHOWN = 5

# safetensors header dtype tags -> torch dtypes. Float8 types only exist in newer torch builds.
_DTYPES: dict[str, torch.dtype] = {
    tag: getattr(torch, name)
    for tag, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    }.items()
    if hasattr(torch, name)
}


# --------------------------------------------------------------------------- errors


class CheckpointError(Exception):
    """Base class of every problem found in a checkpoint directory."""


class MissingTensorError(CheckpointError):
    """The model expects tensors that the checkpoint does not provide."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint provides tensors the model has no place for."""


class TensorShapeError(CheckpointError):
    """A checkpoint tensor's shape differs from the shape the model expects."""


class CorruptCheckpointError(CheckpointError):
    """A file of the checkpoint is absent, unreadable, or not valid JSON / safetensors."""


class UnknownModelTypeError(CheckpointError):
    """config.json names a model_type this code does not know how to serve."""


def _name_list(names: Iterable[str]) -> str:
    """'a', 'b', 'c' (+N more): a bounded, sorted, quoted listing for error messages."""
    ordered = sorted(names)
    shown = ", ".join(repr(n) for n in ordered[:_MAX_NAMES_SHOWN])
    rest = len(ordered) - _MAX_NAMES_SHOWN
    return f"{shown} (+{rest} more)" if rest > 0 else shown


# --------------------------------------------------------------------------- config


def _read_json(path: Path) -> object:
    """Parse a JSON file, turning every way it can fail into CorruptCheckpointError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {exc}") from exc


def read_model_type(
    checkpoint_dir: str | Path,
    known: Iterable[str] = KNOWN_MODEL_TYPES,
) -> str:
    """Return `model_type` from `checkpoint_dir/config.json`.

    Raises CorruptCheckpointError if config.json is missing, unreadable, not valid JSON or
    not a JSON object, and UnknownModelTypeError if `model_type` is absent or not in `known`.
    """
    path = Path(checkpoint_dir) / CONFIG_FILE
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path} must hold a JSON object, found {type(config).__name__}")
    model_type = config.get("model_type")
    known = frozenset(known)
    if model_type not in known:
        raise UnknownModelTypeError(
            f"{path}: unknown model_type {model_type!r}; expected one of {sorted(known)}"
        )
    return model_type


# --------------------------------------------------------------------------- checkpoint files


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor lives and what its header says, known without reading its data."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors tag, e.g. "BF16"


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Open one safetensors file (header only, the data stays on disk) and describe its tensors.

    safetensors validates the header and that the data section covers the file exactly on
    open, so truncated files, random bytes and bad headers all surface here.
    """
    if not path.is_file():
        raise CorruptCheckpointError(f"safetensors file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            infos = {}
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                infos[name] = _TensorInfo(path, tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
            return infos
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptCheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc


def _shard_path(directory: Path, index_path: Path, shard: object) -> Path:
    """Resolve a shard name from the index, refusing names that point outside the checkpoint."""
    if not isinstance(shard, str) or not shard:
        raise CorruptCheckpointError(f"{index_path}: shard file name {shard!r} is not a non-empty string")
    parts = PurePosixPath(shard).parts
    # Plain relative names only: an index must not make us read arbitrary files.
    if PurePosixPath(shard).is_absolute() or ".." in parts:
        raise CorruptCheckpointError(f"{index_path}: shard file {shard!r} lies outside the checkpoint")
    return directory / shard


def _read_weight_map(directory: Path, index_path: Path) -> dict[str, Path]:
    """tensor name -> shard path, from a `model.safetensors.index.json`."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index_path} has no 'weight_map' object")
    return {name: _shard_path(directory, index_path, shard) for name, shard in weight_map.items()}


def _indexed_tensors(directory: Path, index_path: Path) -> dict[str, _TensorInfo]:
    """Tensors of a sharded checkpoint, each checked to exist in the shard the index names."""
    weight_map = _read_weight_map(directory, index_path)
    headers = {shard: _read_header(shard) for shard in sorted(set(weight_map.values()))}
    tensors = {}
    for name, shard in weight_map.items():
        info = headers[shard].get(name)
        if info is None:
            raise CorruptCheckpointError(
                f"{index_path} places tensor {name!r} in {shard.name}, which does not contain it"
            )
        tensors[name] = info
    return tensors


def _unindexed_tensors(directory: Path) -> dict[str, _TensorInfo]:
    """Tensors of `model.safetensors`, or else of every `*.safetensors` file in the directory."""
    single = directory / SINGLE_FILE
    paths = [single] if single.is_file() else sorted(directory.glob("*.safetensors"))
    if not paths:
        raise CorruptCheckpointError(f"{directory} holds neither {INDEX_FILE} nor any *.safetensors file")
    tensors: dict[str, _TensorInfo] = {}
    for path in paths:
        for name, info in _read_header(path).items():
            if name in tensors:
                # Without an index there is no way to tell which copy is meant.
                raise CorruptCheckpointError(
                    f"tensor {name!r} appears in both {tensors[name].file.name} and {path.name}"
                )
            tensors[name] = info
    return tensors


class CheckpointFiles:
    """The safetensors files of a checkpoint directory and the tensors they hold.

    Opening reads and validates every header (no tensor data), so all later questions about
    names, shapes and dtypes are answered from memory.
    """

    def __init__(self, directory: str | Path) -> None:
        """Find and validate the checkpoint's safetensors files in `directory`.

        Uses `model.safetensors.index.json` when present, else `model.safetensors`, else every
        `*.safetensors` file. Raises CorruptCheckpointError for a bad index, a missing shard,
        an invalid safetensors file, or an index entry its shard does not contain.
        """
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CorruptCheckpointError(f"checkpoint directory {self.directory} does not exist")
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            self._tensors = _indexed_tensors(self.directory, index_path)
        else:
            self._tensors = _unindexed_tensors(self.directory)

    def _info(self, name: str) -> _TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensorError(f"checkpoint {self.directory} has no tensor {name!r}") from None

    def names(self) -> set[str]:
        """All tensor names in the checkpoint (a fresh set; changing it changes nothing here)."""
        return set(self._tensors)

    def files(self) -> list[Path]:
        """The safetensors files that hold at least one tensor, sorted."""
        return sorted({info.file for info in self._tensors.values()})

    def file_of(self, name: str) -> Path:
        """The safetensors file holding tensor `name`."""
        return self._info(name).file

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`, from the file header."""
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Stored torch dtype of tensor `name`, from the file header."""
        info = self._info(name)
        try:
            return _DTYPES[info.dtype]
        except KeyError:
            raise CorruptCheckpointError(
                f"tensor {name!r} in {info.file} has dtype {info.dtype!r}, which torch cannot represent"
            ) from None

    def __repr__(self) -> str:
        return f"CheckpointFiles({str(self.directory)!r}, {len(self._tensors)} tensors)"


# --------------------------------------------------------------------------- loading


def _identity(name: str) -> str | None:
    return name


def _never(name: str) -> bool:
    return False


def _select(
    files: CheckpointFiles,
    rename: Callable[[str], str | None],
    ignore: Callable[[str], bool],
) -> dict[str, str]:
    """internal name -> checkpoint name, for every checkpoint tensor we mean to load."""
    selected: dict[str, str] = {}
    for name in sorted(files.names()):
        internal = rename(name)
        if internal is None or ignore(name):
            continue
        if internal in selected:
            raise UnexpectedTensorError(
                f"checkpoint tensors {selected[internal]!r} and {name!r} both map to {internal!r}"
            )
        selected[internal] = name
    return selected


def _check_names(files: CheckpointFiles, selected: Mapping[str, str], expected: Mapping[str, object]) -> None:
    """Raise for the first of: expected tensors missing, then checkpoint tensors left over."""
    missing = expected.keys() - selected.keys()
    if missing:
        raise MissingTensorError(
            f"checkpoint {files.directory} lacks {len(missing)} expected tensor(s): {_name_list(missing)}"
        )
    extra = selected.keys() - expected.keys()
    if extra:
        raise UnexpectedTensorError(
            f"checkpoint {files.directory} has {len(extra)} unexpected tensor(s): "
            f"{_name_list(selected[internal] for internal in extra)}"
        )


def _check_shapes(
    files: CheckpointFiles, selected: Mapping[str, str], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Compare header shapes with the expected ones before any data is read."""
    for internal in sorted(selected):
        name = selected[internal]
        found, want = files.shape(name), tuple(expected[internal])
        if found != want:
            ours = "" if internal == name else f" (ours: {internal!r})"
            raise TensorShapeError(
                f"tensor {name!r}{ours} in {files.file_of(name).name} has shape {found}, expected {want}"
            )


def _safetensors_device(device: torch.device | str | int) -> str:
    """The device string safe_open accepts (it rejects torch.device objects and 'meta')."""
    dev = torch.device(device)
    if dev.type == "meta":
        raise ValueError("cannot load tensor data onto the meta device")
    return str(dev)


def _load_file(
    path: Path, names: Mapping[str, str], device: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Load `names` (internal -> checkpoint name) from one file, one tensor at a time.

    safe_open memory-maps the file and materialises each tensor on `device` as it is asked
    for, so host memory never holds more than one tensor beyond the mapping itself.
    """
    out: dict[str, torch.Tensor] = {}
    current = None  # the tensor being read, for the error message
    try:
        with safe_open(path, framework="pt", device=device) as handle:
            for internal, name in names.items():
                current = name
                tensor = handle.get_tensor(name)
                # Only floating weights follow the serving dtype; ids, masks and counters must not.
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                out[internal] = tensor
    except (SafetensorError, OSError, ValueError) as exc:
        what = f"tensor {current!r} of " if current is not None else ""
        raise CorruptCheckpointError(f"cannot read {what}{path}: {exc}") from exc
    return out


def load_tensors(
    files: CheckpointFiles,
    expected: Mapping[str, tuple[int, ...]],
    *,
    device: torch.device | str | int,
    dtype: torch.dtype,
    rename: Callable[[str], str | None] = _identity,
    ignore: Callable[[str], bool] = _never,
) -> dict[str, torch.Tensor]:
    """Load exactly the tensors of `expected` (internal name -> shape) from a checkpoint.

    `rename(checkpoint_name)` gives our internal name, or None for tensors belonging to
    another component (skipped silently). `ignore(checkpoint_name)` marks tensors that are
    known but deliberately unused. Before any data is read the renamed set must equal
    `expected` (else MissingTensorError / UnexpectedTensorError) and every header shape must
    match (else TensorShapeError). Tensors are then read shard by shard straight onto
    `device`; floating ones are cast to `dtype`, integer and bool ones keep their dtype.
    Returns internal name -> tensor.
    """
    selected = _select(files, rename, ignore)
    _check_names(files, selected, expected)
    _check_shapes(files, selected, expected)
    target = _safetensors_device(device)
    by_file: dict[Path, dict[str, str]] = {}
    for internal, name in sorted(selected.items()):
        by_file.setdefault(files.file_of(name), {})[internal] = name
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(by_file):
        tensors.update(_load_file(path, by_file[path], target, dtype))
    return tensors

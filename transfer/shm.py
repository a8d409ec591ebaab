"""POSIX shared-memory segments for KV handoffs between processes of one host.

A segment is a file in `/dev/shm` (what `shm_open` creates on Linux) named
`tandem-{run_id}-kv-{pid}-{n}`: the run id lets the launcher remove every segment of a run at
stop (`cleanup_run`), even those of a decode replica that died before reading them; pid and
counter keep the names of restarted and concurrent prefill replicas apart.

Layout: the magic `TKV1`, a little-endian uint32 header length, a msgpack header
{"num_tokens", "kv_dtype", "arrays": [{"field", "dtype", "shape", "offset"}]}, then each array's
raw bytes at its offset (64-byte aligned). The reader copies the whole segment into private
memory and unlinks it at once, before parsing, so a bad segment never outlives its read; then it
checks the header strictly (`SegmentError`).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Mapping

import msgpack
import numpy as np

SHM_DIR = Path("/dev/shm")
MAGIC = b"TKV1"
ALIGN = 64
MAX_HEADER_BYTES = 1 << 20
MAX_SEGMENT_BYTES = 1 << 34
ALLOWED_DTYPES = frozenset({"int32", "int64", "float32", "float16", "uint16"})
_RUN_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")


class SegmentError(ValueError):
    """A segment name or content that is not a valid KV segment of this run."""


def segment_prefix(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-64 letters, digits or '_'")
    return f"tandem-{run_id}-kv-"


def segment_path(name: str, run_id: str, directory: Path = SHM_DIR) -> Path:
    """The file of segment `name`, refusing any name that is not one of this run's segments."""
    prefix = segment_prefix(run_id)
    if not (name.startswith(prefix) and re.fullmatch(r"[0-9]+-[0-9]+", name[len(prefix):])):
        raise SegmentError(f"{name!r} is not a KV segment of run {run_id}")
    return directory / name


def write_segment(name: str, run_id: str, num_tokens: int, kv_dtype: str, arrays: Mapping[str, np.ndarray],
                  directory: Path = SHM_DIR) -> int:
    """Create segment `name` holding `arrays`; returns its size in bytes. Never overwrites."""
    path = segment_path(name, run_id, directory)
    specs, offset = [], 0
    for field, array in arrays.items():
        specs.append({"field": field, "dtype": str(array.dtype), "shape": list(array.shape), "offset": offset})
        offset += -(-array.nbytes // ALIGN) * ALIGN
    header = msgpack.packb({"num_tokens": num_tokens, "kv_dtype": kv_dtype, "arrays": specs}, use_bin_type=True)
    start = -(-(len(MAGIC) + 4 + len(header)) // ALIGN) * ALIGN
    size = start + offset
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            for spec, array in zip(specs, arrays.values()):
                f.seek(start + spec["offset"])
                f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            f.truncate(size)
    except BaseException:  # a full /dev/shm, an interrupt: leave no partial segment behind
        path.unlink(missing_ok=True)
        raise
    return size


def read_segment(name: str, run_id: str, directory: Path = SHM_DIR,
                 max_bytes: int = MAX_SEGMENT_BYTES) -> tuple[int, str, dict[str, np.ndarray], int]:
    """Copy segment `name` out, unlink it, and return (num_tokens, kv_dtype, arrays, bytes).

    The arrays are writable views of one private buffer."""
    path = segment_path(name, run_id, directory)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise SegmentError(f"segment {name} has {size} bytes, more than {max_bytes}")
            buffer = bytearray(size)
            if f.readinto(buffer) != size:
                raise SegmentError(f"segment {name} changed size while being read")
    except FileNotFoundError:
        raise SegmentError(f"segment {name} does not exist (already read, or removed at cleanup)") from None
    finally:
        path.unlink(missing_ok=True)
    num_tokens, kv_dtype, arrays = _parse(name, buffer)
    return num_tokens, kv_dtype, arrays, size


def _parse(name: str, buffer: bytearray) -> tuple[int, str, dict[str, np.ndarray]]:
    if bytes(buffer[:4]) != MAGIC or len(buffer) < 8:
        raise SegmentError(f"segment {name} does not start with {MAGIC!r}")
    (header_len,) = struct.unpack("<I", buffer[4:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(buffer):
        raise SegmentError(f"segment {name}: header length {header_len} is out of bounds")
    try:
        header = msgpack.unpackb(bytes(buffer[8:8 + header_len]), raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise SegmentError(f"segment {name}: header is not msgpack: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"num_tokens", "kv_dtype", "arrays"}:
        raise SegmentError(f"segment {name}: header must hold num_tokens, kv_dtype and arrays")
    if not isinstance(header["num_tokens"], int) or not isinstance(header["kv_dtype"], str):
        raise SegmentError(f"segment {name}: num_tokens must be an int and kv_dtype a string")
    start = -(-(8 + header_len) // ALIGN) * ALIGN
    arrays = {}
    for spec in header["arrays"] if isinstance(header["arrays"], list) else [None]:
        if not isinstance(spec, dict) or set(spec) != {"field", "dtype", "shape", "offset"}:
            raise SegmentError(f"segment {name}: each array needs field, dtype, shape and offset")
        dtype, shape, offset = spec["dtype"], spec["shape"], spec["offset"]
        if dtype not in ALLOWED_DTYPES or not isinstance(spec["field"], str):
            raise SegmentError(f"segment {name}: array {spec['field']!r} of dtype {dtype!r} is not allowed")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SegmentError(f"segment {name}: bad shape {shape!r}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * np.dtype(dtype).itemsize
        if not isinstance(offset, int) or offset < 0 or start + offset + nbytes > len(buffer):
            raise SegmentError(f"segment {name}: array {spec['field']!r} lies outside the segment")
        arrays[spec["field"]] = np.frombuffer(buffer, dtype=dtype, count=count, offset=start + offset).reshape(shape)
    return header["num_tokens"], header["kv_dtype"], arrays


def unlink_segment(name: str, run_id: str, directory: Path = SHM_DIR) -> bool:
    """Remove a segment nobody will read (its request was cancelled). True if it existed."""
    try:
        segment_path(name, run_id, directory).unlink()
        return True
    except (FileNotFoundError, SegmentError):
        return False


def run_segments(run_id: str, directory: Path = SHM_DIR) -> list[Path]:
    return sorted(p for p in directory.glob(f"{segment_prefix(run_id)}*") if p.is_file())


def cleanup_run(run_id: str, directory: Path = SHM_DIR) -> int:
    """Remove every KV segment of a run (the launcher calls this at stop); returns how many."""
    removed = 0
    for path in run_segments(run_id, directory):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed

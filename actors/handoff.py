"""KV payloads as named numpy arrays (message fields, shared-memory segments) and back: how pages
cross a process boundary.

The arrays are `{full,sliding}_{pages,k,v}`: per layer group the logical page numbers (int32)
and the K/V arrays [layers, pages, page_size, kv_heads, head_dim]; bfloat16 travels as uint16
(`kv_dtype` says which). `payload_from_arrays` checks what it can without the receiving cache
(every group complete, dtypes as declared, K and V alike) and raises `PayloadError`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from gemma4_model.batch import on_device
from transfer.kv_pages import GroupPages, KVPayload, PayloadError

from .messages import KVHandoff, SamplingSpec

_GROUP_FIELD = {"full_attention": "full", "sliding_attention": "sliding"}
PAGE_FIELDS = tuple(f"{key}_{part}" for key in _GROUP_FIELD.values() for part in ("pages", "k", "v"))
# kv_dtype -> numpy dtype it travels as (numpy has no bfloat16 or float8: their bits as uints)
KV_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16", "float8_e4m3fn": "uint8"}
_AS_BITS = {torch.bfloat16: torch.uint16, torch.float8_e4m3fn: torch.uint8}
_FROM_BITS = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype in _AS_BITS:
        return t.view(_AS_BITS[t.dtype]).numpy(), str(t.dtype).removeprefix("torch.")
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    # frames are read-only views of the socket's buffers: copy those; writable arrays are ours
    t = torch.from_numpy(a if a.flags.writeable else np.array(a, copy=True))
    return t.view(_FROM_BITS[dtype]) if dtype in _FROM_BITS else t


def page_arrays(payload: KVPayload) -> tuple[dict[str, np.ndarray], str]:
    """The payload's arrays by field name, and its `kv_dtype`."""
    fields, kv_dtype = {}, "float32"
    for name, group in payload.groups.items():
        key = _GROUP_FIELD[name]
        fields[f"{key}_pages"] = np.asarray(group.logical, dtype=np.int32)
        fields[f"{key}_k"], kv_dtype = to_numpy(group.k)
        fields[f"{key}_v"], _ = to_numpy(group.v)
    return fields, kv_dtype


def payload_from_arrays(num_tokens: int, kv_dtype: str, arrays: Mapping[str, np.ndarray | None]) -> KVPayload:
    """The inverse of `page_arrays`, refusing inconsistent arrays with a `PayloadError`."""
    if kv_dtype not in KV_DTYPES:
        raise PayloadError(f"kv_dtype {kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise PayloadError(f"num_tokens must be a positive int, got {num_tokens!r}")
    groups = {}
    for name, key in _GROUP_FIELD.items():
        pages, k, v = (arrays.get(f"{key}_{part}") for part in ("pages", "k", "v"))
        if pages is None and k is None and v is None:
            continue
        if pages is None or k is None or v is None:
            raise PayloadError(f"group {name}: pages, k and v must travel together")
        if pages.ndim != 1 or pages.dtype.kind not in "iu":
            raise PayloadError(f"group {name}: page numbers must be a 1-D integer array, "
                               f"got {pages.dtype} {pages.shape}")
        for part, a in (("k", k), ("v", v)):
            if str(a.dtype) != KV_DTYPES[kv_dtype]:
                raise PayloadError(f"group {name}: {part} is {a.dtype}, "
                                   f"but kv_dtype {kv_dtype} travels as {KV_DTYPES[kv_dtype]}")
            if a.ndim != 5 or a.shape[1] != len(pages):
                raise PayloadError(f"group {name}: {part} has shape {a.shape}, expected "
                                   f"[layers, {len(pages)} pages, page_size, kv_heads, head_dim]")
        if k.shape != v.shape:
            raise PayloadError(f"group {name}: k {k.shape} and v {v.shape} differ")
        groups[name] = GroupPages(tuple(int(p) for p in pages), from_numpy(k, kv_dtype), from_numpy(v, kv_dtype))
    return KVPayload(num_tokens, groups)


def handoff_message(request_id: str, prompt: list[int], first_token: int, sampling: SamplingSpec,
                    payload: KVPayload | None, data_ref: str | None = None, **media) -> KVHandoff:
    """The control message; the pages ride in it unless `payload` is None (they travel apart,
    referenced by `data_ref`). `media`: a multimodal prompt's `media_*` fields."""
    fields, kv_dtype = page_arrays(payload) if payload is not None else ({}, "float32")
    num_tokens = payload.num_tokens if payload is not None else len(prompt)
    return KVHandoff(request_id, np.asarray(prompt, dtype=np.int32), first_token, sampling,
                     num_tokens, kv_dtype, **fields, data_ref=data_ref, **media)


def handoff_hidden(hidden: torch.Tensor | None) -> dict:
    """`KVHandoff` fields for the first token's final-norm hidden state (none when absent)."""
    if hidden is None:
        return {}
    array, dtype = to_numpy(hidden)
    return {"first_hidden": array, "hidden_dtype": dtype}


def hidden_of(msg: KVHandoff, hidden_size: int, device: torch.device | str) -> torch.Tensor | None:
    """The handoff's hidden state on `device`; PayloadError when it has the wrong size or dtype."""
    if msg.first_hidden is None:
        return None
    a = msg.first_hidden
    if msg.hidden_dtype not in KV_DTYPES or str(a.dtype) != KV_DTYPES[msg.hidden_dtype] or a.shape != (hidden_size,):
        raise PayloadError(f"first_hidden must be [{hidden_size}] {msg.hidden_dtype}, got {a.dtype} {a.shape}")
    return on_device(from_numpy(a, msg.hidden_dtype), device)  # not behind the step in flight


def payload_of(msg) -> KVPayload:
    """The pages carried by a `KVHandoff` (inline) or a `KVData` message."""
    return payload_from_arrays(msg.num_tokens, msg.kv_dtype, {f: getattr(msg, f) for f in PAGE_FIELDS})

"""KV payloads as `KVHandoff` message fields (numpy frames) and back: how pages cross a socket."""

from __future__ import annotations

import numpy as np
import torch

from transfer.kv_pages import GroupPages, KVPayload

from .messages import KVHandoff, SamplingSpec

_GROUP_FIELD = {"full_attention": "full", "sliding_attention": "sliding"}


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(a, copy=True))  # frames are read-only views
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def handoff_message(request_id: str, prompt: list[int], first_token: int, sampling: SamplingSpec,
                    payload: KVPayload) -> KVHandoff:
    fields, kv_dtype = {}, "float32"
    for name, group in payload.groups.items():
        key = _GROUP_FIELD[name]
        fields[f"{key}_pages"] = np.asarray(group.logical, dtype=np.int32)
        fields[f"{key}_k"], kv_dtype = to_numpy(group.k)
        fields[f"{key}_v"], _ = to_numpy(group.v)
    return KVHandoff(request_id, np.asarray(prompt, dtype=np.int32), first_token, sampling,
                     payload.num_tokens, kv_dtype, **fields)


def payload_of(msg: KVHandoff) -> KVPayload:
    groups = {}
    for name, key in _GROUP_FIELD.items():
        pages = getattr(msg, f"{key}_pages")
        if pages is not None:
            groups[name] = GroupPages(tuple(int(p) for p in pages), from_numpy(getattr(msg, f"{key}_k"), msg.kv_dtype),
                                      from_numpy(getattr(msg, f"{key}_v"), msg.kv_dtype))
    return KVPayload(msg.num_tokens, groups)

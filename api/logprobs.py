"""Token logprobs in OpenAI's two shapes: chat (`content` entries with `bytes` and
`top_logprobs`) and completions (parallel `tokens` / `token_logprobs` / `top_logprobs` /
`text_offset` lists)."""

from __future__ import annotations

from functools import lru_cache


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character; this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenText:
    """A token id's text and bytes, as the tokenizer knows it (cached per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bytes_of_char = _byte_decoder()
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _bytes(self, token_id: int) -> list[int]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(ch in self.bytes_of_char for ch in piece):
            return [self.bytes_of_char[ch] for ch in piece]
        return list(self.text(token_id).encode("utf-8"))


def chat_entries(names: TokenText, token_ids, logprobs, top) -> list[dict]:
    """`choices[i].logprobs.content` items for these tokens."""
    entries = []
    for j, (token, lp) in enumerate(zip(token_ids, logprobs)):
        alternatives = top[j] if top is not None else []
        entries.append({
            "token": names.text(token), "logprob": float(lp), "bytes": names.bytes(token),
            "top_logprobs": [{"token": names.text(t), "logprob": float(l), "bytes": names.bytes(t)}
                             for t, l in alternatives],
        })
    return entries


def completion_logprobs(names: TokenText, token_ids, logprobs, top, offset: int) -> dict:
    """`choices[i].logprobs` of a completion for these tokens; `offset`: text length before them."""
    tokens = [names.text(t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    tops = None
    if top is not None:
        tops = [{names.text(t): float(l) for t, l in alternatives} for alternatives in top]
    return {"tokens": tokens, "token_logprobs": [float(lp) for lp in logprobs],
            "top_logprobs": tops, "text_offset": offsets}

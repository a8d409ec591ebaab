"""The front door for media in chat messages: which image / audio sources a request may name.

Content parts that carry media (`image_url`, `input_audio`, `audio_url`, `video_url`) are checked
before anything is sent on: inline `data:` URLs and base64 `input_audio` are always acceptable;
`http(s)` URLs only from the hosts the operator listed (`--allowed-media-host`, `[api]
allowed_media_hosts`; none by default, so the server never fetches on a client's behalf unless
told to); any other scheme is refused. Media kinds the topology has no encoder actor for are
refused too, with a message saying so, rather than rendered as placeholders with no content.
"""

from __future__ import annotations

from typing import Any, Iterable
from urllib.parse import urlsplit

from .errors import ApiError

MEDIA_PARTS = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}


def media_parts(messages: Iterable[Any]) -> list[tuple[str, str | None, str]]:
    """(kind, url or None for inline data, param path) of every media content part."""
    found = []
    for i, message in enumerate(messages):
        content = getattr(message, "content", None)
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind_name = part.get("type") if isinstance(part, dict) else None
            kind = MEDIA_PARTS.get(kind_name) if isinstance(kind_name, str) else None
            if kind is None:
                continue
            value = part.get(part["type"])
            url = value.get("url") if isinstance(value, dict) else value if isinstance(value, str) else None
            if part["type"] == "input_audio":
                url = None  # base64 data in the body
            elif not isinstance(url, str) or not url:
                raise ApiError(400, f"{part['type']} needs a url", param=f"messages.{i}.content.{j}")
            found.append((kind, url, f"messages.{i}.content.{j}"))
    return found


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Exact host names; an entry starting with '.' also admits its subdomains."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower()
        if host == entry or (entry.startswith(".") and (host.endswith(entry) or host == entry[1:])):
            return True
    return False


def check_media(messages: Iterable[Any], allowed_hosts: Iterable[str], supported_kinds: frozenset[str]) -> None:
    """Raise `ApiError(400)` for a media source or kind this server will not take."""
    allowed_hosts = tuple(allowed_hosts)
    for kind, url, param in media_parts(messages):
        if url is not None and not url.startswith("data:"):
            try:
                parts = urlsplit(url)
                parts.hostname  # parsed lazily: a bad IPv6 literal raises here
            except ValueError as exc:
                raise ApiError(400, f"media URL cannot be parsed: {exc}", param=param) from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ApiError(400, f"media URL scheme {parts.scheme or '(none)'!r} is not accepted; use https or data:",
                               param=param)
            if not host_allowed(parts.hostname, allowed_hosts):
                raise ApiError(400, f"fetching media from host {parts.hostname!r} is not allowed on this server "
                                    "(the operator can allow it with --allowed-media-host)", param=param)
        if kind not in supported_kinds:
            raise ApiError(400, f"{kind} input is not supported by this server: its topology has no {kind} encoder",
                           param=param)

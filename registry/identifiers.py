"""base64url identifiers for URLs (AAS Part 2: "UTF8-BASE64-URL-encoded", we send it without padding).

Kept free of web-framework imports so clients and model code can use it cheaply.
"""

from __future__ import annotations

import base64
import binascii

_B64URL_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class MalformedIdentifier(ValueError):
    """A path segment is not a base64url-encoded UTF-8 identifier (maps to HTTP 400)."""


def b64url_encode(identifier: str) -> str:
    """Encode an AAS identifier for use in a URL: UTF-8, base64url, padding stripped (Part 2, 12.2)."""
    return base64.urlsafe_b64encode(identifier.encode("utf-8")).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> str:
    """Decode a base64url identifier; padding is optional (clients in the wild send both forms).

    Raises :class:`MalformedIdentifier` on characters outside the url-safe alphabet, an impossible
    length, or bytes that are not UTF-8 — the caller answers 400 rather than 404 for those.
    """
    stripped = segment.rstrip("=")
    if not stripped or not set(stripped) <= _B64URL_ALPHABET or len(stripped) % 4 == 1:
        raise MalformedIdentifier(f"not a base64url-encoded identifier: {segment[:80]!r}")
    try:
        raw = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise MalformedIdentifier(f"not a base64url-encoded UTF-8 identifier: {segment[:80]!r}") from exc

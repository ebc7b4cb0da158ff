"""One parsed message for every agent of a process that receives the same payload.

A call for proposals reaches each bidder over its own connection, byte for byte the same: the
agents of one process share its parse (and what is read from its elements, `Message.memo`)
instead of each parsing it again, nine parses of ten with ten bidders in one process. The key is
the payload itself, so a message differing in a single byte is parsed on its own; only valid
frames are kept, so every receiver of a bad payload meets (and reports) the error.
"""

from __future__ import annotations

from protocol.frame import DEFAULT_MAX_MESSAGE_BYTES, Message, parse_message


class MessageCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, size: int = 256) -> None:
        self.max_bytes = max_bytes
        self.size = size
        self._parsed: dict[bytes, Message] = {}
        self.hits = 0

    def parse(self, payload: bytes) -> Message:
        """`parse_message`, or the message parsed from the same bytes a moment ago."""
        msg = self._parsed.get(payload)
        if msg is not None:
            self.hits += 1
            return msg
        msg = parse_message(payload, max_bytes=self.max_bytes)  # raises FrameError: nothing kept
        if len(self._parsed) >= self.size:  # the oldest goes: a broadcast's copies arrive together
            del self._parsed[next(iter(self._parsed))]
        self._parsed[payload] = msg
        return msg

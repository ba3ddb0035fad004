"""ttrpc framing (protocol 1.2), sans-IO: a 10-byte big-endian header, then data.

Header: data length (u32), stream id (u32), message type (u8), flags (u8).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

HEADER_LENGTH: Final = 10
MAX_DATA_LENGTH: Final = 4 << 20

_HEADER = struct.Struct(">IIBB")


class Flags(enum.IntFlag):
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


# Plain ints for hot paths (IntFlag arithmetic runs Python code).
FLAG_REMOTE_CLOSED: Final = 0x1
FLAG_REMOTE_OPEN: Final = 0x2
FLAG_NO_DATA: Final = 0x4
TYPE_REQUEST: Final = 0x1
TYPE_RESPONSE: Final = 0x2
TYPE_DATA: Final = 0x3


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole frame. ``type`` stays an int so unknown future types can be skipped."""

    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose claimed length exceeded the limit; its data was discarded unread."""

    stream_id: int
    type: int
    flags: int
    length: int


def encode_header(length: int, stream_id: int, type: int, flags: int) -> bytes:
    return _HEADER.pack(length, stream_id, type, flags)


def encode_frame(stream_id: int, type: int, flags: int, data: bytes = b"") -> bytes:
    """Header and data as one bytes object; refuses data over the protocol maximum."""
    if len(data) > MAX_DATA_LENGTH:
        raise ValueError(f"frame data of {len(data)} bytes exceeds maximum of {MAX_DATA_LENGTH}")
    return _HEADER.pack(len(data), stream_id, type, flags) + data


class FrameDecoder:
    """Bytes in, frames out. Holds at most one frame's data (bounded by ``max_length``).

    The claimed length is checked as soon as the header is complete: an oversized
    frame's data is skipped as it arrives, never buffered, and reported once
    skipped as an :class:`OversizedFrame`.
    """

    def __init__(self, max_length: int = MAX_DATA_LENGTH) -> None:
        self._max_length = max_length
        self._buffer = bytearray()
        self._skip: OversizedFrame | None = None
        self._skip_left = 0

    @property
    def buffered(self) -> int:
        """Bytes held and not yet returned as frames."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if self._skip_left:
            dropped = min(self._skip_left, len(data))
            self._skip_left -= dropped
            data = data[dropped:]
        self._buffer += data

    def next_frame(self) -> Frame | OversizedFrame | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._skip is not None:
            if self._skip_left:
                return None
            skipped, self._skip = self._skip, None
            return skipped
        buffer = self._buffer
        if len(buffer) < HEADER_LENGTH:
            return None
        length, stream_id, type_, flags = _HEADER.unpack_from(buffer)
        if length > self._max_length:
            self._skip = OversizedFrame(stream_id, type_, flags, length)
            dropped = min(length, len(buffer) - HEADER_LENGTH)
            del buffer[: HEADER_LENGTH + dropped]
            self._skip_left = length - dropped
            return self.next_frame()
        end = HEADER_LENGTH + length
        if len(buffer) < end:
            return None
        data = bytes(buffer[HEADER_LENGTH:end])
        del buffer[:end]
        return Frame(stream_id, type_, flags, data)

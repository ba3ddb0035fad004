"""Frame codec, sans-IO: every input whole, byte by byte, and with trailing bytes."""

from __future__ import annotations

import pytest

from ttrpc_asyncio._frame import (
    MAX_DATA_LENGTH,
    Frame,
    FrameDecoder,
    OversizedFrame,
    encode_frame,
    encode_header,
)

FRAMES = [
    Frame(1, 1, 0, b"request"),
    Frame(3, 3, 0x2, b""),
    Frame(3, 3, 0x5, b""),
    Frame(0xFFFF_FFFF, 2, 0, bytes(range(256)) * 10),
]


def _drain(decoder: FrameDecoder) -> list[Frame | OversizedFrame]:
    out: list[Frame | OversizedFrame] = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_header_layout_is_big_endian() -> None:
    """Length, stream id, type, flags: 10 bytes big-endian, as Go writes them."""
    assert encode_frame(0x01020304, 3, 5, b"ab") == bytes.fromhex("00000002010203040305") + b"ab"


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_decoder_whole_and_split(chunk: int | None) -> None:
    """Frames come out identical whether bytes arrive whole or in pieces."""
    wire = b"".join(encode_frame(f.stream_id, f.type, f.flags, f.data) for f in FRAMES)
    decoder = FrameDecoder()
    got: list[Frame | OversizedFrame] = []
    step = chunk or len(wire)
    for i in range(0, len(wire), step):
        decoder.receive_data(wire[i : i + step])
        got += _drain(decoder)
    assert got == FRAMES
    assert decoder.buffered == 0


def test_trailing_partial_frame_is_kept() -> None:
    """A partial frame after a whole one waits for the rest."""
    whole = encode_frame(1, 1, 0, b"abc")
    partial = encode_frame(3, 1, 0, b"defgh")
    decoder = FrameDecoder()
    decoder.receive_data(whole + partial[:12])
    assert _drain(decoder) == [Frame(1, 1, 0, b"abc")]
    decoder.receive_data(partial[12:])
    assert _drain(decoder) == [Frame(3, 1, 0, b"defgh")]


@pytest.mark.parametrize("chunk", [None, 4096, 1])
def test_oversized_frame_is_skipped_not_buffered(chunk: int | None) -> None:
    """A frame over 4 MiB is reported once and skipped; the next frame decodes."""
    length = MAX_DATA_LENGTH + 1
    body = b"\xaa" * length
    after = encode_frame(5, 1, 0, b"next")
    wire = encode_header(length, 3, 1, 0) + body + after
    decoder = FrameDecoder()
    got: list[Frame | OversizedFrame] = []
    step = chunk or len(wire)
    if step == 1:  # byte by byte through 4 MiB is slow; feed the body in two big pieces
        pieces = [wire[:5], wire[5:10], wire[10 : 10 + length // 2], wire[10 + length // 2 :]]
    else:
        pieces = [wire[i : i + step] for i in range(0, len(wire), step)]
    for piece in pieces:
        decoder.receive_data(piece)
        got += _drain(decoder)
        assert decoder.buffered <= len(after) + 10
    assert got == [OversizedFrame(3, 1, 0, length), Frame(5, 1, 0, b"next")]


def test_encode_refuses_oversized_data() -> None:
    """We never put an oversized frame on the wire."""
    with pytest.raises(ValueError, match="exceeds maximum"):
        encode_frame(1, 1, 0, b"\0" * (MAX_DATA_LENGTH + 1))

"""Fuzz the sans-IO layer: arbitrary, garbled and split bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ttrpc_asyncio._connection import Connection
from ttrpc_asyncio._frame import MAX_DATA_LENGTH, FrameDecoder, encode_header
from ttrpc_asyncio._state import Role
from ttrpc_asyncio.errors import ProtocolError

headers = st.builds(
    encode_header,
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255),
    st.integers(0, 255),
)
chunks = st.lists(st.one_of(st.binary(max_size=64), headers), max_size=30)


@settings(max_examples=300, deadline=None)
@given(chunks, st.sampled_from(Role))
def test_any_bytes_parse_or_raise_protocol_error(pieces: list[bytes], role: Role) -> None:
    """Garbage in: events or a typed protocol error out, never anything else,
    and the buffer never holds more than one maximal frame."""
    conn = Connection(role)
    decoder_bound = MAX_DATA_LENGTH + 10
    for piece in pieces:
        conn.receive_data(piece)
        try:
            while conn.next_event() is not None:
                pass
        except ProtocolError:
            return
        assert conn.buffered <= decoder_bound


@settings(max_examples=200, deadline=None)
@given(st.integers(MAX_DATA_LENGTH + 1, 2**32 - 1), st.binary(max_size=4096))
def test_claimed_length_never_allocated(length: int, tail: bytes) -> None:
    """A header claiming up to 4 GiB makes the decoder skip, never buffer."""
    decoder = FrameDecoder()
    decoder.receive_data(encode_header(length, 1, 1, 0) + tail)
    assert decoder.next_frame() is None or len(tail) >= length
    assert decoder.buffered == 0

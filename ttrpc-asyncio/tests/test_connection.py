"""Sans-IO connection: client and server objects talking through bytes only."""

from __future__ import annotations

import pytest

from ttrpc_asyncio._connection import (
    Connection,
    DataReceived,
    Event,
    FrameRejected,
    RequestReceived,
    ResponseReceived,
)
from ttrpc_asyncio._frame import MAX_DATA_LENGTH, Flags, encode_frame
from ttrpc_asyncio._state import Role, StreamState
from ttrpc_asyncio.errors import Code, LocalProtocolError, TtrpcError


def _events(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    out: list[Event] = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def test_unary_exchange() -> None:
    """Client request -> server event; server response -> client event; both streams end."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid, wire = client.send_request(b"req")
    assert sid == 1
    assert _events(server, wire) == [RequestReceived(1, 0, b"req")]
    assert _events(client, server.send_response(1, b"resp")) == [ResponseReceived(1, b"resp")]
    assert client.active_streams == server.active_streams == 0


def test_client_stream_ids_are_odd_and_increasing() -> None:
    """Client-initiated stream ids are 1, 3, 5, ..."""
    client = Connection(Role.CLIENT)
    assert [client.send_request(b"")[0] for _ in range(4)] == [1, 3, 5, 7]


def test_bidi_exchange_and_close() -> None:
    """Bidi: data both ways; the client's close then the server's close end the stream."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid, wire = client.send_request(b"", Flags.REMOTE_OPEN)
    _events(server, wire)
    assert _events(server, client.send_data(sid, b"m1")) == [DataReceived(sid, b"m1", False)]
    assert _events(client, server.send_data(sid, b"r1")) == [DataReceived(sid, b"r1", False)]
    assert _events(server, client.send_close(sid)) == [DataReceived(sid, None, True)]
    assert _events(client, server.send_close(sid)) == [DataReceived(sid, None, True)]
    assert client.stream_state(sid) is server.stream_state(sid) is StreamState.CLOSED


def test_empty_data_frame_is_a_message_not_an_end() -> None:
    """A zero-length Data frame without no-data is an empty message."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid, wire = client.send_request(b"", Flags.REMOTE_OPEN)
    _events(server, wire)
    assert _events(server, client.send_data(sid, b"")) == [DataReceived(sid, b"", False)]


def test_sending_on_a_closed_side_is_a_local_error() -> None:
    """Data after our close raises LocalProtocolError; nothing is written."""
    client = Connection(Role.CLIENT)
    sid, _ = client.send_request(b"", Flags.REMOTE_OPEN)
    client.send_close(sid)
    with pytest.raises(LocalProtocolError):
        client.send_data(sid, b"late")


def test_oversized_send_is_resource_exhausted() -> None:
    """Sending more than 4 MiB fails locally with RESOURCE_EXHAUSTED."""
    with pytest.raises(TtrpcError) as info:
        Connection(Role.CLIENT).send_request(b"\0" * (MAX_DATA_LENGTH + 1))
    assert info.value.code is Code.RESOURCE_EXHAUSTED


SERVER_RULES = [
    (encode_frame(2, 1, 0), "StreamID must be odd for client initiated streams"),
    (encode_frame(9, 3, 0, b"x"), "StreamID is no longer active"),
    (encode_frame(1, 1, 0) * 2, "StreamID cannot be re-used and must increment"),
    (
        encode_frame(1, 1, Flags.REMOTE_OPEN) + encode_frame(1, 3, Flags.REMOTE_CLOSED, b"x"),
        "data close message cannot include data",
    ),
    (
        encode_frame(1, 1, Flags.REMOTE_OPEN)
        + encode_frame(1, 3, Flags.REMOTE_CLOSED | Flags.NO_DATA)
        + encode_frame(1, 3, 0, b"x"),
        "data handling error: stream 1: cannot receive data as server in state "
        "half-closed (remote)",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("wire", "message"), SERVER_RULES)
def test_server_rule_violations_reject_one_stream(wire: bytes, message: str) -> None:
    """Each rule containerd/ttrpc enforces gives INVALID_ARGUMENT with its text on that stream."""
    server = Connection(Role.SERVER)
    rejected = [e for e in _events(server, wire) if isinstance(e, FrameRejected)]
    assert [(e.code, e.message) for e in rejected] == [(Code.INVALID_ARGUMENT, message)]


def test_unknown_message_type_is_ignored() -> None:
    """A frame of a future message type is skipped, the next one decoded."""
    server = Connection(Role.SERVER)
    events = _events(server, encode_frame(1, 0x9, 0, b"?") + encode_frame(3, 1, 0, b"r"))
    assert events == [RequestReceived(3, 0, b"r")]


def test_client_ignores_frames_for_streams_it_forgot() -> None:
    """A late response for an abandoned call is reported, not delivered."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sid, wire = client.send_request(b"")
    _events(server, wire)
    client.abandon(sid)
    (event,) = _events(client, server.send_response(sid, b""))
    assert isinstance(event, FrameRejected) and event.stream_id == sid

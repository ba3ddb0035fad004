"""A ttrpc connection, sans-IO: bytes in -> events out; calls -> bytes to write.

It enforces the stream-id rules and each stream's state machine. Payloads stay
opaque bytes here (the Request/Response envelopes are decoded a layer up), so
this module knows framing and ordering only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._frame import (
    FLAG_NO_DATA,
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    MAX_DATA_LENGTH,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    FrameDecoder,
    OversizedFrame,
    encode_frame,
)
from ._state import Role, StreamInput, StreamState, StreamStateMachine
from .errors import (
    Code,
    LocalProtocolError,
    RemoteProtocolError,
    TtrpcError,
)

MAX_STREAM_ID = 0xFFFF_FFFF


@dataclass(slots=True)
class RequestReceived:
    """Server side: a new stream. ``flags`` say unary, remote-open or remote-closed."""

    stream_id: int
    flags: int
    data: bytes


@dataclass(slots=True)
class ResponseReceived:
    """Client side: the stream's final frame (status and payload, still encoded)."""

    stream_id: int
    data: bytes


@dataclass(slots=True)
class DataReceived:
    """A message on a stream (``data`` is None for a no-data close); ``end_stream``
    means the peer will send nothing more on it."""

    stream_id: int
    data: bytes | None
    end_stream: bool


@dataclass(slots=True)
class FrameRejected:
    """A frame broke a rule for its stream. A server answers the stream with this
    status (the stream is over); a client logs it. The connection stays usable."""

    stream_id: int
    code: Code
    message: str


Event = RequestReceived | ResponseReceived | DataReceived | FrameRejected


def oversize_message(length: int) -> str:
    return f"message length {length} exceed maximum message size of {MAX_DATA_LENGTH}"


class Connection:
    def __init__(self, role: Role, max_data_length: int = MAX_DATA_LENGTH) -> None:
        self.role = role
        self._decoder = FrameDecoder(max_data_length)
        self._max_data_length = max_data_length
        self._streams: dict[int, StreamStateMachine] = {}
        self._next_stream_id = 1
        self._last_stream_id = 0

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._decoder.receive_data(data)

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed."""
        while True:
            frame = self._decoder.next_frame()
            if frame is None:
                return None
            if isinstance(frame, OversizedFrame):
                self._streams.pop(frame.stream_id, None)
                return FrameRejected(
                    frame.stream_id, Code.RESOURCE_EXHAUSTED, oversize_message(frame.length)
                )
            if self.role is Role.SERVER:
                event = self._server_event(frame.stream_id, frame.type, frame.flags, frame.data)
            else:
                event = self._client_event(frame.stream_id, frame.type, frame.flags, frame.data)
            if event is not None:
                return event
            # else: a frame to ignore (an unknown type, kept for forward compatibility)

    def _reject(self, stream_id: int, message: str, code: Code = Code.INVALID_ARGUMENT) -> Event:
        self._streams.pop(stream_id, None)
        return FrameRejected(stream_id, code, message)

    def _advance(self, stream: StreamStateMachine, event: StreamInput) -> None:
        if stream.process(event) is StreamState.CLOSED:
            del self._streams[stream.stream_id]

    def _server_event(self, stream_id: int, type_: int, flags: int, data: bytes) -> Event | None:
        if stream_id % 2 != 1:
            return self._reject(stream_id, "StreamID must be odd for client initiated streams")
        if type_ == TYPE_REQUEST:
            if stream_id <= self._last_stream_id:
                return self._reject(stream_id, "StreamID cannot be re-used and must increment")
            self._last_stream_id = stream_id
            stream = StreamStateMachine(Role.SERVER, stream_id)
            if flags & FLAG_REMOTE_OPEN:
                stream.process(StreamInput.RECV_REQUEST_OPEN)
            elif flags & FLAG_REMOTE_CLOSED:
                stream.process(StreamInput.RECV_REQUEST_CLOSED)
            else:
                stream.process(StreamInput.RECV_REQUEST_UNARY)
            self._streams[stream_id] = stream
            return RequestReceived(stream_id, flags, data)
        if type_ == TYPE_DATA:
            stream_or_none = self._streams.get(stream_id)
            if stream_or_none is None:
                return self._reject(stream_id, "StreamID is no longer active")
            closing = bool(flags & FLAG_REMOTE_CLOSED)
            if closing and data:
                return self._reject(stream_id, "data close message cannot include data")
            no_data = bool(flags & FLAG_NO_DATA)
            try:
                self._advance(
                    stream_or_none, StreamInput.RECV_CLOSE if closing else StreamInput.RECV_DATA
                )
            except RemoteProtocolError as exc:
                return self._reject(stream_id, f"data handling error: {exc}")
            return DataReceived(stream_id, None if no_data else data, closing)
        return None

    def _client_event(self, stream_id: int, type_: int, flags: int, data: bytes) -> Event | None:
        if type_ not in (TYPE_RESPONSE, TYPE_DATA):
            return None
        stream = self._streams.get(stream_id)
        if stream is None:
            return FrameRejected(
                stream_id, Code.FAILED_PRECONDITION, "received message on inactive stream"
            )
        if type_ == TYPE_RESPONSE:
            self._advance(stream, StreamInput.RECV_RESPONSE)
            return ResponseReceived(stream_id, data)
        closing = bool(flags & FLAG_REMOTE_CLOSED)
        try:
            self._advance(stream, StreamInput.RECV_CLOSE if closing else StreamInput.RECV_DATA)
        except RemoteProtocolError as exc:
            return self._reject(stream_id, str(exc))
        return DataReceived(stream_id, None if flags & FLAG_NO_DATA else data, closing)

    # -- sending -----------------------------------------------------------

    def _check_size(self, data: bytes) -> None:
        if len(data) > self._max_data_length:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, oversize_message(len(data)))

    def _stream(self, stream_id: int) -> StreamStateMachine:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not active")
        return stream

    def send_request(self, data: bytes, flags: int = 0) -> tuple[int, bytes]:
        """Client: open the next stream. Returns its id and the bytes to write."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends requests")
        self._check_size(data)
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, "stream ids exhausted on this connection")
        stream = StreamStateMachine(Role.CLIENT, stream_id)
        if flags & FLAG_REMOTE_OPEN:
            stream.process(StreamInput.SEND_REQUEST_OPEN)
        elif flags & FLAG_REMOTE_CLOSED:
            stream.process(StreamInput.SEND_REQUEST_CLOSED)
        else:
            stream.process(StreamInput.SEND_REQUEST_UNARY)
        self._next_stream_id += 2
        self._streams[stream_id] = stream
        return stream_id, encode_frame(stream_id, TYPE_REQUEST, flags, data)

    def send_data(self, stream_id: int, data: bytes) -> bytes:
        self._check_size(data)
        self._advance(self._stream(stream_id), StreamInput.SEND_DATA)
        return encode_frame(stream_id, TYPE_DATA, 0, data)

    def send_close(self, stream_id: int) -> bytes:
        """End our sending side: a no-data Data frame flagged remote-closed."""
        self._advance(self._stream(stream_id), StreamInput.SEND_CLOSE)
        return encode_frame(stream_id, TYPE_DATA, FLAG_REMOTE_CLOSED | FLAG_NO_DATA)

    def send_response(self, stream_id: int, data: bytes) -> bytes:
        """Server: finish a stream with an encoded Response.

        Also answers a stream that was rejected or never became active, which is
        how rule violations are reported to the client."""
        self._check_size(data)
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._advance(stream, StreamInput.SEND_RESPONSE)
        elif self.role is not Role.SERVER:
            raise LocalProtocolError("only a server sends responses")
        return encode_frame(stream_id, TYPE_RESPONSE, 0, data)

    def abandon(self, stream_id: int) -> None:
        """Forget a stream locally (a cancelled call); later frames for it are rejected."""
        self._streams.pop(stream_id, None)

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        return StreamState.CLOSED if stream is None else stream.state

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return self._decoder.buffered

    @property
    def active_streams(self) -> int:
        return len(self._streams)

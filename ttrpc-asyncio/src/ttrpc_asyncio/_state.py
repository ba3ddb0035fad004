"""Per-stream state machine, sans-IO: one table of legal transitions per role.

Clients close their sending side before the peer's (local before remote);
servers the other way round, and a server that ends its side (Data with
remote-closed, or a Response) finishes the stream, as containerd/ttrpc does.
"""

from __future__ import annotations

import enum

from .errors import LocalProtocolError, RemoteProtocolError


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"

    __hash__ = object.__hash__  # members are singletons: C-speed table lookups


class StreamState(enum.Enum):
    IDLE = "idle"
    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"

    __hash__ = object.__hash__


class StreamInput(enum.Enum):
    SEND_REQUEST_UNARY = "send unary request"
    SEND_REQUEST_OPEN = "send request (remote open)"
    SEND_REQUEST_CLOSED = "send request (remote closed)"
    RECV_REQUEST_UNARY = "receive unary request"
    RECV_REQUEST_OPEN = "receive request (remote open)"
    RECV_REQUEST_CLOSED = "receive request (remote closed)"
    SEND_DATA = "send data"
    SEND_CLOSE = "send close"
    SEND_RESPONSE = "send response"
    RECV_DATA = "receive data"
    RECV_CLOSE = "receive close"
    RECV_RESPONSE = "receive response"

    __hash__ = object.__hash__


S = StreamState
In = StreamInput

TRANSITIONS: dict[Role, dict[StreamState, dict[StreamInput, StreamState]]] = {
    Role.CLIENT: {
        S.IDLE: {
            In.SEND_REQUEST_UNARY: S.HALF_CLOSED_LOCAL,
            In.SEND_REQUEST_CLOSED: S.HALF_CLOSED_LOCAL,
            In.SEND_REQUEST_OPEN: S.OPEN,
        },
        S.OPEN: {
            In.SEND_DATA: S.OPEN,
            In.SEND_CLOSE: S.HALF_CLOSED_LOCAL,
            In.RECV_DATA: S.OPEN,
            # The server may finish before the client closes its side.
            In.RECV_CLOSE: S.CLOSED,
            In.RECV_RESPONSE: S.CLOSED,
        },
        S.HALF_CLOSED_LOCAL: {
            In.RECV_DATA: S.HALF_CLOSED_LOCAL,
            In.RECV_CLOSE: S.CLOSED,
            In.RECV_RESPONSE: S.CLOSED,
        },
        S.HALF_CLOSED_REMOTE: {},
        S.CLOSED: {},
    },
    Role.SERVER: {
        S.IDLE: {
            In.RECV_REQUEST_UNARY: S.HALF_CLOSED_REMOTE,
            In.RECV_REQUEST_CLOSED: S.HALF_CLOSED_REMOTE,
            In.RECV_REQUEST_OPEN: S.OPEN,
        },
        S.OPEN: {
            In.RECV_DATA: S.OPEN,
            In.RECV_CLOSE: S.HALF_CLOSED_REMOTE,
            In.SEND_DATA: S.OPEN,
            In.SEND_CLOSE: S.CLOSED,
            In.SEND_RESPONSE: S.CLOSED,
        },
        S.HALF_CLOSED_REMOTE: {
            In.SEND_DATA: S.HALF_CLOSED_REMOTE,
            In.SEND_CLOSE: S.CLOSED,
            In.SEND_RESPONSE: S.CLOSED,
        },
        S.HALF_CLOSED_LOCAL: {},
        S.CLOSED: {},
    },
}

_RECEIVED = frozenset(i for i in StreamInput if i.name.startswith("RECV_"))


class StreamStateMachine:
    """The state of one stream; ``process`` moves it or raises a typed error."""

    __slots__ = ("role", "state", "stream_id")

    def __init__(self, role: Role, stream_id: int) -> None:
        self.role = role
        self.stream_id = stream_id
        self.state = StreamState.IDLE

    def process(self, event: StreamInput) -> StreamState:
        try:
            self.state = TRANSITIONS[self.role][self.state][event]
        except KeyError:
            message = (
                f"stream {self.stream_id}: cannot {event.value} as {self.role.value} "
                f"in state {self.state.value}"
            )
            if event in _RECEIVED:
                raise RemoteProtocolError(message) from None
            raise LocalProtocolError(message) from None
        return self.state

    @property
    def closed(self) -> bool:
        return self.state is StreamState.CLOSED

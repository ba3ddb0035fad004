"""Stream state machine: the table, walked exhaustively."""

from __future__ import annotations

import contextlib
import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttrpc_asyncio._state import (
    TRANSITIONS,
    Role,
    StreamInput,
    StreamState,
    StreamStateMachine,
)
from ttrpc_asyncio.errors import LocalProtocolError, RemoteProtocolError


@pytest.mark.parametrize(
    ("role", "state", "event"), list(itertools.product(Role, StreamState, StreamInput))
)
def test_every_pair_moves_or_raises_typed_error(
    role: Role, state: StreamState, event: StreamInput
) -> None:
    """Each (state, input) either follows the table or raises the error naming who broke it."""
    machine = StreamStateMachine(role, 7)
    machine.state = state
    expected = TRANSITIONS[role][state].get(event)
    if expected is not None:
        assert machine.process(event) is expected
        return
    error = RemoteProtocolError if event.name.startswith("RECV_") else LocalProtocolError
    with pytest.raises(error, match=re.escape(f"stream 7: cannot {event.value} as {role.value}")):
        machine.process(event)
    assert machine.state is state


@given(st.sampled_from(Role), st.lists(st.sampled_from(StreamInput), max_size=20))
def test_closed_is_terminal(role: Role, events: list[StreamInput]) -> None:
    """Once closed, a stream accepts nothing more."""
    machine = StreamStateMachine(role, 1)
    for event in events:
        with contextlib.suppress(LocalProtocolError, RemoteProtocolError):
            machine.process(event)
        if machine.closed:
            for later in StreamInput:
                with pytest.raises((LocalProtocolError, RemoteProtocolError)):
                    machine.process(later)
            return


def test_unary_client_lifecycle() -> None:
    """Client unary: request closes our side, the response finishes the stream."""
    machine = StreamStateMachine(Role.CLIENT, 1)
    assert machine.process(StreamInput.SEND_REQUEST_UNARY) is StreamState.HALF_CLOSED_LOCAL
    with pytest.raises(LocalProtocolError):
        machine.process(StreamInput.SEND_DATA)
    assert machine.process(StreamInput.RECV_RESPONSE) is StreamState.CLOSED


def test_server_bidi_lifecycle() -> None:
    """Server bidi: data both ways, client closes, server's close finishes the stream."""
    machine = StreamStateMachine(Role.SERVER, 1)
    machine.process(StreamInput.RECV_REQUEST_OPEN)
    machine.process(StreamInput.RECV_DATA)
    machine.process(StreamInput.SEND_DATA)
    assert machine.process(StreamInput.RECV_CLOSE) is StreamState.HALF_CLOSED_REMOTE
    with pytest.raises(RemoteProtocolError):
        machine.process(StreamInput.RECV_DATA)
    assert machine.process(StreamInput.SEND_CLOSE) is StreamState.CLOSED

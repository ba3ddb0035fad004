"""The error classes: one base to catch, each keeping its own name and fields."""

from __future__ import annotations

import pytest

import ttrpc_asyncio as ttrpc


@pytest.mark.parametrize(
    "error",
    [
        ttrpc.TtrpcError(ttrpc.Code.NOT_FOUND, "gone"),
        ttrpc.ProtocolError("broken"),
        ttrpc.LocalProtocolError("our bug"),
        ttrpc.RemoteProtocolError("their bug"),
        ttrpc.StreamClosedError("stream 1: sending side is closed"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_one_except_catches_every_library_error(error: Exception) -> None:
    """``except ttrpc.Error`` catches a failed call, a protocol violation on
    either side and a send on a closed stream alike."""
    assert isinstance(error, ttrpc.Error)
    with pytest.raises(ttrpc.Error):
        raise error


def test_error_classes_keep_their_place() -> None:
    """The finer classes still nest as before, so existing ``except`` clauses
    catch what they caught."""
    assert issubclass(ttrpc.LocalProtocolError, ttrpc.ProtocolError)
    assert issubclass(ttrpc.RemoteProtocolError, ttrpc.ProtocolError)
    assert issubclass(ttrpc.StreamClosedError, ttrpc.LocalProtocolError)
    assert not issubclass(ttrpc.TtrpcError, ttrpc.ProtocolError)
    assert not issubclass(ttrpc.Error, ttrpc.TtrpcError)


def test_ttrpc_error_fields_and_text() -> None:
    """A status error shows its code name and message; an unknown code keeps its number."""
    error = ttrpc.TtrpcError(5, "no such forward")
    assert error.code is ttrpc.Code.NOT_FOUND
    assert error.message == "no such forward"
    assert str(error) == "NOT_FOUND: no such forward"
    assert repr(error) == "TtrpcError(<Code.NOT_FOUND: 5>, 'no such forward')"
    assert str(ttrpc.TtrpcError(ttrpc.Code.CANCELLED)) == "CANCELLED"
    newer = ttrpc.TtrpcError(99, "from the future")
    assert newer.code == 99
    assert str(newer) == "99: from the future"


def test_remote_protocol_error_carries_its_status() -> None:
    """A peer's violation carries the status code its stream is answered with."""
    assert ttrpc.RemoteProtocolError("bad").code is ttrpc.Code.INVALID_ARGUMENT
    error = ttrpc.RemoteProtocolError("too big", ttrpc.Code.RESOURCE_EXHAUSTED)
    assert error.code is ttrpc.Code.RESOURCE_EXHAUSTED
    assert str(error) == "too big"

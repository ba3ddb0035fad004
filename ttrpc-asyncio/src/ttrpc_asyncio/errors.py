"""Typed ttrpc errors: every RPC failure carries its gRPC status code.

All of them derive from :class:`Error`: one ``except ttrpc.Error`` catches every
failed call, broken protocol and closed stream this library reports.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes, as carried in ``google.rpc.Status.code``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Error(Exception):
    """Base of every error this ttrpc library raises."""


class TtrpcError(Error):
    """An RPC ended with a non-OK status (raised by clients, or by handlers to choose one)."""

    def __init__(self, code: Code | int, message: str = "") -> None:
        try:
            self.code: Code | int = Code(code)
        except ValueError:
            self.code = code  # a code newer than this table: keep the number
        self.message = message
        super().__init__(code, message)

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, Code) else str(self.code)
        return f"{name}: {self.message}" if self.message else name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class MessageDecodeError(TtrpcError):
    """One received message did not decode as its type (INTERNAL, as before this
    class existed). Only that message is lost: the stream stays usable and the
    next ``recv()`` returns the next message. ``data`` is the raw payload."""

    def __init__(self, message_type: str, data: bytes, reason: str) -> None:
        super().__init__(Code.INTERNAL, f"ttrpc: error unmarshalling {message_type}: {reason}")
        self.message_type = message_type
        self.data = data


class ProtocolError(Error):
    """The ttrpc protocol was broken; see the two subclasses for who broke it."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""

    def __init__(self, message: str, code: Code = Code.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code


class StreamClosedError(LocalProtocolError):
    """Sending on a stream whose sending side is already closed."""

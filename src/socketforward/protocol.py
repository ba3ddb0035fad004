"""The SocketForward protocol's words, shared by both sides (docs/protocol.md).

Stream ids and their bounds, the Accept metadata key, default endpoints, and
the error texts a host answers a ConnectRequest with. The texts are nerdbox's
own bytes on the wire; :func:`classify` turns one back into a
:class:`HostError` so that no caller compares message text itself.
"""

from __future__ import annotations

import base64
import enum
import os
import time
from collections.abc import Iterable
from typing import Final

from socketforward import datastream

__all__ = [
    "DEFAULT_RPC_DIAL",
    "DEFAULT_STREAMS",
    "FORWARD_IDS_METADATA",
    "HOST_CID",
    "MAX_FORWARD_ID_LEN",
    "MAX_STREAM_ID_LEN",
    "PICK_POOLED_METADATA",
    "RPC_PORT",
    "STREAM_ID_PREFIX",
    "STREAM_PORT",
    "UNKNOWN_FORWARD_ID",
    "HostError",
    "announced_forward_ids",
    "classify",
    "generate_stream_id",
    "valid_stream_id",
]

HOST_CID: Final = 2
RPC_PORT: Final = 1025
"""The guest dials the host here (nerdbox's default)."""
STREAM_PORT: Final = 1026
"""The guest listens for data streams here (nerdbox's default)."""
DEFAULT_RPC_DIAL: Final = f"vsock://{HOST_CID}:{RPC_PORT}"
DEFAULT_STREAMS: Final = f"vsock://:{STREAM_PORT}"

STREAM_ID_PREFIX: Final = "socketfwd"
"""Prefix of the stream ids the guest hands out (as nerdbox's vminitd)."""
MAX_STREAM_ID_LEN: Final = datastream.MAX_ID_LEN
"""Longest stream id (UTF-8 bytes) the data-stream channel writes, reads or acks."""
MAX_FORWARD_ID_LEN: Final = 256
"""Longest forward_id the host accepts in its table (and echoes in an error)."""

FORWARD_IDS_METADATA: Final = "socketforward-forward-ids"
"""Accept-call metadata key: the forward_ids a host stream serves, comma-separated."""
PICK_POOLED_METADATA: Final = "socketforward-pick-pooled"
"""Accept-call metadata key: the host relays a pooled data stream that a
ConnectRequest names (docs/protocol.md 5.6), one of those whose id starts with
``socketfwd-pool-{value}-`` (its pool's tag: several hosts may share a guest)."""


class HostError(enum.Enum):
    """Why a host refused a ConnectRequest; the value is the text on the wire.
    The texts never name a host path."""

    UNKNOWN_FORWARD = "unknown forward ID: "
    """nerdbox's text, followed by the forward_id (cut at MAX_FORWARD_ID_LEN)."""
    DIAL = "failed to dial host socket"
    STREAM = "failed to open data stream"
    STREAM_ID = "invalid stream ID"
    OVERLOAD = "too many pending connections"

    def text(self, forward_id: str = "") -> str:
        """The ConnectResult.error to send."""
        text = str(self.value)
        if self is not HostError.UNKNOWN_FORWARD:
            return text
        shown = forward_id[:MAX_FORWARD_ID_LEN]
        return text + shown + ("..." if len(forward_id) > MAX_FORWARD_ID_LEN else "")


UNKNOWN_FORWARD_ID: Final = HostError.UNKNOWN_FORWARD.value
"""How a host answers a forward_id it does not know (nerdbox's text, then the id)."""


def classify(error: str) -> HostError | None:
    """The HostError a ConnectResult.error text stands for; None for any other
    text (another host's words), and for "" (success)."""
    if error.startswith(UNKNOWN_FORWARD_ID):
        return HostError.UNKNOWN_FORWARD
    try:
        return HostError(error)
    except ValueError:
        return None


def generate_stream_id(prefix: str = STREAM_ID_PREFIX) -> str:
    """``{prefix}-{unix-nanoseconds}-{random}``: 4 random bytes, URL-safe base64
    without padding (as nerdbox's vminitd)."""
    random = base64.urlsafe_b64encode(os.urandom(4)).rstrip(b"=").decode()
    return f"{prefix}-{time.time_ns()}-{random}"


def valid_stream_id(stream_id: str) -> bool:
    """Whether the data-stream channel can carry *stream_id* (1..256 bytes)."""
    return 0 < len(stream_id.encode()) <= MAX_STREAM_ID_LEN


def announced_forward_ids(values: Iterable[str]) -> frozenset[str] | None:
    """The forward_ids an Accept call announced (its metadata values under
    FORWARD_IDS_METADATA); None when it announced none."""
    ids = frozenset(i.strip() for v in values for i in v.split(",") if i.strip())
    return ids or None

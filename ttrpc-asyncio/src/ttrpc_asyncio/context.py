"""What a server handler knows about its call."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .proto import ttrpc_pb2

Metadata = dict[str, list[str]]
"""Request metadata: lower-case keys, each with its values in order (as Go's ttrpc.MD)."""

MetadataLike = Mapping[str, str | Sequence[str]]


def metadata_to_wire(metadata: MetadataLike) -> list[ttrpc_pb2.KeyValue]:
    """Key/value pairs for a Request; keys are lower-cased, a str is one value."""
    pairs: list[ttrpc_pb2.KeyValue] = []
    for key, values in metadata.items():
        for value in (values,) if isinstance(values, str) else values:
            pairs.append(ttrpc_pb2.KeyValue(key=key.lower(), value=value))
    return pairs


def metadata_from_wire(pairs: Iterable[ttrpc_pb2.KeyValue]) -> Metadata:
    metadata: Metadata = {}
    for pair in pairs:
        metadata.setdefault(pair.key, []).append(pair.value)
    return metadata


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """SO_PEERCRED of a UNIX-socket peer, as of its connect()."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket) -> PeerCredentials | None:
        """The peer of a connected UNIX socket; None for other families. OSError
        when the kernel cannot say."""
        if sock.family != socket.AF_UNIX:
            return None
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        return cls(*_PEERCRED.unpack(raw))


_PEERCRED = struct.Struct("3i")


@dataclass(slots=True)
class CallContext:
    service: str
    method: str
    metadata: Metadata = field(default_factory=dict)
    deadline: float | None = None
    """Loop time (``asyncio.get_running_loop().time()``) when the call's timeout passes."""
    peer: PeerCredentials | None = None

    def get(self, key: str) -> list[str]:
        """The values of a metadata key (case-insensitive), empty when absent."""
        return self.metadata.get(key.lower(), [])

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

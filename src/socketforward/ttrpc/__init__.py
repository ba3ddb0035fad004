"""An asyncio ttrpc library, wire-compatible with containerd/ttrpc (protocol 1.2).

It imports nothing else of socketforward and could be published on its own.
"""

from socketforward.ttrpc.client import Client
from socketforward.ttrpc.context import CallContext, Metadata, MetadataLike, PeerCredentials
from socketforward.ttrpc.errors import (
    Code,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    StreamClosedError,
    TtrpcError,
)
from socketforward.ttrpc.server import Server
from socketforward.ttrpc.stream import ClientStream, ServerStream

__all__ = [
    "CallContext",
    "Client",
    "ClientStream",
    "Code",
    "LocalProtocolError",
    "Metadata",
    "MetadataLike",
    "PeerCredentials",
    "ProtocolError",
    "RemoteProtocolError",
    "Server",
    "ServerStream",
    "StreamClosedError",
    "TtrpcError",
]

"""An asyncio ttrpc library, wire-compatible with containerd/ttrpc (protocol 1.2).

ttrpc is containerd's gRPC-like RPC over a plain stream socket: protobuf
messages, no HTTP/2. This package serves and calls it: :class:`Server`
dispatches to services registered from their proto descriptors,
:class:`Client` makes unary and streaming calls multiplexed on one connection
(UNIX, TCP or vsock sockets, on asyncio's loop or uvloop), and every failure
it reports derives from :class:`Error`. Typed ``XxxBase``/``XxxStub`` classes
come from its protoc plugin ``protoc-gen-python_ttrpc`` (see :mod:`.plugin`).

It stands alone: it imports only the standard library and ``protobuf`` (its
``google.rpc.Status`` is generated into :mod:`.proto` from a vendored proto),
refers to itself by relative imports, logs under its own module names, and is
typed (``py.typed``), so it can also be vendored under another name.
"""

from .client import Client
from .context import CallContext, Metadata, MetadataLike, PeerCredentials
from .errors import (
    Code,
    Error,
    LocalProtocolError,
    MessageDecodeError,
    ProtocolError,
    RemoteProtocolError,
    StreamClosedError,
    TtrpcError,
)
from .server import Server
from .stream import ClientStream, ServerStream

__all__ = [
    "CallContext",
    "Client",
    "ClientStream",
    "Code",
    "Error",
    "LocalProtocolError",
    "MessageDecodeError",
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

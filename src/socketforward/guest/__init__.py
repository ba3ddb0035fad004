"""The VM side: the SocketForward ttrpc service and the ``socketforward guest`` agent.

Wire-compatible with nerdbox's vminitd socket-forward plugin; where the
reference falls short this one does better (docs/protocol.md 10, "Differences
from nerdbox"): requests are routed across several Accept calls, paced per
call, queued (bounded, with a timeout) instead of dropped, relays are
half-close aware, Bind is validated and all-or-nothing and never deletes a
regular file, and the agent dials the host again when the RPC connection drops.

Modules: ``service`` (the SocketForward handlers, listeners, claim + relay),
``dispatch`` (sans-IO routing of connections to Accept calls), ``bind``
(Bind's validation and listeners), ``budget`` (the descriptor budget, from the
fd limit), ``agent`` (the RPC connection), ``cli``.
The agent needs only protobuf, ttrpc-asyncio and the standard library.
"""

from socketforward.guest.agent import Agent
from socketforward.guest.cli import AgentConfig, add_parser, config_from_args, main
from socketforward.guest.embed import Guest
from socketforward.guest.service import Service, StreamManager
from socketforward.protocol import (
    DEFAULT_RPC_DIAL,
    DEFAULT_STREAMS,
    FORWARD_IDS_METADATA,
    STREAM_ID_PREFIX,
    UNKNOWN_FORWARD_ID,
    generate_stream_id,
)
from socketforward.stats import ForwardStats

__all__ = [
    "DEFAULT_RPC_DIAL",
    "DEFAULT_STREAMS",
    "FORWARD_IDS_METADATA",
    "STREAM_ID_PREFIX",
    "UNKNOWN_FORWARD_ID",
    "Agent",
    "AgentConfig",
    "ForwardStats",
    "Guest",
    "Service",
    "StreamManager",
    "add_parser",
    "config_from_args",
    "generate_stream_id",
    "main",
]

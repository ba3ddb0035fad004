"""The host side: a :class:`Forwarder` per VM, and ``socketforward host``.

The forward table (``forward_id -> host socket path``) comes from host
configuration only (``--forward``, ``--forwards-file``, ``--config`` or OCI
``uds`` mounts);
the VM names a forward by its id and nothing else. On each RPC connection the
Forwarder Binds every forward, then holds an Accept call announcing its
forward_ids, and answers each ConnectRequest: dial the host socket, open the
data stream (bounded ack, own timeout), reply, relay (docs/protocol.md
4.5, 4.9).

Modules: :mod:`.forwards` (the table model, pure), :mod:`.config` (the
``--config`` file, pure), :mod:`.oci` (uds mounts), :mod:`.connect` (one
ConnectRequest, start to finish), :mod:`.expose` (the VM -> host direction),
:mod:`.forwarder` (the RPC connection, Bind, the Accept call), :mod:`.embed`
(:class:`Host`, for embedding), :mod:`.control` (the table at run time),
:mod:`.cli` (the command line and the process).
"""

from __future__ import annotations

from socketforward.host.cli import add_parser, main
from socketforward.host.embed import Host
from socketforward.host.forwarder import Forwarder
from socketforward.host.forwards import (
    Expose,
    Forward,
    parse_expose,
    parse_forward,
    read_forwards_file,
)
from socketforward.host.oci import forwards_from_oci_spec
from socketforward.stats import ForwardStats

__all__ = [
    "Expose",
    "Forward",
    "ForwardStats",
    "Forwarder",
    "Host",
    "add_parser",
    "forwards_from_oci_spec",
    "main",
    "parse_expose",
    "parse_forward",
    "read_forwards_file",
]

"""The expose direction, VM -> host (docs/protocol.md 4.10).

For each :class:`~socketforward.host.forwards.Expose` the host listens at its
host path (mode 0600 unless configured). Each client gets a data stream to
the guest's stream endpoint: a pooled one when the pool has one ready
(docs/protocol.md 5.6), else one opened now under a fresh stream id (same
channel and handshake as the forward direction); the host asks the guest with
``Dial`` to connect it to the VM socket, and relays; on any failure the client
is closed at once and one line (rate-limited: a VM can fail dials at will)
says why.

Budgets are the forward direction's: a client counts among the VM's
connections (``max_relays``) while it is being set up and while it relays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Final, Protocol

import ttrpc_asyncio as ttrpc
from socketforward import datastream, transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardStub
from socketforward.host.connect import EXHAUSTED, RELAYS_FULL, RPC_LOST, STREAM_FAILED, Connector
from socketforward.host.forwards import Expose
from socketforward.logs import escape
from socketforward.protocol import generate_stream_id
from socketforward.stats import ForwardStats

__all__ = ["EXPOSE_STREAM_PREFIX", "Exposer", "listen_problem"]

log = logging.getLogger("socketforward.host")

EXPOSE_STREAM_PREFIX: Final = "expose"
"""Stream ids of exposed connections: never equal to the guest's (``socketfwd-...``)."""

# Failure reasons counted in the expose's ForwardStats.failed, besides connect.py's.
NO_GUEST: Final = "no_guest"  # no RPC connection with an Accept call open
UNSUPPORTED: Final = "unsupported"  # the guest answers Dial UNIMPLEMENTED (nerdbox's)
DIAL_REFUSED: Final = "dial"  # the guest could not (or would not) dial the VM socket


def listen_problem(path: str) -> str | None:
    """Why the directory of an exposed socket's *path* is unfit: anyone who can
    write it can put a socket of their own in its place. None when it is ours
    or root's and writable by no one else, or missing (created 0700)."""
    return transport.dir_problem(
        path,
        owners={os.geteuid(), 0},
        forbidden=0o022,
        what="can be written by others",
        advice="; they could replace the socket",
    )


class Session(Protocol):
    """An RPC connection to the guest, as an exposed connection uses it."""

    @property
    def stub(self) -> SocketForwardStub: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run *coro* as a task that ends with the connection."""


class Exposer:
    """The exposes of one Forwarder: their listeners and counters, and each
    client's way to a relay. *session* returns the RPC connection in use
    (None while there is none)."""

    def __init__(
        self,
        connector: Connector,
        session: Callable[[], Session | None],
        *,
        rpc_timeout: float,
    ) -> None:
        self.connector = connector
        self._session = session
        self.rpc_timeout = rpc_timeout
        self._exposes: dict[str, Expose] = {}
        self._listeners: dict[str, transport.Listener] = {}
        self.stats: dict[str, ForwardStats] = {}
        self._unsupported: Session | None = None
        """The session whose guest answered Dial UNIMPLEMENTED (said once)."""

    @property
    def exposes(self) -> Mapping[str, Expose]:
        return self._exposes

    async def add(self, exposes: Iterable[Expose]) -> None:
        """Listen for each of *exposes*, all or none: an id in use, a directory
        others can write, or a path that cannot be listened on raises
        ValueError (naming it) and leaves every listener as it was."""
        todo = list(exposes)
        seen: set[str] = set()
        for expose in todo:
            if expose.expose_id in self._exposes or expose.expose_id in seen:
                raise ValueError(f"expose ID {expose.expose_id} is already in use")
            seen.add(expose.expose_id)
            problem = listen_problem(expose.host_path)
            if problem is not None:
                raise ValueError(f"expose {expose.expose_id} at {expose.host_path}: {problem}")
        opened: list[tuple[Expose, transport.Listener]] = []
        try:
            for expose in todo:
                ep = transport.UnixEndpoint(expose.host_path)
                try:
                    listener = await transport.listen(
                        ep, mode=expose.mode, uid=expose.uid, gid=expose.gid
                    )
                except OSError as exc:
                    raise ValueError(
                        f"expose {expose.expose_id}: cannot listen at {expose.host_path}: {exc}"
                    ) from None
                opened.append((expose, listener))
        except BaseException:
            for _, listener in opened:
                listener.close()
            raise
        for expose, listener in opened:
            eid = expose.expose_id
            self._exposes[eid] = expose
            self._listeners[eid] = listener
            self.stats.setdefault(eid, ForwardStats())
            self._start_accepting(expose, listener)
            log.info(
                "exposing expose_id=%s vm_path=%s host_path=%s mode=%o",
                eid,
                expose.vm_path,
                expose.host_path,
                expose.mode,
            )

    def remove(self, expose_ids: Iterable[str]) -> list[str]:
        """Stop listening for *expose_ids* (their files removed); running
        connections go on. Returns the ids that were there."""
        removed = []
        for eid in expose_ids:
            listener = self._listeners.pop(eid, None)
            self._exposes.pop(eid, None)
            if listener is not None:
                listener.close()
                removed.append(eid)
                log.info("expose removed expose_id=%s", eid)
        return removed

    def close(self) -> None:
        """Stop every listener and remove its file."""
        self.remove(list(self._listeners))

    def _start_accepting(self, expose: Expose, listener: transport.Listener) -> None:
        def failed(exc: OSError) -> None:
            self.connector.peer_log.warning(
                "expose_accept",
                "accept failed expose_id=%s host_path=%s error=%r",
                expose.expose_id,
                expose.host_path,
                exc,
            )

        listener.start_accepting(lambda conn: self._on_client(expose, conn), failed)

    def _on_client(self, expose: Expose, client: socket.socket) -> None:
        stats = self.stats[expose.expose_id]
        stats.requests += 1
        connector = self.connector
        if connector.pending + 1 + len(connector.relays) > connector.max_relays:
            self._refuse(expose, client, stats, RELAYS_FULL, "too many connections for this vm")
            return
        session = self._session()
        if session is None:
            self._refuse(expose, client, stats, NO_GUEST, "no guest connected")
            return
        if session is self._unsupported:
            self._refuse(expose, client, stats, UNSUPPORTED, "the guest cannot expose sockets")
            return
        connector.pending += 1  # given back when the set-up ends, whichever way
        try:
            task = session.spawn(self._connect(expose, client, stats, session))
        except BaseException:
            connector.pending -= 1
            client.close()
            raise
        task.add_done_callback(lambda t: self._setup_done(t, client, stats))

    def _setup_done(
        self, task: asyncio.Task[Any], client: socket.socket, stats: ForwardStats
    ) -> None:
        self.connector.pending -= 1
        if task.cancelled() and client.fileno() >= 0:
            # Cancelled before it started (the RPC connection went): nobody closed it.
            client.close()
            stats.fail(RPC_LOST)

    async def _connect(
        self, expose: Expose, client: socket.socket, stats: ForwardStats, session: Session
    ) -> None:
        """Data stream, Dial, relay; on failure the client is closed and counted."""
        connector = self.connector
        data: socket.socket | None = None
        handed = False
        ack: datastream.AckReader | None = None
        loop = asyncio.get_running_loop()
        pooled = connector.pool.take()  # acked already: Dial names it (5.6)
        if pooled is not None:
            stream_id, data = pooled  # its watch parked by the pool
        else:
            stream_id = generate_stream_id(EXPOSE_STREAM_PREFIX)
        try:
            if data is None:  # not pooled: open one now (the pool checked its own)
                try:
                    data, ack = await self._open_stream(stream_id)
                except (OSError, datastream.HandshakeError) as exc:
                    reason = EXHAUSTED if transport.out_of_resources(exc) else STREAM_FAILED
                    self._fail(expose, stats, reason, f"data stream open failed: {exc}")
                    return
                problem = connector.stream_peer_problem(data)
                if problem is not None:
                    self._fail(expose, stats, STREAM_FAILED, f"data stream served by {problem}")
                    return
            ends = connector.ends_channel_for(stream_id)
            request = pb.DialRequest(
                stream_id=stream_id,
                expose_id=expose.expose_id,
                socket_path=expose.vm_path,
                ends_channel=ends,
            )
            try:
                await session.stub.Dial(request, timeout=self.rpc_timeout)
            except ttrpc.TtrpcError as exc:
                if exc.code == ttrpc.Code.UNIMPLEMENTED:
                    self._unsupported = session
                    log.warning(
                        "the guest cannot expose sockets (Dial unimplemented); "
                        "clients of exposes are closed expose_id=%s",
                        expose.expose_id,
                    )
                    stats.fail(UNSUPPORTED)
                    return
                code = exc.code.name if isinstance(exc.code, ttrpc.Code) else exc.code
                self._fail(expose, stats, DIAL_REFUSED, f"code={code} error={exc.message!r}")
                return
            except ttrpc.ProtocolError as exc:
                self._fail(expose, stats, RPC_LOST, f"rpc failed: {exc}")
                return
            if ack is not None:
                try:
                    # The guest acks before it claims the stream: the ack is
                    # usually in by now, and a timer per connection costs.
                    if not ack.read(data):
                        async with asyncio.timeout(connector.stream_timeout):
                            while not ack.read(data):
                                await transport.wait_ready(data)
                except (OSError, TimeoutError, datastream.HandshakeError) as exc:
                    self._fail(expose, stats, STREAM_FAILED, f"data stream ack: {exc!r}")
                    return
            sock, data, handed = data, None, True
            connector.start_relay(
                stats, expose.expose_id, stream_id, client, sock, ends_channel=ends
            )
        except asyncio.CancelledError:
            stats.fail(RPC_LOST)  # the RPC connection went while this was set up
            raise
        finally:
            if data is not None:
                if pooled is not None:
                    loop.remove_reader(data.fileno())
                data.close()
            if not handed:
                client.close()

    async def _open_stream(
        self, stream_id: str
    ) -> tuple[socket.socket, datastream.AckReader | None]:
        """A data stream opened for one client, and the reader of its ack when
        that is still to come. Usually the id goes out at once; then Dial goes
        too, and the ack (sent before the guest claims the stream) is read
        after it."""
        endpoint = self.connector.streams_endpoint
        data = datastream.open_stream_now(endpoint, stream_id)
        if data is not None:
            return data, datastream.AckReader(endpoint, stream_id)
        opened = await datastream.open_stream(
            endpoint, stream_id, timeout=self.connector.stream_timeout, retry_for=0
        )
        return opened, None

    def _refuse(
        self, expose: Expose, client: socket.socket, stats: ForwardStats, reason: str, why: str
    ) -> None:
        client.close()
        self._fail(expose, stats, reason, why)

    def _fail(self, expose: Expose, stats: ForwardStats, reason: str, why: str) -> None:
        stats.fail(reason)
        self.connector.peer_log.warning(
            f"expose_{reason}",
            "exposed connection closed expose_id=%s vm_path=%s reason=%s %s",
            expose.expose_id,
            escape(expose.vm_path),
            reason,
            why,
        )

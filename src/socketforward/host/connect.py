"""One ConnectRequest, start to finish (docs/protocol.md 4.5, 4.9
and 5).

Admission first, once for every request: is the forward_id in the table, can
the stream id travel on the data-stream channel, is there room among the
pending requests? A refusal is answered at once. An admitted request dials
the host socket, opens the data stream (bounded ack, own timeout), answers
the guest and starts the relay.

When both connects succeed at once (UNIX sockets, the usual case) that runs
on callbacks: no task and no Future per connection, only a readiness
callback for the ack whose reader the relay then takes over. Everything else
(errors to report, backlogs to wait out, a VM still booting, vsock) takes a
task of its own that waits, retries and names what failed.

Running out of descriptors or memory (EMFILE, ENOBUFS...) fails the one
request that hit it, with an answer, a count and a log line: never the
Accept call, the RPC connection or a counter. An admitted request holds its
slot among the pending ones (and in its Accept call's count) from
construction to :meth:`ConnectRequest.release`, which every path reaches once.

The data stream's listener must be the expected user (SO_PEERCRED, for
``unix:`` and ``hvsock:`` endpoints): another local user who got to the path
first must not receive host connections (docs/protocol.md 9.4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, Protocol

import ttrpc_asyncio as ttrpc
from socketforward import datastream, relay, transport
from socketforward.api import socketforward_pb2 as pb
from socketforward.deadlines import Deadlines
from socketforward.ends import EndRegistry, EndSender
from socketforward.host.forwards import Forward
from socketforward.host.pool import DEFAULT_POOL_SIZE, StreamPool
from socketforward.logs import RateLimitedLog, escape
from socketforward.protocol import HostError, valid_stream_id
from socketforward.stats import ForwardStats

__all__ = [
    "BAD_STREAM_ID",
    "DIAL_FAILED",
    "DIAL_TIMEOUT",
    "EXHAUSTED",
    "OVERLOADED",
    "RELAYS_FULL",
    "REPLY_FAILED",
    "RPC_LOST",
    "STREAM_FAILED",
    "STREAM_PEER",
    "ConnectRequest",
    "Connector",
    "ResultSink",
    "default_max_relays",
]

# Every module of the host side logs as "socketforward.host": one name in the log.
log = logging.getLogger("socketforward.host")

# Failure reasons counted in ForwardStats.failed.
DIAL_FAILED: Final = "dial"
DIAL_TIMEOUT: Final = "dial_timeout"
STREAM_FAILED: Final = "stream"
REPLY_FAILED: Final = "reply"
OVERLOADED: Final = "overload"
BAD_STREAM_ID: Final = "bad_stream_id"
RPC_LOST: Final = "rpc_lost"
RELAYS_FULL: Final = "relays_full"  # the VM holds max_relays connections already
EXHAUSTED: Final = "exhausted"  # no descriptor or memory for a socket (EMFILE, ENOBUFS...)
STREAM_PEER: Final = "stream_peer"  # the data stream's listener is another user


# Descriptors kept for the RPC connection, listeners, logs and the Python runtime.
_FD_RESERVE: Final = 256


def default_max_relays() -> int:
    """How many connections one VM may hold at once, from this process's fd
    limit: each holds two sockets here and up to two splice pipe ends while
    bytes flow, so a quarter of what is left after a reserve (256, or a quarter
    of a small limit)."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    reserve = min(_FD_RESERVE, soft // 4)  # a small limit keeps a quarter
    return max(1, (soft - reserve) // 4)


def _reason(exc: BaseException, otherwise: str) -> str:
    """The failure reason to count for *exc*: running out of descriptors or
    memory is told apart from a peer's problem."""
    return EXHAUSTED if transport.out_of_resources(exc) else otherwise


def close_pooled(sock: socket.socket) -> None:
    """Close a pooled stream whose reader may still be registered (5.6)."""
    with contextlib.suppress(Exception):
        asyncio.get_running_loop().remove_reader(sock.fileno())
    sock.close()


class ResultSink(Protocol):
    """The Accept call a ConnectRequest was read from, as the request sees it."""

    def send_result(self, result: pb.ConnectResult) -> None:
        """Queue *result* without waiting; TtrpcError or ProtocolError when the
        call is gone."""

    def begin(self) -> None:
        """A request read from this call is being answered."""

    def end(self) -> None:
        """That request is answered (or never will be)."""


Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[Any]"]


class Connector:
    """What the ConnectRequests of one Forwarder share: the table they are
    admitted against, the endpoints and bounds, the pending count, the relays."""

    def __init__(
        self,
        forwards: Mapping[str, Forward],
        stats: Mapping[str, ForwardStats],
        streams_endpoint: transport.Endpoint,
        *,
        dial_timeout: float,
        stream_timeout: float,
        stream_retry_for: float,
        max_pending: int,
        max_relays: int,
        streams_uid: int | None = None,
        stream_pool: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.forwards = forwards  # the Forwarder's table, read live
        self.stats = stats  # likewise
        self.streams_endpoint = streams_endpoint
        self.streams_uid = os.geteuid() if streams_uid is None else streams_uid
        """The user the data-stream listener must run as (SO_PEERCRED)."""
        # AF_VSOCK has no SO_PEERCRED; unix: and hvsock: are UNIX sockets here.
        self._check_peer = not isinstance(streams_endpoint, transport.VsockEndpoint)
        self.dial_timeout = dial_timeout
        self.stream_timeout = stream_timeout
        self.stream_retry_for = stream_retry_for
        self.max_pending = max_pending
        self.max_relays = max_relays
        """Relays plus admitted requests one VM may hold (each holds host descriptors)."""
        self.pending = 0
        """Admitted requests not answered yet."""
        self.unknown_requests = 0
        """ConnectRequests naming a forward_id not in the table (rejected, never dialed)."""
        self.relays: dict[relay.Relay, str] = {}
        """Running relays and their forward_ids."""
        self.no_relays = asyncio.Event()
        """Set while no relay runs (a draining host waits for it)."""
        self.no_relays.set()
        self.pipes = relay.PipePool()  # splice pipes shared by every relay
        self.peer_log = RateLimitedLog(log)
        """Warnings a VM can cause at will, one request at a time."""
        self.ends = EndRegistry(self._ends_call_for, early_limit=0)  # ours exist first
        """Relays whose direction ends travel out of band (docs/protocol.md 5.5)."""
        self._ends_call: ttrpc.ClientStream[pb.StreamEnd, pb.StreamEnd] | None = None
        self._ends_channel = 0
        self.pool = StreamPool(
            streams_endpoint,
            size=stream_pool,
            stream_timeout=stream_timeout,
            check_peer=self.stream_peer_problem,
        )
        """Data streams opened ahead of demand, while the guest takes them (5.6)."""

    # -- StreamEnds (docs/protocol.md 5.5) ------------------------------------------

    def ends_opened(
        self,
        channel: int,
        call: ttrpc.ClientStream[pb.StreamEnd, pb.StreamEnd],
        pool_limit: int = 0,
        *,
        guest_picks: bool = False,
    ) -> None:
        """The guest said hello on a StreamEnds call it numbers *channel*: new
        relays take their ends out of band on it, and new connections their
        data streams from the pool if the guest keeps *pool_limit* of them (the
        guest picks them itself if *guest_picks*)."""
        self._ends_call, self._ends_channel = call, channel
        self.pool.start(pool_limit, guest_picks=guest_picks)

    def ends_closed(self, channel: int) -> None:
        """That call is gone: its relays shut their data streams down instead."""
        if self._ends_channel == channel:
            self._ends_call, self._ends_channel = None, 0
            self.pool.stop()
        self.ends.channel_lost(channel)

    def _ends_call_for(self, channel: int) -> EndSender | None:
        # The call of *channel* while it is the open one; later, None.
        return self._ends_call if self._ends_channel == channel else None

    def ends_channel_for(self, stream_id: str) -> int:
        """The channel a new relay for *stream_id* takes its ends on; 0 (as a
        shutdown) without one, or while a relay with that id still runs (the
        VM picks the ids; it may repeat one)."""
        return 0 if stream_id in self.ends else self._ends_channel

    def end_received(self, end: pb.StreamEnd) -> None:
        """The guest's count for one direction of one data stream."""
        if valid_stream_id(end.stream_id) and self.ends.received(end.stream_id, end.bytes):
            return
        self.peer_log.warning(
            "stray_end",
            "stream end for no relay dropped stream_id=%s bytes=%d",
            escape(end.stream_id[:256]),
            end.bytes,
        )

    def reply(
        self,
        call: ResultSink,
        stream_id: str,
        fid: str,
        error: str,
        *,
        ends_channel: int = 0,
        data_stream_id: str = "",
    ) -> bool:
        """Send one ConnectResult; False (and a line) when the call is gone."""
        # Never waits: the Forwarder stops reading requests while too much is
        # queued toward the VM (docs/protocol.md 9.2); each result is at most about 1.3 KiB.
        try:
            call.send_result(
                pb.ConnectResult(
                    stream_id=stream_id,
                    error=error,
                    ends_channel=ends_channel,
                    data_stream_id=data_stream_id,
                )
            )
        except (ttrpc.TtrpcError, ttrpc.ProtocolError) as exc:
            self.peer_log.warning(
                "reply",
                "connect result not delivered stream_id=%s forward_id=%s error=%r",
                escape(stream_id),
                escape(fid),
                str(exc),
            )
            return False
        return True

    def receive(
        self,
        call: ResultSink,
        request: pb.ConnectRequest,
        acks: Deadlines[ConnectRequest],
        spawn: Spawn,
    ) -> None:
        """Admit *request* and start answering it, never waiting: the Accept
        call's receive queue must never stall. Fast-path requests await their
        ack in *acks*; the others run in a task from *spawn*."""
        stream_id, fid = request.stream_id, request.forward_id
        forward = self.forwards.get(fid)
        if not valid_stream_id(stream_id):
            # Checked first: a VM-supplied id (up to a whole frame) is never
            # echoed, so every result the host queues toward the VM stays small.
            self._refuse_stream_id(call, stream_id, fid, forward is not None)
            return
        named: tuple[str, socket.socket] | None = None
        if request.data_stream_id:
            named = self._claim_named(call, stream_id, fid, request.data_stream_id)
            if named is None:
                return
        stats = self._admitted(call, stream_id, fid, forward)
        if stats is None:
            if named is not None:
                close_pooled(named[1])
            return
        assert forward is not None
        # Holds a slot, and owns the named stream from here.
        connect = ConnectRequest(self, call, forward, stats, stream_id, named=named)
        try:
            if connect.open_now(acks):
                return
            spawn(connect.run()).add_done_callback(connect.task_done)
        except BaseException:
            connect.finish()  # nothing else will: the request went nowhere
            raise

    def _claim_named(
        self, call: ResultSink, stream_id: str, fid: str, pool_id: str
    ) -> tuple[str, socket.socket] | None:
        """The pooled stream a request names (5.6), taken from the pool; None
        (answered, logged) when the pool has no such stream ready."""
        sock = None
        if valid_stream_id(pool_id) and pool_id.startswith(datastream.POOLED_PREFIX):
            sock = self.pool.claim(pool_id)
        if sock is not None:
            return pool_id, sock
        self.peer_log.warning(
            "bad_data_stream",
            "connect request names no ready pooled stream stream_id=%s forward_id=%s "
            "data_stream_id=%s",
            escape(stream_id),
            escape(fid),
            escape(pool_id[:256]),
        )
        stats = self.stats.get(fid)
        if stats is not None:
            stats.requests += 1
            stats.fail(STREAM_FAILED)
        self.reply(call, stream_id, fid, HostError.STREAM.text())
        return None

    def _admitted(
        self, call: ResultSink, stream_id: str, fid: str, forward: Forward | None
    ) -> ForwardStats | None:
        """The stats of a request for a known forward the host has room for;
        None (answered, logged, counted) when it is refused."""
        if forward is None:
            self.unknown_requests += 1
            self.peer_log.warning(
                "unknown_forward",
                "unknown forward ID rejected stream_id=%s forward_id=%s",
                escape(stream_id),
                escape(fid),
            )
            self.reply(call, stream_id, fid, HostError.UNKNOWN_FORWARD.text(fid))
            return None
        stats = self.stats[fid]
        stats.requests += 1
        refused = self._refusal(stream_id, fid)
        if refused is not None:
            error, reason = refused
            stats.fail(reason)
            self.reply(call, stream_id, fid, error.text())
            return None
        return stats

    def _refuse_stream_id(self, call: ResultSink, stream_id: str, fid: str, known: bool) -> None:
        """Answer a request whose stream_id the data-stream channel cannot carry:
        `invalid stream ID` with an empty stream_id (the guest cannot match it)."""
        self.peer_log.warning(
            "bad_stream_id",
            "invalid stream ID rejected stream_id=%s stream_id_len=%d forward_id=%s",
            escape(stream_id),
            len(stream_id),
            escape(fid),
        )
        if known:
            stats = self.stats[fid]
            stats.requests += 1
            stats.fail(BAD_STREAM_ID)
        else:
            self.unknown_requests += 1
        self.reply(call, "", fid, HostError.STREAM_ID.text())

    def _refusal(self, stream_id: str, fid: str) -> tuple[HostError, str] | None:
        """Why a request for a known forward is refused before anything is dialed."""
        pending = self.pending + 1  # counting this one
        if pending + len(self.relays) > self.max_relays:
            self.peer_log.warning(
                "relays_full",
                "too many connections for this vm stream_id=%s forward_id=%s relays=%d pending=%d",
                escape(stream_id),
                fid,
                len(self.relays),
                self.pending,
            )
            return HostError.OVERLOAD, RELAYS_FULL
        if pending > self.max_pending:
            self.peer_log.warning(
                "overload",
                "too many pending connections stream_id=%s forward_id=%s pending=%d",
                escape(stream_id),
                fid,
                pending,
            )
            return HostError.OVERLOAD, OVERLOADED
        return None

    def stream_peer_problem(self, sock: socket.socket) -> str | None:
        """Why the listener behind the data stream *sock* is not to be trusted,
        as key=value words for a log line; None when it is the expected user."""
        if not self._check_peer:
            return None
        try:
            peer = ttrpc.PeerCredentials.of(sock)
        except OSError as exc:
            return f"peer_uid=unknown expected_uid={self.streams_uid} error={str(exc)!r}"
        if peer is None or peer.uid == self.streams_uid:
            return None
        return f"peer_uid={peer.uid} peer_pid={peer.pid} expected_uid={self.streams_uid}"

    def start_relay(
        self,
        stats: ForwardStats,
        fid: str,
        stream_id: str,
        host_sock: socket.socket,
        data_sock: socket.socket,
        *,
        ends_channel: int = 0,
    ) -> None:
        stats.connected += 1
        stats.active += 1
        # No task per relay: an idle forwarded connection costs only its relay.
        done = _RelayDone(self, stats)
        running = relay.Relay(
            host_sock,
            data_sock,
            pipes=self.pipes,
            on_done=done,
            ends=self.ends if ends_channel else None,
            ends_id=stream_id,
            ends_channel=ends_channel,
        )
        done.running = running
        self.relays[running] = fid
        self.no_relays.clear()
        log.debug("connection forwarded stream_id=%s forward_id=%s", stream_id, fid)
        running.start()
        if ends_channel and not running.closed:
            self.ends.add(running)

    def relay_done(
        self, running: relay.Relay, stats: ForwardStats, result: relay.RelayStats
    ) -> None:
        """*running* ended: count it in *stats* and forget it."""
        fid = self.relays.pop(running)
        if not self.relays:
            self.no_relays.set()
        stream_id = running.ends_id
        if running.ends_channel:
            self.ends.discard(running)
            if result.end_mismatch:
                self._log_end_error(stream_id, fid, str(result.error))
        stats.active -= 1
        stats.bytes_to_vm += result.bytes_a_to_b
        stats.bytes_to_host += result.bytes_b_to_a
        log.debug(
            "relay ended stream_id=%s forward_id=%s ended=%s to_host=%d to_vm=%d",
            stream_id,
            fid,
            result.ended,
            result.bytes_b_to_a,
            result.bytes_a_to_b,
        )

    def _log_end_error(self, stream_id: str, fid: str, error: str) -> None:
        self.peer_log.warning(
            "end_mismatch",
            "connection ended on a bad stream end stream_id=%s forward_id=%s error=%r",
            escape(stream_id),
            fid,
            error,
        )

    def close(self) -> None:
        """End every relay; say what the rate limit left out of the log."""
        for running in list(self.relays):
            running.close()
        self.pool.stop()
        self.pipes.close()
        self.peer_log.flush()


class _RelayDone:
    """A relay's ``on_done``: what :meth:`Connector.relay_done` needs that the
    relay does not hold. Slotted, not a closure: a closure over this many
    names cost about 0.45 KiB per idle connection, this 64 bytes (the forward
    id is the relay's value in ``Connector.relays``, the stream id and ends
    channel are the relay's own)."""

    __slots__ = ("connector", "running", "stats")

    def __init__(self, connector: Connector, stats: ForwardStats) -> None:
        self.connector = connector
        self.stats = stats
        self.running: relay.Relay | None = None  # set once the relay is made

    def __call__(self, result: relay.RelayStats) -> None:
        assert self.running is not None
        self.connector.relay_done(self.running, self.stats, result)


class ConnectRequest:
    """One admitted ConnectRequest: dial, open the data stream, answer, relay.

    Hashed by identity (a Deadlines key while its ack is awaited)."""

    __slots__ = (
        "ack",
        "acks",
        "call",
        "connector",
        "data_sock",
        "forward",
        "holding",
        "host_sock",
        "named",
        "stats",
        "stream_id",
    )

    def __init__(
        self,
        connector: Connector,
        call: ResultSink,
        forward: Forward,
        stats: ForwardStats,
        stream_id: str,
        *,
        named: tuple[str, socket.socket] | None = None,
    ) -> None:
        self.connector = connector
        self.call = call
        self.forward = forward
        self.stats = stats
        self.stream_id = stream_id
        self.named = named
        """The pooled stream the guest picked and named (5.6): relayed, not opened."""
        # Set on the fast path only.
        self.host_sock: socket.socket | None = None
        self.data_sock: socket.socket | None = None
        self.ack: datastream.AckReader | None = None
        self.acks: Deadlines[ConnectRequest] | None = None
        # The slot: taken here, given back by release() alone.
        connector.pending += 1
        call.begin()
        self.holding = True

    def _reply(self, error: str, ends_channel: int = 0, data_stream_id: str = "") -> bool:
        return self.connector.reply(
            self.call,
            self.stream_id,
            self.forward.forward_id,
            error,
            ends_channel=ends_channel,
            data_stream_id=data_stream_id,
        )

    def release(self) -> None:
        """Give back the slot this request holds among the pending ones and in its
        Accept call; only the first call counts, so no path can give it twice."""
        if self.holding:
            self.holding = False
            self.connector.pending -= 1
            self.call.end()

    def _fail(self, error: HostError, reason: str) -> None:
        """Count, answer the VM and release: the end of a request that failed
        before its ack was awaited (its caller closes what it opened)."""
        self.stats.fail(reason)
        self._reply(error.text())
        self.release()
        self._drop_named()

    def _drop_named(self) -> None:
        """Close the pooled stream the guest named, if this request still holds it."""
        if self.named is not None:
            close_pooled(self.named[1])
            self.named = None

    # -- the fast path, on callbacks --------------------------------------------------

    def open_now(self, acks: Deadlines[ConnectRequest]) -> bool:
        """Connect both sockets without waiting and await the ack on a readiness
        callback. True when the fast path took the request (its ack awaited, or
        already failed and answered: no socket could be made, or the stream's
        listener is another user); False (nothing left open) when a connect
        would wait."""
        connector = self.connector
        endpoint = connector.streams_endpoint
        opened: list[socket.socket] = []  # closed on the way out unless handed over
        try:
            try:
                host_sock = transport.connect_unix_now(self.forward.host_path)
            except OSError as exc:  # no socket to be had: waiting would not help
                reason = _reason(exc, DIAL_FAILED)
                self._log_dial_failed(exc, reason)
                self._fail(HostError.DIAL, reason)
                return True
            if host_sock is None:
                return False
            opened.append(host_sock)
            pooled, self.named = self.named or connector.pool.take(), None
            if pooled is not None:
                opened.clear()
                self._relay_pooled(host_sock, *pooled)
                return True
            try:
                data_sock = datastream.open_stream_now(endpoint, self.stream_id)
            except OSError as exc:
                reason = _reason(exc, STREAM_FAILED)
                self._log_stream_failed(exc, reason)
                self._fail(HostError.STREAM, reason)
                return True
            if data_sock is None:
                # The task path waits for the data stream; it keeps this dial
                # (one dial per request, whatever path it takes).
                self.host_sock = host_sock
                opened.clear()
                return False
            opened.append(data_sock)
            problem = connector.stream_peer_problem(data_sock)
            if problem is not None:
                self._log_stream_peer(problem)
                self._fail(HostError.STREAM, STREAM_PEER)
                return True
            try:
                # epoll_ctl may fail for want of memory too (ENOMEM, ENOSPC).
                asyncio.get_running_loop().add_reader(data_sock.fileno(), self._on_ack)
            except OSError as exc:
                reason = _reason(exc, STREAM_FAILED)
                self._log_stream_failed(exc, reason)
                self._fail(HostError.STREAM, reason)
                return True
            opened.clear()  # the ack callback owns them now
            self.host_sock, self.data_sock = host_sock, data_sock
            self.ack = datastream.AckReader(endpoint, self.stream_id)
            self.acks = acks
            acks.add(self)
            return True
        finally:
            for sock in opened:
                sock.close()

    def _relay_pooled(
        self, host_sock: socket.socket, pool_id: str, data_sock: socket.socket
    ) -> None:
        """Answer at once, naming the pooled stream *pool_id* (5.6), and relay on
        it. The pool's reader on it stays until the relay replaces it."""
        loop, fd = asyncio.get_running_loop(), data_sock.fileno()
        try:
            if self._succeed(host_sock, data_sock, pool_id):
                return
        except BaseException:
            # The relay closed both sockets; no watcher may outlive the fd.
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            raise
        loop.remove_reader(fd)
        host_sock.close()
        data_sock.close()
        self.release()

    def _succeed(
        self, host_sock: socket.socket, data_sock: socket.socket, data_stream_id: str = ""
    ) -> bool:
        """Answer success, give back the slot and relay; False (counted, the
        sockets still the caller's) when the answer cannot go."""
        ends = self.connector.ends_channel_for(self.stream_id)
        if not self._reply("", ends, data_stream_id):
            self.stats.fail(REPLY_FAILED)
            return False
        self.release()
        self.connector.start_relay(
            self.stats,
            self.forward.forward_id,
            self.stream_id,
            host_sock,
            data_sock,
            ends_channel=ends,
        )
        return True

    def _on_ack(self) -> None:
        assert self.ack is not None and self.data_sock is not None and self.host_sock is not None
        assert self.acks is not None
        try:
            if not self.ack.read(self.data_sock):
                return
        except (OSError, datastream.HandshakeError) as exc:
            self._open_failed(STREAM_FAILED, str(exc))
            return
        ends = self.connector.ends_channel_for(self.stream_id)
        if not self._reply("", ends):
            self._open_failed(REPLY_FAILED, None)
            return
        self.acks.discard(self)
        self.release()
        # The data socket's reader stays registered: the relay replaces its
        # callback instead of a remove and an add (uvloop: seven syscalls).
        fd = self.data_sock.fileno()
        try:
            self.connector.start_relay(
                self.stats,
                self.forward.forward_id,
                self.stream_id,
                self.host_sock,
                self.data_sock,
                ends_channel=ends,
            )
        except BaseException:
            # The relay closed both sockets; no watcher may outlive the fd.
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
            raise

    def ack_timed_out(self) -> None:
        """The ack deadline passed (called by the session's Deadlines)."""
        connector = self.connector
        error = f"stream {self.stream_id!r} at {connector.streams_endpoint}: no ack within "
        self._open_failed(STREAM_FAILED, error + f"{connector.stream_timeout}s")

    def abandon(self) -> None:
        """The RPC connection is gone while the ack is awaited: close both sockets."""
        self._open_failed(RPC_LOST, None)

    def _open_failed(self, reason: str, error: str | None) -> None:
        """Undo a fast-path opening; *error* (logged, and the stream error to the
        VM) is None when there is nobody left to tell."""
        assert self.data_sock is not None and self.host_sock is not None
        if self.acks is not None:
            self.acks.discard(self)
        asyncio.get_running_loop().remove_reader(self.data_sock.fileno())
        self.data_sock.close()
        self.host_sock.close()
        self.stats.fail(reason)
        if error is not None:
            self.connector.peer_log.warning(
                "stream",
                "data stream open failed stream_id=%s forward_id=%s streams=%s error=%r",
                escape(self.stream_id),
                self.forward.forward_id,
                self.connector.streams_endpoint,
                error,
            )
            self._reply(HostError.STREAM.text())
        self.release()

    # -- one log line per failure -----------------------------------------------

    def _log_dial_failed(self, exc: OSError, reason: str) -> None:
        self.connector.peer_log.warning(
            "dial",
            "host socket dial failed stream_id=%s forward_id=%s host_path=%s reason=%s error=%r",
            escape(self.stream_id),
            self.forward.forward_id,
            self.forward.host_path,
            reason,
            str(exc),
        )

    def _log_stream_failed(self, exc: BaseException, reason: str) -> None:
        self.connector.peer_log.warning(
            "stream",
            "data stream open failed stream_id=%s forward_id=%s streams=%s reason=%s error=%r",
            escape(self.stream_id),
            self.forward.forward_id,
            self.connector.streams_endpoint,
            reason,
            str(exc),
        )

    def _log_stream_peer(self, problem: str) -> None:
        self.connector.peer_log.warning(
            "stream_peer",
            "data stream endpoint served by another user, stream closed stream_id=%s "
            "forward_id=%s streams=%s %s",
            escape(self.stream_id),
            self.forward.forward_id,
            self.connector.streams_endpoint,
            problem,
        )

    # -- the task path ------------------------------------------------------------------

    async def run(self) -> None:
        """Start over with connects that may wait; answer, then relay."""
        sockets: list[socket.socket] = []
        pool_id = ""
        try:
            if self.named is not None:
                pool_id, data_sock = self.named
                self.named = None
                # A plain socket from here: closed or relayed, no reader of the pool's left.
                asyncio.get_running_loop().remove_reader(data_sock.fileno())
                sockets.append(data_sock)
            failure = await self._open(sockets)
            if failure is not None:
                error, reason = failure
                self.stats.fail(reason)
                self._reply(error.text())
                return
            host_sock, data_sock = sockets
            if self._succeed(host_sock, data_sock, pool_id):
                sockets.clear()  # the relay's now
        finally:
            for sock in sockets:
                sock.close()

    def task_done(self, task: asyncio.Task[Any]) -> None:
        # A done callback, not a finally: a task cancelled before its first
        # step never runs the coroutine's finally.
        if task.cancelled():
            self.stats.fail(RPC_LOST)
        self.finish()

    def finish(self) -> None:
        """Close a host socket the fast path handed over that no task took, and
        give back the slot: the end of a request on every path that leaves one."""
        if self.host_sock is not None:
            self.host_sock.close()
            self.host_sock = None
        self._drop_named()
        self.release()

    async def _open(self, sockets: list[socket.socket]) -> tuple[HostError, str] | None:
        """Dial the host socket, then open the data stream; both land in *sockets*.
        Returns the error for the VM and the failure reason (None: success)."""
        connector, forward, stream_id = self.connector, self.forward, self.stream_id
        named = bool(sockets)  # the data stream the guest picked is there already
        try:
            if self.host_sock is not None:  # dialed on the fast path already
                sockets.insert(0, self.host_sock)
                self.host_sock = None
            else:
                sockets.insert(
                    0,
                    await transport.connect(
                        transport.UnixEndpoint(forward.host_path), timeout=connector.dial_timeout
                    ),
                )
        except OSError as exc:
            reason = DIAL_TIMEOUT if isinstance(exc, TimeoutError) else _reason(exc, DIAL_FAILED)
            self._log_dial_failed(exc, reason)
            return HostError.DIAL, reason
        if named:
            return None
        try:
            sockets.append(
                await datastream.open_stream(
                    connector.streams_endpoint,
                    stream_id,
                    timeout=connector.stream_timeout,
                    retry_for=connector.stream_retry_for,
                )
            )
        except (OSError, datastream.HandshakeError) as exc:
            reason = _reason(exc, STREAM_FAILED)
            self._log_stream_failed(exc, reason)
            return HostError.STREAM, reason
        problem = connector.stream_peer_problem(sockets[-1])
        if problem is not None:
            self._log_stream_peer(problem)
            return HostError.STREAM, STREAM_PEER
        return None

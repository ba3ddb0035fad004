"""The host side: a :class:`Forwarder` per VM, and ``socketforward host``.

The forward table (``forward_id -> host socket path``) comes from host
configuration only (``--forward`` or OCI ``uds`` mounts); the VM names a
forward by its id and nothing else. On each RPC connection the Forwarder
Binds every forward, then holds an ``Accept`` stream announcing its
forward_ids, and serves each ConnectRequest: dial the host socket, open the
data stream (bounded ack, own timeout), answer, relay. When both connects
succeed at once (UNIX sockets, the usual case) that runs on callbacks; else in
a task of its own that waits, retries and names what failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Final

from socketforward import oci, relay, runner, streams, transport, ttrpc
from socketforward.api import socketforward_pb2 as pb
from socketforward.api.socketforward_ttrpc import SocketForwardStub
from socketforward.argtypes import positive_seconds
from socketforward.deadlines import Deadlines
from socketforward.ids import FORWARD_IDS_METADATA, UNKNOWN_FORWARD_ID

__all__ = [
    "Forward",
    "ForwardStats",
    "Forwarder",
    "add_parser",
    "forwards_from_oci_spec",
    "main",
    "parse_forward",
    "read_forwards_file",
]

log = logging.getLogger("socketforward.host")

MAX_FORWARD_ID_LEN: Final = 256
# Error texts sent to the VM; they never name a host path.
DIAL_ERROR: Final = "failed to dial host socket"
STREAM_ERROR: Final = "failed to open data stream"
STREAM_ID_ERROR: Final = "invalid stream ID"
OVERLOAD_ERROR: Final = "too many pending connections"

# Failure reasons counted in ForwardStats.failures.
DIAL_FAILED: Final = "dial"
DIAL_TIMEOUT: Final = "dial_timeout"
STREAM_FAILED: Final = "stream"
REPLY_FAILED: Final = "reply"
OVERLOADED: Final = "overload"
BAD_STREAM_ID: Final = "bad_stream_id"
RPC_LOST: Final = "rpc_lost"

_BACKOFF_MIN: Final = 0.05
_RETIRE_TIMEOUT: Final = 30.0


def _short(text: str, limit: int = 128) -> str:
    """A VM-supplied string for a log line: bounded, quoted when it has odd characters."""
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return cut if cut.isprintable() and " " not in cut and cut else repr(cut)


def _valid_stream_id(stream_id: str) -> bool:
    return 0 < len(stream_id.encode()) <= streams.MAX_ID_LEN


def _check_socket_path(what: str, path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"{what} {path!r} must be an absolute path")
    if "\0" in path:
        raise ValueError(f"{what} {path!r} contains a NUL byte")
    size = len(os.fsencode(path))
    if size > transport.MAX_UNIX_PATH:
        raise ValueError(
            f"{what} {path!r} is {size} bytes, longer than the "
            f"{transport.MAX_UNIX_PATH} bytes a UNIX socket path can hold"
        )


@dataclass(frozen=True)
class Forward:
    """One forward: the VM listens at *vm_path*; connections reach *host_path*."""

    forward_id: str
    host_path: str
    vm_path: str

    def __post_init__(self) -> None:
        fid = self.forward_id
        if not fid:
            raise ValueError("forward ID must not be empty")
        if len(fid) > MAX_FORWARD_ID_LEN:
            raise ValueError(f"forward ID is longer than {MAX_FORWARD_ID_LEN} characters")
        if not fid.isprintable() or any(c in fid for c in ", =") or not fid.isascii():
            raise ValueError(
                f"forward ID {fid!r} may hold printable ASCII only, without ',', '=' or spaces"
            )
        _check_socket_path("host path", self.host_path)
        _check_socket_path("VM path", self.vm_path)


def parse_forward(text: str) -> Forward:
    """``FORWARD_ID=HOST_PATH:VM_PATH``; the paths split at the last ``:/``."""
    fid, sep, paths = text.partition("=")
    cut = paths.rfind(":/")
    if not sep or cut < 0:
        raise ValueError(f"{text!r} is not FORWARD_ID=HOST_PATH:VM_PATH (both paths absolute)")
    try:
        return Forward(fid, paths[:cut], paths[cut + 1 :])
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def read_forwards_file(path: str) -> list[Forward]:
    """Forwards from a file: one ``FORWARD_ID=HOST_PATH:VM_PATH`` per line, blank
    lines and ``#`` comments skipped. A ValueError names the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    forwards: dict[str, Forward] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            forward = parse_forward(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        if forward.forward_id in forwards:
            raise ValueError(f"{path}:{number}: forward ID {forward.forward_id} is given twice")
        forwards[forward.forward_id] = forward
    return list(forwards.values())


def forwards_from_oci_spec(
    spec: dict[str, Any], container_id: str
) -> tuple[list[Forward], list[oci.UdsMount]]:
    """Rewrite *spec*'s uds mounts in place (SPEC 3.4); the forwards they make."""
    mounts = oci.rewrite_uds_mounts(spec, container_id)
    forwards = []
    for m in mounts:
        try:
            forwards.append(Forward(m.forward_id, m.host_path, m.vm_path))
        except ValueError as exc:
            raise oci.OciSpecError(f"uds mount for {m.container_path!r}: {exc}") from None
    return forwards, mounts


@dataclass
class ForwardStats:
    """What one forward did. Bytes count the relays, finished and running."""

    requests: int = 0
    """ConnectRequests received for this forward."""
    connections: int = 0
    """Connections that reached the relay."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failed ConnectRequests by reason (``dial``, ``dial_timeout``, ``stream``, ...)."""
    bytes_to_host: int = 0
    bytes_to_vm: int = 0
    active_relays: int = 0

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


class _AcceptStream:
    """One Accept call and the ConnectRequests read from it still being answered."""

    def __init__(
        self, stream: ttrpc.ClientStream[pb.ConnectResult, pb.ConnectRequest], announced: int
    ) -> None:
        self.stream = stream
        self.announced = announced
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.closing = False

    def begin(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity (a Deadlines key)
class _Opening:
    """A ConnectRequest on the fast path: both sockets connected, the stream id
    written, the ack awaited on a readiness callback (no task)."""

    session: _Session
    current: _AcceptStream
    fid: str
    host_sock: socket.socket
    data_sock: socket.socket
    ack: streams.AckReader


class _Session:
    """One RPC connection to the guest and the tasks that live only as long as it."""

    def __init__(
        self, client: ttrpc.Client, ack_timeout: float, on_ack_timeout: Callable[[_Opening], None]
    ) -> None:
        self.client = client
        self.stub = SocketForwardStub(client)
        self.refresh = asyncio.Event()
        self.ready = False
        self.tasks: set[asyncio.Task[Any]] = set()
        # Fast-path openings waiting for their ack.
        self.acks: Deadlines[_Opening] = Deadlines(ack_timeout, on_ack_timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()


class Forwarder:
    """The host side for one VM.

    Give it RPC connections with :meth:`serve` (one at a time; a new one
    replaces the old), or let :meth:`run_listening` / :meth:`run_dialing` get
    them. Relays outlive the RPC connection they were set up on; :meth:`close`
    ends everything.
    """

    def __init__(
        self,
        forwards: Iterable[Forward],
        streams_endpoint: transport.Endpoint,
        *,
        dial_timeout: float = 5.0,
        stream_timeout: float = 10.0,
        stream_retry_for: float = 30.0,
        rpc_timeout: float = 10.0,
        max_pending: int = 1024,
    ) -> None:
        self._forwards: dict[str, Forward] = {}
        for forward in forwards:
            self._check_new(forward, self._forwards)
            self._forwards[forward.forward_id] = forward
        self._stats = {fid: ForwardStats() for fid in self._forwards}
        self.streams_endpoint = streams_endpoint
        self.dial_timeout = dial_timeout
        self.stream_timeout = stream_timeout
        self.stream_retry_for = stream_retry_for
        self.rpc_timeout = rpc_timeout
        self.max_pending = max_pending
        self.unknown_requests = 0
        """ConnectRequests naming a forward_id not in the table (rejected, never dialed)."""
        self.sessions = 0
        """RPC connections that got as far as an open Accept stream."""
        self._session: _Session | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._pending = 0
        self._relays: dict[relay.Relay, str] = {}
        self._pipes = relay.PipePool()  # splice pipes shared by every relay
        self._closed = False

    # -- the table ----------------------------------------------------------

    @property
    def forwards(self) -> Mapping[str, Forward]:
        return dict(self._forwards)

    @staticmethod
    def _check_new(forward: Forward, table: Mapping[str, Forward]) -> bool:
        """True when *forward* is new; False when the identical entry is there."""
        existing = table.get(forward.forward_id)
        if existing is None:
            return True
        if existing == forward:
            return False
        raise ValueError(f"forward ID {forward.forward_id} is already used by another forward")

    async def add(self, forwards: Iterable[Forward]) -> None:
        """Add forwards; Bind them now when a guest is connected (else on connect).

        Identical entries are no-ops; a forward_id with other paths is a
        ValueError. A Bind the guest refuses raises its TtrpcError and adds nothing.
        """
        async with self._lock:
            new: dict[str, Forward] = {}
            for forward in forwards:
                if self._check_new(forward, self._forwards) and self._check_new(forward, new):
                    new[forward.forward_id] = forward
            if not new:
                return
            session = self._current()
            if session is not None:
                try:
                    await self._bind_call(session, list(new.values()))
                except ttrpc.TtrpcError as exc:
                    if exc.code != ttrpc.Code.UNAVAILABLE:
                        raise
                    # The connection is going away: the next one Binds everything.
            self._forwards.update(new)
            for fid in new:
                self._stats.setdefault(fid, ForwardStats())
            log.info("forwards added forward_ids=%s", ",".join(new))
            if session is not None:
                session.refresh.set()

    async def remove(self, forward_ids: Iterable[str]) -> None:
        """Remove forwards: their ConnectRequests are refused from now on, and the
        guest is asked to Unbind them (a guest without Unbind is tolerated).
        Relays already running are left alone."""
        async with self._lock:
            ids = []
            for fid in forward_ids:
                if self._forwards.pop(fid, None) is None:
                    log.info("remove: no such forward forward_id=%s", _short(fid))
                else:
                    ids.append(fid)
            if not ids:
                return
            log.info("forwards removed forward_ids=%s", ",".join(ids))
            session = self._current()
            if session is None:
                return
            session.refresh.set()
            try:
                await session.stub.Unbind(
                    pb.UnbindRequest(forward_ids=ids), timeout=self.rpc_timeout
                )
            except ttrpc.TtrpcError as exc:
                if exc.code == ttrpc.Code.UNIMPLEMENTED:
                    log.warning(
                        "guest does not implement Unbind; its listeners stay, connections "
                        "to them are refused forward_ids=%s",
                        ",".join(ids),
                    )
                else:
                    log.warning("unbind failed forward_ids=%s error=%r", ",".join(ids), str(exc))
            else:
                log.info("unbound forward_ids=%s", ",".join(ids))

    # -- stats ----------------------------------------------------------------

    def stats(self) -> dict[str, ForwardStats]:
        """A snapshot per forward_id (forwards removed since keep their figures)."""
        snapshot = {fid: replace(s, failures=dict(s.failures)) for fid, s in self._stats.items()}
        for running, fid in self._relays.items():
            snapshot[fid].bytes_to_vm += running.stats.bytes_a_to_b
            snapshot[fid].bytes_to_host += running.stats.bytes_b_to_a
        return snapshot

    @property
    def connected(self) -> bool:
        return self._current() is not None

    async def wait_ready(self) -> None:
        """Return once a guest is connected, bound and an Accept stream is open."""
        await self._ready.wait()

    # -- RPC connections --------------------------------------------------------

    def _current(self) -> _Session | None:
        session = self._session
        if session is None or session.client.closed:
            return None
        return session

    async def serve(self, sock: socket.socket) -> None:
        """Run over one RPC connection (dialed or accepted; owned from here) until
        it closes: Bind every forward, then hold Accept and answer ConnectRequests."""
        if self._closed:
            sock.close()
            raise RuntimeError("Forwarder is closed")
        try:
            client = await ttrpc.Client.connect(sock)
        except OSError as exc:
            log.warning("rpc connection failed error=%r", exc)
            return
        session = _Session(client, self.stream_timeout, self._ack_timed_out)
        previous, self._session = self._session, session
        try:
            if previous is not None:
                log.warning("new rpc connection replaces the current one")
                await previous.client.close()
            log.info(
                "rpc connected streams=%s forwards=%d", self.streams_endpoint, len(self._forwards)
            )
            async with self._lock:
                await self._bind_all(session)
            accept = session.spawn(self._accept_streams(session))
            closed = session.spawn(client.wait_closed())
            await asyncio.wait({accept, closed}, return_when=asyncio.FIRST_COMPLETED)
        except ttrpc.TtrpcError as exc:
            if exc.code != ttrpc.Code.UNAVAILABLE:
                raise
        finally:
            if self._session is session:
                self._session = None
                self._ready.clear()
            await self._close_session(session)
            log.info("rpc connection closed")

    async def _bind_call(self, session: _Session, forwards: list[Forward]) -> None:
        request = pb.BindRequest(
            sockets=[pb.Socket(forward_id=f.forward_id, socket_path=f.vm_path) for f in forwards]
        )
        await session.stub.Bind(request, timeout=self.rpc_timeout)
        log.info(
            "bound forward_ids=%s count=%d",
            ",".join(f.forward_id for f in forwards),
            len(forwards),
        )

    async def _bind_all(self, session: _Session) -> None:
        """Bind the table (idempotent in the guest). Bind is all-or-nothing, so
        when the guest refuses the whole set, each forward is tried on its own:
        one bad entry does not take the others down."""
        forwards = list(self._forwards.values())
        if not forwards:
            return
        try:
            await self._bind_call(session, forwards)
            return
        except ttrpc.TtrpcError as exc:
            if exc.code == ttrpc.Code.UNAVAILABLE:
                raise
            log.error("bind failed count=%d error=%r", len(forwards), str(exc))
            if len(forwards) == 1:
                return
        for forward in forwards:
            try:
                await self._bind_call(session, [forward])
            except ttrpc.TtrpcError as exc:
                if exc.code == ttrpc.Code.UNAVAILABLE:
                    raise
                log.error("bind failed forward_id=%s error=%r", forward.forward_id, str(exc))

    async def _accept_streams(self, session: _Session) -> None:
        """Keep one Accept stream open announcing the current table; reopen it
        when the guest ends it, and replace it when the table changes."""
        backoff = transport.Backoff(_BACKOFF_MIN, 5.0)
        while not session.client.closed:
            session.refresh.clear()
            announced = ",".join(sorted(self._forwards))
            try:
                stream = await session.stub.Accept(metadata={FORWARD_IDS_METADATA: announced})
            except ttrpc.TtrpcError as exc:
                if session.client.closed:
                    return
                log.warning("accept open failed error=%r", str(exc))
                await asyncio.sleep(backoff.next())
                continue
            current = _AcceptStream(stream, len(self._forwards))
            log.info("accept stream opened announced=%d", current.announced)
            if self._session is session:
                if not session.ready:
                    session.ready = True
                    self.sessions += 1
                self._ready.set()
            reader = session.spawn(self._read_accept(session, current))
            refresh = session.spawn(session.refresh.wait())
            try:
                await asyncio.wait({reader, refresh}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                refresh.cancel()
            if not reader.done():
                session.spawn(self._retire(current, reader))
                backoff.reset()
                continue
            await stream.aclose()
            if session.client.closed:
                return
            self._ready.clear()
            if reader.result():
                backoff.reset()
            log.warning("accept stream ended by the guest; reopening")
            await asyncio.sleep(backoff.next())

    async def _read_accept(self, session: _Session, current: _AcceptStream) -> int:
        """Start each ConnectRequest at once, never waiting on one (the stream's
        receive queue must never stall); returns how many were read."""
        count = 0
        try:
            async for request in current.stream:
                count += 1
                self._dispatch(session, current, request)
        except (ttrpc.TtrpcError, ttrpc.ProtocolError) as exc:
            if not session.client.closed:
                log.warning("accept stream failed error=%r", str(exc))
        return count

    async def _retire(self, old: _AcceptStream, reader: asyncio.Task[int]) -> None:
        """End a superseded Accept stream once its requests are answered."""
        try:
            await old.idle.wait()
            old.closing = True
            with contextlib.suppress(ttrpc.TtrpcError, ttrpc.ProtocolError):
                await old.stream.close_send()
            # The guest ends its side in answer; bounded in case it never does.
            await asyncio.wait({reader}, timeout=_RETIRE_TIMEOUT)
        finally:
            reader.cancel()
            await old.stream.aclose()

    def _dispatch(
        self, session: _Session, current: _AcceptStream, request: pb.ConnectRequest
    ) -> None:
        if current.closing:
            log.warning(
                "connect request on a closed accept stream dropped stream_id=%s forward_id=%s",
                _short(request.stream_id),
                _short(request.forward_id),
            )
            return
        current.begin()
        self._pending += 1
        if self._open_now(session, current, request):
            return
        task = session.spawn(self._handle(current, request))
        task.add_done_callback(lambda _: self._handled(current))

    def _handled(self, current: _AcceptStream) -> None:
        current.end()
        self._pending -= 1

    # -- one ConnectRequest ------------------------------------------------------
    # The fast path, on callbacks: when both connects succeed at once (UNIX
    # sockets, the usual case) only the ack is waited for, by a readiness
    # callback whose reader the relay then takes over. Everything else (errors
    # to report, backlogs to wait out, a VM still booting, vsock) takes the
    # task below, which starts over and names what failed.

    def _open_now(
        self, session: _Session, current: _AcceptStream, request: pb.ConnectRequest
    ) -> bool:
        stream_id, fid = request.stream_id, request.forward_id
        forward = self._forwards.get(fid)
        if forward is None or self._pending > self.max_pending or not _valid_stream_id(stream_id):
            return False
        host_sock = transport.connect_unix_now(forward.host_path)
        if host_sock is None:
            return False
        data_sock = streams.open_stream_now(self.streams_endpoint, stream_id)
        if data_sock is None:
            host_sock.close()
            return False
        self._stats[fid].requests += 1
        ack = streams.AckReader(self.streams_endpoint, stream_id)
        opening = _Opening(session, current, fid, host_sock, data_sock, ack)
        session.acks.add(opening)
        asyncio.get_running_loop().add_reader(data_sock.fileno(), self._on_ack, opening)
        return True

    def _on_ack(self, opening: _Opening) -> None:
        try:
            if not opening.ack.read(opening.data_sock):
                return
        except (OSError, streams.HandshakeError) as exc:
            self._open_failed(opening, STREAM_FAILED, str(exc))
            return
        stream_id, fid = opening.ack.stream_id, opening.fid
        if not self._reply(opening.current, stream_id, fid, ""):
            self._open_failed(opening, REPLY_FAILED, None)
            return
        opening.session.acks.discard(opening)
        self._handled(opening.current)
        # The data socket's reader stays registered: the relay replaces its
        # callback instead of a remove and an add (uvloop: seven syscalls).
        fd = opening.data_sock.fileno()
        try:
            self._start_relay(fid, stream_id, opening.host_sock, opening.data_sock)
        except BaseException:
            # The relay closed both sockets; no watcher may outlive the fd.
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
            raise

    def _ack_timed_out(self, opening: _Opening) -> None:
        error = f"stream {opening.ack.stream_id!r} at {self.streams_endpoint}: no ack within "
        self._open_failed(opening, STREAM_FAILED, error + f"{self.stream_timeout}s")

    def _open_failed(self, opening: _Opening, reason: str, error: str | None) -> None:
        """Undo a fast-path opening; *error* (logged, and STREAM_ERROR to the VM)
        is None when there is nobody left to tell."""
        opening.session.acks.discard(opening)
        asyncio.get_running_loop().remove_reader(opening.data_sock.fileno())
        opening.data_sock.close()
        opening.host_sock.close()
        self._stats[opening.fid].fail(reason)
        stream_id = opening.ack.stream_id
        if error is not None:
            log.warning(
                "data stream open failed stream_id=%s forward_id=%s streams=%s error=%r",
                stream_id,
                opening.fid,
                self.streams_endpoint,
                error,
            )
            self._reply(opening.current, stream_id, opening.fid, STREAM_ERROR)
        self._handled(opening.current)

    def _reply(self, current: _AcceptStream, stream_id: str, fid: str, error: str) -> bool:
        # The guest's window of unanswered requests bounds these writes.
        try:
            current.stream.send_nowait(pb.ConnectResult(stream_id=stream_id, error=error))
        except (ttrpc.TtrpcError, ttrpc.ProtocolError) as exc:
            log.warning(
                "connect result not delivered stream_id=%s forward_id=%s error=%r",
                _short(stream_id),
                _short(fid),
                str(exc),
            )
            return False
        return True

    async def _close_session(self, session: _Session) -> None:
        for opening in session.acks.drain():
            self._open_failed(opening, RPC_LOST, None)
        await session.close()

    # -- the task path ---------------------------------------------------------------

    async def _handle(self, current: _AcceptStream, request: pb.ConnectRequest) -> None:
        stream_id, fid = request.stream_id, request.forward_id
        forward = self._forwards.get(fid)
        if forward is None:
            self.unknown_requests += 1
            log.warning(
                "unknown forward ID rejected stream_id=%s forward_id=%s",
                _short(stream_id),
                _short(fid),
            )
            shown = fid if len(fid) <= MAX_FORWARD_ID_LEN else fid[:MAX_FORWARD_ID_LEN] + "..."
            self._reply(current, stream_id, fid, UNKNOWN_FORWARD_ID + shown)
            return
        stats = self._stats[fid]
        stats.requests += 1
        sockets: list[socket.socket] = []
        try:
            error, reason = await self._open(forward, stream_id, sockets)
            if reason is not None:
                stats.fail(reason)
                self._reply(current, stream_id, fid, error)
                return
            if not self._reply(current, stream_id, fid, ""):
                stats.fail(REPLY_FAILED)
                return
            host_sock, data_sock = sockets
            sockets.clear()
            self._start_relay(fid, stream_id, host_sock, data_sock)
        except asyncio.CancelledError:
            stats.fail(RPC_LOST)
            raise
        finally:
            for sock in sockets:
                sock.close()

    async def _open(
        self, forward: Forward, stream_id: str, sockets: list[socket.socket]
    ) -> tuple[str, str | None]:
        """Dial the host socket, then open the data stream; both land in *sockets*.
        Returns the error text for the VM and the failure reason (None: success)."""
        fid = forward.forward_id
        if not _valid_stream_id(stream_id):
            log.warning(
                "invalid stream ID rejected stream_id=%s forward_id=%s", _short(stream_id), fid
            )
            return STREAM_ID_ERROR, BAD_STREAM_ID
        if self._pending > self.max_pending:
            log.warning(
                "too many pending connections stream_id=%s forward_id=%s pending=%d",
                stream_id,
                fid,
                self._pending,
            )
            return OVERLOAD_ERROR, OVERLOADED
        try:
            sockets.append(
                await transport.connect(
                    transport.UnixEndpoint(forward.host_path), timeout=self.dial_timeout
                )
            )
        except OSError as exc:
            log.warning(
                "host socket dial failed stream_id=%s forward_id=%s host_path=%s error=%r",
                stream_id,
                fid,
                forward.host_path,
                str(exc),
            )
            return DIAL_ERROR, DIAL_TIMEOUT if isinstance(exc, TimeoutError) else DIAL_FAILED
        try:
            sockets.append(
                await streams.open_stream(
                    self.streams_endpoint,
                    stream_id,
                    timeout=self.stream_timeout,
                    retry_for=self.stream_retry_for,
                )
            )
        except (OSError, streams.HandshakeError) as exc:
            log.warning(
                "data stream open failed stream_id=%s forward_id=%s streams=%s error=%r",
                stream_id,
                fid,
                self.streams_endpoint,
                str(exc),
            )
            return STREAM_ERROR, STREAM_FAILED
        return "", None

    def _start_relay(
        self, fid: str, stream_id: str, host_sock: socket.socket, data_sock: socket.socket
    ) -> None:
        stats = self._stats[fid]
        stats.connections += 1
        stats.active_relays += 1

        def done(result: relay.RelayStats) -> None:
            del self._relays[running]
            stats.active_relays -= 1
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

        # No task per relay: an idle forwarded connection costs only its relay.
        running = relay.Relay(host_sock, data_sock, pipes=self._pipes, on_done=done)
        self._relays[running] = fid
        log.debug("connection forwarded stream_id=%s forward_id=%s", stream_id, fid)
        running.start()

    # -- getting connections --------------------------------------------------------

    async def run_listening(self, listener: transport.Listener) -> None:
        """Accept the guest's RPC dials on *listener* (not owned) and serve each;
        a new dial replaces the current connection (the guest restarted)."""
        current: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    sock = await listener.accept()
                except OSError as exc:
                    log.warning("rpc accept failed endpoint=%s error=%r", listener.endpoint, exc)
                    await asyncio.sleep(0.1)
                    continue
                if current is not None and not current.done():
                    current.cancel()
                    await asyncio.wait({current})
                current = asyncio.get_running_loop().create_task(self._serve_logged(sock))
        finally:
            if current is not None:
                current.cancel()
                await asyncio.wait({current})

    async def run_dialing(
        self,
        endpoint: transport.Endpoint,
        *,
        connect_timeout: float = 5.0,
        backoff_max: float = 5.0,
    ) -> None:
        """Dial the guest's RPC endpoint and serve it; when the connection drops
        or cannot be made, dial again with jittered backoff capped at *backoff_max*."""
        backoff = transport.Backoff(_BACKOFF_MIN, backoff_max)
        failures = 0
        while True:
            try:
                sock = await transport.connect(endpoint, timeout=connect_timeout)
            except OSError as exc:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "rpc dial failed endpoint=%s attempt=%d error=%r",
                    endpoint,
                    failures,
                    str(exc),
                )
            else:
                failures = 0
                before = self.sessions
                await self._serve_logged(sock)
                if self.sessions != before:
                    backoff.reset()
            await asyncio.sleep(backoff.next())

    async def _serve_logged(self, sock: socket.socket) -> None:
        try:
            await self.serve(sock)
        except Exception:
            log.exception("rpc connection failed")

    async def close(self) -> None:
        """Drop the RPC connection and end every relay. Idempotent."""
        self._closed = True
        session, self._session = self._session, None
        self._ready.clear()
        if session is not None:
            await self._close_session(session)
        for running in list(self._relays):
            running.close()
        self._pipes.close()

    async def __aenter__(self) -> Forwarder:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


# -- command line ---------------------------------------------------------------------


def _endpoint_arg(text: str) -> transport.Endpoint:
    try:
        return transport.parse_endpoint(text)
    except transport.EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_endpoint_arg(text: str) -> transport.Endpoint:
    ep = _endpoint_arg(text)
    if isinstance(ep, transport.HvsockEndpoint):
        raise argparse.ArgumentTypeError(
            f"cannot listen on {text!r}: guest dials to hybrid vsock port {ep.port} arrive "
            f"on unix:{ep.path}_{ep.port}; listen there"
        )
    return ep


def _forward_arg(text: str) -> Forward:
    try:
        return parse_forward(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "host",
        help="the host side: serve forwards to host UNIX sockets for one VM",
        description="Forward connections made in a VM to UNIX sockets on this host. "
        "SIGTERM/SIGINT stop it cleanly; SIGUSR1 logs the statistics; SIGHUP re-reads "
        "--forwards-file.",
    )
    rpc = parser.add_mutually_exclusive_group(required=True)
    rpc.add_argument(
        "--rpc-listen",
        metavar="URI",
        type=_listen_endpoint_arg,
        help="accept the guest's RPC dial here (nerdbox's direction), "
        "e.g. unix:/run/user/1000/vm1/rpc.sock",
    )
    rpc.add_argument(
        "--rpc-dial",
        metavar="URI",
        type=_endpoint_arg,
        help="dial the guest's RPC endpoint (again when it drops)",
    )
    parser.add_argument(
        "--streams",
        metavar="URI",
        type=_endpoint_arg,
        required=True,
        help="the guest's data-stream endpoint, e.g. vsock://3:1026 or unix:/path/vm.sock_1026",
    )
    parser.add_argument(
        "--forward",
        metavar="FORWARD_ID=HOST_PATH:VM_PATH",
        type=_forward_arg,
        action="append",
        default=[],
        help="a forward (repeatable)",
    )
    parser.add_argument(
        "--forwards-file",
        metavar="FILE",
        help="forwards, one FORWARD_ID=HOST_PATH:VM_PATH per line (# comments); "
        "SIGHUP re-reads it, adding and removing forwards while running",
    )
    parser.add_argument(
        "--oci-spec", metavar="CONFIG_JSON", help="take forwards from this OCI spec's uds mounts"
    )
    parser.add_argument("--container-id", metavar="ID", help="the container of --oci-spec")
    parser.add_argument(
        "--write-spec", metavar="OUT", help="write the rewritten spec (uds -> bind mounts) here"
    )
    parser.add_argument(
        "--dial-timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=5.0,
        help="bound on dialing a host socket (default 5)",
    )
    parser.add_argument(
        "--stream-timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=10.0,
        help="bound on each data-stream handshake (default 10)",
    )
    parser.add_argument(
        "--stream-retry-for",
        metavar="SECONDS",
        type=positive_seconds,
        default=30.0,
        help="keep retrying a missing stream endpoint this long (VM booting; default 30)",
    )
    parser.set_defaults(run=main)


class _UsageError(Exception):
    """A bad command line; the message names the argument."""


def _merge(into: dict[str, Forward], more: Iterable[Forward], source: str, others: str) -> None:
    for forward in more:
        if forward.forward_id in into:
            raise _UsageError(
                f"{source}: forward ID {forward.forward_id} is also given with {others}"
            )
        into[forward.forward_id] = forward


def _forwards_from_args(args: argparse.Namespace) -> tuple[list[Forward], list[str]]:
    """Every forward the command line names, and the ids of those that came
    from --forwards-file (a SIGHUP may change those, never the others)."""
    if args.write_spec and not args.oci_spec:
        raise _UsageError("--write-spec needs --oci-spec")
    if args.oci_spec and not args.container_id:
        raise _UsageError("--oci-spec needs --container-id")
    if args.container_id and not args.oci_spec:
        raise _UsageError("--container-id needs --oci-spec")
    if not args.forward and not args.oci_spec and not args.forwards_file:
        raise _UsageError("nothing to forward: give --forward, --forwards-file or --oci-spec")
    forwards: dict[str, Forward] = {}
    for forward in args.forward:
        if forward.forward_id in forwards:
            raise _UsageError(f"--forward: forward ID {forward.forward_id} is given twice")
        forwards[forward.forward_id] = forward
    from_file: list[Forward] = []
    if args.forwards_file:
        try:
            from_file = read_forwards_file(args.forwards_file)
        except ValueError as exc:
            raise _UsageError(f"--forwards-file {exc}") from None
        _merge(forwards, from_file, f"--forwards-file {args.forwards_file}", "--forward")
    if args.oci_spec:
        try:
            spec = oci.load_spec(args.oci_spec)
            from_spec, _ = forwards_from_oci_spec(spec, args.container_id)
        except (OSError, ValueError) as exc:
            raise _UsageError(f"--oci-spec {args.oci_spec}: {exc}") from None
        if not from_spec:
            log.warning("no uds mounts in the spec oci_spec=%s", args.oci_spec)
        _merge(forwards, from_spec, f"--oci-spec {args.oci_spec}", "--forward or --forwards-file")
        if args.write_spec:
            try:
                oci.write_spec(args.write_spec, spec)
            except OSError as exc:
                raise _UsageError(f"--write-spec {args.write_spec}: {exc}") from None
            log.info("wrote rewritten spec path=%s", args.write_spec)
    return list(forwards.values()), [f.forward_id for f in from_file]


def _check_private_dir(ep: transport.UnixEndpoint) -> None:
    """The RPC socket's directory must be ours and closed to everyone else (SPEC 4)."""
    parent = os.path.dirname(ep.path)
    try:
        st = os.stat(parent)
    except FileNotFoundError:
        return  # created 0700 by transport.listen
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise _UsageError(
            f"--rpc-listen {ep}: directory {parent} is open to other users "
            f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); use a directory "
            "only you can enter (mode 0700)"
        )


def _log_stats(forwarder: Forwarder) -> None:
    for fid, s in forwarder.stats().items():
        failures = ",".join(f"{k}:{v}" for k, v in sorted(s.failures.items())) or "none"
        log.info(
            "stats forward_id=%s requests=%d connections=%d failures=%s to_host=%d to_vm=%d "
            "active=%d",
            fid,
            s.requests,
            s.connections,
            failures,
            s.bytes_to_host,
            s.bytes_to_vm,
            s.active_relays,
        )
    log.info("stats unknown_forward_requests=%d", forwarder.unknown_requests)


class _ForwardsFile:
    """--forwards-file at run time: SIGHUP re-reads it and the difference is
    added and removed (one reload at a time). A file that does not parse, or
    that names a forward_id the command line also gives, changes nothing."""

    def __init__(self, path: str, forwarder: Forwarder, loaded: Iterable[str]) -> None:
        self.path = path
        self.forwarder = forwarder
        self.ids = set(loaded)  # the forwards this file put in the table
        self.fixed = set(forwarder.forwards) - self.ids  # --forward, --oci-spec
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def request_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        async with self._lock:
            try:
                fresh = {f.forward_id: f for f in read_forwards_file(self.path)}
            except ValueError as exc:
                log.error("forwards file not reloaded, table unchanged error=%r", str(exc))
                return
            clash = sorted(set(fresh) & self.fixed)
            if clash:
                log.error(
                    "forwards file not reloaded, table unchanged path=%s error=%r",
                    self.path,
                    f"forward IDs also given on the command line: {','.join(clash)}",
                )
                return
            table = self.forwarder.forwards
            gone = sorted(f for f in self.ids if table.get(f) != fresh.get(f))
            new = [f for fid, f in fresh.items() if table.get(fid) != f]
            try:
                await self.forwarder.remove(gone)
                self.ids.difference_update(gone)
                await self.forwarder.add(new)
                self.ids.update(f.forward_id for f in new)
            except (ValueError, ttrpc.TtrpcError) as exc:
                log.error("forwards file reload failed path=%s error=%r", self.path, str(exc))
                return
            log.info(
                "forwards file reloaded path=%s added=%d removed=%d forwards=%d",
                self.path,
                len(new),
                len(gone),
                len(self.forwarder.forwards),
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _run(args: argparse.Namespace, forwards: list[Forward], file_ids: list[str]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    forwarder = Forwarder(
        forwards,
        args.streams,
        dial_timeout=args.dial_timeout,
        stream_timeout=args.stream_timeout,
        stream_retry_for=args.stream_retry_for,
    )
    handled = [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _log_stats, forwarder)
    from_file: _ForwardsFile | None = None
    if args.forwards_file:
        from_file = _ForwardsFile(args.forwards_file, forwarder, file_ids)
        loop.add_signal_handler(signal.SIGHUP, from_file.request_reload)
        handled.append(signal.SIGHUP)
    listener: transport.Listener | None = None
    serving: asyncio.Task[None] | None = None
    status = 0
    try:
        if args.rpc_listen is not None:
            ep = args.rpc_listen
            if isinstance(ep, transport.UnixEndpoint):
                _check_private_dir(ep)
            try:
                listener = await transport.listen(ep, mode=0o600)
            except OSError as exc:
                raise _UsageError(f"--rpc-listen: {exc}") from None
            serving = loop.create_task(forwarder.run_listening(listener))
            log.info(
                "host listening rpc=%s streams=%s forwards=%d", ep, args.streams, len(forwards)
            )
        else:
            serving = loop.create_task(forwarder.run_dialing(args.rpc_dial))
            log.info(
                "host dialing rpc=%s streams=%s forwards=%d",
                args.rpc_dial,
                args.streams,
                len(forwards),
            )
        stopping = loop.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if serving.done():
            log.error("host stopped unexpectedly error=%r", serving.exception())
            status = 1
        else:
            log.info("host stopping")
    except _UsageError as exc:
        print(f"socketforward host: error: {exc}", file=sys.stderr)
        status = 2
    finally:
        if serving is not None:
            serving.cancel()
            await asyncio.wait({serving})
        if from_file is not None:
            await from_file.close()
        await forwarder.close()
        if listener is not None:
            listener.close()
        for sig in handled:
            loop.remove_signal_handler(sig)
        _log_stats(forwarder)
    return status


def main(args: argparse.Namespace) -> int:
    try:
        forwards, file_ids = _forwards_from_args(args)
    except _UsageError as exc:
        print(f"socketforward host: error: {exc}", file=sys.stderr)
        return 2
    return runner.run(_run(args, forwards, file_ids))

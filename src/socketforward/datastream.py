"""The data-stream channel (docs/protocol.md 5): one connection per forwarded stream.

Wire: the opener writes the stream id as a string (u32 big-endian length, then
UTF-8 bytes); the listener answers with the same id (the ack), or with an
error text and closes. After the ack the connection carries raw bytes.

A *pooled* stream (an id starting with :data:`POOLED_PREFIX`, docs/protocol.md
5.6) is opened by the host ahead of demand: after its ack it waits, with no
deadline, until the host's answer for a connection names it, or the host's
pool is gone (:meth:`StreamRegistry.drop_pooled`).

:class:`StreamRegistry` is the listening side (in the VM), :func:`open_stream`
the opening side (on the host); :func:`open_stream_now` and :class:`AckReader`
are the opening side's parts for callers that wait on callbacks, not tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from socketforward.deadlines import Deadlines
from socketforward.logs import RateLimitedLog, escape
from socketforward.transport import (
    Backoff,
    Endpoint,
    Listener,
    UnixEndpoint,
    connect,
    connect_unix_now,
    wait_ready,
)

__all__ = [
    "DEFAULT_MAX_HANDSHAKES",
    "DEFAULT_MAX_POOLED",
    "DEFAULT_MAX_UNCLAIMED",
    "MAX_ID_LEN",
    "POOLED_PREFIX",
    "AckReader",
    "HandshakeError",
    "RegistryStats",
    "StreamEndpointUnavailable",
    "StreamNotFound",
    "StreamRegistry",
    "StringReader",
    "open_stream",
    "open_stream_now",
]

log = logging.getLogger(__name__)

MAX_ID_LEN: Final = 256
_LEN: Final = struct.Struct(">I")
# Budgets of one StreamRegistry (docs/protocol.md 5.2, 9.2): at most this many
# accepted connections whose id is not in yet, and registered ones unclaimed.
DEFAULT_MAX_HANDSHAKES: Final = 256
DEFAULT_MAX_UNCLAIMED: Final = 1024
POOLED_PREFIX: Final = "socketfwd-pool-"
"""Id prefix of a pooled data stream (docs/protocol.md 5.6); a guest's own ids
are ``socketfwd-{digits}-...`` and never start so."""
DEFAULT_MAX_POOLED: Final = 64
"""Pooled streams one StreamRegistry keeps waiting at most."""


class StreamNotFound(KeyError):
    """No registered, unclaimed data stream has this id."""

    def __str__(self) -> str:
        # KeyError would show the repr of the message.
        return str(self.args[0]) if self.args else "stream not found"


class HandshakeError(Exception):
    """The peer broke the stream handshake; the message says what came instead."""


class StreamEndpointUnavailable(ConnectionError):
    """The stream endpoint did not accept connections within the retry bound."""


def encode_string(text: str) -> bytes:
    data = text.encode()
    return _LEN.pack(len(data)) + data


class StringReader:
    """Reads one length-prefixed string from a non-blocking socket as its bytes
    arrive (call :meth:`read` from a readiness callback or after a wait): exactly
    its bytes, never past them (raw data may follow), and a claimed length over
    MAX_ID_LEN is refused before anything is allocated for it."""

    __slots__ = ("_got", "_size", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self._got = bytearray()
        self._size = -1  # known once its 4 bytes are in

    def read(self, sock: socket.socket) -> bytes | None:
        """The string once it is complete, None while more must come. Raises
        HandshakeError (cut off, too long) and OSError (from recv)."""
        while True:
            header = self._size < 0
            want = (_LEN.size if header else _LEN.size + self._size) - len(self._got)
            if want == 0:
                return bytes(self._got[_LEN.size :])
            try:
                chunk = sock.recv(want)
            except (BlockingIOError, InterruptedError):
                return None
            if not chunk:
                need = _LEN.size if header else self._size
                have = len(self._got) - (0 if header else _LEN.size)
                what = f"{self.what} length" if header else self.what
                raise HandshakeError(f"connection closed after {have} of {need} bytes of {what}")
            self._got += chunk
            if header and len(self._got) == _LEN.size:
                (self._size,) = _LEN.unpack(self._got)
                if self._size > MAX_ID_LEN:
                    raise HandshakeError(
                        f"{self.what} length {self._size} exceeds the limit of {MAX_ID_LEN} bytes"
                    )


def _decode_id(raw: bytes) -> str:
    if not raw:
        raise HandshakeError("empty stream id")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise HandshakeError(f"stream id is not valid UTF-8: {raw[:64]!r}") from None


class _Handshake:
    """One data-stream connection between accept and registration; while it
    exists (until :meth:`StreamRegistry._finish`) it holds a handshake slot."""

    __slots__ = (
        "conn",
        "fd",
        "finished",
        "out",
        "reader",
        "reading",
        "refusal",
        "stream_id",
        "writing",
    )

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        self.reader = StringReader("stream id")
        self.stream_id: str | None = None  # set once the id is read and reserved
        self.refusal: str | None = None  # the reason, once an error text is on its way
        self.out = b""  # what is left to write: the ack, or an error text
        self.reading = False
        self.writing = False
        self.finished = False


@dataclass(frozen=True)
class RegistryStats:
    """A snapshot of a :class:`StreamRegistry`'s figures."""

    handshakes: int
    """Connections accepted whose handshake is in progress (at most max_handshakes)."""
    unclaimed: int
    """Registered streams waiting to be claimed (at most max_unclaimed)."""
    paused: bool
    """Accepting is paused because handshakes are at their cap."""
    refused: Mapping[str, int]
    """Handshakes that ended without registering, by reason: ``too_many_unclaimed``,
    ``duplicate``, ``invalid`` (bad, oversized or cut-off id), ``timeout``,
    ``error`` (the connection failed), ``too_many_pooled``."""
    expired: int
    """Registered streams closed because nobody claimed them within the TTL."""
    pooled: int = 0
    """Pooled streams waiting to be claimed (at most max_pooled)."""


class StreamRegistry:
    """Accepts data streams on a listener and hands each out exactly once.

    Handshakes run on callbacks, each under its own timeout, so a silent peer
    stalls nobody else and a prompt one costs no task: usually the id is
    already there when the connection is accepted, and the ack fits the
    empty send buffer. Unclaimed connections are closed after *ttl*
    seconds. Takes ownership of *listener*.

    Budgets: while *max_handshakes* handshakes are in progress the registry
    stops accepting (new connections wait in the kernel's backlog) and resumes
    as soon as one completes, fails or times out. A handshake that would make
    more than *max_unclaimed* streams wait to be claimed is answered
    ``too many unclaimed streams`` instead of the ack, and closed.
    At most *max_pooled* pooled streams wait, with no TTL (0: none taken);
    when they are at the cap, those the host has closed are dropped first.
    """

    def __init__(
        self,
        listener: Listener,
        *,
        handshake_timeout: float = 10.0,
        ttl: float = 30.0,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        max_unclaimed: int = DEFAULT_MAX_UNCLAIMED,
        max_pooled: int = DEFAULT_MAX_POOLED,
    ) -> None:
        if max_handshakes < 1:
            raise ValueError(f"max_handshakes must be >= 1, got {max_handshakes}")
        if max_unclaimed < 1:
            raise ValueError(f"max_unclaimed must be >= 1, got {max_unclaimed}")
        if max_pooled < 0:
            raise ValueError(f"max_pooled must be >= 0, got {max_pooled}")
        self._listener = listener
        self._handshake_timeout = handshake_timeout
        self._ttl = ttl
        self._max_handshakes = max_handshakes
        self._max_unclaimed = max_unclaimed
        self.max_pooled = max_pooled
        """Pooled streams this registry keeps waiting at most (the guest says it
        in its StreamEnds hello)."""
        self._pooled: dict[str, socket.socket] = {}
        self._reserved_pooled = 0  # pooled ids among _reserved
        self._streams: dict[str, socket.socket] = {}
        self._unclaimed: Deadlines[str] = Deadlines(ttl, self._expire)
        # A handshake holds its slot while it is in here: the one count of them.
        self._handshakes: Deadlines[_Handshake] = Deadlines(
            handshake_timeout, self._handshake_timed_out
        )
        self._reserved: set[str] = set()  # ids whose ack is being written
        self._arrivals: dict[str, list[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._paused = False  # accepting stopped: handshakes at their cap
        self._refused: dict[str, int] = {}
        self._expired = 0
        # Whoever reaches the stream port can cause these lines at will.
        self._peer_log = RateLimitedLog(log)

    @property
    def endpoint(self) -> Endpoint:
        return self._listener.endpoint

    def __len__(self) -> int:
        """Registered connections waiting to be claimed."""
        return len(self._streams)

    def stats(self) -> RegistryStats:
        """The current figures (a copy; the registry keeps counting)."""
        return RegistryStats(
            handshakes=len(self._handshakes),
            unclaimed=len(self._streams),
            paused=self._paused,
            refused=dict(self._refused),
            expired=self._expired,
            pooled=len(self._pooled),
        )

    def start(self) -> None:
        """Start accepting (idempotent); needs a running loop."""
        if self._closed:
            raise RuntimeError("StreamRegistry is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._listener.start_accepting(self._on_connection, self._on_accept_error)

    async def __aenter__(self) -> StreamRegistry:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop accepting, drop handshakes, close unclaimed connections. Idempotent."""
        self._listener.close()
        if self._closed:
            return
        self._closed = True
        self._paused = False
        for h in self._handshakes.drain():
            self._finish(h, None)
        for sock in self._streams.values():
            sock.close()
        self._streams.clear()
        self.drop_pooled()
        self._unclaimed.drain()
        for stream_id in list(self._arrivals):
            self._wake(stream_id)  # waiters re-check and find nothing
        self._peer_log.flush()

    def get(self, stream_id: str) -> socket.socket:
        """Hand out the connection registered as *stream_id*; the caller owns it."""
        sock = self._streams.pop(stream_id, None)
        if sock is None:
            sock = self._pooled.pop(stream_id, None)
            if sock is None:
                raise StreamNotFound(f"stream {stream_id!r} not found")
        self._unclaimed.discard(stream_id)
        log.debug("stream claimed stream_id=%s", stream_id)
        return sock

    # A per-call bound is the point of this API (the caller claims one stream).
    async def wait_for(self, stream_id: str, timeout: float) -> socket.socket:
        """Like :meth:`get`, but wait up to *timeout* s for the stream to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(StreamNotFound):
                return self.get(stream_id)
            remaining = deadline - time.monotonic()
            if self._closed or remaining <= 0:
                raise StreamNotFound(f"stream {stream_id!r} not found within {timeout}s")
            arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters = self._arrivals.setdefault(stream_id, [])
            waiters.append(arrived)
            try:
                async with asyncio.timeout(remaining):
                    await arrived
            except TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    waiters.remove(arrived)
                if not waiters and self._arrivals.get(stream_id) is waiters:
                    del self._arrivals[stream_id]

    def _wake(self, stream_id: str) -> None:
        for arrived in self._arrivals.pop(stream_id, []):
            if not arrived.done():
                arrived.set_result(None)

    # -- handshakes, on callbacks --------------------------------------------

    def _on_accept_error(self, exc: OSError) -> None:
        # EMFILE and friends: the listener backs off instead of spinning.
        self._peer_log.warning(
            "accept_failed", "stream accept failed endpoint=%s error=%r", self.endpoint, exc
        )

    def _on_connection(self, conn: socket.socket) -> None:
        h = _Handshake(conn)
        self._handshakes.add(h)  # the slot; given back only by _finish
        self._read(h)
        # Checked after the first read: a prompt handshake is already done here.
        if len(self._handshakes) >= self._max_handshakes and not self._paused:
            self._paused = True
            self._listener.stop_accepting()
            self._peer_log.warning(
                "paused",
                "stream handshakes at their limit, accepting paused limit=%d endpoint=%s",
                self._max_handshakes,
                self.endpoint,
            )

    def _read(self, h: _Handshake) -> None:
        try:
            raw = h.reader.read(h.conn)
            if raw is None:
                self._watch(h, read=True)
                return
            stream_id = _decode_id(raw)
        except HandshakeError as exc:
            self._peer_log.warning("invalid", "stream handshake rejected error=%r", str(exc))
            self._refuse(h, "invalid", str(exc))
            return
        except OSError as exc:
            self._peer_log.warning("error", "stream handshake failed stream_id=None error=%r", exc)
            self._finish(h, "error")
            return
        if stream_id in self._streams or stream_id in self._reserved or stream_id in self._pooled:
            self._peer_log.warning(
                "duplicate",
                "stream handshake rejected stream_id=%s error=duplicate",
                escape(stream_id),
            )
            self._refuse(h, "duplicate", f"stream {stream_id!r} already exists")
            return
        if stream_id.startswith(POOLED_PREFIX):
            if not self._room_for_pooled():
                self._peer_log.warning(
                    "too_many_pooled",
                    "stream handshake rejected stream_id=%s error=too_many_pooled limit=%d",
                    escape(stream_id),
                    self.max_pooled,
                )
                self._refuse(
                    h, "too_many_pooled", f"too many pooled streams (limit {self.max_pooled})"
                )
                return
            self._reserved_pooled += 1
        # Acks being written count: each is about to become an unclaimed stream.
        elif len(self._streams) + len(self._reserved) >= self._max_unclaimed:
            self._peer_log.warning(
                "too_many_unclaimed",
                "stream handshake rejected stream_id=%s error=too_many_unclaimed limit=%d",
                escape(stream_id),
                self._max_unclaimed,
            )
            self._refuse(
                h, "too_many_unclaimed", f"too many unclaimed streams (limit {self._max_unclaimed})"
            )
            return
        h.stream_id = stream_id
        self._reserved.add(stream_id)
        self._reply(h, stream_id)

    def _refuse(self, h: _Handshake, reason: str, text: str) -> None:
        """Answer an error text instead of the ack, then close (counted as *reason*)."""
        h.refusal = reason
        data = text.encode()
        if len(data) > MAX_ID_LEN:  # the opener would not read a longer one
            text = data[:MAX_ID_LEN].decode(errors="ignore")
        self._reply(h, text)

    def _reply(self, h: _Handshake, text: str) -> None:
        """Write the ack (the id itself) or an error text; then register or close."""
        self._watch(h, read=False)
        h.out = encode_string(text)
        self._write(h)

    def _write(self, h: _Handshake) -> None:
        try:
            while h.out:
                try:
                    sent = h.conn.send(h.out)
                except (BlockingIOError, InterruptedError):
                    self._watch(h, write=True)
                    return
                h.out = h.out[sent:]
        except OSError as exc:
            if h.stream_id is not None:
                self._peer_log.warning(
                    "error",
                    "stream handshake failed stream_id=%s error=%r",
                    escape(h.stream_id),
                    exc,
                )
            self._finish(h, "error")
            return
        stream_id = h.stream_id
        if stream_id is None:  # an error text went out: done with this one
            assert h.refusal is not None
            self._finish(h, h.refusal)
            return
        self._finish(h, None)
        if self._closed:
            return
        if stream_id.startswith(POOLED_PREFIX):
            self._pooled[stream_id] = h.conn  # no TTL: the host's pool holds it
        else:
            self._streams[stream_id] = h.conn
            self._unclaimed.add(stream_id)
        log.debug("stream registered stream_id=%s", stream_id)
        self._wake(stream_id)

    # -- pooled streams (docs/protocol.md 5.6) -------------------------------------

    def take_pooled(self, prefix: str) -> tuple[str, socket.socket] | None:
        """The oldest pooled stream whose id starts with *prefix* (one host's),
        and its id, for a connection the guest relays on before the host
        answers (5.6); None when there is none."""
        for stream_id in self._pooled:
            if stream_id.startswith(prefix):
                return stream_id, self._pooled.pop(stream_id)
        return None

    def drop_pooled(self) -> int:
        """Close every pooled stream nobody claimed (the host's pool is gone:
        an answer lost with it must not leave the host relaying into one);
        how many."""
        dropped = len(self._pooled)
        for sock in self._pooled.values():
            sock.close()
        self._pooled.clear()
        if dropped:
            log.debug("pooled streams dropped count=%d", dropped)
        return dropped

    def _room_for_pooled(self) -> bool:
        """Whether one more pooled stream fits (acks being written count); at
        the cap, after dropping those whose host closed them."""
        if len(self._pooled) + self._reserved_pooled < self.max_pooled:
            return True
        self._sweep_pooled()
        return len(self._pooled) + self._reserved_pooled < self.max_pooled

    def _sweep_pooled(self) -> None:
        """Drop the pooled streams whose host closed them with nothing to read
        (a pool that stopped without this guest noticing)."""
        poller = select.poll()
        by_fd = {sock.fileno(): pool_id for pool_id, sock in self._pooled.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        for fd, events in poller.poll(0):
            if not events & (select.POLLHUP | select.POLLERR):
                continue
            sock = self._pooled[by_fd[fd]]
            with contextlib.suppress(OSError):
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    continue  # bytes for a connection about to claim it
            del self._pooled[by_fd[fd]]
            sock.close()
            log.debug("pooled stream closed by its host dropped stream_id=%s", by_fd[fd])

    def _watch(self, h: _Handshake, *, read: bool | None = None, write: bool | None = None) -> None:
        loop = self._loop
        assert loop is not None
        if read is not None and read != h.reading:
            h.reading = read
            if read:
                loop.add_reader(h.fd, self._read, h)
            else:
                loop.remove_reader(h.fd)
        if write is not None and write != h.writing:
            h.writing = write
            if write:
                loop.add_writer(h.fd, self._write, h)
            else:
                loop.remove_writer(h.fd)

    def _handshake_timed_out(self, h: _Handshake) -> None:
        self._peer_log.warning(
            "timeout",
            "stream handshake timed out stream_id=%s timeout=%s",
            "-" if h.stream_id is None else escape(h.stream_id),
            self._handshake_timeout,
        )
        self._finish(h, "timeout")

    def _finish(self, h: _Handshake, failure: str | None) -> None:
        """The one way out of a handshake, on every path: its watchers go, its
        slot and reserved id are given back (accepting resumes if it was paused
        for want of a slot). With a *failure* (the reason counted, unless an
        error text already named one) the connection is closed; with None the
        caller registers it, or the registry is closing and closes it."""
        if h.finished:
            return
        h.finished = True
        self._watch(h, read=False, write=False)
        self._handshakes.discard(h)  # no-op when its timeout removed it
        if h.stream_id is not None:
            self._reserved.discard(h.stream_id)
            if h.stream_id.startswith(POOLED_PREFIX):
                self._reserved_pooled -= 1
        reason = h.refusal or failure
        if reason is not None:
            self._refused[reason] = self._refused.get(reason, 0) + 1
        if failure is not None or self._closed:
            h.conn.close()
        if self._paused and len(self._handshakes) < self._max_handshakes:
            self._paused = False
            self._listener.start_accepting(self._on_connection, self._on_accept_error)
            log.debug("stream accepting resumed endpoint=%s", self.endpoint)

    def _expire(self, stream_id: str) -> None:
        sock = self._streams.pop(stream_id, None)
        if sock is not None:
            sock.close()
            self._expired += 1
            self._peer_log.warning(
                "expired",
                "stream never claimed, closed stream_id=%s ttl=%s",
                escape(stream_id),
                self._ttl,
            )


def open_stream_now(ep: Endpoint, stream_id: str) -> socket.socket | None:
    """Connect to a ``unix:`` stream endpoint and write the id, if neither has to
    wait: the socket, whose ack is then read with :class:`AckReader`; None
    otherwise (use :func:`open_stream`, which waits, retries and names errors).
    OSError (EMFILE, ENFILE, ENOBUFS...) when no socket can be made at all."""
    if not isinstance(ep, UnixEndpoint):
        return None
    sock = connect_unix_now(ep.path)
    if sock is None:
        return None
    data = encode_string(stream_id)
    try:
        # A fresh socket's send buffer takes a few hundred bytes whole.
        if sock.send(data) == len(data):
            return sock
    except OSError:
        pass
    sock.close()
    return None


class AckReader:
    """Reads and checks the ack of one data stream as it arrives, from a
    readiness callback (see :class:`StringReader`)."""

    __slots__ = ("_endpoint", "_reader", "stream_id")

    def __init__(self, endpoint: Endpoint, stream_id: str) -> None:
        self._endpoint = endpoint
        self.stream_id = stream_id
        self._reader = StringReader("ack")

    def read(self, sock: socket.socket) -> bool:
        """Read what is there: True once the whole ack is in and matches. Raises
        HandshakeError for a wrong, oversized or cut-off ack, OSError from recv."""
        where = f"stream {self.stream_id!r} at {self._endpoint}"
        try:
            raw = self._reader.read(sock)
        except HandshakeError as exc:
            raise HandshakeError(f"{where}: {exc}") from None
        if raw is None:
            return False
        if raw != self.stream_id.encode():
            text = raw.decode(errors="replace")
            raise HandshakeError(f"stream {self.stream_id!r} rejected by {self._endpoint}: {text}")
        return True


# Errors that mean "not there yet" while the VM boots.
_RETRYABLE = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError)


async def _handshake_opener(sock: socket.socket, ep: Endpoint, stream_id: str) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, encode_string(stream_id))
    ack = AckReader(ep, stream_id)
    while not ack.read(sock):
        await wait_ready(sock)


async def open_stream(
    ep: Endpoint,
    stream_id: str,
    *,
    timeout: float = 10.0,
    retry_for: float = 30.0,
) -> socket.socket:
    """Open data stream *stream_id* at *ep*; the returned socket belongs to the caller.

    Retries with capped, jittered backoff for up to *retry_for* seconds while
    the endpoint is missing or refuses (VM still booting); *timeout* bounds
    each connect plus handshake.
    """
    raw = stream_id.encode()
    if not raw or len(raw) > MAX_ID_LEN:
        raise ValueError(f"stream id must be 1..{MAX_ID_LEN} bytes, got {len(raw)}")
    deadline = time.monotonic() + retry_for
    backoff = Backoff(0.01, 1.0)
    attempt = 0
    while True:
        attempt += 1
        try:
            sock = await connect(ep, timeout=timeout)
        except _RETRYABLE as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StreamEndpointUnavailable(
                    f"stream {stream_id!r}: {ep} not available after {retry_for}s "
                    f"({attempt} attempts): {exc}"
                ) from exc
            log.debug(
                "stream endpoint not ready stream_id=%s endpoint=%s error=%r", stream_id, ep, exc
            )
            await asyncio.sleep(min(remaining, backoff.next()))
            continue
        try:
            async with asyncio.timeout(timeout):
                await _handshake_opener(sock, ep, stream_id)
        except TimeoutError:
            sock.close()
            raise TimeoutError(f"stream {stream_id!r} at {ep}: no ack within {timeout}s") from None
        except BaseException:
            sock.close()
            raise
        log.debug("stream opened stream_id=%s endpoint=%s", stream_id, ep)
        return sock

"""The data-stream channel (SPEC 3.3): one connection per forwarded stream.

Wire: the opener writes the stream id as a string (u32 big-endian length, then
UTF-8 bytes); the listener answers with the same id (the ack), or with an
error text and closes. After the ack the connection carries raw bytes.

:class:`StreamRegistry` is the listening side (in the VM), :func:`open_stream`
the opening side (on the host).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from types import TracebackType
from typing import Final

from socketforward.transport import Backoff, Endpoint, Listener, connect

__all__ = [
    "MAX_ID_LEN",
    "HandshakeError",
    "StreamEndpointUnavailable",
    "StreamNotFound",
    "StreamRegistry",
    "open_stream",
]

log = logging.getLogger(__name__)

MAX_ID_LEN: Final = 256
_LEN: Final = struct.Struct(">I")


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


async def _recv_exactly(sock: socket.socket, n: int, what: str) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        try:
            # Usually already there: skips a reader registration and a loop pass.
            chunk = sock.recv(n - len(buf))
        except (BlockingIOError, InterruptedError):
            chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise HandshakeError(f"connection closed after {len(buf)} of {n} bytes of {what}")
        buf += chunk
    return bytes(buf)


async def _read_string(sock: socket.socket, what: str) -> bytes:
    """Read a length-prefixed string, refusing lengths over MAX_ID_LEN unread."""
    (size,) = _LEN.unpack(await _recv_exactly(sock, _LEN.size, f"{what} length"))
    if size > MAX_ID_LEN:
        raise HandshakeError(f"{what} length {size} exceeds the limit of {MAX_ID_LEN} bytes")
    return await _recv_exactly(sock, size, what)


def _decode_id(raw: bytes) -> str:
    if not raw:
        raise HandshakeError("empty stream id")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise HandshakeError(f"stream id is not valid UTF-8: {raw[:64]!r}") from None


class StreamRegistry:
    """Accepts data streams on a listener and hands each out exactly once.

    Each connection is handshaken in its own task with its own timeout, so a
    silent peer stalls nobody else. Unclaimed connections are closed after
    *ttl* seconds. Takes ownership of *listener*.
    """

    def __init__(
        self,
        listener: Listener,
        *,
        handshake_timeout: float = 10.0,
        ttl: float = 30.0,
    ) -> None:
        self._listener = listener
        self._handshake_timeout = handshake_timeout
        self._ttl = ttl
        self._streams: dict[str, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self._reserved: set[str] = set()  # ids whose ack is being written
        self._arrivals: dict[str, list[asyncio.Future[None]]] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self._listener.endpoint

    def __len__(self) -> int:
        """Registered connections waiting to be claimed."""
        return len(self._streams)

    def start(self) -> None:
        """Start accepting (idempotent); needs a running loop."""
        if self._closed:
            raise RuntimeError("StreamRegistry is closed")
        if self._accept_task is None:
            self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

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
        """Stop accepting, cancel handshakes, close unclaimed connections. Idempotent."""
        if not self._closed:
            self._closed = True
            tasks = list(self._handshakes)
            if self._accept_task is not None:
                tasks.append(self._accept_task)
            for task in tasks:
                task.cancel()
            for sock, timer in self._streams.values():
                timer.cancel()
                sock.close()
            self._streams.clear()
            for stream_id in list(self._arrivals):
                self._wake(stream_id)  # waiters re-check and find nothing
            await asyncio.gather(*tasks, return_exceptions=True)
        # The accept task may never have run, so close the listener here.
        self._listener.close()

    def get(self, stream_id: str) -> socket.socket:
        """Hand out the connection registered as *stream_id*; the caller owns it."""
        entry = self._streams.pop(stream_id, None)
        if entry is None:
            raise StreamNotFound(f"stream {stream_id!r} not found")
        sock, timer = entry
        timer.cancel()
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

    # -- internals ----------------------------------------------------------

    async def _accept_loop(self) -> None:
        try:
            while True:
                try:
                    conn = await self._listener.accept()
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning.
                    log.warning("stream accept failed endpoint=%s error=%r", self.endpoint, exc)
                    await asyncio.sleep(0.1)
                    continue
                task = asyncio.get_running_loop().create_task(self._handshake(conn))
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)
        finally:
            self._listener.close()

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        stream_id: str | None = None
        registered = False
        try:
            async with asyncio.timeout(self._handshake_timeout):
                try:
                    stream_id = _decode_id(await _read_string(conn, "stream id"))
                except HandshakeError as exc:
                    log.warning("stream handshake rejected error=%r", str(exc))
                    with contextlib.suppress(OSError):
                        await loop.sock_sendall(conn, encode_string(str(exc)))
                    return
                if stream_id in self._streams or stream_id in self._reserved:
                    log.warning("stream handshake rejected stream_id=%s error=duplicate", stream_id)
                    with contextlib.suppress(OSError):
                        await loop.sock_sendall(
                            conn, encode_string(f"stream {stream_id!r} already exists")
                        )
                    return
                self._reserved.add(stream_id)
                try:
                    await loop.sock_sendall(conn, encode_string(stream_id))
                finally:
                    self._reserved.discard(stream_id)
            timer = loop.call_later(self._ttl, self._expire, stream_id)
            self._streams[stream_id] = (conn, timer)
            registered = True
            log.debug("stream registered stream_id=%s", stream_id)
            self._wake(stream_id)
        except TimeoutError:
            log.warning(
                "stream handshake timed out stream_id=%s timeout=%s",
                stream_id,
                self._handshake_timeout,
            )
        except OSError as exc:
            log.warning("stream handshake failed stream_id=%s error=%r", stream_id, exc)
        finally:
            if not registered:
                conn.close()

    def _expire(self, stream_id: str) -> None:
        entry = self._streams.pop(stream_id, None)
        if entry is not None:
            entry[0].close()
            log.warning("stream never claimed, closed stream_id=%s ttl=%s", stream_id, self._ttl)


# Errors that mean "not there yet" while the VM boots.
_RETRYABLE = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError)


async def _handshake_opener(sock: socket.socket, ep: Endpoint, stream_id: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, encode_string(stream_id))
    try:
        raw = await _read_string(sock, "ack")
    except HandshakeError as exc:
        raise HandshakeError(f"stream {stream_id!r} at {ep}: {exc}") from None
    if raw != stream_id.encode():
        text = raw.decode(errors="replace")
        raise HandshakeError(f"stream {stream_id!r} rejected by {ep}: {text}")


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

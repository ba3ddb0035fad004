"""The asyncio edge shared by client and server connections: bytes from the
transport go into the sans-IO :class:`Connection`, events come out to the
subclass; writes respect the transport's flow control."""

from __future__ import annotations

import asyncio
import logging
import socket
import typing

from ._connection import Connection, Event
from ._fd_transport import FdTransport
from ._state import Role
from .errors import Code, TtrpcError
from .stream import MessageQueue

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0
"""How long closing waits for the peer to take what is still buffered."""

STREAM_FULL_TIMEOUT = 1.0
"""How long a full stream may hold up the connection without its consumer taking a
message before the stream is closed (as Go's ttrpc)."""

# Socket families every event loop's own transports take.
_LOOP_FAMILIES = frozenset({socket.AF_UNIX, socket.AF_INET, socket.AF_INET6})

FLUSH_THRESHOLD = 64 * 1024
"""Frames written in one loop pass go out in one syscall, up to this many bytes."""


class Channel(asyncio.Protocol):
    role: Role

    def __init__(self) -> None:
        self.conn = Connection(self.role)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        # uvloop calls connection_made after connect_accepted_socket returns.
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._writable = asyncio.Event()
        self._writable.set()
        self._blocked: tuple[MessageQueue, int, Event] | None = None
        self._blocked_timer: asyncio.TimerHandle | None = None
        self._reading = True
        self._held = False  # reading stopped by the owner (hold_reading), not by a queue
        self._loop = loop
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_handle: asyncio.Handle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = typing.cast(asyncio.Transport, transport)
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        return False  # close our side too: ttrpc has no half-closed connections

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()  # wake writers; they find the connection gone
        self._out.clear()
        self._out_size = 0
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        self._blocked = None
        if not self.ready.done():
            self.ready.set_result(None)
        try:
            self.on_connection_lost(exc)
        finally:
            if not self.closed.done():
                self.closed.set_result(None)

    # -- for subclasses ----------------------------------------------------

    def handle_event(self, event: Event) -> None:
        raise NotImplementedError

    def on_connection_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def on_stream_full(self, stream_id: int) -> None:
        """A stream's consumer stalled past STREAM_FULL_TIMEOUT; end that stream."""
        raise NotImplementedError

    def deliver(self, queue: MessageQueue, stream_id: int, data: bytes, event: Event) -> bool:
        """Queue a message; when the queue is full, stop reading the connection
        until the consumer catches up (or the stream is closed after a timeout).
        Returns False when the event is held back for later."""
        if queue.offer(data):
            return True
        self._blocked = (queue, stream_id, event)
        self._set_reading(False)
        self._blocked_timer = self._loop.call_later(STREAM_FULL_TIMEOUT, self._stream_full)
        return False

    def queue_has_space(self, queue: MessageQueue) -> None:
        """MessageQueue callback: a consumer took a message from a queue at least
        half full. Reading resumes once the queue is down to half (not on every
        message, which would flip reading on and off per message)."""
        blocked = self._blocked
        if blocked is None or blocked[0] is not queue:
            return
        if not queue.below_low_water:
            if self._blocked_timer is not None:  # progress: a fresh timeout
                self._blocked_timer.cancel()
            self._blocked_timer = self._loop.call_later(STREAM_FULL_TIMEOUT, self._stream_full)
            return
        self._unblock()
        self.handle_event(blocked[2])
        self._pump()

    async def attach(self, sock: socket.socket) -> None:
        """Run this channel on ``sock`` (connected, dialed or accepted); owns it from here."""
        sock.setblocking(False)
        try:
            if sock.family in _LOOP_FAMILIES:
                await self._loop.connect_accepted_socket(lambda: self, sock)
            else:
                # AF_VSOCK: uvloop's transports refuse it; this one works on any loop.
                FdTransport(self._loop, sock, self)
        except BaseException:
            sock.close()
            raise
        await self.ready

    def is_connected(self) -> bool:
        return self.transport is not None and not self.closed.done()

    def check_open(self) -> None:
        """Raise UNAVAILABLE when the connection can no longer be written."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise TtrpcError(Code.UNAVAILABLE, "ttrpc: connection closed")

    async def write(self, data: bytes) -> None:
        """Write one or more whole frames, then wait while the peer is not reading."""
        self.check_open()
        self.write_nowait(data)
        if not self._writable.is_set():
            await self._writable.wait()
            if self.closed.done():
                raise TtrpcError(Code.UNAVAILABLE, "ttrpc: connection closed")

    @property
    def write_buffer_size(self) -> int:
        """Bytes written and not yet taken by the kernel: frames gathered for
        the end of this loop pass plus the transport's buffer."""
        transport = self.transport
        if transport is None or self.closed.done():
            return 0
        return self._out_size + transport.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The transport's flow-control marks (asyncio's meaning: pause writers
        past *high*, resume them at *low*)."""
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high, low)

    async def drain(self) -> None:
        """Send what is gathered, then wait while the transport has writers
        paused (its buffer went past the high mark and is not yet at the low one)."""
        self._flush()
        if not self._writable.is_set():
            await self._writable.wait()

    def write_nowait(self, data: bytes) -> None:
        """Write whole frames: the first of a loop pass goes out at once (no added
        latency), later ones are gathered and leave together at the end of the pass."""
        if self._flush_handle is None:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
            self._flush_handle = self._loop.call_soon(self._flush)
            return
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= FLUSH_THRESHOLD:
            self._flush()
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        out = self._out
        if not out:
            return
        self._out = []
        self._out_size = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close once the frames already written are sent, or abort after
        *timeout* seconds: a peer that stopped reading (a frozen VM) must not
        hold a shutdown up for good."""
        self._flush()
        if self.transport is None or self.closed.done():
            return
        self.transport.close()
        if self._abort_timer is None and not self.closed.done():
            self._abort_timer = self._loop.call_later(timeout, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if self.transport is not None and not self.closed.done():
            log.warning("ttrpc: peer not reading, connection aborted after close timeout")
            self.transport.abort()

    # -- internals ---------------------------------------------------------

    def _pump(self) -> None:
        conn = self.conn
        while self._blocked is None and not self.closed.done():
            event = conn.next_event()
            if event is None:
                return
            self.handle_event(event)

    def _unblock(self) -> None:
        self._blocked = None
        if self._blocked_timer is not None:
            self._blocked_timer.cancel()
            self._blocked_timer = None
        self._set_reading(True)

    def _stream_full(self) -> None:
        blocked = self._blocked
        if blocked is None:
            return
        _, stream_id, _ = blocked
        self._unblock()
        log.warning("ttrpc: stream receive queue full for %.1fs, closing stream_id=%d",
                    STREAM_FULL_TIMEOUT, stream_id)  # fmt: skip
        self.on_stream_full(stream_id)
        self._pump()

    def hold_reading(self, held: bool) -> None:
        """Stop reading the connection (the peer's writes then push back on it),
        or go on once no stream's full queue holds it either."""
        self._held = held
        if held:
            self._set_reading(False)
        elif self._blocked is None:
            self._set_reading(True)

    def _set_reading(self, reading: bool) -> None:
        if reading and self._held:
            return
        if self._reading == reading or self.transport is None or self.transport.is_closing():
            return
        self._reading = reading
        if reading:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

"""A stream-socket transport on ``loop.add_reader``/``add_writer``, for socket
families an event loop's own transports refuse: uvloop's
``connect_accepted_socket`` takes only AF_UNIX and AF_INET[6], and ttrpc runs
over AF_VSOCK in a VM. It does what a ttrpc channel needs: reads into the
protocol, writes with a bounded buffer and ``pause_writing``/``resume_writing``,
``pause_reading``, close after the buffer drains, abort."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024


class FdTransport(asyncio.Transport):
    """Owns *sock* from here on; ``protocol.connection_made`` is called at once."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol
    ) -> None:
        extra: dict[str, Any] = {"socket": sock}
        for name, lookup in (("peername", sock.getpeername), ("sockname", sock.getsockname)):
            try:  # looked up now, as asyncio's transports do: later the socket may be gone
                extra[name] = lookup()
            except OSError:
                extra[name] = None
        super().__init__(extra)
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffer = bytearray()
        self._reading = False
        self._writing = False
        self._read_paused = False
        self._protocol_paused = False
        self._closing = False
        self._lost = False  # connection_lost scheduled (runs once)
        self._high = HIGH_WATER
        self._low = LOW_WATER
        protocol.connection_made(self)
        self._watch_read(True)

    # -- reading --------------------------------------------------------------

    def _watch_read(self, on: bool) -> None:
        if on and not self._reading:
            self._loop.add_reader(self._fd, self._read_ready)
        elif not on and self._reading:
            self._loop.remove_reader(self._fd)
        self._reading = on

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        if data:
            self._protocol.data_received(data)
            return
        self._watch_read(False)
        if not self._protocol.eof_received():
            self.close()

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        self._read_paused = True
        self._watch_read(False)

    def resume_reading(self) -> None:
        self._read_paused = False
        if not self._closing:
            self._watch_read(True)

    # -- writing --------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._force_close(exc)
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._write_ready)
            self._writing = True
        self._buffer += data
        if not self._protocol_paused and len(self._buffer) > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        del self._buffer[:sent]
        if self._protocol_paused and len(self._buffer) <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()
        if self._buffer:
            return
        self._loop.remove_writer(self._fd)
        self._writing = False
        if self._closing:
            self._connection_lost(None)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        # As asyncio's transports: defaults derive from each other, the new
        # marks apply at once.
        if high is None:
            high = HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if not self._protocol_paused and len(self._buffer) > high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return False

    # -- closing --------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; close once what is buffered is written."""
        if self._closing:
            return
        self._closing = True
        self._watch_read(False)
        if not self._buffer:
            self._connection_lost(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("ttrpc: connection error fd=%d error=%r", self._fd, exc)
        self._closing = True
        self._buffer.clear()
        self._watch_read(False)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._connection_lost(exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        # Later, from the loop, as asyncio's transports do: never inside a
        # protocol callback that is still running.
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._finish, exc)

    def _finish(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

"""Byte relay between two stream sockets: half-close aware, bounded, splice fast path.

The relay is callback driven (``loop.add_reader``/``add_writer`` on the raw
fds), so it runs on the default asyncio loop and on uvloop alike. Each
direction moves bytes through one bounded stage: a user-space buffer (copy
mode) or a pipe (splice mode, kernel to kernel).

A direction's end can also travel out of band (docs/protocol.md 5.5): instead
of shutting *b* down, the relay reports the byte count to its :class:`EndSink`,
and the far side's count (:meth:`Relay.peer_end`) ends the direction from *b*
once that many bytes are relayed, so *b* itself is never half-closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from socketforward.transport import RESOURCE_ERRNOS, family_of, type_of

__all__ = [
    "BULK_SNDBUF",
    "COPY_BUFFER_SIZE",
    "END_TIMEOUT",
    "PIPE_SIZE",
    "EndMismatch",
    "EndSink",
    "PipePool",
    "Relay",
    "RelayStats",
    "relay",
]

log = logging.getLogger(__name__)

Mode = Literal["auto", "splice", "copy"]


class EndSink(Protocol):
    """Where a relay reports that a -> b ended (docs/protocol.md 5.5); one for
    many relays, so that a relay holds no closure of its own."""

    def announce(self, relay: Relay, total: int) -> bool:
        """Tell the far side of *relay*'s b that a -> b carried *total* bytes
        in all; False when that cannot be sent (b is shut down instead)."""


Ending = Literal["eof", "reset", "error", "cancelled"]

COPY_BUFFER_SIZE: Final = 256 * 1024
PIPE_SIZE: Final = 1 << 20
BULK_SNDBUF: Final = 4 << 20
"""SO_SNDBUF a socket gets once it fills up (see :class:`Relay`)."""
END_TIMEOUT: Final = 30.0
"""How long the bytes a peer announced may stay missing with nothing arriving."""
# Passes per wake-up before yielding to other callbacks (fairness).
_MAX_PASSES: Final = 16
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# A peer that went away, as opposed to a local failure.
_RESET_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN, errno.ETIMEDOUT}
)
# splice() not supported by this socket kind: fall back to copying.
_NO_SPLICE_ERRNOS: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class EndMismatch(Exception):
    """The far side's out-of-band byte count disagrees with what the data
    stream carried (more came, the stream ended short, or the rest never came)."""


@dataclass(slots=True)
class RelayStats:
    """What one relay did: bytes each way, how long, how it ended."""

    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    duration: float = 0.0
    ended: Ending | None = None
    mode: Literal["splice", "copy"] = "copy"
    error: str | None = None
    pipe_shortages: int = 0
    """Directions that found no pipe to be had (EMFILE...) and copied instead."""
    end_mismatch: bool = False
    """Ended because the far side's out-of-band count did not match (:class:`EndMismatch`)."""


def _can_splice(sock: socket.socket) -> bool:
    family = family_of(sock)
    return family in (socket.AF_UNIX, socket.AF_VSOCK) and type_of(sock) == socket.SOCK_STREAM


def _set_nonblocking(sock: socket.socket) -> None:
    # Accepted and dialed sockets usually are already: skip the syscall.
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)


def _choose_mode(mode: Mode, a: socket.socket, b: socket.socket) -> Literal["splice", "copy"]:
    if mode != "auto":
        return mode
    if sys.platform == "linux" and hasattr(os, "splice") and _can_splice(a) and _can_splice(b):
        return "splice"
    return "copy"


def _hung_up(sock: socket.socket) -> bool:
    """The peer of *sock* closed it whole (POLLHUP), not just its write side."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _open_pipe(size: int) -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, size)
    except OSError as exc:
        # EPERM past pipe-user-pages-soft: the default size still works.
        if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EBUSY):
            os.close(r)
            os.close(w)
            raise
    return r, w


class PipePool:
    """Empty splice pipes for reuse, owned by whoever runs many relays.

    A direction holds a pipe only while bytes are in it and hands it back when
    it drains, so idle connections hold no pipe and short ones open none:
    opening and sizing a pipe costs four syscalls, closing it two more.
    """

    def __init__(self, size: int = PIPE_SIZE, limit: int = 16) -> None:
        self.size = size
        self._limit = limit
        self._free: list[tuple[int, int]] = []
        self._closed = False

    def get(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        return _open_pipe(self.size)

    def put(self, pipe: tuple[int, int]) -> None:
        """Take back an EMPTY pipe (or close it when the pool is full or closed)."""
        if self._closed or len(self._free) >= self._limit:
            os.close(pipe[0])
            os.close(pipe[1])
        else:
            self._free.append(pipe)

    def close(self) -> None:
        self._closed = True
        while self._free:
            r, w = self._free.pop()
            os.close(r)
            os.close(w)


class _Direction:
    """One direction src -> dst. Owns its buffer or pipe, not the sockets."""

    # Slots: two of these live as long as every idle forwarded connection, so
    # what the relay holds for both (loop, pipe pool, buffer size) stays there.
    __slots__ = (
        "_pipe", "_start", "_view", "announced", "done", "dst", "dst_fd", "grow_to", "limit",
        "mode", "moved", "pending", "reading", "relay", "src", "src_eof", "src_fd", "writing",
    )  # fmt: skip

    def __init__(
        self,
        relay: Relay,
        *,
        src: socket.socket,
        dst: socket.socket,
        src_fd: int,
        dst_fd: int,
        mode: Literal["splice", "copy"],
        sndbuf: int | None,
    ) -> None:
        self.relay = relay
        self.announced = False
        self.limit: int | None = None  # bytes src carries in all, when told out of band
        self.grow_to = sndbuf  # None once applied (or never wanted)
        self.src = src
        self.dst = dst
        # The relay's fileno() ints, shared by both directions (one object per fd).
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.mode = mode
        self.moved = 0
        self.pending = 0  # bytes read from src not yet written to dst
        self.done = False
        self.src_eof = False
        self.reading = False
        self.writing = False
        self._view: memoryview | None = None  # copy mode: of the buffer, its only reference
        self._start = 0  # copy mode: pending bytes are _view[_start:_start+pending]
        self._pipe: tuple[int, int] | None = None

    # -- watchers ---------------------------------------------------------

    def start(self) -> None:
        self._watch_src(True)

    def _watch_src(self, on: bool) -> None:
        if on and not self.reading:
            # The direction itself is the callback (__call__): a bound method
            # would be one more object per watcher, held while the connection idles.
            self.relay.loop.add_reader(self.src_fd, self)
        elif not on and self.reading:
            self.relay.loop.remove_reader(self.src_fd)
        self.reading = on

    def _watch_dst(self, on: bool) -> None:
        if on and not self.writing:
            self.relay.loop.add_writer(self.dst_fd, self._on_writable)
        elif not on and self.writing:
            self.relay.loop.remove_writer(self.dst_fd)
        self.writing = on

    def stop(self) -> None:
        """Drop watchers and release the buffer/pipe. Idempotent."""
        self._watch_src(False)
        self._watch_dst(False)
        self._release()

    def _release(self) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            if self.pending == 0:
                self.relay._pipes.put(pipe)
            else:
                os.close(pipe[0])
                os.close(pipe[1])
        if self._view is not None:
            self._view.release()
            self._view = None
        self.pending = 0

    # -- events -----------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            if self.mode == "splice":
                self._pump_splice()
                self._give_back_pipe()
            else:
                self._pump_copy()
        except Exception as exc:
            self.relay.fail(exc)

    __call__ = _on_readable

    def _on_writable(self) -> None:
        try:
            if self.mode == "splice":
                self._drain_pipe()
                self._give_back_pipe()
            else:
                self._drain_buffer()
            if self.pending == 0:
                self._watch_dst(False)
                if self.src_eof:
                    self._finish()
                    return
            # Room again: read the source (copy mode only once the one buffer
            # is empty; a pipe can take more while it is still draining).
            if not self.src_eof and (self.pending == 0 or self.mode == "splice"):
                self._watch_src(True)
        except Exception as exc:
            self.relay.fail(exc)

    def _source_ended(self) -> None:
        self.src_eof = True
        self._watch_src(False)
        if self.pending == 0:
            self._finish()
        else:
            self._watch_dst(True)

    def _dst_full(self) -> None:
        """The destination took less than we had: wait for room, and if this is
        the first time, let its send buffer grow (a bulk transfer is on)."""
        if self.grow_to is not None:
            grow, self.grow_to = self.grow_to, None
            with contextlib.suppress(OSError):
                if self.dst.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < grow:
                    self.dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, grow)
        self._watch_dst(True)

    def _finish(self) -> None:
        """Source at EOF and everything written: pass the EOF on (half-close)."""
        self.stop()
        self.done = True
        if self.relay.both_done():
            # Both sides are read to EOF and both sockets close next: close()
            # tells the peer the same as shutdown() would, one wake-up fewer.
            self.relay.direction_done()
            return
        ends = self.relay.ends
        if self.relay._ends_later and self is self.relay._ab:
            # How this end travels is not known yet (see Relay.settle_ends).
            self.done = False
            self.relay._end_held = True
            return
        if ends is not None and self is self.relay._ab:
            if _hung_up(self.src):
                # The local peer closed whole: nothing can reach it any more, so
                # the data stream closes whole too, and no count need travel.
                self.relay.end_whole()
                return
            if ends.announce(self.relay, self.moved):
                # dst stays open both ways: its far side ends our direction by the count.
                self.announced = True
                self.relay.direction_done()
                return
        self.shutdown_dst()
        self.relay.direction_done()

    def shutdown_dst(self) -> None:
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # The destination already went away; its own direction reports it.
            if exc.errno not in _RESET_ERRNOS:
                raise

    # -- the far side's count ----------------------------------------------

    @property
    def received(self) -> int:
        """Bytes read from src so far (written on, or waiting to be)."""
        return self.moved + self.pending

    def end_at(self, total: int) -> None:
        """src carries *total* bytes in all: read no more, and pass the EOF
        on once they are written."""
        if self.done or self.src_eof:
            if self.received != total:
                raise EndMismatch(
                    f"peer announced {total} bytes, the data stream carried {self.received}"
                )
            return
        if total < self.received:
            raise EndMismatch(f"peer announced {total} bytes, {self.received} already came")
        self.limit = total
        if self.received == total:
            self._source_ended()

    def _room(self, want: int) -> int:
        """What may still be read of the far side's announced count."""
        assert self.limit is not None
        return min(want, self.limit - self.received)

    def _src_eof(self) -> None:
        """src read 0: the far side closed the data stream."""
        if self.limit is not None and self.received < self.limit:
            raise EndMismatch(
                f"data stream ended after {self.received} of {self.limit} announced bytes"
            )
        self._source_ended()

    # -- copy mode --------------------------------------------------------

    def _pump_copy(self) -> None:
        if self._view is None:
            self._view = memoryview(bytearray(self.relay._buffer_size))
        view = self._view
        for _ in range(_MAX_PASSES):
            # Only a direction told its far side's count has a limit (rare): no call otherwise.
            room = len(view) if self.limit is None else self._room(len(view))
            try:
                n = self.src.recv_into(view, room)
            except (BlockingIOError, InterruptedError):
                return
            if n == 0:
                self._src_eof()
                return
            self._start = 0
            self.pending = n
            self._drain_buffer()
            if self.limit is not None and self.received == self.limit:
                self._source_ended()
                return
            if self.pending:
                # Destination full: stop reading until it drains.
                self._watch_src(False)
                self._dst_full()
                return
            if n < room:
                return  # source drained; level-triggered polling says if more comes

    def _drain_buffer(self) -> None:
        view = self._view
        assert view is not None
        while self.pending:
            try:
                sent = self.dst.send(view[self._start : self._start + self.pending])
            except (BlockingIOError, InterruptedError):
                return
            self._start += sent
            self.pending -= sent
            self._count(sent)

    # -- splice mode ------------------------------------------------------

    def _give_back_pipe(self) -> None:
        if self._pipe is not None and self.pending == 0:
            pipe, self._pipe = self._pipe, None
            self.relay._pipes.put(pipe)

    def _pump_splice(self) -> None:
        pipes = self.relay._pipes
        pipe = self._pipe
        if pipe is None:
            try:
                pipe = self._pipe = pipes.get()
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    raise
                # No descriptor for a pipe: an established connection must not
                # die of it, so this direction copies through a buffer instead.
                log.debug("no pipe to be had (%s), this direction copies", exc)
                self.mode = "copy"
                self.relay.stats.pipe_shortages += 1
                self._pump_copy()
                return
        w, pipe_size = pipe[1], pipes.size
        for _ in range(_MAX_PASSES):
            room = pipe_size if self.limit is None else self._room(pipe_size)
            try:
                n = os.splice(self.src_fd, w, room, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                if self.pending:
                    # EAGAIN with bytes in the pipe may mean "pipe full" while
                    # the source stays readable: stop watching it until the
                    # destination drains, or this wakes up forever.
                    self._watch_src(False)
                    self._watch_dst(True)
                return
            except OSError as exc:
                if exc.errno in _NO_SPLICE_ERRNOS and self.moved == 0 and self.pending == 0:
                    log.debug("splice unsupported (%s), falling back to copy", exc)
                    self._release()
                    self.mode = "copy"
                    self.relay.stats.mode = "copy"
                    self._pump_copy()
                    return
                raise
            if n == 0:
                self._src_eof()
                return
            self.pending += n
            self._drain_pipe()
            if self.limit is not None and self.received == self.limit:
                self._source_ended()
                return
            if self.pending:
                self._dst_full()
            if n < room:
                return  # source drained (or pipe full); polling says if more comes

    def _drain_pipe(self) -> None:
        if not self.pending:
            return  # the pipe may be back in the pool
        assert self._pipe is not None
        r = self._pipe[0]
        while self.pending:
            try:
                n = os.splice(r, self.dst_fd, self.pending, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            self.pending -= n
            self._count(n)

    def _count(self, n: int) -> None:
        self.moved += n
        self.relay.count(self, n)


class Relay:
    """Relay between *a* and *b*; takes ownership of both sockets.

    Use :func:`relay` unless you need to look at :attr:`stats` or
    :attr:`buffered` while it runs; the arguments are :func:`relay`'s.
    """

    __slots__ = (
        "_a", "_ab", "_b", "_ba", "_buffer_size", "_closed", "_done", "_end_held", "_end_seen",
        "_end_timeout", "_end_timer", "_ends_later", "_on_done", "_own_pipes", "_pipes", "_sndbuf",
        "_t0", "ends", "ends_channel", "ends_id", "loop", "stats",
    )  # fmt: skip

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        mode: Mode = "auto",
        buffer_size: int = COPY_BUFFER_SIZE,
        pipe_size: int = PIPE_SIZE,
        sndbuf: int | None = BULK_SNDBUF,
        on_done: Callable[[RelayStats], None] | None = None,
        pipes: PipePool | None = None,
        ends: EndSink | None = None,
        ends_id: str = "",
        ends_channel: int = 0,
        end_timeout: float = END_TIMEOUT,
        ends_later: bool = False,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._a = a
        self._b = b
        self.stats = RelayStats(mode=_choose_mode(mode, a, b))
        self._buffer_size = buffer_size
        # A relay of its own keeps its pipes (at most one each way) until it ends.
        self._own_pipes = pipes is None
        self._pipes = PipePool(pipe_size, limit=2) if pipes is None else pipes
        self._sndbuf = sndbuf
        self._on_done = on_done
        self._ab: _Direction | None = None
        self._ba: _Direction | None = None
        self._done: asyncio.Future[None] | None = None  # made by run() only
        self._closed = False
        self._t0 = time.monotonic()
        self.ends = ends
        """Where a -> b's end goes instead of a shutdown of b (None: shut b down)."""
        self.ends_id = ends_id  # the data stream's id, for *ends*
        self.ends_channel = ends_channel  # the call its ends travel on, for *ends*
        self._end_timeout = end_timeout
        self._end_timer: asyncio.TimerHandle | None = None
        self._end_seen = 0
        # With ends_later, a -> b's end waits for settle_ends to say how it travels.
        self._ends_later = ends_later
        self._end_held = False

    @property
    def buffered(self) -> int:
        """Bytes read from one side and not yet written to the other."""
        return sum(d.pending for d in (self._ab, self._ba) if d is not None)

    async def run(self) -> RelayStats:
        """Relay until both directions ended; then both sockets are closed."""
        self._done = self.loop.create_future()
        try:
            self.start()
            await self._done
        except asyncio.CancelledError:
            self._close("cancelled", None)
            raise
        except BaseException as exc:
            self._close("error", exc)
            raise
        return self.stats

    def start(self) -> None:
        """Start relaying without a task of its own (``on_done`` reports the end;
        :meth:`close` ends it early): what many idle connections want."""
        try:
            a, b = self._a, self._b
            _set_nonblocking(a)
            _set_nonblocking(b)
            mode = self.stats.mode
            a_fd, b_fd = a.fileno(), b.fileno()
            self._ab = _Direction(
                self, src=a, dst=b, src_fd=a_fd, dst_fd=b_fd, mode=mode, sndbuf=self._sndbuf
            )
            self._ba = _Direction(
                self, src=b, dst=a, src_fd=b_fd, dst_fd=a_fd, mode=mode, sndbuf=self._sndbuf
            )
            self._ab.start()
            self._ba.start()
        except BaseException as exc:
            self._close("error", exc)
            raise

    def settle_ends(self, ends: EndSink | None, channel: int = 0) -> None:
        """For a relay made with ``ends_later``: a -> b's end travels to *ends* on
        *channel*, or as a shutdown of b (None). An end that came meanwhile
        goes on now."""
        self.ends, self.ends_channel = ends, channel
        self._ends_later = False
        if self._end_held and not self._closed and self._ab is not None:
            self._end_held = False
            self._ab._finish()

    def close(self) -> None:
        """End the relay now (both sockets closed); ``on_done`` sees "cancelled"."""
        self._close("cancelled", None)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- ends out of band (docs/protocol.md 5.5) ------------------------------

    def peer_end(self, total: int) -> None:
        """The far side of *b* says the direction b -> a carries *total* bytes in
        all: once that many are relayed, *a* gets its EOF. A count that does not
        match the data stream ends the relay (an :class:`EndMismatch`)."""
        ba = self._ba
        if self._closed or ba is None:
            return
        try:
            ba.end_at(total)
        except Exception as exc:
            self.fail(exc)
            return
        if not self._closed and not ba.src_eof and self._end_timer is None:
            self._end_seen = ba.received + ba.moved
            self._end_timer = self.loop.call_later(self._end_timeout, self._check_end)

    def _check_end(self) -> None:
        """The announced bytes are still missing: fine while bytes move or *a*
        is slow to take them; over when nothing moved for a whole period."""
        self._end_timer = None
        ba = self._ba
        if self._closed or ba is None or ba.src_eof or ba.limit is None:
            return
        progress = ba.received + ba.moved  # bytes read in, bytes written out
        if progress == self._end_seen and ba.pending == 0:
            self.fail(
                EndMismatch(
                    f"peer announced {ba.limit} bytes, {ba.received} came and then "
                    f"nothing for {self._end_timeout:g}s"
                )
            )
            return
        self._end_seen = progress
        self._end_timer = self.loop.call_later(self._end_timeout, self._check_end)

    def end_whole(self) -> None:
        """Both directions are over (the local peer closed whole): close now."""
        self._close("eof", None)

    def end_in_band(self) -> None:
        """The far side may never hear an *announce* made (its channel is gone):
        shut *b* down after all, as a relay without one would have."""
        ab = self._ab
        if self._closed or ab is None or not ab.announced:
            return
        ab.announced = False
        try:
            ab.shutdown_dst()
        except OSError as exc:
            self.fail(exc)

    # -- called by the directions ----------------------------------------

    def count(self, direction: _Direction, n: int) -> None:
        if direction is self._ab:
            self.stats.bytes_a_to_b += n
        else:
            self.stats.bytes_b_to_a += n

    def both_done(self) -> bool:
        return self._ab is not None and self._ba is not None and self._ab.done and self._ba.done

    def direction_done(self) -> None:
        if self.both_done():
            self._close("eof", None)

    def fail(self, exc: Exception) -> None:
        reset = isinstance(exc, OSError) and exc.errno in _RESET_ERRNOS
        ending: Ending = "reset" if reset else "error"
        # A bad count is the peer's doing: its owner logs it, rate-limited.
        if isinstance(exc, EndMismatch):
            self.stats.end_mismatch = True
        elif not reset:
            log.warning("relay failed error=%r", exc)
        self._close(ending, exc)

    def _close(self, ending: Ending, exc: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._end_timer is not None:
            self._end_timer.cancel()
            self._end_timer = None
        # Watchers go before the sockets: a closed fd must never stay registered.
        for d in (self._ab, self._ba):
            if d is not None:
                with contextlib.suppress(Exception):
                    d.stop()
        if self._own_pipes:
            self._pipes.close()
        self._a.close()
        self._b.close()
        st = self.stats
        st.ended = ending
        st.duration = time.monotonic() - self._t0
        if exc is not None:
            st.error = f"{type(exc).__name__}: {exc}"
        log.debug(
            "relay ended ended=%s mode=%s a_to_b=%d b_to_a=%d duration=%.3f%s",
            ending,
            st.mode,
            st.bytes_a_to_b,
            st.bytes_b_to_a,
            st.duration,
            f" error={st.error!r}" if st.error else "",
        )
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if self._on_done is not None:
            self._on_done(st)


async def relay(
    a: socket.socket,
    b: socket.socket,
    *,
    mode: Mode = "auto",
    buffer_size: int = COPY_BUFFER_SIZE,
    pipe_size: int = PIPE_SIZE,
    sndbuf: int | None = BULK_SNDBUF,
    pipes: PipePool | None = None,
) -> RelayStats:
    """Copy bytes both ways between *a* and *b* until both directions ended.

    Takes ownership of both sockets and closes them on every path. EOF on
    one side becomes ``shutdown(SHUT_WR)`` on the other while the opposite
    direction keeps flowing; a reset or error on either side ends both.
    Cancelling the task closes both sockets and re-raises. *sndbuf*: a
    socket's SO_SNDBUF is raised to this the first time it fills up, so bulk
    transfers take fewer wake-ups per byte while short and idle connections
    keep the kernel default (None: always the default; the kernel caps it at
    net.core.wmem_max). *pipes* shares splice pipes between relays (its size
    then wins over *pipe_size*).
    """
    return await Relay(
        a, b, mode=mode, buffer_size=buffer_size, pipe_size=pipe_size, sndbuf=sndbuf, pipes=pipes
    ).run()

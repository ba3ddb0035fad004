"""Data streams opened ahead of demand (docs/protocol.md 5.6).

A new forwarded connection otherwise waits for its data stream: a connect to
the guest's stream endpoint, the id, the guest's ack, three crossings of the
VM boundary before the host can answer. A guest of ours that says so in its
StreamEnds hello keeps a few streams the host opened earlier, each acked under
a pooled id; the answer names the one taken and goes at once. The pool
refills itself after each take, on readiness callbacks (``unix:``) or in one
task (other endpoints), and backs off while opening fails. nerdbox's guest
never sees a pooled stream: its hello has no limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from socketforward import datastream, transport
from socketforward.deadlines import Deadlines
from socketforward.logs import RateLimitedLog
from socketforward.transport import Backoff

__all__ = ["DEFAULT_POOL_SIZE", "MAX_POOL_SIZE", "PoolStats", "StreamPool"]

log = logging.getLogger("socketforward.host")

DEFAULT_POOL_SIZE: Final = 4
"""Streams kept open ahead of demand per VM (``--stream-pool``)."""
MAX_POOL_SIZE: Final = 64


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a :class:`StreamPool`'s figures."""

    size: int
    """Streams the pool keeps ready now (0 while the guest takes none)."""
    ready: int
    """Acked streams waiting to be taken."""
    opening: int
    """Streams whose ack is awaited."""
    taken: int
    """Streams handed to new connections."""
    lost: int
    """Ready streams the guest closed (a guest restart, a full registry)."""
    failed: int
    """Openings that failed (connect, ack, peer check)."""


class _Opening:
    """A pooled stream between connect and ack (hashed by identity: a
    Deadlines key)."""

    __slots__ = ("ack", "fd", "sock")

    def __init__(self, sock: socket.socket, ack: datastream.AckReader) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ack = ack


class StreamPool:
    """Up to *size* acked data streams to *endpoint*, ready for :meth:`take`.

    Empty until :meth:`start` names how many the guest keeps; :meth:`stop`
    closes them all (the RPC connection or its StreamEnds call is gone).
    *check_peer* says why a fresh stream's listener is not to be trusted
    (SO_PEERCRED), or None."""

    def __init__(
        self,
        endpoint: transport.Endpoint,
        *,
        size: int = DEFAULT_POOL_SIZE,
        stream_timeout: float = 10.0,
        check_peer: Callable[[socket.socket], str | None] = lambda sock: None,
    ) -> None:
        if not 0 <= size <= MAX_POOL_SIZE:
            raise ValueError(f"stream pool size must be 0..{MAX_POOL_SIZE}, got {size}")
        self.endpoint = endpoint
        self.max_size = size
        self._stream_timeout = stream_timeout
        self._check_peer = check_peer
        self._size = 0
        self._ready: deque[tuple[str, socket.socket]] = deque()
        # Streams whose ack is awaited, each under the stream timeout: one timer.
        self._opening: Deadlines[_Opening] = Deadlines(stream_timeout, self._ack_timed_out)
        self._task: asyncio.Task[None] | None = None  # the filler for non-unix endpoints
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = Backoff(0.05, 5.0)
        self._ids = itertools.count(1)
        self.tag = os.urandom(3).hex()
        """In each pooled id: unique across the pools of one guest (several hosts
        may share it), and how a guest tells this pool's streams apart."""
        self._taken = self._lost = self._failed = 0
        # Ready streams the guest picked and wrote to before its request came
        # (5.6): held, unwatched, until the request claims them or the timeout.
        self._guest_picks = False
        self._picked: dict[str, socket.socket] = {}
        self._picked_timeouts: Deadlines[str] = Deadlines(stream_timeout, self._pick_timed_out)
        self._log = RateLimitedLog(log)

    def stats(self) -> PoolStats:
        return PoolStats(
            size=self._size,
            ready=len(self._ready),
            opening=len(self._opening) + (self._task is not None),
            taken=self._taken,
            lost=self._lost,
            failed=self._failed,
        )

    def start(self, limit: int, *, guest_picks: bool = False) -> None:
        """Keep min(size, *limit*) streams ready (*limit*: the guest's hello).
        With *guest_picks* only :meth:`claim` hands them out: the guest picks
        them, so the host must never also :meth:`take` one."""
        self.stop()
        self._guest_picks = guest_picks
        self._size = max(0, min(self.max_size, limit))
        if self._size:
            log.info("stream pool started size=%d endpoint=%s", self._size, self.endpoint)
            self._fill()

    def stop(self) -> None:
        """Close every pooled stream; the pool stays empty until started again."""
        self._size = 0
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for opening in self._opening.drain():
            self._drop(opening)
        loop = asyncio.get_running_loop() if self._ready else None
        while self._ready:
            _, sock = self._ready.popleft()
            assert loop is not None
            loop.remove_reader(sock.fileno())
            sock.close()
        for pool_id in self._picked_timeouts.drain():
            self._picked.pop(pool_id).close()
        self._backoff.reset()
        self._log.flush()

    def take(self) -> tuple[str, socket.socket] | None:
        """A ready stream and its pooled id, for the answer to name; None when
        none is ready. Refills in the background. The caller owns the socket,
        whose reader is parked on the loop: it replaces it (a relay's
        add_reader swaps a callback, no epoll removal and re-add) or removes
        it before closing it."""
        if not self._ready or self._guest_picks:
            return None
        pool_id, sock = self._ready.popleft()
        self._hand_out(sock)
        return pool_id, sock

    def claim(self, pool_id: str) -> socket.socket | None:
        """The stream *pool_id* that the guest picked for a new connection and
        named in its request (5.6); None when the pool has no such stream ready.
        The caller owns it as after :meth:`take` (a parked reader may still be
        registered: replace it, or remove it before closing)."""
        if not self._guest_picks:
            return None  # the guest never said it picks: the host takes them
        sock = self._picked.pop(pool_id, None)
        if sock is not None:
            self._picked_timeouts.discard(pool_id)
        else:
            sock = self._claim_ready(pool_id)
            if sock is None:
                return None
        self._hand_out(sock)
        return sock

    def _hand_out(self, sock: socket.socket) -> None:
        """*sock* leaves the pool. Its watch must not act on a stream the pool no
        longer holds (the peer's bytes may come before the caller's relay): it
        is parked, to be replaced by the relay's (a callback swap instead of an
        epoll removal and re-add), or to remove itself if woken first."""
        loop, fd = asyncio.get_running_loop(), sock.fileno()
        loop.add_reader(fd, loop.remove_reader, fd)
        self._taken += 1
        loop.call_soon(self._fill)  # after the caller's answer

    def _claim_ready(self, pool_id: str) -> socket.socket | None:
        for ready in self._ready:
            if ready[0] == pool_id:
                self._ready.remove(ready)
                return ready[1]
        for opening in self._opening:
            if opening.ack.stream_id != pool_id:
                continue
            # The guest acked before it picked the stream, so the ack is here
            # already (else the stream is not the guest's to pick).
            try:
                acked = opening.ack.read(opening.sock)
            except (OSError, datastream.HandshakeError) as exc:
                self._drop(opening)
                self._failure(str(exc))
                return None
            if not acked:
                return None
            self._opening.discard(opening)
            self._backoff.reset()
            return opening.sock
        return None

    def _pick_timed_out(self, pool_id: str) -> None:
        self._picked.pop(pool_id).close()
        self._lost += 1
        self._log.warning(
            "pool_pick",
            "pooled stream written to but never named by a request, closed endpoint=%s timeout=%gs",
            self.endpoint,
            self._stream_timeout,
        )
        self._fill()

    # -- filling ----------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"{datastream.POOLED_PREFIX}{self.tag}-{next(self._ids)}"

    def _missing(self) -> bool:
        """Whether fewer streams are ready or on their way than the pool keeps."""
        return len(self._ready) + len(self._opening) + len(self._picked) < self._size

    def _trusted(self, sock: socket.socket) -> bool:
        """Whether a fresh stream's listener is the expected user; if not the
        stream is closed and the failure counted."""
        problem = self._check_peer(sock)
        if problem is None:
            return True
        sock.close()
        self._failure(f"stream endpoint served by another user {problem}")
        return False

    def _fill(self) -> None:
        if self._retry is not None or self._task is not None:
            return
        while self._missing():
            pool_id = self._next_id()
            try:
                sock = datastream.open_stream_now(self.endpoint, pool_id)
            except OSError as exc:  # EMFILE and friends: try again later
                self._failure(f"{exc!r}")
                return
            if sock is None:  # not unix:, or a connect that would wait
                self._task = asyncio.get_running_loop().create_task(self._open_slowly())
                return
            if not self._watch_ack(sock, pool_id):
                return

    def _watch_ack(self, sock: socket.socket, pool_id: str) -> bool:
        if not self._trusted(sock):
            return False
        opening = _Opening(sock, datastream.AckReader(self.endpoint, pool_id))
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(opening.fd, self._on_ack, opening)
        except OSError as exc:
            sock.close()
            self._failure(f"{exc!r}")
            return False
        self._opening.add(opening)
        return True

    def _on_ack(self, opening: _Opening) -> None:
        try:
            if not opening.ack.read(opening.sock):
                return
        except (OSError, datastream.HandshakeError) as exc:
            self._drop(opening)
            self._failure(str(exc))
            return
        self._opening.discard(opening)
        self._backoff.reset()
        self._ready_now(opening.ack.stream_id, opening.sock)

    def _ack_timed_out(self, opening: _Opening) -> None:
        self._drop(opening)
        self._failure(f"no ack within {self._stream_timeout}s")

    def _drop(self, opening: _Opening) -> None:
        self._opening.discard(opening)
        asyncio.get_running_loop().remove_reader(opening.fd)
        opening.sock.close()

    def _ready_now(self, pool_id: str, sock: socket.socket) -> None:
        # Anything readable on a ready stream is its end (or a broken guest).
        ready = (pool_id, sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_ready_readable, ready)
        self._ready.append(ready)

    def _on_ready_readable(self, ready: tuple[str, socket.socket]) -> None:
        pool_id, sock = ready
        with contextlib.suppress(ValueError):
            self._ready.remove(ready)
        asyncio.get_running_loop().remove_reader(sock.fileno())
        try:
            picked = bool(sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError):
            picked = True  # woken for nothing: still the guest's to pick
        except OSError:
            picked = False
        if picked:
            # Bytes from a connection whose request has not come yet.
            self._picked[pool_id] = sock
            self._picked_timeouts.add(pool_id)
            return
        sock.close()
        self._lost += 1
        log.debug("pooled stream closed by the guest endpoint=%s", self.endpoint)
        self._fill()

    async def _open_slowly(self) -> None:
        """The filler for endpoints whose connect waits (vsock, hvsock). Acks are
        awaited on callbacks, as on the fast path: a stream the guest has acked
        can be claimed (:meth:`claim`) before the pool has read the ack."""
        loop = asyncio.get_running_loop()
        try:
            while self._missing():
                pool_id = self._next_id()
                try:
                    sock = await transport.connect(self.endpoint, timeout=self._stream_timeout)
                except OSError as exc:
                    self._failure(str(exc))
                    return
                try:
                    await loop.sock_sendall(sock, datastream.encode_string(pool_id))
                except OSError as exc:
                    sock.close()
                    self._failure(str(exc))
                    return
                if not self._watch_ack(sock, pool_id):
                    return
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    def _failure(self, error: str) -> None:
        self._failed += 1
        delay = self._backoff.next()
        self._log.warning(
            "pool",
            "pooled stream open failed endpoint=%s retry_in=%.2fs error=%r",
            self.endpoint,
            delay,
            error,
        )
        if self._size and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(delay, self._retry_fill)

    def _retry_fill(self) -> None:
        self._retry = None
        self._fill()

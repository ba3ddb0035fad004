"""The guest's descriptor budget (docs/protocol.md 4.7, 9.2).

Container connections could otherwise take every descriptor the agent has: the
data-stream listener would then fail with EMFILE and the host's answers could
never be claimed. So the agent reserves descriptors for itself (the RPC
connection, listeners, data-stream handshakes, pooled splice pipes) and lets
container connections have the rest, counted conservatively. While the budget
is spent it stops accepting on every forward listener: new connections wait in
the kernel's listen backlog, costing no descriptor, and are accepted as soon as
earlier ones end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from socketforward.daemon import fd_limits
from socketforward.datastream import DEFAULT_MAX_HANDSHAKES

__all__ = [
    "DEFAULT_PIPE_POOL",
    "FDS_PER_CONNECTION",
    "FIXED_RESERVE",
    "Budget",
    "BudgetStats",
    "FdPlan",
]

FDS_PER_CONNECTION: Final = 6
"""The most one container connection holds: its socket, its data stream, and a
splice pipe (two descriptors) in each direction while bytes are in flight."""
FIXED_RESERVE: Final = 32
"""Descriptors the agent keeps for itself: standard streams, the event loop,
the RPC connection(s), the data-stream listener, forward listeners."""
DEFAULT_PIPE_POOL: Final = 16
"""Idle splice pipes kept for reuse (two descriptors each) with a large fd limit."""
_MIN_HANDSHAKES: Final = 4


@dataclass(frozen=True)
class FdPlan:
    """How the agent spends *fd_limit* descriptors.

    ``reserve = FIXED_RESERVE + max_handshakes + 2 * pipe_pool`` and
    ``max_connections = (fd_limit - reserve) // FDS_PER_CONNECTION`` (at least 1).
    With a small limit the handshake cap (fd_limit / 16, at least 4, at most
    DEFAULT_MAX_HANDSHAKES) and the pipe pool (fd_limit / 256, at most 16) shrink
    too, so that 128 descriptors still leave room for 14 connections.
    """

    fd_limit: int
    max_handshakes: int
    pipe_pool: int
    reserve: int
    max_connections: int

    @classmethod
    def derive(
        cls,
        fd_limit: int,
        *,
        max_handshakes: int | None = None,
        max_connections: int | None = None,
    ) -> FdPlan:
        """The plan for *fd_limit*; a given cap is taken as it is."""
        if max_handshakes is None:
            max_handshakes = min(DEFAULT_MAX_HANDSHAKES, max(_MIN_HANDSHAKES, fd_limit // 16))
        pipe_pool = min(DEFAULT_PIPE_POOL, fd_limit // 256)
        reserve = FIXED_RESERVE + max_handshakes + 2 * pipe_pool
        if max_connections is None:
            max_connections = max(1, (fd_limit - reserve) // FDS_PER_CONNECTION)
        return cls(fd_limit, max_handshakes, pipe_pool, reserve, max_connections)

    @classmethod
    def current(cls) -> FdPlan:
        """The plan for this process's soft RLIMIT_NOFILE now (1024 where unknown)."""
        limits = fd_limits()
        return cls.derive(1024 if limits is None else limits[0])

    @property
    def overcommitted(self) -> bool:
        """Whether connections at their cap could take descriptors from the reserve."""
        return self.reserve + self.max_connections * FDS_PER_CONNECTION > self.fd_limit


@dataclass(frozen=True)
class BudgetStats:
    """A snapshot of a :class:`Budget`."""

    connections: int
    """Container connections open now (waiting for the host, or relaying)."""
    max_connections: int
    held_fds: int
    """Descriptors counted against the budget (FDS_PER_CONNECTION per connection)."""
    max_fds: int
    accepting: bool
    """False while the budget is spent: new connections wait in the listen backlog."""
    pauses: int
    """How many times accepting paused for want of descriptors."""


class Budget:
    """Container connections open now against *max_connections*.

    Each connection :meth:`take` s one share when it is accepted and gives it
    back (:meth:`give_back`) exactly once, when its socket is closed, whether it
    failed while pending or ended as a relay. Reaching the cap calls *pause*;
    the first share given back after that calls *resume*.
    """

    __slots__ = ("_pause", "_resume", "accepting", "connections", "max_connections", "pauses")

    def __init__(
        self, max_connections: int, *, pause: Callable[[], None], resume: Callable[[], None]
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.max_connections = max_connections
        self.connections = 0
        self.accepting = True
        self.pauses = 0
        self._pause = pause
        self._resume = resume

    def take(self) -> None:
        """A connection was accepted."""
        self.connections += 1
        if self.accepting and self.connections >= self.max_connections:
            self.accepting = False
            self.pauses += 1
            self._pause()

    def give_back(self) -> None:
        """A connection's socket was closed."""
        if self.connections <= 0:
            raise RuntimeError("descriptor budget given back more often than taken")
        self.connections -= 1
        if not self.accepting and self.connections < self.max_connections:
            self.accepting = True
            self._resume()

    def stats(self) -> BudgetStats:
        return BudgetStats(
            connections=self.connections,
            max_connections=self.max_connections,
            held_fds=self.connections * FDS_PER_CONNECTION,
            max_fds=self.max_connections * FDS_PER_CONNECTION,
            accepting=self.accepting,
            pauses=self.pauses,
        )
